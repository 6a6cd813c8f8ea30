"""Semantic differences between two migration streams.

>>> from qmigstream.diff import diff
>>> result = diff("a.mig", "b.mig")                      # doctest: +SKIP
>>> result.equal, [d.path for d in result.differences]   # doctest: +SKIP
(False, ['0000:00:02.0/e1000/mac_reg[12]', 'pc.ram'])

What is compared, area by area (``Difference.area``):

* ``header`` - the file format version;
* ``configuration`` - machine type, configuration subsections (name, version,
  value), migration capabilities (as sets);
* ``sections`` - the sections by ``(idstr, instance)``: present in one stream
  only, section id, version, the section types seen (START/PART/END/FULL), the
  order of first appearance; and the ``QEMU_VM_COMMAND`` names in order;
* ``device`` - the state of every FULL device section, field by field, each
  stream decoded through its own VMDESCRIPTION (paths like
  ``0000:00:02.0/e1000/mac_reg[12]``); a payload either stream cannot decode
  is compared as bytes and reported with the first differing offset;
  payloads of iterative non-RAM sections (block, dirty-bitmap, VFIO) are
  compared record by record (the first differing record, with its first
  differing byte when the records are small);
* ``ram`` - the RAM blocks (names, lengths) and the pages whose *final*
  content differs: both streams are replayed into temporary sparse files
  (:mod:`qmigstream.guestmem`) and compared chunk by chunk, holes skipped.

:func:`diff` is the one call; :class:`StreamSnapshot` holds what one stream
contributes, so one snapshot can be compared with many (:func:`compare`).
"""

from __future__ import annotations

import collections

import dataclasses
import fnmatch
import hashlib
import os
import shutil
import tempfile

import numpy as np

from . import guestmem, vmstate
from .codec.records import (Command, Configuration, EndOfStream, FileHeader, OpaquePayload,
                            PackagedEnd, SectionFooter, SectionHeader, TrailingBytes,
                            VmDescription)
from .errors import QmigstreamError
from .vmstate.node import Vmsd
from .vmstate.types import NULL_POINTER
from .wire.header import SectionType as T

#: Records that end whatever section payload came before them.
_TOP_LEVEL = (SectionFooter, Command, EndOfStream, PackagedEnd, VmDescription, TrailingBytes)
AREAS = ("header", "configuration", "sections", "device", "ram")
#: Bytes read from each memory file at a time when comparing RAM.
COMPARE_CHUNK = 8 << 20
#: Payload records of iterative sections up to this size are kept whole (first
#: differing byte reported); larger ones by length and sha256.
SMALL_RECORD = 64 << 10


# -- results ------------------------------------------------------------------------

@dataclasses.dataclass
class Difference:
    """One difference.  ``kind`` is ``changed``, ``only_in_a``, ``only_in_b``,
    ``order``, ``bytes`` (opaque payloads), ``record`` (iterative sections),
    ``length`` or ``pages`` (RAM)."""

    area: str
    path: str
    kind: str
    a: object = None
    b: object = None
    offset_a: int | None = None
    offset_b: int | None = None
    detail: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"area": self.area, "path": self.path, "kind": self.kind,
             "a": _jsonable(self.a), "b": _jsonable(self.b)}
        if self.offset_a is not None or self.offset_b is not None:
            d["offset_a"], d["offset_b"] = self.offset_a, self.offset_b
        if self.detail:
            d["detail"] = _jsonable(self.detail)
        return d

    def text(self) -> str:
        at = ""
        if self.offset_a is not None or self.offset_b is not None:
            at = f"  (A @{_hex(self.offset_a)}, B @{_hex(self.offset_b)})"
        if self.kind == "only_in_a":
            return f"{self.path}: only in A{_val(self.a, ' ')}{at}"
        if self.kind == "only_in_b":
            return f"{self.path}: only in B{_val(self.b, ' ')}{at}"
        if self.kind == "pages":
            d = self.detail
            ranges = ", ".join(f"0x{s:x}-0x{e:x}" for s, e in d["ranges"][:8])
            more = f", ... ({len(d['ranges'])} ranges)" if len(d["ranges"]) > 8 else ""
            verb = "pages differ" if d["pages"] != 1 else "page differs"
            return (f"{self.path}: {d['pages']} {verb} "
                    f"({d['pages'] * d['page_size'] // 1024} KiB): {ranges}{more}")
        if self.kind == "bytes":
            d = self.detail
            return (f"{self.path}: payload bytes differ at payload offset {d['first_difference']}"
                    f" ({d['length_a']} vs {d['length_b']} bytes; {d['why']}){at}")
        if self.kind == "order":
            return f"{self.path}: {self.detail['text']}"
        if self.kind == "record":
            d = self.detail
            if self.a is None:
                return (f"{self.path}: {d['records_a']} vs {d['records_b']} payload records "
                        f"(the first {d['record']} are equal)")
            where = f" at byte {d['first_difference']}" if "first_difference" in d else ""
            what = self.a if self.a == self.b else f"{self.a} / {self.b}"
            return (f"{self.path}: payload record {d['record']} ({d['section_type_a']}, {what}, "
                    f"{d['length_a']} vs {d['length_b']} bytes) differs{where}{at}")
        extra = ""
        if "first_difference" in self.detail:
            extra = f" (first differing byte {self.detail['first_difference']})"
        return f"{self.path}: {_val(self.a) or 'none'} -> {_val(self.b) or 'none'}{extra}{at}"


