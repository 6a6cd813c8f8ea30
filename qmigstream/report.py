"""An HTML report of a stream: where its bytes go, phase by phase, in one pass.

:func:`collect` walks the records once (nothing is held but counts; page data
and device bytes are dropped as soon as they are counted) and returns a
:class:`Report`; :func:`render_html` turns it into one self-contained page
(inline CSS and SVG, no scripts, nothing fetched).  Every string that comes
from the stream (idstrs, block and machine names, reasons quoting them) is
escaped on the way out.

Phases follow QEMU's save order (``qemu_savevm_state_setup`` / ``_iterate`` /
``_complete_precopy``): ``header`` (file header and configuration),
``commands`` (commands before the first section), ``setup`` (START sections),
``iteration N`` (the N-th round of PART sections: a round ends when a section
that already sent a PART in it sends another), ``completion`` (END sections),
``devices`` (FULL sections), ``trailer`` (VMDESCRIPTION) and ``trailing
bytes``.  A command or EOF marker after the first section counts in the phase
it appears in.  The phases add up to the file size.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, OrderedDict

from . import __version__
from .codec import ram_records as R
from .codec.records import (Command, Configuration, EndOfStream, FileHeader, OpaquePayload,
                            SectionFooter, SectionHeader, TrailingBytes, VmDescription)
from .codec.sections.device import DeviceState
from .codec.sections.vfio import VfioConfig, VfioDataChunk, VfioMarker, is_vfio_idstr
from .errors import QmigstreamError
from .summary import StreamSummary

RAM_KINDS = ("zero", "normal", "xbzrle", "compressed")
_PAGE_KIND = {R.RamZero: "zero", R.RamZeroRun: "zero", R.RamPage: "normal",
              R.RamXbzrle: "xbzrle", R.RamCompressed: "compressed"}
_PHASE_OF_TYPE = {"START": "setup", "END": "completion", "FULL": "devices"}
_SUMMARY_TYPES = frozenset((Configuration, Command, EndOfStream, VmDescription, TrailingBytes,
                            R.RamMemSize, R.RamMultifdFlush, R.MappedRamBitmap))
#: Iterations are shown one by one up to this many, then in equal groups.
MAX_ITERATION_BUCKETS = 128
_RANK = {"header": 0, "commands": 1, "setup": 2, "completion": 4, "devices": 5,
         "trailer": 6, "trailing bytes": 7, "unread": 8}


def _key_rank(k):
    return (3, k) if k.__class__ is int else (_RANK.get(k, 9), 0)


class _HashingFile:
    """A raw binary file that hashes its bytes in order as they are first read.

    The reader may look ahead (the trailer at the end) and come back; bytes
    are hashed only when reading reaches them in order, and :meth:`finish`
    hashes whatever was not read (after an error, say).
    """

    def __init__(self, f):
        self._f = f
        self.h = hashlib.sha256()
        self.hashed = 0
        self._pos = f.tell() if self.seekable() else 0

    def read(self, n=-1):
        data = self._f.read(n)
        pos = self._pos
        self._pos = pos + len(data)
        if pos <= self.hashed < self._pos:
            self.h.update(memoryview(data)[self.hashed - pos:])
            self.hashed = self._pos
        return data

    def seek(self, off, whence=0):
        self._pos = self._f.seek(off, whence)
        return self._pos

    def tell(self):
        return self._pos

    def seekable(self):
        try:
            return self._f.seekable()
        except (AttributeError, ValueError, OSError):
            return False

    def fileno(self):
        return self._f.fileno()

    def finish(self):
        """Hash the rest of the input (what the reader did not read in order)."""
        if self.seekable():
            self._f.seek(self.hashed)
        elif self._pos != self.hashed:
            return self.h.hexdigest()
        while True:
            b = self._f.read(1 << 20)
            if not b:
                break
            self.h.update(b)
            self.hashed += len(b)
        return self.h.hexdigest()


class SectionInfo:
    """One section (idstr + instance) as the report shows it."""

    __slots__ = ("section_id", "idstr", "instance_id", "version_id", "types", "bytes",
                 "fields", "vmsd_name", "kinds", "opaque_reasons", "bounded_by",
                 "phase_bytes", "decoded_bytes", "opaque_bytes")

    def __init__(self, hdr):
        self.section_id, self.idstr = hdr.section_id, hdr.idstr
        self.instance_id, self.version_id = hdr.instance_id, hdr.version_id
        self.types = Counter()
        self.bytes = 0
        self.fields = 0
        self.vmsd_name = None
        self.kinds = Counter()         # payload record kinds (not device states)
        self.opaque_reasons = Counter()
        self.bounded_by = set()
        self.phase_bytes = Counter()
        self.decoded_bytes = 0         # payload bytes decoded field by field
        self.opaque_bytes = 0

    @property
    def name(self):
        return f"{self.idstr}({self.instance_id})" if self.instance_id else self.idstr

    def decoded_as(self) -> str:
        """How the payload was decoded, in words."""
        out = []
        if self.decoded_bytes:
            out.append(f"field by field ({self.fields:,} field{'s' if self.fields != 1 else ''}"
                       + (f", vmsd {self.vmsd_name}" if self.vmsd_name else "") + ")")
        if self.opaque_bytes:
            why = "; ".join(self.opaque_reasons) or "no reason given"
            how = ", ".join(sorted(self.bounded_by))
            out.append(f"opaque: {why}" + (f" (end found by {how})" if how else ""))
        if self.kinds:
            out.append("records: " + ", ".join(f"{v:,} {k}" for k, v in self.kinds.most_common()))
        return "; ".join(out) or "empty payload"


class VfioInfo:
    """A VFIO device's data chunks per phase (sizes only)."""

    def __init__(self, idstr, instance_id):
        self.idstr, self.instance_id = idstr, instance_id
        self.phases = OrderedDict()      # phase -> [count, bytes, min, max] (see Report)
        self.config_bytes = 0
        self.config_phase = None
        self.sections = []               # (type, [stub records]) for family inference
        self._shapes = set()
        self.family = None

    @property
    def name(self):
        return f"{self.idstr}({self.instance_id})" if self.instance_id else self.idstr

    @property
    def data_bytes(self):
        return sum(p[1] for p in self.phases.values())

    @property
    def chunks(self):
        return sum(p[0] for p in self.phases.values())

    def keep_new_shapes(self):
        """Drop the last PART section if one of the same shape was kept before.

        Family inference asks whether some section has a given shape (markers,
        zero-length or oversized chunks), so one of each shape is enough and the
        list stays short however many rounds there are.
        """
        if not self.sections or self.sections[-1][0] != "PART":
            return
        recs = self.sections[-1][1]
        shape = tuple((r.kind, getattr(r, "marker", None), bool(getattr(r, "data_size", 1)),
                       getattr(r, "data_size", 0) > (1 << 20)) for r in recs)
        if shape in self._shapes:
            self.sections.pop()
        else:
            self._shapes.add(shape)

    def chunk(self, key, n):
        p = self.phases.get(key)
        if p is None:
            self.phases[key] = [1, n, n, n]
        else:
            p[0] += 1
            p[1] += n
            p[2] = min(p[2], n)
            p[3] = max(p[3], n)


