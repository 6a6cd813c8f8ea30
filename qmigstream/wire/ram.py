"""The ``ram`` section (version 4): record word, page header, bodies, block list.

Mirrors ``migration/ram.c`` (``save_page_header``, ``ram_load_precopy``,
``ram_save_setup``), ``migration/ram.h`` (flags, 10.x) and ``migration/xbzrle.c``.
Every record starts with a be64 word = ``(offset & TARGET_PAGE_MASK) | flags``.
"""

import sys
from enum import IntFlag

from . import schemas_on_first_use

RAM_SECTION_VERSION = 4


class RamFlag(IntFlag):
    FULL = 0x01            # obsolete since 2009; the loader refuses it
    ZERO = 0x02            # called COMPRESS before 2.x; u8 fill byte follows
    MEM_SIZE = 0x04        # block list
    PAGE = 0x08            # raw page
    EOS = 0x10             # end of this section's RAM payload
    CONTINUE = 0x20        # same block as the previous page record
    XBZRLE = 0x40          # delta-encoded page
    HOOK = 0x80            # RDMA control (migration/rdma.h)
    COMPRESS_PAGE = 0x100  # zlib page, QEMU <= 9.0
    MULTIFD_FLUSH = 0x200  # sync point for multifd channels, QEMU >= 8.1


#: Flags whose record carries a page header (word + optional block name).
PAGE_KINDS = RamFlag.ZERO | RamFlag.PAGE | RamFlag.XBZRLE | RamFlag.COMPRESS_PAGE

#: Records that are only the bare word.
BARE_KINDS = RamFlag.EOS | RamFlag.MULTIFD_FLUSH | RamFlag.HOOK

#: ENCODING_FLAG_XBZRLE, the byte before an XBZRLE payload.
ENCODING_FLAG_XBZRLE = 0x01

MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_ALIGN = 0x100000


def page_header():
    """Word plus block name when CONTINUE is not set (``save_page_header``)."""
    from construct import If, Int64ub, Struct
    from .common import CountedString
    return Struct(
        "word" / Int64ub,
        "block" / If(lambda ctx: not (ctx.word & RamFlag.CONTINUE), CountedString),
    )


def page_body(page_size: int):
    """PAGE: the page's raw bytes."""
    from construct import Bytes, Struct
    return Struct("data" / Bytes(page_size))


def mem_size_block(page_size_field: bool, mr_addr_field: bool, mapped_ram: bool):
    """One entry of the MEM_SIZE block list (``ram_save_setup``).

    ``page_size`` is present when postcopy-ram is on and the block's page size
    differs from the host's; ``mr_addr`` with x-ignore-shared (4.0+);
    the mapped-ram header with mapped-ram (9.0+).
    """
    from construct import Int64ub, Struct
    from .common import CountedString
    fields = ["name" / CountedString, "used_length" / Int64ub]
    if page_size_field:
        fields.append("page_size" / Int64ub)
    if mr_addr_field:
        fields.append("mr_addr" / Int64ub)
    if mapped_ram:
        fields.append("mapped_ram" / sys.modules[__name__].MappedRamHeader)
    return Struct(*fields)


def _schemas():
    from construct import Bytes, Const, Int8ub, Int16ub, Int32ub, Int64ub, Struct, this

    #: ZERO: page header + fill byte (0 since forever; old loaders memset with it).
    ZeroBody = Struct("fill" / Int8ub)

    #: XBZRLE: encoding flag, be16 length, encoded delta (xbzrle.c format).
    XbzrleBody = Struct(
        "encoding" / Const(ENCODING_FLAG_XBZRLE, Int8ub),
        "length" / Int16ub,
        "data" / Bytes(this.length),
    )

    #: COMPRESS_PAGE: be32 length + zlib stream of one page.
    CompressBody = Struct(
        "length" / Int32ub,
        "data" / Bytes(this.length),
    )

    #: mapped-ram per-block header (``MappedRamHeader``, QEMU 9.0+): packed, big-endian.
    MappedRamHeader = Struct(
        "version" / Int32ub,
        "page_size" / Int64ub,
        "bitmap_offset" / Int64ub,
        "pages_offset" / Int64ub,
    )
    return locals()


__getattr__ = schemas_on_first_use(__name__, _schemas)