@dataclasses.dataclass
class DiffResult:
    """The outcome of :func:`diff`: ``equal`` is true when ``differences`` is empty.

    ``compared`` counts what was looked at (so "equal" can be judged: equal
    after comparing 0 fields means little); ``notes`` say what could only be
    compared coarsely and why.
    """

    a: str
    b: str
    differences: list
    notes: list
    compared: dict

    @property
    def equal(self) -> bool:
        return not self.differences

    def by_area(self) -> dict:
        out = {a: [] for a in AREAS}
        for d in self.differences:
            out.setdefault(d.area, []).append(d)
        return out

    def to_json(self) -> dict:
        counts = {a: len(v) for a, v in self.by_area().items() if v}
        return {"a": self.a, "b": self.b, "equal": self.equal, "counts": counts,
                "compared": self.compared, "notes": list(self.notes),
                "differences": [d.to_json() for d in self.differences]}

    def format_text(self) -> str:
        lines = [f"A: {self.a}", f"B: {self.b}"]
        titles = {"header": "header", "configuration": "configuration",
                  "sections": "sections", "device": "device state", "ram": "RAM"}
        for area, diffs in self.by_area().items():
            if diffs:
                lines.append(f"{titles.get(area, area)}:")
                lines += [f"  {d.text()}" for d in diffs]
        for n in self.notes:
            lines.append(f"note: {n}")
        c = self.compared
        what = (f"{c.get('sections', 0)} sections, {c.get('devices_decoded', 0)} device "
                f"states field by field ({c.get('fields', 0)} fields), "
                f"{c.get('devices_opaque', 0)} as bytes")
        if c.get("ram_blocks") is not None:
            what += f", {c['ram_blocks']} RAM blocks ({c.get('ram_pages', 0)} pages)"
        else:
            what += ", RAM not compared"
        if self.equal:
            lines.append(f"equal: no differences ({what})")
        else:
            counts = ", ".join(f"{a} {len(v)}" for a, v in self.by_area().items() if v)
            lines.append(f"{len(self.differences)} difference"
                         f"{'s' if len(self.differences) != 1 else ''} ({counts}; "
                         f"compared {what})")
        return "\n".join(lines)


# -- what one stream contributes --------------------------------------------------------

@dataclasses.dataclass
class SectionEntry:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int
    types: list = dataclasses.field(default_factory=list)
    counts: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.idstr}({self.instance_id})" if self.instance_id else self.idstr


@dataclasses.dataclass
class RecordSummary:
    """One payload record of an iterative (or non-vmstate) section: enough to
    compare it without keeping big records (``data`` only up to
    :data:`SMALL_RECORD` bytes)."""

    section_type: str
    kind: str
    offset: int
    length: int
    digest: bytes
    data: bytes | None


