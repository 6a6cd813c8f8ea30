"""Buffered input with absolute byte offsets, for files, pipes and bytes.

The reader never holds the whole stream: it keeps one window of at most a few
MiB.  Every read is bounds-checked and a short input raises
:class:`~qmigstream.errors.Truncated` naming the offset and how many bytes were
missing.
"""

from __future__ import annotations

import io
import mmap
import os
import stat
import struct

from ..errors import Truncated

CHUNK = 1 << 20
#: Most bytes asked of the file object in one read() (a read() of N allocates N
#: bytes before it knows how many the input has; N comes from length fields).
READ_MAX = 8 << 20

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Source:
    """A forward-only byte source that knows where it is.

    ``src.offset`` is the absolute stream offset of the next unread byte.
    ``base`` is the offset of the first byte of ``fileobj`` (non-zero when a
    source continues a stream, e.g. after spooling).
    """

    def __init__(self, fileobj, *, base: int = 0, size: int | None = None,
                 name: str | None = None, chunk: int = CHUNK):
        if isinstance(fileobj, mmap.mmap):
            # a mapped file: the whole of it is the window (nothing is copied)
            self._f = None
            self._buf = fileobj
            self.size = base + len(fileobj) if size is None else size
            self.seekable = True
        elif isinstance(fileobj, (bytes, bytearray, memoryview)):
            data = bytes(fileobj)
            self._f = None
            self._buf = data
            self.size = base + len(data) if size is None else size
            self.seekable = True
        else:
            self._f = fileobj
            self._buf = b""
            self.size = size if size is not None else _file_size(fileobj, base)
            self.seekable = _is_seekable(fileobj)
            self._origin = (base - fileobj.tell()) if self.seekable else 0
        self._pos = 0          # index into _buf
        self._base = base      # absolute offset of _buf[0]
        self._eof = self._f is None
        self.chunk = chunk
        self.name = name

    # -- position ---------------------------------------------------------
    @property
    def offset(self) -> int:
        return self._base + self._pos

    def available(self) -> int:
        """Bytes buffered right now (without reading more)."""
        return len(self._buf) - self._pos

    def remaining_known(self) -> int | None:
        """Bytes left in the input when its size is known, else None."""
        if self.size is None:
            return None
        return max(0, self.size - self.offset)

    # -- filling ----------------------------------------------------------
    def fill(self, need: int) -> int:
        """Try to have ``need`` bytes buffered; return how many are."""
        have = len(self._buf) - self._pos
        if have >= need or self._eof:
            return have
        tail = self._buf[self._pos:]
        self._base += self._pos
        self._pos = 0
        want = max(need - have, self.chunk)
        parts = [tail]
        if have and self.seekable and type(self._f) is io.FileIO:
            # Read the unread tail again together with the new bytes: the new
            # window is one buffer from the kernel, not a join that copies it.
            # Same window, byte for byte (the tail is checked).
            self._f.seek(self._base - self._origin)
            # Windows of one size while the tail is small: the allocator then
            # reuses the memory of a window just freed instead of mapping (and
            # faulting in) new pages for each slightly larger one.
            total = self.chunk if need <= self.chunk else have + min(want, READ_MAX)
            got = self._f.read(total)
            if got[:have] == tail:
                if len(got) >= need:
                    self._buf = got
                    return len(got)
                parts = [got]
                have = len(got)
                want = max(need - have, 0) or self.chunk
            else:       # the file changed under us: keep what was read before
                self._f.seek(self._base + have - self._origin)
        while have < need and not self._eof:
            got = self._f.read(min(want, READ_MAX))
            if not got:
                self._eof = True
                break
            parts.append(got)
            have += len(got)
            want = max(need - have, 0) or self.chunk
        if len(parts) == 2 and not parts[0]:
            self._buf = parts[1]        # nothing was left over: no join (a copy)
        else:
            self._buf = b"".join(parts)
        return have

    def at_end(self) -> bool:
        return self.fill(1) == 0

    # -- reading ----------------------------------------------------------
    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes without consuming them (fewer only at the end)."""
        self.fill(n)
        return self._buf[self._pos:self._pos + n]

    def read(self, n: int, what: str = "data") -> bytes:
        """Exactly ``n`` bytes or :class:`Truncated`."""
        if n < 0:
            raise ValueError("negative read")
        have = len(self._buf) - self._pos
        if have < n:
            if self.size is not None and n - have > CHUNK and self.offset + n > self.size:
                # Do not buffer huge amounts just to find out the input is short.
                raise Truncated(f"stream ends inside {what}", self.offset,
                                needed=n, available=self.size - self.offset)
            have = self.fill(n)
            if have < n:
                raise Truncated(f"stream ends inside {what}", self.offset,
                                needed=n, available=have)
        p = self._pos
        self._pos = p + n
        return self._buf[p:p + n]

    def read_view(self, n: int, what: str = "data"):
        """:meth:`read`, as a read-only view when the source is a mapped file (its
        bytes are not copied; the view keeps the mapping alive), else bytes."""
        if type(self._buf) is MappedFile:
            have = len(self._buf) - self._pos
            if have < n:
                raise Truncated(f"stream ends inside {what}", self.offset, needed=n,
                                available=have)
            p = self._pos
            self._pos = p + n
            return memoryview(self._buf)[p:p + n]
        return self.read(n, what)

    def skip(self, n: int, what: str = "data") -> None:
        """Consume ``n`` bytes without keeping them (seeks when it can)."""
        have = len(self._buf) - self._pos
        if n <= have:
            self._pos += n
            return
        if self._f is not None and self.seekable and self.size is not None:
            target = self.offset + n
            if target > self.size:
                raise Truncated(f"stream ends inside {what}", self.offset,
                                needed=n, available=self.size - self.offset)
            self._f.seek(target - self._origin)
            self._buf, self._pos, self._base = b"", 0, target
            return
        left = n
        while left:
            take = min(left, max(self.fill(min(left, self.chunk)), 0))
            if take == 0:
                raise Truncated(f"stream ends inside {what}", self.offset,
                                needed=left, available=0)
            self._pos += take
            left -= take

    def u8(self, what: str = "byte") -> int:
        return self.read(1, what)[0]

    def be16(self, what: str = "be16") -> int:
        return _U16.unpack(self.read(2, what))[0]

    def be32(self, what: str = "be32") -> int:
        return _U32.unpack(self.read(4, what))[0]

    def be64(self, what: str = "be64") -> int:
        return _U64.unpack(self.read(8, what))[0]

    def counted_string(self, what: str = "string") -> str:
        """``u8 len`` + bytes, as QEMU's qemu_put_counted_string writes it."""
        n = self.u8(what + " length")
        return self.read(n, what).decode("latin-1")

    def spool(self) -> None:
        """Copy the rest of a pipe to a temporary file, so it can be read ahead.

        The source keeps its position; afterwards it is seekable and its size
        known.  Used to read a stream's trailer before its device sections.
        """
        if self._f is None or self.seekable:
            return
        import tempfile
        tmp = tempfile.TemporaryFile()
        tmp.write(self._buf[self._pos:])
        while True:
            chunk = self._f.read(1 << 20)
            if not chunk:
                break
            tmp.write(chunk)
        here = self.offset
        self.size = here + tmp.tell()
        tmp.seek(0)
        self._f = tmp
        self._buf, self._pos, self._base = b"", 0, here
        self._eof = False
        self.seekable = True
        self._origin = here

    def read_at(self, start: int, n: int) -> bytes:
        """Bytes at an absolute offset ahead of the position (seekable sources)."""
        if self._f is None:
            rel = start - self._base
            return self._buf[rel:rel + n]
        here = self._f.tell()
        try:
            self._f.seek(start - self._origin)
            return self._f.read(n)
        finally:
            self._f.seek(here)

    # -- fast-path access -------------------------------------------------
    def window(self, need: int = 0):
        """Return ``(buf, pos)``: the buffered bytes and the current index.

        Callers that parse many small records walk ``buf`` themselves and then
        call :meth:`advance`.  ``need`` asks for that many bytes to be buffered
        first if the input has them.
        """
        if need:
            self.fill(need)
        return self._buf, self._pos

    def advance_to(self, pos: int) -> None:
        """Set the buffer index after a fast-path walk over :meth:`window`."""
        if pos < self._pos or pos > len(self._buf):
            raise ValueError("advance outside the window")
        self._pos = pos


