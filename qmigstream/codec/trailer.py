"""Finding the VMDESCRIPTION trailer from the end of a stream.

The search itself is :func:`qmigstream.vmdesc.locate_trailer` (one
implementation for the reader, ``check`` and :func:`qmigstream.vmdesc.find_trailer`);
this module keeps the name the codec imports and how much of the end it reads.
"""

from __future__ import annotations

from ..vmdesc import locate_trailer

__all__ = ["TAIL_BYTES", "locate_trailer"]

#: How much of the end of a stream is searched for the trailer.
TAIL_BYTES = 16 << 20
