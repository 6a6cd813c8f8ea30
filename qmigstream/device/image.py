"""Storage for device images: ``bytearray`` for small ones, :class:`ImageBuffer` for large.

A large image (a device with tens of MiB of state) in a ``bytearray`` costs a
page fault per 4 KiB when it is made (``bytearray(n)`` writes every byte) and
its memory cannot be asked for as huge pages.  :class:`ImageBuffer` is
private anonymous memory (``mmap``) advised as huge pages where the kernel
offers them, and behaves as the device code uses a ``bytearray``: indexing,
slicing (slices are ``bytes``), slice assignment of the same length, the
buffer protocol, ``len`` and ``==`` by contents.
"""

from __future__ import annotations

import mmap
import zlib

from ..pieces import Pieces

#: Images of at least this many bytes are ImageBuffers.
LARGE = 1 << 20


class ImageBuffer(mmap.mmap):
    """``n`` zero bytes of anonymous memory (huge pages where offered)."""

    def __new__(cls, n: int):
        self = super().__new__(cls, -1, max(n, 1),
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            try:
                self.madvise(advice)
            except OSError:
                pass
        return self

    def __eq__(self, other):
        try:
            o = memoryview(other).cast("B")
        except TypeError:
            return NotImplemented
        n = len(self)
        if len(o) != n:
            return False
        step = 1 << 20
        return all(self[p:p + step] == o[p:p + step].tobytes() for p in range(0, n, step))

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None

    def copy(self) -> "ImageBuffer":
        out = ImageBuffer(len(self))
        out[:] = self
        return out


def new_image(n: int):
    """``n`` zero bytes to build an image in: an ImageBuffer when large."""
    return ImageBuffer(n) if n >= LARGE else bytearray(n)


def copy_image(image):
    """A private, writable copy of ``image`` (an ImageBuffer when large)."""
    if isinstance(image, ImageBuffer):
        return image.copy()
    if type(image) is Pieces:
        out = new_image(len(image))
        image.copy_into(out)
        return out
    return bytearray(image)


def is_image(obj) -> bool:
    """Whether ``obj`` can be installed as an image as it is (not copied): a
    bytearray, an ImageBuffer, or :class:`~qmigstream.pieces.Pieces` (read-only
    views, made a writable image when first needed as one)."""
    return type(obj) is bytearray or isinstance(obj, ImageBuffer) or type(obj) is Pieces


def image_crc32(image) -> int:
    """zlib's CRC-32 of an image of any of those kinds."""
    return image.crc32() if type(image) is Pieces else zlib.crc32(image)