@dataclasses.dataclass
class DevicePayload:
    """One FULL device section's payload: ``tree`` when it was decoded, else bytes only."""

    key: tuple
    name: str
    offset: int
    data: bytes
    tree: Vmsd | None
    why: str | None
    entry: dict | None = None


class StreamSnapshot:
    """Everything :func:`compare` needs from one stream, read in one pass.

    With ``ram=True`` the stream's RAM is replayed into a temporary directory
    (under ``workdir`` if given) removed by :meth:`close` / the ``with`` block.
    """

    def __init__(self, stream, *, ram: bool = True, workdir: str | None = None,
                 until_iteration: int | None = None, channels=()):
        self.name = stream if isinstance(stream, str) else "<stream>"
        self.version = None
        self.machine = None
        self.subsections = {}            # name -> (version, value)
        self.capabilities = []
        self.sections = {}               # (idstr, instance) -> SectionEntry
        self.order = []                  # keys by first appearance
        self.commands = []
        self.devices = {}                # (idstr, instance, occurrence) -> DevicePayload
        self.iterative = {}              # section key -> [RecordSummary]
        self.memory = None               # GuestMemory (closed) when ram
        self.ram_dir = None
        self._by_id = {}
        self._current = None
        self._occ = {}
        if ram:
            self.ram_dir = tempfile.mkdtemp(prefix="qmigstream-diff-", dir=workdir)
            try:
                self.memory, reader = guestmem.replay(stream, self.ram_dir,
                                                      until_iteration=until_iteration,
                                                      on_record=self._record, hash=False,
                                                      channels=channels)
            except BaseException:
                self.close()
                raise
        else:
            from .codec.reader import StreamReader
            reader = StreamReader(stream)
            for rec in reader.records():
                self._record(rec)
        self.page_size = reader.page_size

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.ram_dir is not None:
            shutil.rmtree(self.ram_dir, ignore_errors=True)
            self.ram_dir = None

    # -- collecting ---------------------------------------------------------
    def _record(self, rec):
        if isinstance(rec, SectionHeader):
            self._section(rec)
        elif isinstance(rec, _TOP_LEVEL):
            self._current = None
            if isinstance(rec, Command):
                self.commands.append(rec.name)
        elif isinstance(rec, OpaquePayload):
            self._payload(rec)
        elif isinstance(rec, FileHeader):
            self.version = rec.version
        elif isinstance(rec, Configuration):
            self.machine = rec.machine.decode("latin-1")
            for s in rec.subsections:
                self.subsections[s.name] = (s.version_id, _config_value(s))
            self.capabilities = list(rec.capabilities)
        elif self._current is not None and self._current[0].idstr != "ram":
            self._iterative(self._current[0], rec)

    def _section(self, h):
        if h.full:
            key = (h.idstr, h.instance_id)
            e = self.sections.get(key)
            if e is None:
                e = SectionEntry(h.section_id, h.idstr, h.instance_id, h.version_id, h.offset)
                self.sections[key] = e
                self.order.append(key)
            self._by_id[h.section_id] = e
        else:
            e = self._by_id.get(h.section_id)
        tname = h.type_name
        if tname not in e.types:
            e.types.append(tname)
        e.counts[tname] = e.counts.get(tname, 0) + 1
        self._current = (e, h)

    def _payload(self, rec):
        if self._current is None:
            return
        e, h = self._current
        if h.type != T.SECTION_FULL:
            self._iterative(e, rec)
            return
        base = (e.idstr, e.instance_id)
        occ = self._occ.get(base, 0)
        self._occ[base] = occ + 1
        name = e.name + (f"#{occ + 1}" if occ else "")
        tree = getattr(rec, "tree", None)
        why = None if tree is not None else (getattr(rec, "reason", None) or
                                             "not decoded")
        self.devices[base + (occ,)] = DevicePayload(base + (occ,), name, rec.offset,
                                                    rec.data, tree, why,
                                                    getattr(rec, "entry", None))

    def _iterative(self, e, rec):
        """Keep a summary of one payload record of a section compared record by record."""
        data = rec.encode()
        small = bytes(data) if len(data) <= SMALL_RECORD else None
        self.iterative.setdefault((e.idstr, e.instance_id), []).append(RecordSummary(
            self._current[1].type_name, rec.kind, rec.offset, len(data),
            hashlib.sha256(data).digest(), small))


