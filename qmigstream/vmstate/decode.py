"""Decode a vmstate payload through its VMDESCRIPTION entry.

The description is what ``vmstate_save_state_v`` and ``vmstate_subsection_save``
(migration/vmstate.c) emitted while writing the payload, so it can be walked in
step with the bytes: every ``fields[]`` entry covers ``array_len`` (or one)
elements of ``size`` bytes each, a ``struct`` element is a nested vmsd written
inline, and after the fields come the listed subsections, each behind a
``0x05``/counted-name/be32-version header.  Old-style (``save_state``) entries
(``migration/savevm.c``, ``vmstate_save_old_style``) describe one ``data``
buffer of the top-level ``size``.

Descriptions come from the stream and are not trusted: every number is checked
against the bytes actually present before it is used, nesting is bounded, and
problems raise :class:`~qmigstream.errors.DescriptionError` (the description is
wrong), :class:`~qmigstream.errors.StreamError` (the bytes disagree with it) or
:class:`~qmigstream.errors.Truncated`, each at an absolute stream offset.
"""

from __future__ import annotations

import struct

from ..errors import DescriptionError, LimitExceeded, StreamError, Truncated
from ..vmdesc import members
from . import types as T
from .node import Field, Vmsd

#: Deepest vmsd nesting followed (structs, subsections, list items).
MAX_DEPTH = 64
#: Most elements one entry may describe when they take no bytes each.
MAX_EMPTY_ELEMENTS = 1 << 16

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def payload_size(entry: dict) -> int:
    """Bytes of payload the description ``entry`` implies.

    Sum over ``fields`` of ``size`` times ``array_len`` (or 1), plus for each
    subsection its header (``1 + 1 + len(name) + 4``) and its own payload; an
    old-style entry is its top-level ``size``.  The stream codec uses this to
    find where a device section ends.
    """
    if not isinstance(entry, dict):
        raise DescriptionError("description is not an object")
    if "vmsd_name" not in entry and "size" in entry:
        return _count(entry, "size", "old-style entry")
    return _vmsd_size(entry, 0, entry.get("vmsd_name") or entry.get("name") or "?")


def _vmsd_size(desc: dict, depth: int, path: str) -> int:
    if depth > MAX_DEPTH:
        raise LimitExceeded(f"{path}: description nested deeper than {MAX_DEPTH}")
    total = 0
    for i, f in enumerate(_list(desc, "fields", path)):
        if not isinstance(f, dict):
            raise DescriptionError(f"{path}.fields[{i}] is not an object")
        where = f"{path}.{f.get('name', i)}"
        n = _count(f, "array_len", where) if "array_len" in f else 1
        total += n * _count(f, "size", where)
    for s in _subsections(desc, path):
        name = _name_bytes(s, path)
        total += 6 + len(name) + _vmsd_size(s, depth + 1, f"{path}/{s['vmsd_name']}")
    return total


def decode(entry: dict, data, base_offset: int = 0) -> Vmsd:
    """Decode ``data`` (exactly one section payload) through ``entry``.

    ``entry`` is one ``devices[]`` element of the VMDESCRIPTION JSON (or any
    vmsd description, e.g. the 8.2+ ``configuration`` object); ``data`` starts
    right after the section header, at absolute offset ``base_offset``, and
    must hold exactly :func:`payload_size` bytes.
    """
    if not isinstance(entry, dict):
        raise DescriptionError("description is not an object", base_offset)
    buf = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    dec = _Decoder(buf, base_offset)
    old_style = "vmsd_name" not in entry and "size" in entry
    node = Vmsd("old-style" if old_style else "section", entry.get("name"),
                entry.get("vmsd_name"), entry.get("version"),
                base_offset, base_offset, buf, base_offset)
    if type(entry.get("instance_id")) is int:
        node.instance_id = entry["instance_id"]
    path = str(entry.get("name") or entry.get("vmsd_name") or "?")
    end = dec.body(node, entry, 0, len(buf), 0, path)
    if old_style:
        declared = _count(entry, "size", path)
        if declared != end:
            raise DescriptionError(f"{path}: old-style size {declared} but its fields "
                                   f"cover {end} bytes", base_offset,
                                   expected=declared, found=end)
    if end != len(buf):
        dec.leftover(end, len(buf), path)
    node.size = end
    return node