class _ChunkStub:
    """What family inference needs of a run of data chunks: kind and a size."""

    __slots__ = ("data_size",)
    kind = "vfio_data"

    def __init__(self, n):
        self.data_size = n


class Report:
    """Counts gathered in one pass; :meth:`feed` each record, then :meth:`finish`."""

    def __init__(self, name="stream"):
        self.name = name
        self.summary = StreamSummary()
        # While reading, iterations are kept in at most MAX_ITERATION_BUCKETS
        # buckets of ``iteration_width`` consecutive iterations (the width
        # doubles when they run out), so any number of iterations takes
        # bounded memory; the keys are phase names or bucket numbers until
        # finish() turns them into phase names in save order.
        self.phases = OrderedDict()          # phase -> bytes
        self.ram = OrderedDict()             # phase -> {kind: [records, bytes]}
        self.iteration_width = 1
        self.ram_block_bytes = OrderedDict() # block -> wire bytes of its page records
        self.ram_block_pages = OrderedDict() # block -> pages
        self.sections = OrderedDict()        # section_id -> SectionInfo
        self.vfio = OrderedDict()            # (idstr, instance) -> VfioInfo
        self.iterations = 0
        self.sha256 = None
        self.size = 0
        self.error = None                    # one line: why the stream was not read to the end
        self.error_offset = None
        self.records = 0                     # records read
        self._phase = "header"
        self._round = set()
        self._sec = None
        self._sec_phase = None
        self._vfio = None
        self._vfio_recs = None
        self._hints = {"switchover_start": False, "vmdesc_configuration": False}

    # -- gathering -----------------------------------------------------------
    def _key(self, phase):
        """The dict key of a phase: its name, or the bucket of iteration ``phase``."""
        return phase if phase.__class__ is str else (phase - 1) // self.iteration_width

    def _add(self, phase, n):
        k = self._key(phase)
        self.phases[k] = self.phases.get(k, 0) + n

    def _widen(self):
        """Halve the number of iteration buckets (merge neighbours)."""
        self.iteration_width *= 2

        def merge(d, add):
            out = OrderedDict()
            for k, v in d.items():
                if k.__class__ is int:
                    k //= 2
                    if k in out:
                        out[k] = add(out[k], v)
                        continue
                out[k] = v
            return out
        self.phases = merge(self.phases, lambda a, b: a + b)
        self.ram = merge(self.ram, lambda a, b: {k: [a[k][0] + b[k][0], a[k][1] + b[k][1]]
                                                 for k in a})
        for v in self.vfio.values():
            v.phases = merge(v.phases, lambda a, b: [a[0] + b[0], a[1] + b[1],
                                                     min(a[2], b[2]), max(a[3], b[3])])

    def feed(self, rec):
        t = type(rec)
        if t in _SUMMARY_TYPES:
            # The stream-wide facts (machine, configuration, RAM blocks, commands,
            # trailer) come from StreamSummary; sections and pages are counted
            # here, and handed to it in finish() for its version hints.
            self.summary.feed(rec)
        if t is SectionHeader:
            # the size from the fields, without building the header's bytes
            size = 14 + len(rec.idstr.encode("latin-1")) if rec.full else 5
        else:
            size = rec.size
        kind = _PAGE_KIND.get(t)
        if kind is not None:
            phase = self._sec_phase or self._phase
            if self._sec is not None:
                self._in_section(rec, self._sec, phase, size)
            else:
                self._add(phase, size)
            n = rec.count if type(rec) is R.RamZeroRun else 1
            key = self._key(phase)
            per = self.ram.get(key)
            if per is None:
                per = self.ram[key] = {k: [0, 0] for k in RAM_KINDS}
            c = per[kind]
            c[0] += n
            c[1] += size
            b = rec.block
            self.ram_block_bytes[b] = self.ram_block_bytes.get(b, 0) + size
            self.ram_block_pages[b] = self.ram_block_pages.get(b, 0) + n
            return
        if isinstance(rec, SectionHeader):
            t = rec.type_name
            if t == "PART":
                if rec.section_id in self._round or not self.iterations:
                    self.iterations += 1
                    self._round = set()
                    if (self.iterations - 1) // self.iteration_width >= MAX_ITERATION_BUCKETS:
                        self._widen()
                self._round.add(rec.section_id)
                phase = self.iterations
            else:
                phase = _PHASE_OF_TYPE[t]
                if t == "END":
                    self._round = set()
            self._phase = phase
            s = self.sections.get(rec.section_id)
            if s is None:
                s = self.sections[rec.section_id] = SectionInfo(rec)
            s.types[t] += 1
            self._sec, self._sec_phase = s, phase
            self._in_section(rec, s, phase, size)
            if is_vfio_idstr(s.idstr or ""):
                key = (s.idstr, s.instance_id)
                v = self.vfio.get(key)
                if v is None:
                    v = self.vfio[key] = VfioInfo(*key)
                self._vfio = v
                self._vfio_recs = []
                v.keep_new_shapes()
                v.sections.append((t, self._vfio_recs))
            else:
                self._vfio = None
            return
        if isinstance(rec, SectionFooter):
            self.summary.footers = True
            if self._sec is not None:
                self._in_section(rec, self._sec, self._sec_phase, size)
            else:
                self._add(self._phase, size)
            self._sec = self._sec_phase = self._vfio = None
            return
        s = self._sec
        if s is not None and not isinstance(rec, (Command, EndOfStream)):
            phase = self._sec_phase
            self._in_section(rec, s, phase, size)
            if isinstance(rec, DeviceState):
                s.decoded_bytes += size
                s.vmsd_name = rec.tree.vmsd_name
                s.fields += sum(1 for _ in rec.tree.walk())
            elif isinstance(rec, OpaquePayload):
                s.opaque_bytes += size
                if rec.reason:
                    s.opaque_reasons[rec.reason] += 1
                if rec.how:
                    s.bounded_by.add(rec.how)
            else:
                s.kinds[rec.kind] += getattr(rec, "count", 1) if rec.kind == "ram_zero_run" \
                    else 1
            if self._vfio is not None:
                self._vfio_record(rec, phase)
            return
        self._sec = self._sec_phase = self._vfio = None
        if isinstance(rec, (FileHeader, Configuration)):
            self._add("header", size)
        elif isinstance(rec, Command):
            if self._phase == "header":
                self._phase = "commands"
            self._add(self._phase, size)
            if rec.name == "SWITCHOVER_START":
                self._hints["switchover_start"] = True
        elif isinstance(rec, VmDescription):
            self._phase = "trailer"
            self._add("trailer", size)
            try:
                obj = rec.obj
                self._hints["vmdesc_configuration"] = isinstance(obj, dict) and \
                    "configuration" in obj
            except ValueError:
                pass
        elif isinstance(rec, TrailingBytes):
            self._add("trailing bytes", size)
        elif size:
            self._add(self._phase, size)

    def _in_section(self, rec, s, phase, size):
        s.bytes += size
        s.phase_bytes["iterations" if phase.__class__ is int else phase] += size
        self._add(phase, size)

    def _vfio_record(self, rec, phase):
        v, recs = self._vfio, self._vfio_recs
        if isinstance(rec, VfioDataChunk):
            n = rec.data_size
            v.chunk(self._key(phase), n)
            last = recs[-1] if recs else None
            # runs of chunks collapse into one stub (bounded memory); what family
            # inference looks at (zero-length chunks, the first oversized one) stays
            if isinstance(last, _ChunkStub) and bool(last.data_size) == bool(n):
                if n > last.data_size and last.data_size <= (1 << 20):
                    last.data_size = n
            else:
                recs.append(_ChunkStub(n))
        elif isinstance(rec, VfioConfig):
            v.config_bytes = rec.size
            v.config_phase = "iteration" if phase.__class__ is int else phase
            if not any(isinstance(r, VfioConfig) for r in recs):
                recs.append(rec)
        elif isinstance(rec, VfioMarker):
            recs.append(rec)

    def phase_name(self, key) -> str:
        if key.__class__ is not int:
            return key
        w = self.iteration_width
        a, b = key * w + 1, min((key + 1) * w, self.iterations)
        return f"iteration {a}" if a == b else f"iterations {a}–{b}"

    def _named(self, d):
        return OrderedDict((self.phase_name(k), d[k]) for k in sorted(d, key=_key_rank))

    def finish(self, reader=None):
        s = self.summary
        s.finish(reader)
        s.sections = OrderedDict(self.sections)
        for d in self.ram.values():
            for k, (n, b) in d.items():
                s.pages[k] += n
                s.ram_bytes[k] += b
        self.phases = self._named(self.phases)
        self.ram = self._named(self.ram)
        for v in self.vfio.values():
            v.phases = self._named(v.phases)
        self.size = sum(self.phases.values())
        if self.vfio:
            from .vfio.family import infer_family
            for v in self.vfio.values():
                try:
                    v.family = infer_family(v.sections, self._hints)
                except Exception:          # inference is a hint; never fail the report on it
                    v.family = None
                v.sections = []
        return self

    # -- conclusions ---------------------------------------------------------
    def iteration_phases(self):
        """Names of the iteration phases (one per bucket of iterations)."""
        return [p for p in self.phases if p.startswith("iteration")]

    def to_json(self):
        s = self.summary
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "machine": s.machine,
            "qemu_version_hints": s.version_hints(),
            "capabilities": list(s.capabilities),
            "page_size": getattr(s, "page_size", None),
            "iterations": self.iterations,
            "iterations_per_phase": self.iteration_width,
            "phases": dict(self.phases),
            "ram": {"records_per_phase": {p: {k: v[0] for k, v in d.items()}
                                          for p, d in self.ram.items()},
                    "bytes_per_phase": {p: {k: v[1] for k, v in d.items()}
                                        for p, d in self.ram.items()},
                    "bytes_per_block": dict(self.ram_block_bytes),
                    "pages_per_block": dict(self.ram_block_pages)},
            "sections": [{"section_id": x.section_id, "idstr": x.idstr,
                          "instance_id": x.instance_id, "version_id": x.version_id,
                          "headers": dict(x.types), "bytes": x.bytes, "fields": x.fields,
                          "decoded_as": x.decoded_as(),
                          "phase_bytes": dict(x.phase_bytes)}
                         for x in self.sections.values()],
            "vfio": [{"idstr": v.idstr, "instance_id": v.instance_id,
                      "family": v.family.family if v.family else None,
                      "data_bytes": v.data_bytes, "chunks": v.chunks,
                      "config_bytes": v.config_bytes,
                      "phases": {p: {"chunks": c[0], "bytes": c[1], "min": c[2], "max": c[3]}
                                 for p, c in v.phases.items()}}
                     for v in self.vfio.values()],
            "commands": dict(s.commands),
            "error": self.error,
        }


