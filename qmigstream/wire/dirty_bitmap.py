"""The ``dirty-bitmap`` section (version 1).

Mirrors ``migration/block-dirty-bitmap.c`` (``send_bitmap_header``,
``send_bitmap_start``, ``send_bitmap_bits``, ``dirty_bitmap_load``).
"""

from enum import IntFlag

from . import schemas_on_first_use


class DirtyBitmapFlag(IntFlag):
    EOS = 0x01
    ZEROES = 0x02
    BITMAP_NAME = 0x04
    DEVICE_NAME = 0x08
    START = 0x10
    COMPLETE = 0x20
    BITS = 0x40
    EXTRA_FLAGS = 0x80    # more flag bytes follow (2 or 4 in all)


#: The flag byte(s): 1 byte, or with 0x80 set 2 or 4 bytes big-endian (loader).
FLAGS_MASK_16 = 0x8000
FLAGS_MASK_32 = 0x80000000
START_FLAGS_MASK = 0x07


def _schemas():
    from construct import Int8ub, Int32ub, Int64ub, Struct
    from .common import CountedString

    NodeName = Struct("node" / CountedString)
    BitmapName = Struct("bitmap" / CountedString)

    #: START body: be32 granularity, u8 flags (bit0 enabled, bit1 persistent, bit2 ignored).
    StartBody = Struct("granularity" / Int32ub, "flags" / Int8ub)

    #: BITS body: be64 first sector, be32 sector count; buffer unless ZEROES.
    BitsHeader = Struct("start_sector" / Int64ub, "nr_sectors" / Int32ub)
    BitsBuffer = Struct("buf_size" / Int64ub)
    return locals()


__getattr__ = schemas_on_first_use(__name__, _schemas)