def _config_value(s):
    v = dict(s.value)
    if "uuid" in v:
        v["uuid"] = bytes(v["uuid"]).hex()
    if "capabilities" in v:
        v["capabilities"] = list(v["capabilities"])
    return v


# -- comparing -------------------------------------------------------------------------

def diff(a, b, *, ignore_ram: bool = False, ignore=(), workdir: str | None = None,
         until_iteration: int | None = None, channels_a=(), channels_b=()) -> DiffResult:
    """Compare two streams (paths, ``-`` or file objects).

    ``ignore`` is a list of :mod:`fnmatch` patterns; a difference whose path
    matches one is dropped (e.g. ``"timer/*"``).  ``until_iteration`` compares
    memory as of that RAM iteration in both.  ``channels_a``/``channels_b``:
    recorded multifd channels of each migration (their pages count as RAM).
    Raises the :class:`~qmigstream.errors.QmigstreamError` family for unusable
    input.
    """
    with StreamSnapshot(a, ram=not ignore_ram, workdir=workdir,
                        until_iteration=until_iteration, channels=channels_a) as sa, \
            StreamSnapshot(b, ram=not ignore_ram, workdir=workdir,
                           until_iteration=until_iteration, channels=channels_b) as sb:
        return compare(sa, sb, ignore=ignore)


def compare(sa: StreamSnapshot, sb: StreamSnapshot, *, ignore=()) -> DiffResult:
    """Compare two snapshots (RAM too when both were made with ``ram=True``)."""
    out, notes = [], []
    compared = {"sections": len(set(sa.sections) | set(sb.sections)),
                "devices_decoded": 0, "devices_opaque": 0, "fields": 0,
                "ram_blocks": None, "ram_pages": 0}
    _header(sa, sb, out)
    _sections(sa, sb, out)
    _devices(sa, sb, out, notes, compared)
    if sa.memory is not None and sb.memory is not None:
        _ram(sa, sb, out, compared)
    if ignore:
        out = [d for d in out if not any(fnmatch.fnmatchcase(d.path, p) for p in ignore)]
    return DiffResult(sa.name, sb.name, out, notes, compared)


def _header(sa, sb, out):
    if sa.version != sb.version:
        out.append(Difference("header", "version", "changed", sa.version, sb.version))
    if sa.machine != sb.machine:
        out.append(Difference("configuration", "machine", "changed", sa.machine, sb.machine))
    ca, cb = set(sa.capabilities), set(sb.capabilities)
    for cap in sorted(ca - cb):
        out.append(Difference("configuration", f"capabilities/{cap}", "only_in_a"))
    for cap in sorted(cb - ca):
        out.append(Difference("configuration", f"capabilities/{cap}", "only_in_b"))
    for name in _union(sa.subsections, sb.subsections):
        va, vb = sa.subsections.get(name), sb.subsections.get(name)
        if name == "configuration/capabilities" and (va is None or vb is None):
            continue            # the capabilities are compared as sets above
        if va is None or vb is None:
            out.append(Difference("configuration", name, "only_in_b" if va is None
                                  else "only_in_a", va and va[1], vb and vb[1]))
            continue
        if va[0] != vb[0]:
            out.append(Difference("configuration", f"{name}/version", "changed", va[0], vb[0]))
        if name == "configuration/capabilities":
            continue            # compared as sets above
        if va[1] != vb[1]:
            out.append(Difference("configuration", name, "changed", va[1], vb[1]))


