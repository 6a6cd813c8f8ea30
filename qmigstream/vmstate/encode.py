"""Rebuild vmstate payload bytes from a decoded tree, and show a tree as JSON.

:func:`encode` writes every field from its value, the way the ``put``
functions of ``migration/vmstate-types.c`` and ``vmstate_save_state_v`` /
``vmstate_subsection_save`` (``migration/vmstate.c``) write them; only opaque
types (``buffer``, ``unused_buffer``, device-specific infos) are their bytes.
"""

from __future__ import annotations

import math
import struct

from ..errors import StreamError
from ..wire import header as H
from . import types as T
from .node import Field, Vmsd

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def encode(node) -> bytes:
    """The wire bytes of a :class:`Vmsd` (or a single :class:`Field`)."""
    out: list = []
    if isinstance(node, Field):
        _field(node, out)
    else:
        _vmsd(node, out)
    return b"".join(out)


def _vmsd(node: Vmsd, out: list):
    if node.kind == "subsection":
        out.append(H.SubsectionHeader.build({"name": node.vmsd_name, "version_id": node.version}))
    for f in node.fields:
        _field(f, out)
    for s in node.subsections:
        _vmsd(s, out)


def _field(f: Field, out: list):
    values = f.elements
    prim = T.PRIMITIVES.get(f.type)
    try:
        if prim is not None and T.NULL_POINTER not in values:
            out.append(T.array_codec(prim.code, len(values)).pack(*_wire(prim.kind, values)))
            return
        for v in values:
            _element(f.type, prim, v, out)
    except (struct.error, TypeError, ValueError, OverflowError) as e:
        raise StreamError(f"{f.name}: value does not fit type {f.type!r}: {e}", f.offset) from None


def _element(type_: str, prim, v, out: list):
    if v is T.NULL_POINTER:
        out.append(bytes((T.VMS_NULLPTR_MARKER,)))
    elif prim is not None:
        out.append(struct.pack(">" + prim.code, *_wire(prim.kind, [v])))
    elif type_ in (T.STRUCT, T.VSTRUCT, T.TMP):
        _vmsd(v, out)
    elif type_ in (T.QTAILQ, T.QLIST):
        for item in v:
            out.append(b"\x01")
            _vmsd(item, out)
        out.append(b"\x00")
    elif type_ == T.GTREE:
        out.append(_BE32.pack(len(v)))
        for key, value in v:
            out.append(b"\x01")
            if isinstance(key, Vmsd):
                _vmsd(key, out)
            else:
                out.append(_BE64.pack(key))
            _vmsd(value, out)
        out.append(b"\x00")
    elif type_ == T.BITMAP:
        out.append(T.array_codec("Q", len(v)).pack(*v))
    elif type_ == T.FD and (v is None or isinstance(v, int)):
        if v is not None:
            out.append(struct.pack(">i", v))
    else:
        out.append(bytes(v))


def _wire(kind: str, values) -> list:
    if kind == T.TIMER:
        return [T.TIMER_NOT_ARMED if v is None else v for v in values]
    if kind == T.BOOL:
        return [int(v) for v in values]
    return values


# --------------------------------------------------------------------------

def to_json(node) -> dict:
    """A plain dict/list tree of a decoded node, with absolute offsets.

    Bytes become hex strings, the NULL element of a pointer array the string
    ``"nullptr"``, non-finite floats their ``repr``.
    """
    if isinstance(node, Field):
        return _field_json(node)
    out = {}
    if node.name is not None:
        out["name"] = node.name
    if node.instance_id is not None:
        out["instance_id"] = node.instance_id
    if node.position is not None:
        out["position"] = node.position
    out["kind"] = node.kind
    if node.vmsd_name is not None:
        out["vmsd_name"] = node.vmsd_name
    if node.version is not None:
        out["version"] = node.version
    out["offset"] = node.offset
    if node.kind == "subsection":
        out["body_offset"] = node.body_offset
    out["size"] = node.size
    out["fields"] = [_field_json(f) for f in node.fields]
    if node.subsections:
        out["subsections"] = [to_json(s) for s in node.subsections]
    return out


def _field_json(f: Field) -> dict:
    out = {"name": f.name, "type": f.type}
    if f.index is not None:
        out["index"] = f.index
    if f.array_len is not None:
        out["array_len"] = f.array_len
    out["offset"] = f.offset
    out["size"] = f.size
    if f.array_len is not None:
        out["elem_size"] = f.elem_size
        out["value"] = [_value_json(v) for v in f.value]
    else:
        out["value"] = _value_json(f.value)
    return out


def _value_json(v):
    if v is T.NULL_POINTER:
        return "nullptr"
    if isinstance(v, Vmsd):
        return to_json(v)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, tuple):                    # gtree node
        return {"key": _value_json(v[0]), "value": _value_json(v[1])}
    if isinstance(v, list):
        return [_value_json(x) for x in v]
    return v
