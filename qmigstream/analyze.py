"""The output of QEMU's ``scripts/analyze-migration.py``, computed by qmigstream's decoder.

``qmigstream analyze`` is a drop-in replacement for that script (QEMU 7.2's
copy is the reference): the same options (``-f``, ``-d state|desc``, ``-m``,
``-x``) and, for every stream the script can read, the same JSON text,
quirks included.  Where the script stops (XBZRLE and compressed pages,
``QEMU_VM_COMMAND`` records, configuration subsections, ``block`` /
``dirty-bitmap`` / VFIO iterative sections, streams without a trailer,
mapped-ram files) this module goes on and reports what the stream holds.
docs/analyze.md lists every difference.

How the script shapes its output (and so how this module does):

* ``-d state``: one member per section, ``"<idstr> (<section_id>)"``, in the
  order sections first appear.  ``ram`` is ``{"section sizes": {block:
  "0x%016x"}}`` (plus ``"memory"`` with ``-m``); a device section is its
  fields in description order, then its subsections under their names.
* a field's value comes from the JSON ``type`` and ``size`` of one element:
  integer types as ``"0x%0<2*size>x"`` of the value read **big-endian**
  (``int32 le`` too: the script never uses its little-endian reader), with
  ``" (<n>)"`` appended when the signed reading is negative (``uint8 equal``
  and ``uint16 equal`` count as signed); ``bool`` as true/false; ``struct``
  as a nested object; every other type as the element's bytes in hex pairs
  separated by spaces.  Fields with ``array_len`` or ``index`` become lists.
* the JSON text is ``json.dumps(obj, indent=4, separators=(',', ': '))``.

The script changed in QEMU 10.0, and so does this output (``script``: ``"7.2"``
or ``"10.0"``; by default the generation of the QEMU that wrote the stream, see
:func:`script_for`):

* up to 9.2 a field becomes a list when its JSON entry has ``array_len`` or
  ``index``, and a name seen again without them replaces the earlier value;
* from 10.0 ``array_len`` entries are unfolded into one entry per element and
  every name seen more than once becomes a list of its values in order (one
  occurrence stays a plain value).  QEMU 11 describes arrays of structs as
  repeated entries without ``index``, which only this rule reads as arrays;
* from 10.0 a ``nullptr`` field (the ``0x30`` marker of a NULL pointer) shows as
  ``"nullptr"`` instead of ``"30"``.
"""

from __future__ import annotations

import collections
import json
import os

from . import xbzrle
from .codec import ram_records as R
from .codec.reader import StreamReader
from .codec.records import OpaquePayload, SectionHeader, VmDescription
from .codec.sections.device import DeviceState
from .errors import DescriptionError, QmigstreamError, StreamError
from .vmstate.node import Vmsd

OrderedDict = collections.OrderedDict

#: The script's table of integer readers: JSON type -> signed?
_INT_TYPES = {
    "int8": True, "int16": True, "int32": True, "int32 equal": True, "int32 le": True,
    "int64": True, "int64 equal": True, "uint8 equal": True, "uint16 equal": True,
    "uint8": False, "uint16": False, "uint32": False, "uint32 equal": False,
    "uint64": False,
}


def dumps(obj) -> str:
    """The script's JSON text (``JSONEncoder(indent=4, separators=(',', ': '))``)."""
    return json.dumps(obj, indent=4, separators=(",", ": "))


# -- device fields ---------------------------------------------------------------

def _hex_pairs(raw: bytes) -> str:
    return raw.hex(" ")


def _int_text(raw: bytes, signed: bool) -> str:
    u = int.from_bytes(raw, "big", signed=False)
    text = "0x%0*x" % (len(raw) * 2, u)
    if signed:
        s = int.from_bytes(raw, "big", signed=True)
        if s < 0:
            text += " (%d)" % s
    return text


