"""The ``dirty-bitmap`` section payload (migration/block-dirty-bitmap.c)."""

from __future__ import annotations

import struct

from ...errors import LimitExceeded, StreamError
from ...wire import dirty_bitmap as W
from ...wire.dirty_bitmap import DirtyBitmapFlag as F
from ..records import Record
from . import register


class DirtyBitmapRecord(Record):
    """One record: flag byte(s), optional names, then START/BITS body."""

    __slots__ = ("flags", "flag_bytes", "node", "bitmap", "granularity", "start_flags",
                 "start_sector", "nr_sectors", "buf")
    kind = "dirty_bitmap"

    def __init__(self, flags, flag_bytes=1, node=None, bitmap=None, granularity=None,
                 start_flags=None, start_sector=None, nr_sectors=None, buf=None,
                 offset=None, depth=0):
        self.flags, self.flag_bytes = flags, flag_bytes
        self.node, self.bitmap = node, bitmap
        self.granularity, self.start_flags = granularity, start_flags
        self.start_sector, self.nr_sectors, self.buf = start_sector, nr_sectors, buf
        self.offset, self.depth = offset, depth

    def encode(self):
        if self.flag_bytes == 1:
            out = bytes((self.flags,))
        elif self.flag_bytes == 2:
            out = struct.pack(">H", self.flags)
        else:
            out = struct.pack(">I", self.flags)
        if self.flags & F.DEVICE_NAME:
            out += W.NodeName.build(dict(node=self.node))
        if self.flags & F.BITMAP_NAME:
            out += W.BitmapName.build(dict(bitmap=self.bitmap))
        if self.flags & F.START:
            out += W.StartBody.build(dict(granularity=self.granularity, flags=self.start_flags))
        if self.flags & F.BITS:
            out += W.BitsHeader.build(dict(start_sector=self.start_sector,
                                           nr_sectors=self.nr_sectors))
            if not self.flags & F.ZEROES:
                out += W.BitsBuffer.build(dict(buf_size=len(self.buf))) + bytes(self.buf)
        return out

    def fields(self):
        d = {"flags": "|".join(f.name for f in F if self.flags & f and f != F.EXTRA_FLAGS)}
        for k in ("node", "bitmap", "granularity", "start_flags", "start_sector", "nr_sectors"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        if self.buf is not None:
            d["buf_size"] = len(self.buf)
        return d


@register("dirty-bitmap")
class DirtyBitmapSection:
    name = "dirty-bitmap"
    self_delimiting = True

    def read(self, reader, src, header):
        st = reader.section_state("dirty-bitmap", lambda: {"node": None, "bitmap": None})
        while True:
            off = src.offset
            flags = src.u8("dirty-bitmap flags")
            nbytes = 1
            if flags & F.EXTRA_FLAGS:
                b = src.u8("dirty-bitmap flags")
                flags = (flags << 8) | b
                nbytes = 2
                if flags & W.FLAGS_MASK_16 and flags & 0x80:
                    flags = (flags << 16) | src.be16("dirty-bitmap flags")
                    nbytes = 4
            known = F.EOS | F.ZEROES | F.BITMAP_NAME | F.DEVICE_NAME | F.START | F.COMPLETE | F.BITS
            if nbytes == 1 and flags & ~int(known):
                raise StreamError("unknown dirty-bitmap flags", off, section="dirty-bitmap",
                                  found=f"0x{flags:x}")
            rec = DirtyBitmapRecord(flags, nbytes, offset=off, depth=header.depth)
            if flags & F.DEVICE_NAME:
                rec.node = st["node"] = src.counted_string("dirty-bitmap node name")
            if flags & F.BITMAP_NAME:
                rec.bitmap = st["bitmap"] = src.counted_string("dirty-bitmap name")
            if flags & F.START:
                rec.granularity = src.be32("dirty-bitmap granularity")
                rec.start_flags = src.u8("dirty-bitmap start flags")
            if flags & F.BITS:
                rec.start_sector = src.be64("dirty-bitmap start sector")
                rec.nr_sectors = src.be32("dirty-bitmap sector count")
                if not flags & F.ZEROES:
                    boff = src.offset
                    n = src.be64("dirty-bitmap buffer size")
                    left = src.remaining_known()
                    if left is not None and n > left:
                        raise LimitExceeded("dirty-bitmap buffer larger than the rest of the input",
                                            boff, section="dirty-bitmap", found=n)
                    rec.buf = src.read(n, "dirty-bitmap buffer")
            yield rec
            if flags & F.EOS:
                return
