"""Device sections decoded through the VMDESCRIPTION JSON.

* :func:`payload_size` - payload bytes a ``devices[]`` entry implies
* :func:`decode` - payload bytes -> :class:`Vmsd` / :class:`Field` tree
* :func:`encode` - tree -> the identical bytes, rebuilt from the values
* :func:`to_json` - tree -> plain dicts and lists with absolute offsets

Mirrors ``migration/vmstate.c`` and ``migration/vmstate-types.c``; the wire
form of each type is declared once in :mod:`qmigstream.vmstate.types`.
"""

from .decode import decode, inline_vmsds, payload_size
from .encode import encode, to_json
from .node import Field, Vmsd
from .types import NULL_POINTER, PRIMITIVES

__all__ = ["decode", "encode", "payload_size", "to_json", "inline_vmsds",
           "Field", "Vmsd", "NULL_POINTER", "PRIMITIVES"]