def _element(ftype: str, raw: bytes, value, script: str = "7.2"):
    signed = _INT_TYPES.get(ftype)
    if signed is not None and raw:
        return _int_text(raw, signed)
    if ftype == "bool" and raw:
        return raw[0] != 0
    if ftype == "struct" and isinstance(value, Vmsd):
        return vmsd_dict(value, script)
    return _hex_pairs(raw)


#: the script generations whose output differs (see the module docstring)
SCRIPTS = ("7.2", "10.0")


def vmsd_dict(node: Vmsd, script: str = "7.2") -> OrderedDict:
    """A decoded vmsd as the script of generation ``script`` shows it."""
    out = OrderedDict()
    new = script != "7.2"
    for f in node.fields:
        raw = f.raw
        es = f.elem_size
        values = f.elements
        if new and f.type == "nullptr":
            items = ["nullptr" if raw[k * es:(k + 1) * es] == b"0" else
                     _hex_pairs(raw[k * es:(k + 1) * es]) for k in range(len(values))]
        else:
            items = [_element(f.type, raw[k * es:(k + 1) * es], v, script)
                     for k, v in enumerate(values)]
        if new:
            for item in items:
                if f.name not in out:
                    out[f.name] = item
                elif isinstance(out[f.name], list):      # items are never lists
                    out[f.name].append(item)
                else:
                    out[f.name] = [out[f.name], item]
        elif f.array_len is not None or f.index is not None:
            out.setdefault(f.name, [])
            if isinstance(out[f.name], list):
                out[f.name].extend(items)
            else:
                out[f.name] = items
        else:
            out[f.name] = items[0] if items else ""
    for s in node.subsections:
        out[s.vmsd_name] = vmsd_dict(s, script)
    return out


# -- the whole stream ------------------------------------------------------------

class _Ram:
    """The ``ram`` member: section sizes, and with ``-m`` the memory records."""

    def __init__(self, dump_memory: bool, writer):
        self.data = OrderedDict()
        self.sizes = OrderedDict()
        self.data["section sizes"] = self.sizes
        self.memory = None
        self.pages = {}          # (block, addr) -> bytes, for XBZRLE deltas in -m
        self.page_size = 4096
        if dump_memory:
            self.memory = OrderedDict()
            self.data["memory"] = self.memory
        self.writer = writer
        self.bitmaps = {}

    def record(self, rec):
        t = type(rec)
        if t is R.RamMemSize:
            for b in rec.blocks:
                self._block(b)
        elif t is R.RamBlockEntry:
            self._block(rec.info)
        elif self.memory is None and self.writer is None:
            return                      # without -m / -x only the block list shows
        elif isinstance(rec, R.RamZeroRun):
            for z in rec.expand():
                self._zero(z.block, z.addr, z.fill)
        elif isinstance(rec, R.RamZero):
            self._zero(rec.block, rec.addr, rec.fill)
        elif isinstance(rec, R.RamPage):
            self._page(rec.block, rec.addr, bytes(rec.data))
        elif isinstance(rec, R.RamXbzrle):
            old = self._current(rec.block, rec.addr)
            self._page(rec.block, rec.addr, xbzrle.decode(bytes(rec.data), old,
                                                          offset=rec.offset))
        elif isinstance(rec, R.RamCompressed):
            data = rec.inflate(self.page_size)
            if len(data) < self.page_size:  # the rest of the page keeps what it held
                data += self._current(rec.block, rec.addr)[len(data):]
            self._page(rec.block, rec.addr, data)
        elif isinstance(rec, R.MappedRamBitmap):
            self.bitmaps[rec.block] = bytes(rec.data)
        elif isinstance(rec, R.MappedRamChunk) and rec.area == "pages":
            self._mapped_chunk(rec)

    def _block(self, info):
        if info.name in self.sizes and self.writer is None:
            return
        self.sizes[info.name] = "0x%016x" % info.used_length
        if self.writer is not None:
            self.writer.block(info.name, info.used_length)

    def _zero(self, block, addr, fill):
        if self.memory is not None:
            self.memory["%s (0x%016x)" % (block, addr)] = "Filled with 0x%02x" % fill
            self.pages[(block, addr)] = bytes((fill,)) * self.page_size if fill else None
        if self.writer is not None:
            self.writer.fill(block, addr, fill, self.page_size)

    def _page(self, block, addr, data):
        if self.memory is not None:
            self.memory["%s (0x%016x)" % (block, addr)] = data.hex(" ")
            self.pages[(block, addr)] = data
        if self.writer is not None:
            self.writer.write(block, addr, data)

    def _current(self, block, addr) -> bytes:
        if self.writer is not None:
            return self.writer.read(block, addr, self.page_size)
        got = self.pages.get((block, addr))
        return got if got is not None else bytes(self.page_size)

    def _mapped_chunk(self, rec):
        """Every page of a mapped-ram page area, as the script (11.x) lists them: the
        page's bytes when its bitmap bit is set, else ``Filled with 0x00``."""
        bitmap = self.bitmaps.get(rec.block, b"")
        ps = self.page_size
        data = rec.data
        for k in range(0, rec.length - ps + 1, ps):
            page = (rec.start + k) // ps
            byte = page // 8
            if byte < len(bitmap) and bitmap[byte] >> (page % 8) & 1:
                self._page(rec.block, rec.start + k,
                           bytes(ps) if data is None else bytes(data[k:k + ps]))
            elif self.memory is not None:
                self._zero(rec.block, rec.start + k, 0)


