"""Where does a section payload end?  (Sections that do not delimit themselves.)

Device sections (vmstate FULL sections, and iterative sections of handlers the
codec does not model) carry no length on the wire.  Their end is found, in this
order of preference:

1. ``description``: the stream's own VMDESCRIPTION JSON entry for the section
   gives the exact size (sum of the described fields and subsection headers);
   checked against the footer that must follow when footers are on.
2. ``footer``: the first ``0x7e`` + ``be32 section_id`` that is followed by a
   plausible next record (or the end of the input).
3. ``next-header``: streams with neither footers nor trailer (machine types up
   to 2.2): the first position where a plausible next record starts.

Methods 2 and 3 can be fooled by a payload that contains such a pattern; the
record says which method bounded it (``OpaquePayload.how``).
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

from ..errors import LimitExceeded, StreamError, Truncated
from ..wire.commands import FIXED_LENGTH, MigCmd
from ..wire.header import SectionType

#: Longest device payload searched for a boundary (a hostile stream could make
#: the scan buffer everything).
MAX_SCAN = 256 << 20

_BE32 = struct.Struct(">I")
_HDR = struct.Struct(">IB")
#: Where a record may start: a section or command type byte, or an EOF that is
#: followed by a VMDESCRIPTION trailer or ends the input.
_CANDIDATE = re.compile(rb"[\x01-\x04\x08]|\x00(?=\x06)|\x00\Z")


def description_size(entry: dict, depth: int = 0) -> int:
    """Payload bytes implied by one ``devices[]`` entry of the VMDESCRIPTION JSON."""
    if depth > 64:
        raise LimitExceeded("description nested too deeply", None)
    if not isinstance(entry, dict):
        raise ValueError("a description that is not an object")
    if "fields" not in entry and "size" in entry:
        return _count(entry["size"])
    total = 0
    for f in _objects(entry.get("fields", ())):
        n = _count(f.get("array_len", 1))
        if "struct" in f and isinstance(f["struct"], dict) and f["struct"]:
            one = description_size(f["struct"], depth + 1)
            # The described size of a struct element is authoritative.
            one = _count(f.get("size", one))
        else:
            one = _count(f.get("size", 0))
        total += n * one
    for s in _objects(entry.get("subsections", ())):
        # the wire name is the UTF-8 of the JSON string (as vmstate.decode has it)
        name = str(s.get("vmsd_name", "")).encode("utf-8", "surrogateescape")
        total += 1 + 1 + len(name) + 4 + description_size(s, depth + 1)
    return total


def _objects(v) -> list:
    """``fields``/``subsections`` of a description: a list of objects, else ValueError."""
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, dict) for x in v):
        raise ValueError("'fields'/'subsections' is not a list of objects")
    return v


def _count(v) -> int:
    """A size or count from the description: a non-negative JSON integer, else ValueError."""
    if type(v) is not int or v < 0:
        raise ValueError(f"not a non-negative integer: {v!r}")
    return v


def _printable(b: bytes) -> bool:
    return len(b) > 0 and all(0x20 <= c < 0x7F for c in b)


def plausible_record(buf: bytes, q: int, ids, at_end: bool, depth: int) -> bool:
    """Could a top-level record start at ``buf[q]``?  ``at_end``: ``buf`` ends where the input ends.

    ``ids`` is a :class:`SectionIds`: PART/END must name an open iterative
    section, START/FULL must not reuse the id of another section.
    """
    if q >= len(buf):
        return at_end
    t = buf[q]
    if t == SectionType.EOF:
        rest = len(buf) - q - 1
        if rest == 0:
            return at_end
        if depth == 0 and buf[q + 1] == SectionType.VMDESCRIPTION:
            # QEMU stops reading at the EOF: the trailer may be cut short (or
            # followed by more bytes) and the stream still loads.
            if rest < 6:
                return at_end                 # cut inside the trailer's length
            return buf[q + 6:q + 7] == b"{"
        return False
    if t in (SectionType.SECTION_START, SectionType.SECTION_FULL):
        if len(buf) - q < 7:
            return False
        sid, n = _HDR.unpack_from(buf, q + 1)
        if len(buf) - q < 6 + n + 8:
            return False
        idstr = buf[q + 6:q + 6 + n]
        inst, ver = struct.unpack_from(">II", buf, q + 6 + n)
        # (a version id can be large: eeprom93xx's is 20061113; QEMU keeps it in an int)
        if not (_printable(idstr) and inst < 0x10000 and ver < 0x80000000 and sid < 0x100000):
            return False
        seen = ids.names.get(sid)
        if seen is None:
            return True
        # Only an iterative section's FULL part (VFIO) repeats a START's id.
        return t == SectionType.SECTION_FULL and seen == (idstr.decode("latin-1"), inst) \
            and sid in ids.started
    if t in (SectionType.SECTION_PART, SectionType.SECTION_END):
        if len(buf) - q < 5:
            return False
        return _BE32.unpack_from(buf, q + 1)[0] in ids.open
    if t == SectionType.COMMAND:
        if len(buf) - q < 5:
            return False
        cmd, ln = struct.unpack_from(">HH", buf, q + 1)
        if not 1 <= cmd <= max(MigCmd):
            return False
        fixed = FIXED_LENGTH.get(MigCmd(cmd))
        return fixed is None or fixed == ln
    return False


class SectionIds:
    """What the reader knows about section ids so far."""

    def __init__(self):
        self.names = {}       # id -> (idstr, instance_id)
        self.started = set()  # ids seen in a START section
        self.open = set()     # started and not yet ended

    def saw(self, type_, sid, idstr=None, inst=None):
        if idstr is not None:
            self.names[sid] = (idstr, inst)
        if type_ == SectionType.SECTION_START:
            self.started.add(sid)
            self.open.add(sid)
        elif type_ == SectionType.SECTION_END:
            self.open.discard(sid)


def scan_for_end(src, section_id: int, footers: bool | None, known_ids, depth: int):
    """Return ``(length, how)`` of the payload starting at ``src``'s position."""
    step = 1 << 16
    want = step
    start_scan = 0
    settled = 0
    while True:
        have = src.fill(want)
        buf, pos = src.window()
        # a bounded view (a mapped source's window is the whole rest of the file)
        at_end = have < want
        view = buf[pos:pos + (have if at_end else max(want, 1 << 20))]
        if footers is not False:
            pat = b"\x7e" + _BE32.pack(section_id)
            i = view.find(pat, start_scan)
            while i >= 0:
                if i + 5 + 16 <= len(view) or at_end:
                    if plausible_record(view, i + 5, known_ids, at_end, depth):
                        return i, "footer"
                    # Inside a PACKAGED blob an EOF may end the nested state
                    # (qemu_loadvm_state_main returns there).
                    if depth > 0 and view[i + 5:i + 6] == b"\x00":
                        return i, "footer"
                else:
                    break  # need more bytes to judge this candidate
                i = view.find(pat, i + 1)
            if footers is True:
                if at_end:
                    raise Truncated("stream ends inside a section payload (no footer found)",
                                    src.offset, needed=None, available=have)
                start_scan = max(0, (i if i >= 0 else len(view) - 4))
        if footers is not True:
            limit = len(view) if at_end else len(view) - 300
            # Only bytes that can start a record are tried (an EOF only where a
            # trailer or the end follows, see plausible_record), from where the
            # previous, shorter window stopped: positions below its limit had
            # all the bytes they need and were rejected for good.
            m = _CANDIDATE.search(view, settled)
            while m is not None and m.start() < limit:
                q = m.start()
                if plausible_record(view, q, known_ids, at_end, depth):
                    return q, "next-header"
                m = _CANDIDATE.search(view, q + 1)
            settled = max(settled, limit)
            if at_end:
                if depth > 0:
                    return len(view), "end-of-package"
                raise Truncated("stream ends inside a section payload (no next record found)",
                                src.offset, available=have)
        if want >= MAX_SCAN:
            raise LimitExceeded(f"no end found for a section payload within {MAX_SCAN} bytes",
                                src.offset)
        want *= 4


