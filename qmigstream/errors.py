"""The one exception family of qmigstream.

Every problem found in input data is a :class:`StreamError` (or a subclass)
carrying the byte offset where it was found, the section it was found in (if
any), and what was expected versus what was found.  The CLI catches this
family alone, prints :meth:`StreamError.one_line` and exits 2; anything else
escaping is a bug.
"""

from __future__ import annotations


class QmigstreamError(Exception):
    """Base of every error qmigstream raises on purpose."""

    def one_line(self) -> str:
        return str(self).splitlines()[0] if str(self) else type(self).__name__


class StreamError(QmigstreamError):
    """Malformed input at a byte offset."""

    def __init__(self, message: str, offset: int | None = None, *,
                 section: str | None = None, expected=None, found=None):
        self.message = message
        self.offset = offset
        self.section = section
        self.expected = expected
        self.found = found
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.offset is not None:
            parts.append(f"at offset {self.offset} (0x{self.offset:x})")
        if self.section:
            parts.append(f"in section {self.section}")
        where = (" ".join(parts) + ": ") if parts else ""
        text = where + self.message
        if self.expected is not None or self.found is not None:
            text += f" (expected {_show(self.expected)}, found {_show(self.found)})"
        return text

    def with_section(self, section: str | None) -> "StreamError":
        """Return self, with the section filled in if it was not known yet."""
        if self.section is None and section is not None:
            self.section = section
            self.args = (self._render(),)
        return self

    def to_json(self) -> dict:
        return {"error": type(self).__name__, "message": self.message,
                "offset": self.offset, "section": self.section,
                "expected": _jsonable(self.expected), "found": _jsonable(self.found)}


class Truncated(StreamError):
    """The input ended before a record was complete."""

    def __init__(self, message: str = "stream truncated", offset: int | None = None, *,
                 section: str | None = None, needed: int | None = None,
                 available: int | None = None):
        self.needed = needed
        self.available = available
        super().__init__(message, offset, section=section)
        if needed is not None:
            self.expected = f"{needed} bytes"
            self.found = f"{available} available" if available is not None else None
            self.args = (self._render(),)


class BadMagic(StreamError):
    """The input is not a QEMU migration stream at all."""


class UnsupportedVersion(StreamError):
    """A version number QEMU itself would refuse."""


class LimitExceeded(StreamError):
    """A length, count or nesting depth beyond what the format (or the input) allows."""


class CompressedPageError(StreamError):
    """A COMPRESS_PAGE record whose zlib data QEMU's loader refuses to inflate."""


class DescriptionError(StreamError):
    """The VMDESCRIPTION trailer is damaged or disagrees with the stream."""


class DeviceError(QmigstreamError):
    """An emulated device refused an operation; ``errno`` is what a kernel driver returns."""

    def __init__(self, message: str, errno: int | None = None):
        self.errno = errno
        super().__init__(message)


def _show(v) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        return "0x" + b.hex() if len(b) <= 16 else "0x" + b[:16].hex() + "..."
    if isinstance(v, int) and not isinstance(v, bool) and v > 9:
        return f"0x{v:x}"
    return repr(v) if isinstance(v, str) else str(v)


def _jsonable(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if v is None or isinstance(v, (int, str, float, bool)):
        return v
    return str(v)
