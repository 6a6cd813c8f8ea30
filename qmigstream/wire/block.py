"""The ``block`` section (block migration, version 1; removed in QEMU 9.1).

Mirrors ``migration/block.c`` (``blk_send``, ``block_load``).  Each record
starts with ``be64 (sector << BDRV_SECTOR_BITS) | flags``.
"""

from enum import IntFlag

from . import schemas_on_first_use

BDRV_SECTOR_BITS = 9
BLK_MIG_BLOCK_SIZE = 1 << 20      # one chunk of data: 1 MiB


class BlockFlag(IntFlag):
    DEVICE_BLOCK = 0x01
    EOS = 0x02
    PROGRESS = 0x04
    ZERO_BLOCK = 0x08


def _schemas():
    from construct import Int64ub, Struct
    from .common import CountedString

    BlockWord = Struct("word" / Int64ub)

    #: DEVICE_BLOCK: the block device name, then (unless ZERO_BLOCK) one chunk.
    BlockDeviceName = Struct("device" / CountedString)
    return locals()


__getattr__ = schemas_on_first_use(__name__, _schemas)