class PayloadStart(NamedTuple):
    """What a section handler knows as its payload starts (:func:`payload_start`)."""

    #: the section's ``SectionInfo`` (None when the id was never announced)
    sec: object
    #: ``sec.idstr``, or None
    idstr: str | None
    #: the trailer's ``devices[]`` entry of a FULL section, or None
    entry: dict | None
    #: payload bytes and the method that found them (None when not bounded here)
    length: int | None
    how: str | None
    #: why the description did not bound the payload (None when it did)
    reason: str | None


def payload_start(reader, src, header, *, bound: bool = True) -> PayloadStart:
    """The preamble of a section payload: its section, its description entry, its end.

    For a FULL section the trailer's ``devices[]`` entry is taken (always, so
    the reader's cursor over the entries stays in step with the sections).
    With ``bound`` the payload's end is found: the entry's size when it ends at
    a footer or next record (method 1), else :func:`scan_for_end` (2 and 3),
    with ``reason`` saying why the description was not used.  A handler whose
    payload delimits itself passes ``bound=False``.
    """
    sec = reader.sections.get(header.section_id)
    idstr = sec.idstr if sec else None
    full = header.type_name == "FULL"
    entry = reader.description_entry(header) if full else None
    if not bound:
        return PayloadStart(sec, idstr, entry, None, None, None)
    length = how = reason = None
    if entry is not None:
        try:
            n = description_size(entry)
        except (ValueError, TypeError, KeyError, StreamError):
            n, reason = None, "its description is malformed"
        if n is not None:
            if reader.check_end_at(src, n, header.section_id):
                length, how = n, "description"
            else:
                reason = f"its description ({n} bytes) does not end at a footer"
    elif not full:
        reason = "iterative section of a handler the codec does not model"
    elif reader.description is None and reader._desc_devices is None:
        reason = "the stream has no VMDESCRIPTION trailer"
    else:
        reason = "not described in the VMDESCRIPTION trailer"
    if length is None:
        length, how = scan_for_end(src, header.section_id, reader.footers,
                                   reader.ids, header.depth)
    return PayloadStart(sec, idstr, entry, length, how, reason)