class _Decoder:
    def __init__(self, buf, base: int):
        self.buf = buf
        self.base = base

    # -- vmsd bodies ------------------------------------------------------

    def body(self, node: Vmsd, desc: dict, pos: int, end: int, depth: int, path: str) -> int:
        """Decode ``desc``'s fields and subsections from ``pos``; return the end."""
        if depth > MAX_DEPTH:
            raise LimitExceeded(f"{path}: vmsd nesting deeper than {MAX_DEPTH}",
                                self.base + pos)
        fields = desc.get("fields")
        if type(fields) is not list:
            raise DescriptionError(f"{path}: 'fields' is not a list", self.base + pos)
        out = node.fields
        field = self.field
        for i, f in enumerate(fields):
            node_field, pos = field(f, i, pos, end, depth, path)
            out.append(node_field)
        if "subsections" in desc:
            for s in _subsections(desc, path, self.base + pos):
                sub, pos = self.subsection(s, pos, end, depth + 1, path)
                node.subsections.append(sub)
        return pos

    def subsection(self, desc: dict, pos: int, end: int, depth: int, path: str):
        buf, base = self.buf, self.base
        name = _name_bytes(desc, path, base + pos)
        version = desc.get("version")
        if type(version) is not int:
            raise DescriptionError(f"{path}: subsection without an integer 'version'",
                                   base + pos)
        where = f"{path}/{desc['vmsd_name']}"
        header = 6 + len(name)
        self.need(pos, header, end, where)
        if buf[pos] != T.QEMU_VM_SUBSECTION:
            raise StreamError(f"{where}: no subsection header", base + pos,
                              expected=T.QEMU_VM_SUBSECTION, found=buf[pos])
        got = bytes(buf[pos + 2:pos + 2 + buf[pos + 1]])
        if buf[pos + 1] != len(name) or got != name:
            raise StreamError(f"{path}: subsection name differs from the description",
                              base + pos + 1, expected=name.decode("latin-1"),
                              found=bytes(buf[pos + 2:min(pos + 2 + buf[pos + 1], end)])
                              .decode("latin-1"))
        (wire_version,) = _BE32.unpack_from(buf, pos + 2 + len(name))
        if wire_version != version:
            raise StreamError(f"{where}: subsection version differs from the description",
                              base + pos + 2 + len(name), expected=version, found=wire_version)
        node = Vmsd("subsection", None, name.decode("latin-1"), version,
                    base + pos, base + pos + header, buf, base)
        stop = self.body(node, desc, pos + header, end, depth, where)
        node.size = stop - pos
        return node, stop

    def element_vmsd(self, kind: str, name, desc: dict, pos: int, end: int, depth: int,
                     path: str) -> tuple:
        vmsd_name = desc.get("vmsd_name")
        if not isinstance(vmsd_name, str):
            raise DescriptionError(f"{path}: nested description without 'vmsd_name'",
                                   self.base + pos)
        node = Vmsd(kind, name, vmsd_name, desc.get("version"),
                    self.base + pos, self.base + pos, self.buf, self.base)
        stop = self.body(node, desc, pos, end, depth + 1, f"{path}<{vmsd_name}>")
        node.size = stop - pos
        return node, stop

    # -- fields -----------------------------------------------------------

    def field(self, f, i: int, pos: int, end: int, depth: int, path: str):
        try:
            name = f["name"]
            type_ = f["type"]
            size = f["size"]
        except (KeyError, TypeError):
            name = type_ = size = None
        if type(name) is not str or type(type_) is not str:
            raise DescriptionError(f"{path}.fields[{i}] without 'name' and 'type' strings",
                                   self.base + pos)
        if type(size) is not int or size < 0:
            raise DescriptionError(f"{path}.{name}: 'size' is not a non-negative integer",
                                   self.base + pos, found=size)
        array_len = f.get("array_len")
        index = f.get("index")
        n = 1
        if array_len is not None:
            n = array_len = _count(f, "array_len", f"{path}.{name}", self.base + pos)
        if index is not None:
            index = _count(f, "index", f"{path}.{name}", self.base + pos)
        total = n * size
        if pos + total > end:
            self.need(pos, total, end, f"{path}.{name}")
        prim = T.PRIMITIVES.get(type_)
        if prim is not None and size == prim.width and array_len is None:
            (value,) = prim.one.unpack_from(self.buf, pos)
            kind = prim.kind
            if kind is T.BOOL:
                if value <= 1:
                    value = value == 1
            elif kind is T.TIMER and value == T.TIMER_NOT_ARMED:
                value = None
        else:
            if size == 0 and n > MAX_EMPTY_ELEMENTS:
                raise LimitExceeded(f"{path}.{name}: {n} elements of 0 bytes", self.base + pos)
            value = self.elements(f, type_, name, n, size, pos, depth, f"{path}.{name}")
            if array_len is None:
                value = value[0]
        return Field(name, type_, index, array_len, self.base + pos, size, value,
                     self.buf, self.base), pos + total

    def elements(self, f: dict, type_: str, name: str, n: int, size: int, pos: int,
                 depth: int, where: str) -> list:
        buf, base = self.buf, self.base
        prim = T.PRIMITIVES.get(type_)
        if prim is not None:
            if size == prim.width:
                raw = T.array_codec(prim.code, n).unpack_from(buf, pos)
                return _present(prim.kind, raw)
            if size == 1:                      # NULL elements, described before 10.0
                return self.nulls(n, pos, where)
            raise DescriptionError(f"{where}: size {size} for type {type_!r} "
                                   f"(wire width {prim.width})", base + pos,
                                   expected=prim.width, found=size)
        if type_ == T.NULLPTR:
            if size != 1:
                raise DescriptionError(f"{where}: nullptr of size {size}", base + pos,
                                       expected=1, found=size)
            return self.nulls(n, pos, where)
        if type_ == T.STRUCT:
            body = f.get("struct")
            if not isinstance(body, dict):
                raise DescriptionError(f"{where}: struct field without a 'struct' object",
                                       base + pos)
            if not body:
                return self.null_elements(n, size, pos, where)
            return self.structs(name, body, n, size, pos, depth, where)
        if type_ in (T.VSTRUCT, T.TMP):
            bodies = inline_vmsds(f)
            if not bodies:
                return self.null_elements(n, size, pos, where)
            if len(bodies) > 1:
                raise DescriptionError(f"{where}: {type_} describes {len(bodies)} vmsds",
                                       base + pos)
            return self.structs(name, bodies[0], n, size, pos, depth, where)
        if type_ in (T.QTAILQ, T.QLIST):
            bodies = inline_vmsds(f)
            return [self.exact(self.list_items(name, bodies, p, p + size, depth, where),
                               p, size, where)
                    for p in _starts(pos, n, size)]
        if type_ == T.GTREE:
            bodies = inline_vmsds(f)
            return [self.exact(self.gtree(name, bodies, p, p + size, depth, where),
                               p, size, where)
                    for p in _starts(pos, n, size)]
        if type_ == T.BITMAP:
            if size % 8:
                raise DescriptionError(f"{where}: bitmap of {size} bytes is not whole "
                                       "be64 words", base + pos)
            words = size // 8
            codec = T.array_codec("Q", words)
            return [list(codec.unpack_from(buf, p)) for p in _starts(pos, n, size)]
        if type_ == T.FD and size in (0, 4):
            if size == 0:
                return [None] * n
            return list(T.array_codec("i", n).unpack_from(buf, pos))
        return [bytes(buf[p:p + size]) for p in _starts(pos, n, size)]

    def structs(self, name, body, n, size, pos, depth, where) -> list:
        out = []
        for k in range(n):
            p = pos + k * size
            node, stop = self.element_vmsd("struct", name, body, p, p + size, depth, where)
            if stop != p + size:
                raise DescriptionError(f"{where}: element decoded to {stop - p} bytes, "
                                       f"the description says {size}", self.base + stop,
                                       expected=size, found=stop - p)
            if n > 1:
                node.position = k
            out.append(node)
        return out

    def list_items(self, name, bodies, pos, end, depth, where):
        """``put_qtailq``/``put_qlist``: ``u8 1`` + vmsd per item, ``u8 0``."""
        buf, base = self.buf, self.base
        items = []
        for k, body in enumerate(bodies):
            self.need(pos, 1, end, where)
            if buf[pos] != 1:
                raise StreamError(f"{where}: list item {k} marker", base + pos,
                                  expected=1, found=buf[pos])
            node, pos = self.element_vmsd("item", name, body, pos + 1, end, depth, where)
            node.position = k
            items.append(node)
        self.need(pos, 1, end, where)
        if buf[pos] != 0:
            raise StreamError(f"{where}: end of list", base + pos, expected=0, found=buf[pos])
        return items, pos + 1

    def gtree(self, name, bodies, pos, end, depth, where):
        """``put_gtree``: be32 count, per node ``u8 1`` + key + value, ``u8 0``."""
        buf, base = self.buf, self.base
        self.need(pos, 4, end, where)
        (count,) = _BE32.unpack_from(buf, pos)
        if count == len(bodies):
            direct = True
        elif count * 2 == len(bodies):
            direct = False
        else:
            raise DescriptionError(f"{where}: gtree of {count} nodes described by "
                                   f"{len(bodies)} vmsds", base + pos,
                                   expected=count, found=len(bodies))
        pos += 4
        nodes = []
        for k in range(count):
            self.need(pos, 1, end, where)
            if buf[pos] != 1:
                raise StreamError(f"{where}: gtree node {k} marker", base + pos,
                                  expected=1, found=buf[pos])
            pos += 1
            if direct:
                self.need(pos, 8, end, where)
                (key,) = _BE64.unpack_from(buf, pos)
                pos += 8
                value_desc = bodies[k]
            else:
                key, pos = self.element_vmsd("item", name, bodies[2 * k], pos, end, depth, where)
                value_desc = bodies[2 * k + 1]
            value, pos = self.element_vmsd("item", name, value_desc, pos, end, depth, where)
            value.position = k
            nodes.append((key, value))
        self.need(pos, 1, end, where)
        if buf[pos] != 0:
            raise StreamError(f"{where}: end of gtree", base + pos, expected=0, found=buf[pos])
        return nodes, pos + 1

    def exact(self, result, pos, size, where):
        value, stop = result
        if stop != pos + size:
            raise DescriptionError(f"{where}: element decoded to {stop - pos} bytes, the "
                                   f"description says {size}", self.base + stop,
                                   expected=size, found=stop - pos)
        return value

    def null_elements(self, n, size, pos, where):
        if size != 1:
            raise DescriptionError(f"{where}: element without a description and of "
                                   f"size {size}", self.base + pos, expected=1, found=size)
        return self.nulls(n, pos, where)

    def nulls(self, n, pos, where):
        buf = self.buf
        for p in range(pos, pos + n):
            if buf[p] != T.VMS_NULLPTR_MARKER:
                raise StreamError(f"{where}: NULL pointer marker", self.base + p,
                                  expected=T.VMS_NULLPTR_MARKER, found=buf[p])
        return [T.NULL_POINTER] * n

    # -- bounds -----------------------------------------------------------

    def need(self, pos: int, count: int, end: int, where: str):
        if pos + count <= end:
            return
        if end == len(self.buf):
            raise Truncated(f"{where}: payload ends inside the described fields",
                            self.base + pos, needed=pos + count - end, available=end - pos)
        raise DescriptionError(f"{where}: {count} bytes described at {pos} run past the "
                               f"end of the enclosing element ({end - pos} left)",
                               self.base + pos, expected=count, found=end - pos)

    def leftover(self, pos: int, end: int, path: str):
        buf = self.buf
        if buf[pos] == T.QEMU_VM_SUBSECTION and pos + 2 <= end:
            name = bytes(buf[pos + 2:pos + 2 + buf[pos + 1]]).decode("latin-1")
            raise StreamError(f"{path}: subsection {name!r} is not in the description",
                              self.base + pos)
        raise StreamError(f"{path}: {end - pos} bytes after the described fields",
                          self.base + pos, expected="end of payload", found=bytes(buf[pos:pos + 8]))


