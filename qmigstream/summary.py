"""What a stream contains, gathered in one pass over its records.

Used by ``qmigstream info`` and by tools that want counts without walking the
records themselves.  Nothing here holds page data.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict

from .codec import ram_records as R
from .codec.records import (Command, Configuration, EndOfStream, OpaquePayload, SectionFooter,
                            SectionHeader, TrailingBytes, VmDescription)

_MACHINE_VERSION = re.compile(r"-(\d+)\.(\d+)$")
_ZERO_RUN = "zero run"
#: Exact record types counted on the hot path of StreamSummary.feed.
_PAGE_KINDS = {R.RamZero: "zero", R.RamPage: "normal", R.RamXbzrle: "xbzrle",
               R.RamCompressed: "compressed", R.RamZeroRun: _ZERO_RUN,
               R.RamPageRun: "normal"}
#: Compact records that stand for ``count`` page records.
_RUNS = (R.RamZeroRun, R.RamPageRun)


class SectionSummary:
    __slots__ = ("section_id", "idstr", "instance_id", "version_id", "types", "bytes",
                 "payload_bytes", "bounded_by")

    def __init__(self, hdr):
        self.section_id, self.idstr = hdr.section_id, hdr.idstr
        self.instance_id, self.version_id = hdr.instance_id, hdr.version_id
        self.types = Counter()
        self.bytes = 0
        self.payload_bytes = 0
        self.bounded_by = set()

    def to_json(self):
        return {"section_id": self.section_id, "idstr": self.idstr,
                "instance_id": self.instance_id, "version_id": self.version_id,
                "headers": dict(self.types), "bytes": self.bytes,
                "payload_bytes": self.payload_bytes,
                **({"bounded_by": sorted(self.bounded_by)} if self.bounded_by else {})}


class StreamSummary:
    def __init__(self):
        self.size = 0
        self.machine = None
        self.configuration = None
        self.capabilities = []
        self.footers = None
        self.sections = OrderedDict()     # section_id -> SectionSummary
        self.ram_blocks = []
        self.pages = Counter()            # kind -> count
        self.pages_per_block = {}         # block -> Counter
        self.ram_bytes = Counter()        # kind -> wire bytes
        self.ram_sections = Counter()     # START/PART/END -> count
        self.multifd_flushes = 0
        self.commands = Counter()
        self.trailer = None               # dict or None
        self.trailing_bytes = 0
        self.eof = False
        self.json_style = None
        self.description = None
        self.mapped_ram_bitmaps = {}

    # -- gathering ---------------------------------------------------------------
    def feed(self, rec, reader=None):
        kind = _PAGE_KINDS.get(type(rec))
        if kind is not None:
            # The hot path (page records and zero runs): same effect as the
            # general path below, with the size computed once.
            size = rec.size
            end = (rec.offset or 0) + size
            if end > self.size:
                self.size = end
            cur = self._cur
            if cur is not None:
                cur.bytes += size
                cur.payload_bytes += size
            n = rec.count if type(rec) in _RUNS else 1
            kind = "zero" if kind is _ZERO_RUN else kind
            self.pages[kind] += n
            self.ram_bytes[kind] += size
            per = self.pages_per_block.get(rec.block)
            if per is None:
                per = self.pages_per_block[rec.block] = Counter()
            per[kind] += n
            return
        end = (rec.offset or 0) + rec.size
        if end > self.size:
            self.size = end
        cur = self._cur
        if isinstance(rec, SectionHeader):
            if rec.full:
                s = self.sections.get(rec.section_id)
                if s is None:
                    s = self.sections[rec.section_id] = SectionSummary(rec)
            else:
                s = self.sections.get(rec.section_id)
            s.types[rec.type_name] += 1
            s.bytes += rec.size
            self._cur = s
            if s.idstr == "ram":
                self.ram_sections[rec.type_name] += 1
            return
        if isinstance(rec, SectionFooter):
            if cur is not None:
                cur.bytes += rec.size
            self.footers = True
            self._cur = None
            return
        if cur is not None and not isinstance(rec, (Command, EndOfStream)):
            cur.bytes += rec.size
            cur.payload_bytes += rec.size
        else:
            self._cur = None
        k = rec.kind
        if isinstance(rec, R.RamZeroRun):
            self.pages["zero"] += rec.count
            self.ram_bytes["zero"] += rec.size
            self.pages_per_block.setdefault(rec.block, Counter())["zero"] += rec.count
        elif isinstance(rec, (R.RamZero, R.RamPage, R.RamXbzrle, R.RamCompressed)):
            kind = {"ram_zero": "zero", "ram_page": "normal", "ram_xbzrle": "xbzrle",
                    "ram_compressed": "compressed"}[k]
            self.pages[kind] += 1
            self.ram_bytes[kind] += rec.size
            self.pages_per_block.setdefault(rec.block, Counter())[kind] += 1
        elif isinstance(rec, R.RamMemSize):
            self.ram_blocks = [b.to_json() for b in rec.blocks]
        elif isinstance(rec, R.RamBlockEntry):          # mapped-ram: entries on their own
            self.ram_blocks.append(rec.info.to_json())
        elif isinstance(rec, R.RamMultifdFlush):
            self.multifd_flushes += 1
        elif isinstance(rec, R.MappedRamBitmap):
            self.mapped_ram_bitmaps[rec.block] = rec.pages_set()
        elif isinstance(rec, OpaquePayload):
            if cur is not None and rec.how:
                cur.bounded_by.add(rec.how)
        elif isinstance(rec, Configuration):
            self.machine = rec.machine.decode("latin-1")
            self.configuration = rec.fields()
            self.capabilities = rec.capabilities
        elif isinstance(rec, Command):
            self.commands[rec.name] += 1
        elif isinstance(rec, EndOfStream):
            if rec.depth == 0:
                self.eof = True
        elif isinstance(rec, VmDescription):
            self.json_style = "qjson" if rec.json_bytes[:2] == b"{ " else "jsonwriter"
            info = {"offset": rec.offset, "json_length": len(rec.json_bytes),
                    "style": self.json_style}
            try:
                obj = rec.obj
                if not isinstance(obj, dict):
                    raise ValueError("the trailer's JSON is not an object")
                info["page_size"] = obj.get("page_size")
                devs = obj.get("devices", [])
                info["devices"] = len(devs) if isinstance(devs, list) else None
                info["has_configuration"] = "configuration" in obj
                self.description = obj
            except ValueError:
                info["damaged"] = True
            self.trailer = info
        elif isinstance(rec, TrailingBytes):
            if not self.trailing_bytes and self.trailer is None and self.eof and \
                    rec.data[:1] == b"\x06" and rec.size >= 5:
                # a VMDESCRIPTION whose JSON is cut short (QEMU never reads it)
                declared = int.from_bytes(rec.data[1:5], "big")
                self.trailer = {"offset": rec.offset, "json_length": declared,
                                "cut": True, "present": None}
            if self.trailer is not None and self.trailer.get("cut"):
                self.trailer["present"] = self.trailing_bytes + rec.size - 5
            self.trailing_bytes += rec.size

    _cur = None

    def finish(self, reader):
        if reader is not None:
            if self.footers is None:
                self.footers = bool(reader.footers)
            self.page_size = reader.page_size
        return self

    # -- conclusions ---------------------------------------------------------------
    def version_hints(self):
        """QEMU releases that could have written this stream, with the evidence."""
        lo, hi = (2, 4), (99, 99)
        why = []

        def at_least(v, reason):
            nonlocal lo
            why.append(f">= {v[0]}.{v[1]}: {reason}")
            lo = max(lo, v)

        def at_most(v, reason):
            nonlocal hi
            why.append(f"<= {v[0]}.{v[1]}: {reason}")
            hi = min(hi, v)
        if self.machine:
            m = _MACHINE_VERSION.search(self.machine)
            if m:
                at_least((int(m.group(1)), int(m.group(2))), f"machine type {self.machine}")
        if self.json_style == "qjson":
            at_most((5, 2), "VMDESCRIPTION written by the old QJSON writer")
        elif self.json_style == "jsonwriter":
            at_least((6, 0), "VMDESCRIPTION written by JSONWriter")
        if self.trailer and self.trailer.get("has_configuration"):
            at_least((8, 2), "VMDESCRIPTION describes the configuration")
        elif self.trailer and "has_configuration" in self.trailer and self.machine:
            # (a trailer cut short or damaged tells neither way)
            at_most((8, 1), "configuration sent but not described in VMDESCRIPTION")
        if self.multifd_flushes:
            at_least((8, 1), "RAM MULTIFD_FLUSH records")
        if self.commands.get("SWITCHOVER_START"):
            at_least((10, 0), "SWITCHOVER_START command")
        if self.pages.get("compressed"):
            at_most((9, 0), "COMPRESS_PAGE records")
        if "mapped-ram" in self.capabilities:
            at_least((9, 0), "mapped-ram capability")
        if any(s.idstr == "block" for s in self.sections.values()):
            at_most((9, 0), "block migration section")
        if hi < lo:
            why.append("evidence conflicts")
        return {"min": f"{lo[0]}.{lo[1]}", "max": None if hi == (99, 99) else f"{hi[0]}.{hi[1]}",
                "evidence": why}

    def to_json(self):
        return {
            "size": self.size,
            "machine": self.machine,
            "configuration": self.configuration,
            "capabilities": list(self.capabilities),
            "footers": self.footers,
            "page_size": getattr(self, "page_size", None),
            "qemu_version_hints": self.version_hints(),
            "sections": [s.to_json() for s in self.sections.values()],
            "ram": {"blocks": self.ram_blocks,
                    "sections": dict(self.ram_sections),
                    "pages": {k: self.pages.get(k, 0)
                              for k in ("zero", "normal", "xbzrle", "compressed")},
                    "pages_per_block": {b: dict(c) for b, c in self.pages_per_block.items()},
                    "wire_bytes": dict(self.ram_bytes),
                    "multifd_flushes": self.multifd_flushes,
                    **({"mapped_ram_pages": self.mapped_ram_bitmaps}
                       if self.mapped_ram_bitmaps else {})},
            "commands": dict(self.commands),
            "eof": self.eof,
            "trailer": self.trailer,
            "trailing_bytes": self.trailing_bytes,
        }


def summarize(path_or_file, progress=None, **options):
    from .codec.reader import StreamReader
    options.setdefault("page_runs", True)
    # Counts need each device payload's bounds, not its fields.
    options.setdefault("vmstate", False)
    reader = StreamReader(path_or_file, **options)
    s = StreamSummary()
    for rec in reader.records():
        s.feed(rec, reader)
        if progress is not None:
            progress(reader.src.offset)
    return s.finish(reader)
