"""XBZRLE: the run-length delta encoding of RAM pages (migration/xbzrle.c).

An encoded page is a sequence of ``zrun_len nzrun_len nzrun_bytes`` triples:
``zrun_len`` bytes unchanged from the old page, then ``nzrun_len`` new bytes.
Lengths are "small" ULEB128 (util/cutils.c ``uleb128_encode_small``): one byte
below 0x80, else two, at most 0x3fff.  The encoder emits maximal runs, omits
the final zero run, answers 0 for an unchanged page and -1 (here: ``None``)
when the encoding would not fit in ``dlen`` bytes, with the same overflow checks
in the same places as QEMU.  The decoder enforces QEMU's rules: at least two
input bytes at the start of each run, an empty zero run only first, a
non-empty nzrun, no output past ``dlen``.
"""

from __future__ import annotations

from .errors import StreamError

ULEB_MAX = 0x3FFF


def uleb128_encode_small(n: int) -> bytes:
    if not 0 <= n <= ULEB_MAX:
        raise ValueError(f"small uleb128 out of range: {n}")
    if n < 0x80:
        return bytes((n,))
    return bytes(((n & 0x7F) | 0x80, n >> 7))


def _uleb128_decode_small(src, i):
    """Return (value, bytes used) or (None, 0) for an invalid second byte."""
    b = src[i]
    if not b & 0x80:
        return b, 1
    if i + 1 >= len(src):
        return None, 0
    b2 = src[i + 1]
    if b2 & 0x80:
        return None, 0
    return (b & 0x7F) | (b2 << 7), 2


def encode(old: bytes, new: bytes, dlen: int | None = None):
    """Encode ``new`` against ``old``.

    Returns ``b""`` for an unchanged page (QEMU's 0: nothing is sent), the
    encoded bytes, or ``None`` when the result would exceed ``dlen`` (QEMU's
    -1: the page is sent as a normal page).  ``dlen`` defaults to the page size.
    """
    slen = len(new)
    if len(old) != slen:
        raise ValueError("old and new pages differ in size")
    if dlen is None:
        dlen = slen
    out = bytearray()
    i = 0
    while i < slen:
        if len(out) + 2 > dlen:
            return None
        j = _common_prefix(old, new, i)
        if j - i == slen:
            return b""
        if j == slen:
            return bytes(out)
        out += uleb128_encode_small(j - i)
        i = j
        if len(out) + 2 > dlen:
            return None
        j = _diff_prefix(old, new, i)
        n = j - i
        out += uleb128_encode_small(n)
        if len(out) + n > dlen:
            return None
        out += new[i:j]
        i = j
    return bytes(out)


def _common_prefix(a, b, i):
    """First index >= i where a and b differ (len if none)."""
    n = len(a)
    # Compare in growing blocks, then narrow down.
    step = 64
    while i < n:
        k = min(n, i + step)
        if a[i:k] == b[i:k]:
            i = k
            step = min(step * 2, 4096)
            continue
        while i < k and a[i] == b[i]:
            i += 1
        return i
    return n


def _diff_prefix(a, b, i):
    n = len(a)
    while i < n and a[i] != b[i]:
        i += 1
    return i


def decode(data: bytes, old: bytes, *, offset: int | None = None) -> bytes:
    """Apply an encoded delta to ``old`` and return the new page.

    Raises :class:`StreamError` (at ``offset`` + position in ``data``) where
    QEMU's ``xbzrle_decode_buffer`` returns -1.
    """
    dlen = len(old)
    dst = bytearray(old)
    slen = len(data)
    i = d = 0

    def bad(msg, at):
        return StreamError(f"invalid XBZRLE data: {msg}",
                           None if offset is None else offset + at, section="ram")
    while i < slen:
        if slen - i < 2:
            raise bad("fewer than 2 bytes at the start of a run", i)
        count, used = _uleb128_decode_small(data, i)
        if count is None:
            raise bad("length longer than 14 bits", i)
        if i and not count:
            raise bad("empty zero run after the first", i)
        i += used
        d += count
        if d > dlen:
            raise bad("zero run past the end of the page", i - used)
        if slen - i < 2:
            raise bad("fewer than 2 bytes at the start of a run", i)
        count, used = _uleb128_decode_small(data, i)
        if count is None:
            raise bad("length longer than 14 bits", i)
        if not count:
            raise bad("empty non-zero run", i)
        i += used
        if d + count > dlen or i + count > slen:
            raise bad("non-zero run past the end of the page or the data", i - used)
        dst[d:d + count] = data[i:i + count]
        d += count
        i += count
    return bytes(dst)