def _starts(pos: int, n: int, size: int):
    """Start positions of ``n`` consecutive elements of ``size`` bytes (size may be 0)."""
    return [pos + k * size for k in range(n)]


def inline_vmsds(f: dict) -> list:
    """The vmsd descriptions a ``put`` hook wrote into field object ``f``.

    ``vstruct`` and ``tmp`` fields hold one (``vmsd_name``, ``version``,
    ``fields``, ``subsections``) run of keys, ``qtailq``/``qlist`` one run per
    list element, ``gtree`` one (direct keys) or two (key vmsd, value vmsd) per
    node; each run starts at a ``vmsd_name`` key.
    """
    out: list = []
    current = None
    for key, value in members(f):
        if key == "vmsd_name":
            current = {"vmsd_name": value}
            out.append(current)
        elif current is not None and key in ("version", "fields", "subsections"):
            current[key] = value
    return out


def _present(kind: str, raw: tuple) -> list:
    if kind == T.INT or kind == T.FLOAT:
        return list(raw)
    if kind == T.BOOL:
        return [bool(b) if b <= 1 else b for b in raw]
    return [None if v == T.TIMER_NOT_ARMED else v for v in raw]


def _count(obj: dict, key: str, where: str, offset: int | None = None) -> int:
    v = obj.get(key)
    if type(v) is not int or v < 0:
        raise DescriptionError(f"{where}: {key!r} is not a non-negative integer",
                               offset, found=v)
    return v


def _list(desc: dict, key: str, where: str) -> list:
    v = desc.get(key)
    if not isinstance(v, list):
        raise DescriptionError(f"{where}: {key!r} is not a list")
    return v


def _subsections(desc: dict, where: str, offset: int | None = None) -> list:
    subs = desc.get("subsections", [])
    if not isinstance(subs, list) or not all(isinstance(s, dict) for s in subs):
        raise DescriptionError(f"{where}: 'subsections' is not a list of objects", offset)
    return subs


def _name_bytes(desc: dict, where: str, offset: int | None = None) -> bytes:
    name = desc.get("vmsd_name")
    if not isinstance(name, str):
        raise DescriptionError(f"{where}: subsection without a 'vmsd_name'", offset)
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:       # a lone surrogate escape (\ud800): no wire name
        raise DescriptionError(f"{where}: subsection name {name!r} has no byte form",
                               offset) from None
    if len(raw) > 255:
        raise DescriptionError(f"{where}: subsection name longer than 255 bytes", offset)
    return raw