def _sections(sa, sb, out):
    for key in _union(sa.order, sb.order):
        ea, eb = sa.sections.get(key), sb.sections.get(key)
        if ea is None or eb is None:
            e = ea or eb
            desc = f"v{e.version_id} {'/'.join(e.types)}"
            out.append(Difference("sections", e.name, "only_in_b" if ea is None else "only_in_a",
                                  desc if ea else None, desc if eb else None,
                                  ea and ea.offset, eb and eb.offset))
            continue
        if ea.version_id != eb.version_id:
            out.append(Difference("sections", f"{ea.name}/version_id", "changed",
                                  ea.version_id, eb.version_id, ea.offset, eb.offset))
        if ea.section_id != eb.section_id:
            out.append(Difference("sections", f"{ea.name}/section_id", "changed",
                                  ea.section_id, eb.section_id, ea.offset, eb.offset))
        if set(ea.types) != set(eb.types):
            out.append(Difference("sections", f"{ea.name}/types", "changed",
                                  "/".join(ea.types), "/".join(eb.types)))
    common = [k for k in sa.order if k in sb.sections]
    common_b = [k for k in sb.order if k in sa.sections]
    if common != common_b:
        i = next(i for i, (x, y) in enumerate(zip(common, common_b)) if x != y)
        na, nb = sa.sections[common[i]].name, sb.sections[common_b[i]].name
        out.append(Difference("sections", "order", "order", detail={
            "position": i, "a": na, "b": nb,
            "text": f"sections in a different order: at position {i} of the common "
                    f"sections A has {na}, B has {nb}"}))
    if sa.commands != sb.commands:
        out.append(Difference("sections", "commands", "changed", sa.commands, sb.commands))


def _borrow(da, db, side, borrowed):
    """Decode the undecoded payload of ``db`` through ``da``'s description, if it fits."""
    if da.tree is None or db.tree is not None or da.entry is None:
        return db
    try:
        tree = vmstate.decode(da.entry, db.data, db.offset)
    except QmigstreamError:
        return db
    borrowed.setdefault(f"{side} decoded through the other stream's description "
                        f"({db.why})", []).append(db.name)
    return dataclasses.replace(db, tree=tree)


def _devices(sa, sb, out, notes, compared):
    borrowed, as_bytes = {}, {}
    for key in _union(sa.devices, sb.devices):
        da, db = sa.devices.get(key), sb.devices.get(key)
        if da is None or db is None:
            continue            # reported with the section list
        db = _borrow(da, db, "B", borrowed)
        da = _borrow(db, da, "A", borrowed)
        if da.tree is not None and db.tree is not None:
            compared["devices_decoded"] += 1
            la, lb = flatten(da.tree, da.name), flatten(db.tree, db.name)
            compared["fields"] += len(set(la) | set(lb))
            for path in _union(la, lb):
                fa, fb = la.get(path), lb.get(path)
                if fa is None or fb is None:
                    out.append(Difference("device", path, "only_in_b" if fa is None
                                          else "only_in_a", fa and fa[0], fb and fb[0],
                                          fa and fa[1], fb and fb[1]))
                elif not _same(fa[0], fb[0]):
                    detail = {"type": fa[2]}
                    if isinstance(fa[0], bytes) and isinstance(fb[0], bytes):
                        detail["first_difference"] = _first_diff(fa[0], fb[0])
                    out.append(Difference("device", path, "changed", fa[0], fb[0],
                                          fa[1], fb[1], detail))
            continue
        compared["devices_opaque"] += 1
        why = da.why if da.tree is None else db.why
        if da.data != db.data:
            k = _first_diff(da.data, db.data)
            out.append(Difference("device", da.name, "bytes", None, None,
                                  da.offset + k, db.offset + k,
                                  {"first_difference": k, "length_a": len(da.data),
                                   "length_b": len(db.data), "why": f"compared as bytes: {why}"}))
        else:
            as_bytes.setdefault(why, []).append(da.name)
    for what, names in borrowed.items():
        notes.append(f"{len(names)} device section{'s' if len(names) > 1 else ''} {what}: "
                     f"{', '.join(names)}")
    for why, names in as_bytes.items():
        notes.append(f"{len(names)} equal device section{'s' if len(names) > 1 else ''} "
                     f"compared as bytes only ({why}): {', '.join(names)}")
    for key in _union(sa.iterative, sb.iterative):
        ia, ib = sa.iterative.get(key), sb.iterative.get(key)
        if ia is None or ib is None:
            continue
        name = sa.sections[key].name if key in sa.sections else key[0]
        d = _records_diff(name, ia, ib)
        if d is not None:
            out.append(d)