def collect(source, *, name=None, progress=None, **options) -> Report:
    """Read ``source`` (a path, ``-`` or a binary file object) once into a :class:`Report`.

    A stream that cannot be read to the end still gives a report of what came
    before the problem; ``report.error`` says what and where.
    """
    from .codec.reader import StreamReader
    if isinstance(source, (str, os.PathLike)):
        if str(source) == "-":
            import sys
            raw, owned = sys.stdin.buffer, None
            name = name or "<stdin>"
        else:
            raw = owned = open(source, "rb", buffering=0)
            name = name or os.path.basename(str(source))
    else:
        raw, owned = source, None
        name = name or getattr(source, "name", None) or "stream"
    f = _HashingFile(raw)
    rep = Report(str(name))
    reader = None
    try:
        reader = StreamReader(f, **options)
        n = 0
        for rec in reader.records():
            rep.feed(rec)
            n += 1
            rep.records = n
            if progress is not None and not n & 255:
                progress(reader.src.offset)
    except QmigstreamError as e:
        rep.error = e.one_line()
        rep.error_offset = getattr(e, "offset", None)
    finally:
        try:
            rep.sha256 = f.finish()
            total = f.hashed
        finally:
            if owned is not None:
                owned.close()
    rep.finish(reader)
    if rep.error:
        rep.phases["unread"] = max(0, total - rep.size)
        rep.size = total
    return rep


def write_report(source, output, **kw) -> Report:
    """Collect and write the HTML page to ``output``; returns the :class:`Report`."""
    rep = collect(source, **kw)
    page = render_html(rep)
    with open(output, "w", encoding="utf-8") as out:
        out.write(page)
    return rep



# --- the page -------------------------------------------------------------------------

import html as _html  # noqa: E402
import math  # noqa: E402

PHASE_COLORS = {"header": "#64748b", "commands": "#cc79a7", "setup": "#d55e00",
                "iteration": ("#0072b2", "#56b4e9"), "completion": "#009e73",
                "devices": "#e69f00", "trailer": "#8e6bbf", "trailing bytes": "#3b3b3b",
                "unread": "#b91c1c"}
