"""The ``block`` section payload (migration/block.c, QEMU <= 9.0)."""

from __future__ import annotations

import struct

from ...errors import StreamError
from ...wire import block as W
from ...wire.block import BlockFlag
from ..records import Record
from . import register

_U64 = struct.Struct(">Q")


class BlockRecord(Record):
    """One block-migration record: ``be64 (sector << 9) | flags`` and its body."""

    __slots__ = ("flags", "sector", "device", "data")
    kind = "block"

    def __init__(self, flags, sector, device=None, data=None, offset=None, depth=0):
        self.flags, self.sector, self.device, self.data = int(flags), sector, device, data
        self.offset, self.depth = offset, depth

    def encode(self):
        out = _U64.pack((self.sector << W.BDRV_SECTOR_BITS) | self.flags)
        if self.flags & BlockFlag.DEVICE_BLOCK:
            out += W.BlockDeviceName.build(dict(device=self.device))
            if not self.flags & BlockFlag.ZERO_BLOCK:
                out += bytes(self.data)
        return out

    def fields(self):
        names = [f.name for f in BlockFlag if self.flags & f]
        d = {"flags": "|".join(names) or "0", "sector": self.sector}
        if self.flags & BlockFlag.PROGRESS:
            d["progress_percent"] = self.sector
        if self.device is not None:
            d["device"] = self.device
        if self.data is not None:
            d["length"] = len(self.data)
        return d


@register("block")
class BlockSection:
    name = "block"
    self_delimiting = True

    def read(self, reader, src, header):
        while True:
            off = src.offset
            word = src.be64("block record word")
            flags = word & ((1 << W.BDRV_SECTOR_BITS) - 1)
            sector = word >> W.BDRV_SECTOR_BITS
            if flags & ~0x0F:
                raise StreamError("unknown block migration flags", off, section="block",
                                  found=f"0x{flags:x}")
            device = data = None
            if flags & BlockFlag.DEVICE_BLOCK:
                device = src.counted_string("block device name")
                if not flags & BlockFlag.ZERO_BLOCK:
                    data = src.read(W.BLK_MIG_BLOCK_SIZE, "block data")
            yield BlockRecord(flags, sector, device, data, off, header.depth)
            if flags & BlockFlag.EOS:
                return