def _records_diff(name, ra, rb):
    """The first payload record that differs between two record lists, or None."""
    for i, (x, y) in enumerate(zip(ra, rb)):
        if (x.section_type, x.kind, x.length, x.digest) == \
                (y.section_type, y.kind, y.length, y.digest):
            continue
        detail = {"record": i, "records_a": len(ra), "records_b": len(rb),
                  "section_type_a": x.section_type, "section_type_b": y.section_type,
                  "length_a": x.length, "length_b": y.length}
        oa, ob = x.offset, y.offset
        if x.data is not None and y.data is not None and x.kind == y.kind:
            k = _first_diff(x.data, y.data)
            detail["first_difference"] = k
            oa, ob = oa + k, ob + k
        return Difference("device", name, "record", x.kind, y.kind, oa, ob, detail)
    if len(ra) != len(rb):
        return Difference("device", name, "record", detail={
            "record": min(len(ra), len(rb)), "records_a": len(ra), "records_b": len(rb)})
    return None


def _ram(sa, sb, out, compared):
    ba, bb = sa.memory.blocks, sb.memory.blocks
    compared["ram_blocks"] = len(set(ba) | set(bb))
    for name in _union(ba, bb):
        xa, xb = ba.get(name), bb.get(name)
        if xa is None or xb is None:
            out.append(Difference("ram", name, "only_in_b" if xa is None else "only_in_a",
                                  xa and {"used_length": xa.used_length},
                                  xb and {"used_length": xb.used_length}))
            continue
        if xa.used_length != xb.used_length:
            out.append(Difference("ram", f"{name}/used_length", "length",
                                  xa.used_length, xb.used_length))
        if xa.page_size != xb.page_size:
            out.append(Difference("ram", f"{name}/page_size", "changed",
                                  xa.page_size, xb.page_size))
            continue
        ps = xa.page_size
        n = min(xa.used_length, xb.used_length)
        compared["ram_pages"] += n // ps
        runs = compare_files(xa.path, xb.path, n, ps)
        if runs:
            pages = sum(e - s for s, e in runs)
            out.append(Difference("ram", name, "pages", detail={
                "pages": pages, "page_size": ps,
                "ranges": [(s * ps, e * ps) for s, e in runs]}))


# -- RAM files -------------------------------------------------------------------------

def compare_files(path_a: str, path_b: str, length: int, page_size: int) -> list:
    """Pages in ``[0, length)`` whose bytes differ, as ``(first, end)`` page-index runs.

    Reads both files chunk by chunk (:data:`COMPARE_CHUNK`), only where at
    least one of them has data: ranges that are holes in both are skipped.
    """
    fa, fb = os.open(path_a, os.O_RDONLY), os.open(path_b, os.O_RDONLY)
    runs = []
    try:
        spans = _merge(list(guestmem.data_ranges(fa, 0, length)) +
                       list(guestmem.data_ranges(fb, 0, length)), page_size, length)
        for s, e in spans:
            pos = s
            while pos < e:
                n = min(COMPARE_CHUNK, e - pos)
                ca, cb = _pread(fa, n, pos), _pread(fb, n, pos)
                if ca != cb:
                    va = np.frombuffer(ca, dtype=np.uint8).reshape(-1, page_size)
                    vb = np.frombuffer(cb, dtype=np.uint8).reshape(-1, page_size)
                    bad = (va != vb).any(axis=1)
                    first = pos // page_size
                    for rs, re_ in guestmem._runs(bad):
                        _add_run(runs, first + rs, first + re_)
                pos += n
    finally:
        os.close(fa)
        os.close(fb)
    return runs


def _pread(fd, n, pos):
    data = os.pread(fd, n, pos)
    return data if len(data) == n else data + bytes(n - len(data))