KIND_COLORS = {"zero": "#9aa5b1", "normal": "#0072b2", "xbzrle": "#e69f00",
               "compressed": "#009e73"}
SECTION_COLORS = {"ram": "#0072b2", "vfio": "#cc79a7", "iterative": "#009e73",
                  "device": "#e69f00", "other": "#9aa5b1"}
SERIES_COLORS = ("#cc79a7", "#0072b2", "#e69f00", "#009e73", "#d55e00", "#56b4e9",
                 "#8e6bbf", "#9aa5b1")
KIND_LABELS = {"zero": "zero page", "normal": "full page", "xbzrle": "XBZRLE delta",
               "compressed": "compressed page"}
#: Sections shown one by one in the bytes-per-section chart; the rest are one bar.
TOP_SECTIONS = 14

_UNPRINTABLE = {c: f"\\x{c:02x}" for c in list(range(0x20)) + list(range(0x7f, 0xa0))}
_UNPRINTABLE[0x09] = "\\t"
_UNPRINTABLE[0x0a] = "\\n"
_UNPRINTABLE[0x0d] = "\\r"


def esc(s) -> str:
    """Text for HTML and SVG: control characters shown as ``\\xNN``, markup escaped."""
    s = str(s).translate(_UNPRINTABLE)
    s = "".join(c if not (0xd800 <= ord(c) <= 0xdfff or ord(c) in (0xfffe, 0xffff))
                else f"\\u{ord(c):04x}" for c in s) if any(ord(c) >= 0xd800 for c in s) else s
    return _html.escape(s, quote=True)


def _short(s, n=34) -> str:
    s = str(s)
    return s if len(s) <= n else s[:n - 1] + "\u2026"


