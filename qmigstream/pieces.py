"""Bytes held as pieces: read-only views of buffers that do not change, in order.

A device's data chunk of 1 MiB that spans two parts of a blob, or a device
image that arrived as views of a mapped stream file, is kept as the views
themselves instead of being joined into new memory.  :class:`Pieces` behaves
as the code that reads such bytes needs: ``len``, indexing, slices (as
``bytes``), ``bytes()``, ``==`` by contents, CRC-32; writers hand ``parts``
to ``writev``.  The buffers behind the views must not change while a Pieces
holds them.
"""

from __future__ import annotations

import zlib


def _flat(p) -> memoryview:
    mv = memoryview(p)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class Pieces:
    """The concatenation of ``parts`` (bytes-like), not copied."""

    __slots__ = ("parts", "size")

    def __init__(self, parts):
        self.parts = [_flat(p) for p in parts if len(p)]
        self.size = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    tobytes = __bytes__

    def __repr__(self):
        return f"Pieces({self.size} bytes in {len(self.parts)} parts)"

    def read(self, pos: int, n: int) -> bytes:
        """Bytes ``pos .. pos+n`` (fewer at the end)."""
        out = []
        for p in self.parts:
            if n <= 0:
                break
            if pos >= len(p):
                pos -= len(p)
                continue
            take = p[pos:pos + n]
            out.append(take)
            n -= len(take)
            pos = 0
        return b"".join(out)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step != 1:
                return bytes(self)[key]
            return self.read(start, max(0, stop - start))
        i = key + self.size if key < 0 else key
        if not 0 <= i < self.size:
            raise IndexError("Pieces index out of range")
        for p in self.parts:
            if i < len(p):
                return p[i]
            i -= len(p)
        raise IndexError("Pieces index out of range")       # pragma: no cover

    def crc32(self, crc: int = 0) -> int:
        for p in self.parts:
            crc = zlib.crc32(p, crc)
        return crc

    def copy_into(self, out, at: int = 0) -> None:
        """Copy the bytes into the writable buffer ``out`` at ``at``."""
        ov = _flat(out)
        for p in self.parts:
            ov[at:at + len(p)] = p
            at += len(p)

    def __eq__(self, other):
        if isinstance(other, Pieces):
            other = bytes(other)
        try:
            o = _flat(other)
        except TypeError:
            return NotImplemented
        if len(o) != self.size:
            return False
        at = 0
        for p in self.parts:
            if p != o[at:at + len(p)]:
                return False
            at += len(p)
        return True

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None