def _merge(ranges, ps, length):
    """Union of ranges, widened to whole pages."""
    spans = sorted((s // ps * ps, min(length, -(-e // ps) * ps)) for s, e in ranges)
    out = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [tuple(x) for x in out]


def _add_run(runs, s, e):
    if runs and runs[-1][1] == s:
        runs[-1] = (runs[-1][0], e)
    else:
        runs.append((s, e))


# -- device trees ----------------------------------------------------------------------

def flatten(node: Vmsd, prefix: str) -> dict:
    """Leaves of a decoded device state: ``path -> (value, offset, type)``.

    Paths: ``section/field``, ``field[i]`` for array elements, ``field.member``
    inside structs, ``section/subsection-name/field`` inside subsections.  The
    entries of one name in a vmsd are one array, numbered in order, whichever
    way the description writes it: one entry with ``array_len`` (up to 10.x),
    one entry per element with ``index``, repeated entries without either
    (QEMU 11's arrays of structs), or segments split around NULL pointers — so a
    stream compares with another release's by element.  A name with one plain
    entry is a plain field.
    """
    out = {}
    _flatten_vmsd(node, prefix + "/", out)
    return out


def _flatten_vmsd(node, prefix, out):
    entries = collections.Counter(f.name for f in node.fields)
    position = collections.Counter()        # next element number per name
    for f in node.fields:
        path = prefix + f.name
        if f.array_len is not None:
            for i, v in enumerate(f.value):
                _flatten_value(v, f"{path}[{position[f.name] + i}]", f.element_offset(i),
                               f.type, out)
            position[f.name] += len(f.value)
        elif f.index is not None or entries[f.name] > 1:
            _flatten_value(f.value, f"{path}[{position[f.name]}]", f.offset, f.type, out)
            position[f.name] += 1
        else:
            _flatten_value(f.value, path, f.offset, f.type, out)
    for s in node.subsections:
        _flatten_vmsd(s, f"{prefix}{s.vmsd_name}/", out)


def _flatten_value(v, path, offset, type_, out):
    if isinstance(v, Vmsd):
        _flatten_vmsd(v, path + ".", out)
    elif isinstance(v, list) and v and all(isinstance(x, (Vmsd, tuple)) for x in v):
        for k, item in enumerate(v):
            if isinstance(item, tuple):                 # gtree node (key, value)
                key, val = item
                if isinstance(key, Vmsd):
                    _flatten_vmsd(key, f"{path}[{k}].key.", out)
                else:
                    out[f"{path}[{k}].key"] = (key, None, "gtree key")
                _flatten_vmsd(val, f"{path}[{k}].", out)
            else:
                _flatten_vmsd(item, f"{path}[{k}].", out)
        out[f"{path}#count"] = (len(v), offset, type_)
    elif isinstance(v, list) and type_ in ("qtailq", "qlist", "gtree"):
        out[f"{path}#count"] = (0, offset, type_)
    else:
        out[path] = (v, offset, type_)


# -- helpers ---------------------------------------------------------------------------

def _union(a, b) -> list:
    """Keys of ``a`` then those only in ``b``, each once, in order."""
    out = list(dict.fromkeys(a))
    seen = set(out)
    out += [k for k in dict.fromkeys(b) if k not in seen]
    return out


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float) and x != x and y != y:
        return True             # NaN == NaN for our purpose
    return type(x) is type(y) and x == y or (x is NULL_POINTER and y is NULL_POINTER)


def _first_diff(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    while a[lo] == b[lo]:
        lo += 1
    return lo


def _jsonable(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if v is NULL_POINTER:
        return "nullptr"
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _hex(v):
    return "-" if v is None else f"0x{v:x}"


def _val(v, lead=""):
    if v is None:
        return ""
    if isinstance(v, bool):
        s = str(v).lower()
    elif isinstance(v, int):
        s = f"0x{v:x}" if v > 9 else str(v)
    elif isinstance(v, (bytes, bytearray)):
        h = bytes(v).hex()
        s = "0x" + (h if len(h) <= 64 else h[:64] + f"... ({len(v)} bytes)")
    elif v is NULL_POINTER:
        s = "nullptr"
    else:
        s = str(_jsonable(v))
    return lead + s
