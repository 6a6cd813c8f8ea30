"""Wire forms of the VMStateInfo types named in the VMDESCRIPTION JSON.

The JSON ``type`` of a field is the ``name`` of its ``VMStateInfo`` (or
``struct``/``vstruct`` for nested vmsds), see ``vmfield_get_type_name`` in
``migration/vmstate.c``.  The infos and their ``put`` functions live in
``migration/vmstate-types.c`` (QEMU 5.2 to 10.x/master), except ``timer``
(``migration/savevm.c``) and ``float64`` (vmstate-types.c until it was removed
as unused; kept here for older streams).  This table is the one declaration of
the fixed-width types; the decoder and the encoder both read it.
"""

from __future__ import annotations

import struct

#: ``QEMU_VM_SUBSECTION`` (migration/savevm.h): first byte of a subsection header.
QEMU_VM_SUBSECTION = 0x05
#: ``VMS_NULLPTR_MARKER`` (include/migration/vmstate.h): a NULL element of a
#: ``VMS_ARRAY_OF_POINTER`` array is written as this one byte ('0').
VMS_NULLPTR_MARKER = 0x30
#: The all-ones expiry ``timer_put`` writes for a timer that is not armed.
TIMER_NOT_ARMED = 0xFFFF_FFFF_FFFF_FFFF

# How a fixed-width value is presented.
INT, BOOL, FLOAT, TIMER = "int", "bool", "float", "timer"


class Primitive:
    """A fixed-width VMStateInfo: its JSON name, wire layout and presentation."""

    __slots__ = ("name", "code", "kind", "note", "one", "width")

    def __init__(self, name: str, code: str, kind: str, note: str):
        self.name = name
        self.code = code            # struct code of one element (big-endian, no prefix)
        self.kind = kind            # INT, BOOL, FLOAT or TIMER
        self.note = note
        self.one = struct.Struct(">" + code)
        self.width = self.one.size

    def __repr__(self) -> str:
        return f"Primitive({self.name!r}, {self.code!r}, {self.kind})"


#: Fixed-width types, by JSON name.  All big-endian.
PRIMITIVES: dict[str, Primitive] = {p.name: p for p in (
    Primitive("bool", "B", BOOL, "1 byte; the loader takes any non-zero byte as true"),
    Primitive("int8", "b", INT, "1 byte, signed"),
    Primitive("int16", "h", INT, "be16, signed"),
    Primitive("int32", "i", INT, "be32, signed"),
    Primitive("int64", "q", INT, "be64, signed"),
    Primitive("uint8", "B", INT, "1 byte"),
    Primitive("uint16", "H", INT, "be16"),
    Primitive("uint32", "I", INT, "be32"),
    Primitive("uint64", "Q", INT, "be64"),
    Primitive("uint8 equal", "B", INT, "1 byte; the loader requires its own value"),
    Primitive("uint16 equal", "H", INT, "be16; the loader requires its own value"),
    Primitive("int32 equal", "i", INT, "be32, signed; the loader requires its own value"),
    Primitive("uint32 equal", "I", INT, "be32; the loader requires its own value"),
    Primitive("int64 equal", "Q", INT, "be64; QEMU's name for the *uint64* equal info"),
    Primitive("int32 le", "i", INT, "be32, signed; the loader requires 0 <= v <= its own value"),
    Primitive("float64", "d", FLOAT, "be64 IEEE double"),
    Primitive("CPU_Double_U", "d", FLOAT, "be32 upper word, be32 lower word of a double"),
    Primitive("timer", "Q", TIMER, "be64 expiry in ns; all ones = not armed"),
)}

#: Types whose element is a nested vmsd written inline.  ``struct`` carries it
#: under a ``"struct"`` key; ``vstruct`` and ``tmp`` put its keys in the field itself.
STRUCT, VSTRUCT, TMP = "struct", "vstruct", "tmp"
#: ``u8 1`` + element vmsd per list element, ``u8 0`` at the end.
QTAILQ, QLIST = "qtailq", "qlist"
#: ``be32`` node count, per node ``u8 1`` + key + value vmsd, ``u8 0`` at the end.
GTREE = "gtree"
#: ``size`` bits as ceil(bits/64) be64 words (the JSON size is in bytes).
BITMAP = "bitmap"
#: One byte ``VMS_NULLPTR_MARKER`` (10.0+ describes NULL elements with this type).
NULLPTR = "nullptr"
#: An fd passed with SCM_RIGHTS (no bytes) or, in cpr-exec mode, a be32.
FD = "fd"
#: Raw bytes of the described size; every type not named above is treated so too.
BUFFER, UNUSED_BUFFER = "buffer", "unused_buffer"


class _NullPointer:
    """The value of a NULL element of a pointer array (one ``0x30`` byte)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NULL_POINTER"

    def __reduce__(self):
        return "NULL_POINTER"


NULL_POINTER = _NullPointer()

_ARRAY_CODECS: dict = {}


def array_codec(code: str, count: int) -> struct.Struct:
    """A cached ``struct.Struct`` for ``count`` big-endian elements of ``code``."""
    key = (code, count)
    codec = _ARRAY_CODECS.get(key)
    if codec is None:
        codec = struct.Struct(f">{count}{code}")
        if len(_ARRAY_CODECS) < 4096:
            _ARRAY_CODECS[key] = codec
    return codec
