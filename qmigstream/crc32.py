"""Arithmetic on zlib's CRC-32 (ISO-HDLC, reflected polynomial 0xEDB88320).

zlib.crc32 is linear over GF(2): the CRC of ``A + B`` is the CRC of ``A``
carried through ``len(B)`` zero bytes, XOR the CRC of ``B``.  Carrying a CRC
through ``n`` zero bytes is a multiplication by ``x^(8n)`` modulo the
polynomial, which takes a few dozen integer operations per set bit of ``n``
instead of ``n`` bytes of work.  So CRCs of pieces combine into the CRC of
their concatenation without reading the bytes again (:func:`combine`), and
the CRC of ``k`` copies of a piece takes ``log2(k)`` steps (:func:`repeat`).

Polynomials are kept as zlib keeps its CRC register: bit 31 is ``x^0``, bit 0
is ``x^31``.
"""

from __future__ import annotations


POLY = 0xEDB88320        # x^32 + x^26 + ... + 1, reflected, without x^32
ONE = 1 << 31            # the polynomial 1
_MASK = 0xFFFFFFFF


def mulmod(a: int, b: int) -> int:
    """``a * b`` modulo the CRC polynomial (both reflected, 32-bit)."""
    p = 0
    m = ONE
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return p


# _X2N[k] = x^(2^k) mod P: x^1, x^2, x^4, ... (period of x divides 2^32 - 1)
_X2N = [ONE >> 1]
for _ in range(63):
    _X2N.append(mulmod(_X2N[-1], _X2N[-1]))
del _

_shift_cache = {}


def x8n(n: int) -> int:
    """``x^(8 n)`` modulo the polynomial: the operator of ``n`` zero bytes."""
    got = _shift_cache.get(n)
    if got is not None:
        return got
    p = ONE
    k = 3                                   # 8 n = n << 3
    m = n
    while m:
        if m & 1:
            p = mulmod(_X2N[k % 64], p)
        m >>= 1
        k += 1
    if len(_shift_cache) < 4096:
        _shift_cache[n] = p
    return p


_uses = {}
_tables = {}


def _byte_tables(op: int):
    """Multiplication by ``op`` as four 256-entry tables, one per byte of the
    operand (the product is linear in the operand)."""
    basis = []
    v = op
    for _ in range(32):                    # basis[k] = op * x^k: the operand's bit 31-k
        basis.append(v)
        v = (v >> 1) ^ POLY if v & 1 else v >> 1
    tables = []
    for lane in range(4):                  # operand bits 8*lane .. 8*lane+7
        t = [0] * 256
        for bit in range(8):
            val = basis[31 - (8 * lane + bit)]
            step = 1 << bit
            for j in range(step):
                t[step + j] = t[j] ^ val
        tables.append(t)
    return tables


def shift(crc: int, n: int) -> int:
    """The CRC register ``crc`` carried through ``n`` zero bytes (without the
    pre- and post-inversion: what :func:`combine` needs).  A length shifted by
    often gets byte tables (four lookups instead of a 32-step multiply)."""
    if not crc:
        return 0
    t = _tables.get(n)
    if t is not None:
        t0, t1, t2, t3 = t
        return t0[crc & 0xFF] ^ t1[(crc >> 8) & 0xFF] ^ t2[(crc >> 16) & 0xFF] ^ t3[crc >> 24]
    k = _uses.get(n, 0) + 1
    if k >= 8 and len(_tables) < 256:
        _tables[n] = _byte_tables(x8n(n))
    elif len(_uses) < 65536:
        _uses[n] = k
    return mulmod(x8n(n), crc)


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """``zlib.crc32(A + B)`` from ``zlib.crc32(A)``, ``zlib.crc32(B)`` and ``len(B)``."""
    return shift(crc_a, len_b) ^ crc_b


def remove_prefix(crc_ab: int, crc_a: int, len_b: int) -> int:
    """``zlib.crc32(B)`` from ``zlib.crc32(A + B)``, ``zlib.crc32(A)`` and ``len(B)``."""
    return crc_ab ^ shift(crc_a, len_b)


def repeat(crc: int, length: int, count: int) -> int:
    """``zlib.crc32(X * count)`` from ``crc = zlib.crc32(X)`` and ``length = len(X)``
    (doubling: ``log2(count)`` combines)."""
    out, out_len = 0, 0
    piece, piece_len = crc, length
    while count:
        if count & 1:
            out = combine(out, piece, piece_len) if out_len else piece
            out_len += piece_len
        count >>= 1
        if count:
            piece = combine(piece, piece, piece_len)
            piece_len *= 2
    return out & _MASK