def human(n) -> str:
    """1,234,567 -> '1.18 MiB'."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "bytes":
                return f"{int(n):,} bytes"
            return f"{n:.3g} {unit}" if n < 100 else f"{n:,.0f} {unit}"
        n /= 1024
    return f"{n} TiB"


def _unit(maxv):
    for i, u in enumerate(("bytes", "KiB", "MiB", "GiB", "TiB")):
        if maxv < 4 * 1024 ** (i + 1) or u == "TiB":
            return u, 1024 ** i


def _nice_ticks(maxv, n=5):
    """Round tick values from 0 to at least ``maxv``."""
    if maxv <= 0:
        return [0, 1]
    raw = maxv / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    k = math.ceil(maxv / step - 1e-9)
    return [i * step for i in range(k + 1)]


def _num(v) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.2f}".rstrip("0").rstrip(".")


def _fmt(x) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _svg_open(w, h, label):
    return [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" '
            f'width="{w}" height="{h}" role="img" aria-label="{esc(label)}" class="chart">',
            f"<title>{esc(label)}</title>"]


def _first_number(phase):
    m = re.search(r"\d+", phase)
    return int(m.group()) if m else 0


def _phase_color(phase, i=0):
    if phase.startswith("iteration"):
        return PHASE_COLORS["iteration"][i % 2]
    return PHASE_COLORS.get(phase, SERIES_COLORS[i % len(SERIES_COLORS)])


def _phase_groups(phases):
    """Phases for the legend: the iterations as one entry."""
    out = OrderedDict()
    for p, n in phases.items():
        key = "iterations" if p.startswith("iteration") else p
        out[key] = out.get(key, 0) + n
    return out


def svg_phase_bar(rep) -> str:
    W, H, x0, x1 = 1000, 86, 10, 990
    total = sum(rep.phases.values()) or 1
    out = _svg_open(W, H, f"bytes per phase, {total:,} bytes in all")
    x = float(x0)
    scale = (x1 - x0) / total
    spans = {}
    for i, (p, n) in enumerate(rep.phases.items()):
        w = n * scale
        if n:
            out.append(f'<rect x="{_fmt(x)}" y="8" width="{_fmt(max(w, 0.6))}" height="38" '
                       f'fill="{_phase_color(p, i)}"><title>{esc(p)}: {n:,} bytes ({human(n)}, '
                       f'{100 * n / total:.1f}%)</title></rect>')
        key = "iterations" if p.startswith("iteration") else p
        a, b = spans.get(key, (x, x))
        spans[key] = (min(a, x), max(b, x + w))
        x += w
    for key, (a, b) in spans.items():
        lab = {"devices": "device state", "iterations": "iterations"}.get(key, key)
        if b - a >= 9 * len(lab) + 12:
            out.append(f'<text x="{_fmt((a + b) / 2)}" y="32" text-anchor="middle" '
                       f'class="inbar">{esc(lab)}</text>')
    unit, div = _unit(total)
    ticks = _nice_ticks(total / div, 8)
    for t in ticks:
        if t * div > total * 1.0001:
            break
        tx = x0 + t * div * scale
        out.append(f'<line x1="{_fmt(tx)}" y1="48" x2="{_fmt(tx)}" y2="54" class="axis"/>')
        anchor = "start" if t == 0 else "middle"
        out.append(f'<text x="{_fmt(tx)}" y="68" text-anchor="{anchor}" class="tick">'
                   f'{_num(t)}</text>')
    out.append(f'<text x="{x1}" y="82" text-anchor="end" class="label">offset in the stream '
               f'({unit})</text>')
    out.append("</svg>")
    return "\n".join(out)


def legend(items) -> str:
    """``items``: (colour, label, value text)."""
    li = "".join(f'<li><span class="sw" style="background:{c}"></span>{esc(lab)}'
                 + (f' <span class="muted">{esc(val)}</span>' if val else "") + "</li>"
                 for c, lab, val in items)
    return f'<ul class="legend">{li}</ul>'


def svg_hbars(rows, label, axis_label) -> str:
    """Horizontal bars, one row per ``(label, value, colour, tooltip)``."""
    W, row_h, top, lab_w, x1 = 1000, 24, 6, 250, 880
    H = top + row_h * len(rows) + 44
    maxv = max([r[1] for r in rows] + [1])
    unit, div = _unit(maxv)
    ticks = _nice_ticks(maxv / div)
    span = ticks[-1] * div or 1
    sc = (x1 - lab_w) / span
    out = _svg_open(W, H, label)
    bottom = top + row_h * len(rows)
    for t in ticks:
        tx = lab_w + t * div * sc
        out.append(f'<line x1="{_fmt(tx)}" y1="{top}" x2="{_fmt(tx)}" y2="{bottom}" '
                   f'class="grid"/>')
        out.append(f'<text x="{_fmt(tx)}" y="{bottom + 16}" text-anchor="middle" '
                   f'class="tick">{_num(t)}</text>')
    out.append(f'<text x="{x1}" y="{bottom + 36}" text-anchor="end" class="label">'
               f'{esc(axis_label)} ({unit})</text>')
    for i, (lab, v, col, tip) in enumerate(rows):
        y = top + i * row_h
        w = v * sc
        out.append(f'<g><title>{esc(tip)}</title>'
                   f'<text x="{lab_w - 8}" y="{y + 16}" text-anchor="end" class="name">'
                   f'{esc(_short(lab))}</text>'
                   f'<rect x="{lab_w}" y="{y + 4}" width="{_fmt(max(w, 1))}" height="{row_h - 8}"'
                   f' rx="2" fill="{col}"/>'
                   f'<text x="{_fmt(lab_w + max(w, 1) + 6)}" y="{y + 16}" class="value">'
                   f'{esc(human(v))}</text></g>')
    out.append(f'<line x1="{lab_w}" y1="{top}" x2="{lab_w}" y2="{bottom}" class="axis"/>')
    out.append("</svg>")
    return "\n".join(out)


def svg_vbars(categories, series, label, y_label, *, mode="stack", value_fmt=None,
              tip_extra=None) -> str:
    """Vertical bars per category; ``series``: [(name, colour, [value per category])].

    ``mode`` ``stack`` stacks the series, ``group`` puts them side by side.  When
    a few stacked bars dwarf the rest the value axis is cut: those bars run
    to the top with a break mark and their total written above them.
    """
    W, H, left, right, top, bottom = 1000, 300, 70, 990, 26, 244
    ncat = max(1, len(categories))
    value_fmt = value_fmt or _num
    totals = [sum(s[2][i] for s in series) for i in range(ncat)] if mode == "stack" else \
        [max([s[2][i] for s in series] + [0]) for i in range(ncat)]
    maxv = max(totals + [0])
    cap = maxv
    nonzero = sorted(t for t in totals if t)
    if len(nonzero) >= 4:
        med = nonzero[len(nonzero) // 2]
        rest = [t for t in nonzero if t <= 10 * med]
        if len(rest) < len(nonzero) and rest:
            cap = max(rest) * 1.3
    unit_div = 1
    is_bytes = y_label.endswith("bytes")
    if is_bytes:
        unit, unit_div = _unit(cap or 1)
        y_label = f"{y_label} ({unit})"
    ticks = _nice_ticks((cap or 1) / unit_div, 4)
    span = ticks[-1] * unit_div
    sc = (bottom - top) / span
    slot = (right - left) / ncat
    cut_bars = [i for i in range(ncat) if totals[i] > span]
    note = None
    if cut_bars and slot < 44:
        # too narrow to write each cut bar's total above it: one line for all of them
        shown = [f"{categories[i]}: {value_fmt(totals[i])}" for i in cut_bars[:6]]
        note = "cut bars (total): " + " · ".join(shown) + (" · …" if len(cut_bars) > 6 else "")
        top += 14
        sc = (bottom - top) / span
    out = _svg_open(W, H, label)
    if note:
        out.append(f'<text x="{left}" y="14" class="value">{esc(note)}</text>')
    for t in ticks:
        ty = bottom - t * unit_div * sc
        out.append(f'<line x1="{left}" y1="{_fmt(ty)}" x2="{right}" y2="{_fmt(ty)}" '
                   f'class="grid"/><text x="{left - 6}" y="{_fmt(ty + 4)}" text-anchor="end" '
                   f'class="tick">{_num(t)}</text>')
    out.append(f'<text transform="translate(16 {(top + bottom) // 2}) rotate(-90)" '
               f'text-anchor="middle" class="label">{esc(y_label)}</text>')
    bw = max(1.0, min(48.0, slot * 0.78))
    longest = max([len(_short(_cat_short(c), 12)) for c in categories] + [1])
    every = max(1, math.ceil((longest * 7.5 + 10) / slot))
    for i, cat in enumerate(categories):
        cx = left + slot * (i + 0.5)
        if mode == "stack":
            y = float(bottom)
            cut = totals[i] > span
            used = 0.0
            parts = []
            for name, col, vals in series:
                v = vals[i]
                if not v:
                    continue
                h = v * sc
                if cut:
                    h = min(h, y - top)
                if h <= 0:
                    continue
                used += h
                y -= h
                tip = f"{cat} · {name}: {value_fmt(v)}"
                if tip_extra:
                    tip += tip_extra(i, name)
                parts.append(f'<rect x="{_fmt(cx - bw / 2)}" y="{_fmt(y)}" width="{_fmt(bw)}" '
                             f'height="{_fmt(max(h, 0.5))}" fill="{col}"><title>{esc(tip)}'
                             f'</title></rect>')
            out.extend(parts)
            if cut:
                by = top + 14
                out.append(f'<path d="M{_fmt(cx - bw / 2 - 2)} {by + 4} l{_fmt(bw + 4)} -6 '
                           f'M{_fmt(cx - bw / 2 - 2)} {by + 10} l{_fmt(bw + 4)} -6" '
                           f'class="break"/>')
                if note is None:
                    out.append(f'<text x="{_fmt(cx)}" y="{top - 6}" text-anchor="middle" '
                               f'class="value">{esc(value_fmt(totals[i]))}</text>')
        else:
            n = max(1, len(series))
            gw = bw / n
            for j, (name, col, vals) in enumerate(series):
                v = vals[i]
                tip = f"{cat} · {name}: {value_fmt(v)}"
                if tip_extra:
                    extra = tip_extra(i, name)
                    if not extra:
                        continue            # nothing of this series here
                    tip += extra
                elif not v:
                    continue
                if not v:
                    # present but empty (a zero-length chunk): a mark on the axis
                    mx = cx - bw / 2 + j * gw + gw / 2
                    out.append(f'<path d="M{_fmt(mx)} {bottom - 7} l5 7 l-10 0 z" fill="{col}">'
                               f'<title>{esc(tip)}</title></path>')
                    continue
                h = min(max(v * sc, 2), bottom - top)
                out.append(f'<rect x="{_fmt(cx - bw / 2 + j * gw)}" y="{_fmt(bottom - h)}" '
                           f'width="{_fmt(max(gw - 1, 0.8))}" height="{_fmt(max(h, 0.5))}" '
                           f'fill="{col}"><title>{esc(tip)}</title></rect>')
        if i % every == 0 or i == ncat - 1:
            out.append(f'<text x="{_fmt(cx)}" y="{bottom + 16}" text-anchor="middle" '
                       f'class="tick">{esc(_short(_cat_short(cat), 12))}</text>')
    out.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>')
    out.append(f'<text x="{right}" y="{bottom + 44}" text-anchor="end" class="label">'
               f'phase (S = setup, numbers = iterations, C = completion, D = device state)'
               f'</text>')
    out.append("</svg>")
    return "\n".join(out)


def _cat_short(cat):
    if cat.startswith("iteration"):
        return cat.split(" ", 1)[1]
    return {"setup": "S", "completion": "C", "devices": "D"}.get(cat, cat)


def _section_class(s):
    if s.idstr == "ram":
        return "ram"
    if is_vfio_idstr(s.idstr or ""):
        return "vfio"
    if any(t in s.types for t in ("START", "PART", "END")):
        return "iterative"
    return "device"


_SECTION_CLASS_LABEL = {"ram": "RAM", "vfio": "VFIO", "iterative": "other iterative (block, "
                        "dirty bitmaps, ...)",
                        "device": "device state (FULL)", "other": "grouped"}


def _table(head, rows, cls="") -> str:
    num = ' class="n"'
    th = "".join(f'<th{num if n else ""}>{esc(h)}</th>' for h, n in head)
    body = []
    for r in rows:
        tds = "".join(f'<td{num if head[i][1] else ""}>{c}</td>' for i, c in enumerate(r))
        body.append(f"<tr>{tds}</tr>")
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{th}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


_CSS = """
:root{--bg:#f7f8fa;--card:#ffffff;--fg:#1c2430;--muted:#5b6675;--grid:#e3e7ec;
--axis:#8a94a3;--accent:#0072b2;--warn:#b91c1c;--code:#eef1f5;color-scheme:light dark}
@media (prefers-color-scheme:dark){:root{--bg:#11151b;--card:#1a2029;--fg:#e4e8ee;
--muted:#9aa6b5;--grid:#2c3440;--axis:#6b7686;--accent:#56b4e9;--warn:#f87171;--code:#242c37}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1200px;margin:0 auto;padding:24px 20px 48px}
h1{font-size:1.6rem;margin:0 0 4px;font-weight:650;word-break:break-all}
h2{font-size:1.15rem;margin:0 0 6px;font-weight:650}
p.what{margin:0 0 14px;color:var(--muted);font-size:.92rem}
.card{background:var(--card);border-radius:10px;padding:18px 20px;margin:16px 0;
box-shadow:0 1px 2px rgba(0,0,0,.06),0 1px 8px rgba(0,0,0,.04)}
.sub{color:var(--muted);margin:0 0 12px}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px;margin:14px 0}
.tile{background:var(--card);border-radius:10px;padding:12px 14px;
box-shadow:0 1px 2px rgba(0,0,0,.06)}
.tile b{display:block;font-size:1.35rem;font-weight:650;font-variant-numeric:tabular-nums}
.tile span{color:var(--muted);font-size:.85rem}
dl.meta{columns:2 420px;column-gap:28px;margin:0}
dl.meta>div{break-inside:avoid;display:grid;grid-template-columns:120px 1fr;gap:0 12px;
padding:3px 0}
dl.meta dt{color:var(--muted)}dl.meta dd{margin:0;overflow-wrap:anywhere}
code,.mono{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;font-size:.88em}
code{background:var(--code);padding:1px 5px;border-radius:4px}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
svg.chart{display:block;width:100%;height:auto;min-width:600px}
svg .grid{stroke:var(--grid);stroke-width:1}
svg .axis{stroke:var(--axis);stroke-width:1}
svg .tick{fill:var(--muted);font-size:12px}
svg .label{fill:var(--muted);font-size:12px;font-style:italic}
svg .name{fill:var(--fg);font-size:13px}
svg .value{fill:var(--fg);font-size:12px;font-variant-numeric:tabular-nums}
svg .inbar{fill:#fff;font-size:13px;font-weight:600;pointer-events:none;
stroke:rgba(0,0,0,.4);stroke-width:2px;paint-order:stroke;stroke-linejoin:round}
svg .break{stroke:var(--card);stroke-width:3;fill:none}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
ul.legend{list-style:none;display:flex;flex-wrap:wrap;gap:6px 18px;padding:0;margin:10px 0 14px;
font-size:.9rem}
ul.legend li{display:flex;align-items:center;gap:6px}
.sw{display:inline-block;width:12px;height:12px;border-radius:3px;flex:none}
.muted{color:var(--muted)}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:5px 10px;border-bottom:1px solid var(--grid);vertical-align:top}
th{color:var(--muted);font-weight:600;white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:hover{background:var(--code)}
.tag{display:inline-block;padding:0 7px;border-radius:9px;font-size:.8rem;
background:var(--code);white-space:nowrap}
.tag.ok{background:#d9f2e6;color:#065f46}.tag.op{background:#fdecd2;color:#7c4a03}
@media (prefers-color-scheme:dark){.tag.ok{background:#113d2c;color:#8ee3bd}
.tag.op{background:#47300c;color:#f6c77a}}
.banner{border-left:4px solid var(--warn);padding:10px 14px;background:var(--card);
border-radius:6px;margin:12px 0;color:var(--warn)}
details summary{cursor:pointer;color:var(--accent);margin-top:10px}
footer{color:var(--muted);font-size:.85rem;margin-top:24px}
@media (max-width:640px){main{padding:14px 10px 32px}.card{padding:14px 12px}
h1{font-size:1.25rem}dl.meta>div{grid-template-columns:1fr}}
"""


def _version_text(h):
    return f">= {h['min']}" + (f", <= {h['max']}" if h["max"] else "")


def render_html(rep: Report) -> str:
    s = rep.summary
    hints = s.version_hints()
    total = rep.size
    parts = []
    w = parts.append
    w("<!DOCTYPE html>")
    w('<html lang="en"><head><meta charset="utf-8"/>')
    w('<meta name="viewport" content="width=device-width, initial-scale=1"/>')
    w('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
      'style-src \'unsafe-inline\'; img-src data:"/>')
    w(f"<title>{esc(rep.name)} · qmigstream report</title>")
    w(f"<style>{_CSS}</style></head><body><main>")

    # -- header ------------------------------------------------------------------
    w(f'<h1>{esc(rep.name)}</h1>')
    w(f'<p class="sub">QEMU migration stream · {esc(human(total))} · machine '
      f'<code>{esc(s.machine or "(no configuration record)")}</code> · written by QEMU '
      f'{esc(_version_text(hints))}</p>')
    if rep.error:
        w(f'<div class="banner"><b>The stream could not be read to the end.</b> '
          f'{esc(rep.error)} — the report covers what came before.</div>')
    pages = Counter()
    for d in rep.ram.values():
        for k, v in d.items():
            pages[k] += v[0]
    devices = [x for x in rep.sections.values() if _section_class(x) not in ("ram",)]
    ram_bytes = sum(x.bytes for x in rep.sections.values() if x.idstr == "ram")
    tiles = [(human(total), "stream size"),
             (f"{rep.iterations:,}", "iterations"),
             (f"{sum(pages.values()):,}", "RAM pages sent"),
             (human(ram_bytes), "RAM section bytes"),
             (f"{len(devices):,}", "other sections"),
             (f"{len(rep.vfio):,}", "VFIO devices")]
    w('<div class="tiles">' + "".join(f'<div class="tile"><b>{esc(a)}</b><span>{esc(b)}'
                                      f'</span></div>' for a, b in tiles) + "</div>")
    meta = [("file", esc(rep.name)),
            ("size", f"{total:,} bytes ({esc(human(total))})"),
            ("sha256", f'<span class="mono">{esc(rep.sha256 or "?")}</span>'),
            ("machine", esc(s.machine or "(no configuration record)")),
            ("QEMU version", esc(_version_text(hints))
             + "".join(f'<br/><span class="muted">{esc(e)}</span>' for e in hints["evidence"])),
            ("page size", esc(getattr(s, "page_size", None) or "?")),
            ("capabilities", esc(", ".join(s.capabilities) or "none listed")),
            ("section footers", "yes" if s.footers else "no"),
            ("end of stream", "EOF marker" + ((", VMDESCRIPTION trailer cut short "
                                                f"({max(0, s.trailer['present']):,} of "
                                                f"{s.trailer['json_length']:,} bytes)")
                                               if s.trailer and s.trailer.get("cut") else
                                               (", VMDESCRIPTION trailer of "
                                                f"{s.trailer['json_length']:,} bytes")
                                               if s.trailer else ", no trailer")
             if s.eof else "no EOF marker")]
    if s.commands:
        meta.append(("commands", esc(", ".join(f"{k} ×{v}" if v > 1 else k
                                              for k, v in s.commands.items()))))
    if s.configuration:
        subs = []
        for sub in s.configuration.get("subsections", []):
            vals = ", ".join(f"{k}={_short(v, 60)}" for k, v in sub.items()
                             if k not in ("name", "offset"))
            subs.append(f"{sub.get('name', '?')}" + (f" ({vals})" if vals else ""))
        meta.append(("configuration", esc("; ".join(subs) or "no subsections")))
    w('<section class="card"><h2>Stream</h2><dl class="meta">'
      + "".join(f"<div><dt>{esc(k)}</dt><dd>{v}</dd></div>" for k, v in meta)
      + "</dl></section>")

    # -- phases ------------------------------------------------------------------
    w('<section class="card" id="phases"><h2>Bytes per phase</h2>')
    w('<p class="what">The whole file from its first byte to its last. Setup is the START '
      'sections, each iteration one round of PART sections, completion the END sections, '
      'device state the FULL sections.</p>')
    w(f'<div class="scroll">{svg_phase_bar(rep)}</div>')
    items = []
    for p, n in _phase_groups(rep.phases).items():
        col = PHASE_COLORS["iteration"][1] if p == "iterations" else _phase_color(p)
        its = f"iterations 1–{rep.iterations}" if rep.iterations > 1 else "iteration 1"
        lab = {"devices": "device state", "iterations": its}.get(p, p)
        items.append((col, lab, f"{human(n)} · {100 * n / (total or 1):.1f}%"))
    w(legend(items))
    w("<details><summary>bytes of every phase</summary>")
    w(_table([("phase", 0), ("bytes", 1), ("share", 1)],
             [[esc(p), f"{n:,}", f"{100 * n / (total or 1):.2f}%"]
              for p, n in rep.phases.items()]))
    w("</details></section>")

    # -- sections ----------------------------------------------------------------
    secs = sorted(rep.sections.values(), key=lambda x: -x.bytes)
    rows = []
    for x in secs[:TOP_SECTIONS]:
        c = _section_class(x)
        hdrs = ", ".join(f"{k} ×{v}" if v > 1 else k for k, v in x.types.items())
        rows.append((x.name, x.bytes, SECTION_COLORS[c],
                     f"{x.name} (section {x.section_id}, version {x.version_id}): "
                     f"{x.bytes:,} bytes; {hdrs}"))
    rest = secs[TOP_SECTIONS:]
    if rest:
        n = sum(x.bytes for x in rest)
        rows.append((f"{len(rest)} other sections", n, SECTION_COLORS["other"],
                     f"{len(rest)} smaller sections: {n:,} bytes"))
    w('<section class="card" id="sections"><h2>Bytes per section</h2>')
    w('<p class="what">Header, payload and footer of every section with the same id, '
      'biggest first.</p>')
    if rows:
        w(f'<div class="scroll">{svg_hbars(rows, "bytes per section", "bytes")}</div>')
        shown = {_section_class(x) for x in secs[:TOP_SECTIONS]} | ({"other"} if rest else set())
        used = [c for c in SECTION_COLORS if c in shown]
        w(legend([(SECTION_COLORS[c], _SECTION_CLASS_LABEL[c], "") for c in used]))
    else:
        w('<p class="muted">No sections.</p>')
    w("</section>")

    # -- RAM ---------------------------------------------------------------------
    w('<section class="card" id="ram"><h2>RAM records per iteration</h2>')
    w('<p class="what">Page records of the RAM section in each phase, by kind. A page '
      'that did not change is not sent, so it does not appear. Hover a bar for its '
      'bytes.</p>')
    empty = {k: [0, 0] for k in RAM_KINDS}
    sent = [p for p in rep.ram if any(v[0] for v in rep.ram[p].values())]
    if sent:
        # every iteration, also those without page records, so the axis is the whole run
        cats = sorted(set(sent) | set(rep.iteration_phases()), key=_phase_rank)
        ram = {p: rep.ram.get(p, empty) for p in cats}
    kinds = [k for k in RAM_KINDS if any(rep.ram[p][k][0] for p in sent)]
    if sent:
        series = [(KIND_LABELS[k], KIND_COLORS[k], [ram[p][k][0] for p in cats])
                  for k in kinds]

        def extra(i, name, cats=cats):
            k = next(k for k in kinds if KIND_LABELS[k] == name)
            return f" records, {human(ram[cats[i]][k][1])} on the wire"
        chart = svg_vbars(cats, series, "RAM records per phase and kind", "records",
                          tip_extra=extra)
        w(f'<div class="scroll">{chart}</div>')
        w(legend([(KIND_COLORS[k], KIND_LABELS[k], f"{pages[k]:,} records")
                  for k in kinds]))
        w("<details><summary>records and bytes of every phase</summary>")
        head = [("phase", 0)] + [(f"{k} records", 1) for k in kinds] + \
            [(f"{k} bytes", 1) for k in kinds]
        w(_table(head, [[esc(p)] + [f"{ram[p][k][0]:,}" for k in kinds]
                        + [f"{ram[p][k][1]:,}" for k in kinds] for p in cats]))
        w("</details>")
    else:
        w('<p class="muted">No RAM page records in this stream.</p>')
    if s.multifd_flushes or "multifd" in s.capabilities:
        w('<p class="what">multifd: page data travels on separate channels, which are not '
          'part of this file; the records here are those of the main channel'
          + (f" ({s.multifd_flushes:,} MULTIFD_FLUSH records)" if s.multifd_flushes else "")
          + ".</p>")
    if s.mapped_ram_bitmaps:
        n = sum(s.mapped_ram_bitmaps.values())
        w(f'<p class="what">mapped-ram: pages are stored in place in each block\'s area of '
          f'the file, not as records; the blocks\' bitmaps mark {n:,} pages as written '
          f'({esc(", ".join(f"{b}: {c:,}" for b, c in s.mapped_ram_bitmaps.items()))}).</p>')
        ps = s.page_size or 4096
        rows = [(b, c * ps, SECTION_COLORS["ram"],
                 f"{b}: {c:,} pages written, {c * ps:,} bytes of page data in the file")
                for b, c in s.mapped_ram_bitmaps.items()]
        w(f'<div class="scroll">{svg_hbars(rows, "mapped-ram page data per block", "bytes")}'
          '</div>')
    w("</section>")

    blocks = {b["name"]: b for b in s.ram_blocks}
    names = list(blocks) + [b for b in rep.ram_block_bytes if b not in blocks]
    if names:
        w('<section class="card" id="blocks"><h2>RAM blocks</h2>')
        w('<p class="what">Bytes of page records per block (headers included), next to the '
          'block\'s size in the guest.</p>')
        rows = [(b, rep.ram_block_bytes.get(b, 0), SECTION_COLORS["ram"],
                 f"{b}: {rep.ram_block_bytes.get(b, 0):,} bytes on the wire, "
                 f"{rep.ram_block_pages.get(b, 0):,} page records")
                for b in sorted(names, key=lambda b: -rep.ram_block_bytes.get(b, 0))]
        w(f'<div class="scroll">{svg_hbars(rows, "bytes per RAM block", "bytes on the wire")}'
          '</div>')
        w(_table([("block", 0), ("size in the guest", 1), ("page records", 1),
                  ("bytes on the wire", 1)],
                 [[esc(b), esc(human(blocks[b]["used_length"])) if b in blocks else "?",
                   f"{rep.ram_block_pages.get(b, 0):,}", f"{rep.ram_block_bytes.get(b, 0):,}"]
                  for b in names]))
        w("</section>")

    # -- devices -----------------------------------------------------------------
    w('<section class="card" id="devices"><h2>Devices</h2>')
    w('<p class="what">Every section but RAM, in stream order, and how its payload was '
      'decoded: field by field through the stream\'s own VMDESCRIPTION, by a section '
      'handler into records, or kept opaque (with the reason).</p>')
    rows = []
    for x in rep.sections.values():
        if x.idstr == "ram":
            continue
        how = x.decoded_as()
        tag = ('<span class="tag ok">fields</span> ' if x.decoded_bytes and not x.opaque_bytes
               else '<span class="tag op">opaque</span> ' if x.opaque_bytes
               else '<span class="tag">records</span> ' if x.kinds else "")
        rows.append([f"{x.section_id}", esc(x.idstr), f"{x.instance_id}", f"{x.version_id}",
                     esc(", ".join(f"{k} ×{v}" if v > 1 else k for k, v in x.types.items())),
                     f"{x.bytes:,}",
                     f"{x.fields:,}" if x.decoded_bytes else "–", tag + esc(how)])
    if rows:
        w(_table([("section", 1), ("idstr", 0), ("instance", 1), ("version", 1), ("sections", 0),
                  ("bytes", 1), ("fields", 1), ("decoded", 0)], rows, "devices"))
    else:
        w('<p class="muted">No device sections.</p>')
    w("</section>")

    # -- VFIO --------------------------------------------------------------------
    w('<section class="card" id="vfio"><h2>VFIO devices</h2>')
    if rep.vfio:
        w('<p class="what">Device data chunks (DEV_DATA_STATE) per phase, bytes of data '
          'without the 16-byte chunk headers. A triangle on the axis is a zero-length '
          'chunk (what a v1 device writes when it has nothing pending).</p>')
        order = []
        for v in rep.vfio.values():
            for p in v.phases:
                if p not in order:
                    order.append(p)
        order.sort(key=_phase_rank)
        vs = list(rep.vfio.values())
        series = [(v.name, SERIES_COLORS[i % len(SERIES_COLORS)],
                   [v.phases.get(p, [0, 0])[1] for p in order]) for i, v in enumerate(vs)]

        def vextra(i, name, order=order):
            v = next(v for v in vs if v.name == name)
            c = v.phases.get(order[i])
            if not c:
                return ""
            if c[0] == 1:
                return " bytes in 1 chunk"
            if c[2] == c[3]:
                return f" bytes in {c[0]:,} chunks of {c[2]:,} bytes"
            return f" bytes in {c[0]:,} chunks ({c[2]:,}–{c[3]:,} bytes each)"
        if order:
            chart = svg_vbars(order, series, "VFIO data per phase", "bytes", mode="group",
                              value_fmt="{:,}".format, tip_extra=vextra)
            w(f'<div class="scroll">{chart}</div>')
            w(legend([(c, n, human(sum(vals))) for n, c, vals in series]))
        rows = []
        for v in vs:
            fam = v.family.family if v.family and v.family.family else "?"
            for p, c in sorted(v.phases.items(), key=lambda kv: _phase_rank(kv[0])):
                rows.append([esc(v.name), esc(fam), esc(p), f"{c[0]:,}", f"{c[1]:,}",
                             f"{c[2]:,}", f"{c[3]:,}"])
            if v.config_bytes:
                rows.append([esc(v.name), esc(fam), esc(f"config ({v.config_phase})"), "–",
                             f"{v.config_bytes:,}", "–", "–"])
        w(_table([("device", 0), ("family", 0), ("phase", 0), ("chunks", 1), ("bytes", 1),
                  ("smallest", 1), ("largest", 1)], rows))
        for v in vs:
            if v.family and v.family.reason:
                w(f'<p class="what"><b>{esc(v.name)}</b>: {esc(v.family.reason)}</p>')
    else:
        w('<p class="muted">No VFIO device sections in this stream.</p>')
    w("</section>")

    w(f'<footer>Written by qmigstream {esc(__version__)} (<code>qmigstream report</code>) '
      f'in one pass over the stream. Hover bars for exact numbers.</footer>')
    w("</main></body></html>")
    return "\n".join(parts) + "\n"


def _phase_rank(p):
    if p.startswith("iteration"):
        return (3, _first_number(p))
    return (_RANK.get(p, 9), 0)