class _Other:
    """A section the script cannot read: what qmigstream found in it."""

    def __init__(self):
        self.data = OrderedDict()
        self.records = collections.Counter()
        self.bytes = 0

    def record(self, rec):
        self.records[rec.kind] += 1
        self.bytes += rec.size
        if isinstance(rec, OpaquePayload) and rec.reason:
            self.data["opaque"] = rec.reason

    def result(self):
        out = OrderedDict()
        out["payload bytes"] = self.bytes
        out["records"] = OrderedDict(sorted(self.records.items()))
        out.update(self.data)
        return out


def script_for(machine: bytes | None, switchover_start: bool) -> str:
    """The script generation of the QEMU that wrote a stream, from what it shows:
    ``"10.0"`` when the machine type is 10.0 or later or a SWITCHOVER_START command
    was sent (10.0+), else ``"7.2"``.  (A 10.x QEMU running an older machine type
    without the command looks older; ``--script`` says otherwise.)"""
    if switchover_start:
        return "10.0"
    from .summary import _MACHINE_VERSION
    m = _MACHINE_VERSION.search((machine or b"").decode("latin-1"))
    if m and (int(m.group(1)), int(m.group(2))) >= (10, 0):
        return "10.0"
    return "7.2"


def analyze_state(source, *, dump_memory=False, memory_writer=None, page_size=None,
                  script=None):
    """``-d state``: the script's dict for the stream (sections in first-seen order),
    as the script generation ``script`` (:data:`SCRIPTS`; default
    :func:`script_for` the stream) prints it."""
    if script is not None and script not in SCRIPTS:
        raise ValueError(f"script generation {script!r} is not one of {SCRIPTS}")
    # Without -m / -x only the RAM block list shows: pages may come in runs.
    reader = StreamReader(source, page_size=page_size, compact=True,
                          page_runs=not dump_memory and memory_writer is None)
    sections = OrderedDict()        # section_id -> [key, object]
    ram = None
    current = sid = None
    machine, switchover_start = None, False
    for rec in reader.records():
        if rec.kind == "configuration":
            machine = rec.machine
        elif rec.kind == "command" and rec.name == "SWITCHOVER_START":
            switchover_start = True
        if isinstance(rec, SectionHeader):
            sid = rec.section_id
            info = reader.sections[sid]
            entry = sections.get(sid)
            if info.idstr == "ram" and info.instance_id == 0:
                if ram is None:
                    ram = _Ram(dump_memory, memory_writer)
                    ram.page_size = reader.page_size
                obj = ram
            elif entry is not None and isinstance(entry[1], _Other) and not rec.full:
                obj = entry[1]
            else:
                obj = _Other()
            if entry is None:
                sections[sid] = ["%s (%d)" % (info.idstr, sid), obj]
            else:
                entry[1] = obj          # the script replaces the object, keeps the position
            current = obj
        elif isinstance(rec, DeviceState) and current is not None:
            sections[sid][1] = rec.tree         # shown once the generation is known
            current = None
        elif rec.kind == "footer" or isinstance(rec, VmDescription):
            current = None
        elif current is not None:
            current.record(rec)
    if script is None:
        script = script_for(machine, switchover_start)
    out = OrderedDict()
    for key, obj in sections.values():
        if isinstance(obj, _Ram):
            out[key] = obj.data
        elif isinstance(obj, _Other):
            out[key] = obj.result()
        else:
            out[key] = vmsd_dict(obj, script)
    return out


