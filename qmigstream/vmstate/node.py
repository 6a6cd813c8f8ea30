"""The decoded tree of a vmstate payload.

Two kinds of node mirror what ``vmstate_save_state_v`` (migration/vmstate.c)
writes: a :class:`Vmsd` is one vmsd instance (a device section's payload, a
struct element, a subsection, a list element), a :class:`Field` is one entry of
its ``fields`` list in the JSON description.  Offsets are absolute stream
offsets; ``raw`` is read from the decoded buffer only when asked for.
"""

from __future__ import annotations


class Vmsd:
    """One vmsd instance on the wire: its fields, then its subsections.

    ``kind`` is ``section`` (a device section payload), ``old-style`` (a
    ``save_state`` payload described as one ``data`` buffer), ``struct`` (an
    element of a struct/vstruct/tmp field), ``item`` (an element of a
    qtailq/qlist/gtree) or ``subsection``.  A subsection's ``offset`` is that of
    its header (``0x05``, counted name, be32 version) and ``body_offset`` where
    its fields start; for every other kind the two are equal.
    """

    __slots__ = ("kind", "name", "vmsd_name", "version", "instance_id", "position",
                 "offset", "body_offset", "size", "fields", "subsections", "_buf", "_base")

    def __init__(self, kind, name, vmsd_name, version, offset, body_offset, buf, base):
        self.kind = kind
        self.name = name
        self.vmsd_name = vmsd_name
        self.version = version
        self.instance_id = None
        self.position = None
        self.offset = offset
        self.body_offset = body_offset
        self.size = 0
        self.fields: list[Field] = []
        self.subsections: list[Vmsd] = []
        self._buf = buf
        self._base = base

    @property
    def header_size(self) -> int:
        return self.body_offset - self.offset

    @property
    def raw(self) -> bytes:
        start = self.offset - self._base
        return bytes(self._buf[start:start + self.size])

    def field(self, name: str) -> "Field | None":
        """The first field called ``name`` (None if there is none)."""
        for f in self.fields:
            if f.name == name:
                return f
        return None

    def subsection(self, vmsd_name: str) -> "Vmsd | None":
        for s in self.subsections:
            if s.vmsd_name == vmsd_name:
                return s
        return None

    def walk(self):
        """Every field of this vmsd and of everything nested in it, in wire order."""
        for f in self.fields:
            yield f
            for child in f.nested():
                yield from child.walk()
        for s in self.subsections:
            yield from s.walk()

    def __repr__(self) -> str:
        return (f"Vmsd({self.kind} {self.vmsd_name or self.name!r} v{self.version} "
                f"@{self.offset} size={self.size} fields={len(self.fields)} "
                f"subsections={len(self.subsections)})")


class Field:
    """One ``fields[]`` entry of the description and the bytes it covers.

    ``index`` is the JSON ``index`` (one entry per element of a non-compressible
    array), ``array_len`` the JSON ``array_len`` (one entry for all elements).
    ``elem_size`` is the JSON ``size`` (bytes of one element) and ``size`` the
    bytes of the whole entry (``array_len * elem_size``).  ``value`` is the
    element's value, or with ``array_len`` the list of element values:

    * fixed-width types: ``int`` (``bool`` for 0/1 bools, ``float`` for
      ``float64``/``CPU_Double_U``, ``None`` for a timer that is not armed);
    * ``buffer``, ``unused_buffer`` and every unknown type: ``bytes``;
    * ``bitmap``: list of be64 words; ``fd``: ``None`` (0 bytes) or ``int``;
    * ``struct``/``vstruct``/``tmp``: a :class:`Vmsd`;
    * ``qtailq``/``qlist``: list of :class:`Vmsd`; ``gtree``: list of
      ``(key, Vmsd)`` with ``key`` an ``int`` (direct key) or a :class:`Vmsd`;
    * a NULL element of a pointer array: :data:`~qmigstream.vmstate.types.NULL_POINTER`.
    """

    __slots__ = ("name", "type", "index", "array_len", "offset", "elem_size",
                 "value", "_buf", "_base")

    def __init__(self, name, type_, index, array_len, offset, elem_size, value, buf, base):
        self.name = name
        self.type = type_
        self.index = index
        self.array_len = array_len
        self.offset = offset
        self.elem_size = elem_size
        self.value = value
        self._buf = buf
        self._base = base

    @property
    def count(self) -> int:
        return 1 if self.array_len is None else self.array_len

    @property
    def size(self) -> int:
        return self.count * self.elem_size

    @property
    def elements(self) -> list:
        """The element values as a list (one element unless ``array_len``)."""
        return [self.value] if self.array_len is None else self.value

    def element_offset(self, position: int) -> int:
        return self.offset + position * self.elem_size

    @property
    def raw(self) -> bytes:
        start = self.offset - self._base
        return bytes(self._buf[start:start + self.size])

    def nested(self):
        """The :class:`Vmsd` nodes held by this field, in wire order."""
        for v in self.elements:
            if isinstance(v, Vmsd):
                yield v
            elif isinstance(v, list):
                for item in v:
                    if isinstance(item, Vmsd):
                        yield item
                    elif isinstance(item, tuple):
                        yield from (x for x in item if isinstance(x, Vmsd))

    def __repr__(self) -> str:
        shape = f"[{self.array_len}]" if self.array_len is not None else (
            f"#{self.index}" if self.index is not None else "")
        return f"Field({self.name!r}{shape} {self.type} @{self.offset} size={self.size})"
