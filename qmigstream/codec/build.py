"""Build streams from parts: section ids, footers, CONTINUE flags, mapped-ram offsets.

The builder produces records (so what it makes is exactly what the reader
would yield for the same bytes) and keeps the bookkeeping QEMU's saver keeps:
section ids by registration, the last RAM block sent (for CONTINUE), and the
file offset (for mapped-ram areas).
"""

from __future__ import annotations

from ..wire import header as H
from ..wire.ram import MAPPED_RAM_ALIGN, MAPPED_RAM_HDR_VERSION, RamFlag
from .ram_records import (MappedRamBitmap, MappedRamChunk, RamBlockEntry, RamBlockInfo,
                          RamEos, RamMemSize, RamMultifdFlush, RamPage, RamZero, RamXbzrle)
from .records import (Command, ConfigSubsection, Configuration, EndOfStream, FileHeader,
                      SectionFooter, SectionHeader, VmDescription)

T = H.SectionType


class StreamBuilder:
    """Collects records; ``records`` is the stream, ``encode()`` its bytes."""

    def __init__(self, *, footers=True, page_size=4096):
        self.records = []
        self.footers = footers
        self.page_size = page_size
        self.offset = 0
        self.last_block = None
        self._ids = {}

    def add(self, rec):
        rec.offset = self.offset
        self.offset += len(rec.encode()) if not isinstance(rec, MappedRamChunk) else rec.length
        self.records.append(rec)
        return rec

    # -- top level -------------------------------------------------------------
    def header(self):
        return self.add(FileHeader())

    def configuration(self, machine: str, capabilities=None, uuid: bytes = None,
                      target_page_bits: int = None):
        subs = []
        if target_page_bits is not None:
            subs.append(ConfigSubsection("configuration/target-page-bits", 1,
                                         {"target_page_bits": target_page_bits}))
        if capabilities:
            subs.append(ConfigSubsection("configuration/capabilities", 1,
                                         {"capabilities": list(capabilities)}))
        if uuid is not None:
            subs.append(ConfigSubsection("configuration/uuid", 1, {"uuid": bytes(uuid)}))
        return self.add(Configuration(machine.encode("latin-1"), subs))

    def section_id(self, idstr, instance_id=0, section_id=None):
        key = (idstr, instance_id)
        if section_id is not None:
            self._ids[key] = section_id
        elif key not in self._ids:
            self._ids[key] = max(self._ids.values(), default=-1) + 1
        return self._ids[key]

    def section(self, type_, idstr, payload_records, *, instance_id=0, version_id=1,
                section_id=None):
        """One section: header, the payload records, footer (if footers are on)."""
        sid = self.section_id(idstr, instance_id, section_id)
        if type_ in (T.SECTION_START, T.SECTION_FULL):
            self.add(SectionHeader(type_, sid, idstr, instance_id, version_id))
        else:
            self.add(SectionHeader(type_, sid))
        for r in payload_records:
            self.add(r)
        if self.footers:
            self.add(SectionFooter(sid))
        return sid

    def command(self, cmd, **args):
        return self.add(Command(cmd, args))

    def eof(self):
        return self.add(EndOfStream())

    def vmdescription(self, json_bytes: bytes):
        return self.add(VmDescription(json_bytes))

    def encode(self) -> bytes:
        return b"".join(r.encode() for r in self.records)

    # -- RAM payload helpers --------------------------------------------------------
    def ram_page_record(self, block, addr, data=None, *, zero=False, xbzrle=None):
        """A ZERO/PAGE/XBZRLE record with CONTINUE set as QEMU sets it."""
        cont = RamFlag.CONTINUE if block == self.last_block else 0
        self.last_block = block
        name = block
        if zero:
            return RamZero(name, addr, RamFlag.ZERO | cont, 0)
        if xbzrle is not None:
            return RamXbzrle(name, addr, xbzrle, RamFlag.XBZRLE | cont)
        return RamPage(name, addr, data, RamFlag.PAGE | cont)

    def ram_setup_records(self, blocks, *, mapped_ram=False, multifd_flush=False):
        """MEM_SIZE with the block list; with mapped-ram also each block's area
        (bitmap all clear, pages all holes: the pages are filled in by
        :meth:`mapped_ram_fill`).  ``blocks``: list of (name, used_length) or
        RamBlockInfo.  The offsets depend on where the section starts: call
        this right before :meth:`section`, whose header length is added here.
        """
        infos = [b if isinstance(b, RamBlockInfo) else RamBlockInfo(*b) for b in blocks]
        total = sum(b.used_length for b in infos)
        self.last_block = None
        if not mapped_ram:
            out = [RamMemSize(total, infos)]
        else:
            out = [RamMemSize(total, infos, inline=False)]
            # START header: type, id, idstr "ram", instance, version.
            pos = self.offset + 1 + 4 + 1 + 3 + 4 + 4 + 8
            for b in infos:
                pos += 1 + len(b.name) + 8 + 28
                pages = b.used_length // self.page_size
                bmap = (pages + 63) // 64 * 8
                pages_off = -(-(pos + bmap) // MAPPED_RAM_ALIGN) * MAPPED_RAM_ALIGN
                b.mapped_ram = {"version": MAPPED_RAM_HDR_VERSION, "page_size": self.page_size,
                                "bitmap_offset": pos, "pages_offset": pages_off}
                out.append(RamBlockEntry(b))
                out.append(MappedRamBitmap(b.name, bytes(bmap)))
                if pages_off - pos - bmap:
                    out.append(MappedRamChunk(b.name, "padding", 0, pages_off - pos - bmap))
                out.append(MappedRamChunk(b.name, "pages", 0, b.used_length))
                pos = pages_off + b.used_length
        if multifd_flush:
            out.append(RamMultifdFlush())
        out.append(RamEos())
        return out


def mapped_ram_fill(records, block, page_index, data, page_size=4096):
    """Write one page into a built mapped-ram area (bitmap bit and page bytes)."""
    bm = next(r for r in records if isinstance(r, MappedRamBitmap) and r.block == block)
    b = bytearray(bm.data)
    word, bit = divmod(page_index, 64)
    # Host unsigned longs, little-endian on x86.
    b[word * 8 + bit // 8] |= 1 << (bit % 8)
    bm.data = bytes(b)
    area = next(r for r in records if isinstance(r, MappedRamChunk) and r.block == block
                and r.area == "pages")
    buf = bytearray(area.encode())
    buf[page_index * page_size:(page_index + 1) * page_size] = data
    area.data = bytes(buf)