def _is_seekable(f) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, ValueError, OSError):
        return False


def _file_size(f, base: int) -> int | None:
    try:
        if not f.seekable():
            return None
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return base + st.st_size - f.tell()
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        try:
            here = f.tell()
            end = f.seek(0, io.SEEK_END)
            f.seek(here)
            return base + end - here
        except Exception:
            return None


class MappedFile(mmap.mmap):
    """A read-only mapping of a whole file that keeps the file open (``file``), so
    that its bytes can also be read with ``preadv`` while the mapping lives.
    Its bytes count as not changing while it lives (``stable_bytes``: views of it
    may be kept instead of copies), as long as the file is not written meanwhile."""

    file = None
    stable_bytes = True

    def fileno(self) -> int:
        return self.file.fileno()


def open_mapped(path, **kw) -> Source | None:
    """A :class:`Source` over a read-only mapping of the regular file ``path`` (its
    window is the whole file, read as the kernel's page cache holds it), or None
    when ``path`` is not a non-empty regular file that can be mapped.

    Slices of the window are bytes like those of any source; records that keep
    a view of it (runs of pages) keep the mapping alive.  The file must not
    shrink while it is mapped: reading a page past a new end of the file ends
    the process (SIGBUS), so only callers that ask for it map (``replay``, which
    ``--no-map`` makes read instead)."""
    f = None
    try:
        f = open(path, "rb", buffering=0)
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            f.close()
            return None
        m = MappedFile(f.fileno(), st.st_size, prot=mmap.PROT_READ)
    except (OSError, ValueError, OverflowError):
        if f is not None:
            f.close()
        return None
    m.file = f
    try:
        m.madvise(mmap.MADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    return Source(m, name=str(path), **kw)


def open_source(path_or_file, **kw) -> Source:
    """Open a path (``-`` = stdin), a binary file object, or bytes as a :class:`Source`."""
    if isinstance(path_or_file, (bytes, bytearray, memoryview)):
        return Source(path_or_file, **kw)
    if isinstance(path_or_file, (str, os.PathLike)):
        if str(path_or_file) == "-":
            import sys
            return Source(sys.stdin.buffer, name="<stdin>", **kw)
        f = open(path_or_file, "rb", buffering=0)
        s = Source(f, name=str(path_or_file), **kw)
        s._owned = f
        return s
    return Source(path_or_file, **kw)