def analyze_desc(source) -> OrderedDict:
    """``-d desc``: the stream's VMDESCRIPTION JSON, as the script re-prints it."""
    reader = StreamReader(source, vmstate=False)
    desc = None
    for rec in reader.records():
        if isinstance(rec, VmDescription):
            desc = rec
    if desc is None:
        raise DescriptionError("the stream has no VMDESCRIPTION trailer "
                               "(suppress-vmdesc, machine type <= 2.2, or postcopy)", None)
    try:
        return json.loads(desc.json_bytes.decode("utf-8"), object_pairs_hook=OrderedDict)
    except (ValueError, UnicodeDecodeError) as e:
        raise DescriptionError(f"VMDESCRIPTION JSON does not parse: {e}", desc.offset) from None


# -- -x: files ---------------------------------------------------------------------

def safe_relpath(name: str) -> str:
    """A relative path for a RAM block file that stays inside the output directory.

    The script writes ``./<name>``; a hostile name (``../../x``) would leave the
    directory.  Components ``..``/``.``/empty are dropped or neutralised, NUL
    and other control characters replaced; ordinary names (``pc.ram``,
    ``/rom@etc/acpi/tables``) keep the script's layout.
    """
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            p = "%2e%2e"
        p = "".join(c if c.isprintable() and c != "\\" else "_" for c in p)
        parts.append(p[:200])
    return "/".join(parts) or "_"


class MemoryFiles:
    """RAM blocks written into ``directory`` as sparse files (``-x``)."""

    def __init__(self, directory: str, announce=print):
        self.dir = os.path.realpath(directory)
        self.files = {}
        self.announce = announce

    def block(self, name, length):
        rel = safe_relpath(name)
        path = os.path.join(self.dir, rel)
        if not os.path.realpath(path).startswith(self.dir + os.sep):
            raise QmigstreamError(f"RAM block {name!r}: file would leave {self.dir}")
        self.announce(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if name in self.files:
            self.files[name].close()
        try:
            f = open(path, "w+b")
        except IsADirectoryError:
            raise QmigstreamError(f"RAM block {name!r}: {rel} is a directory "
                                  "(another block's path)") from None
        f.truncate(length)
        self.files[name] = f

    def _f(self, block):
        f = self.files.get(block)
        if f is None:
            raise StreamError(f"page for RAM block {block!r} that is not in the block list",
                              None, section="ram")
        return f

    def write(self, block, addr, data):
        f = self._f(block)
        f.seek(addr)
        f.write(data)

    def fill(self, block, addr, fill, page_size):
        if fill:
            self.write(block, addr, bytes((fill,)) * page_size)
        else:
            f = self._f(block)
            f.seek(addr)
            if f.read(page_size).strip(b"\0"):
                f.seek(addr)
                f.write(bytes(page_size))

    def read(self, block, addr, n):
        f = self._f(block)
        f.seek(addr)
        got = f.read(n)
        return got + bytes(n - len(got))

    def close(self):
        for f in self.files.values():
            f.close()
