"""XBZRLE codec against QEMU's rules (migration/xbzrle.c)."""

import os

import pytest
from hypothesis import given, settings, strategies as st

from qmigstream import xbzrle
from qmigstream.errors import StreamError

PS = 4096


def test_uleb128_small():
    assert xbzrle.uleb128_encode_small(0) == b"\x00"
    assert xbzrle.uleb128_encode_small(0x7F) == b"\x7f"
    assert xbzrle.uleb128_encode_small(0x80) == b"\x80\x01"
    assert xbzrle.uleb128_encode_small(0x3FFF) == b"\xff\x7f"
    with pytest.raises(ValueError):
        xbzrle.uleb128_encode_small(0x4000)


def test_known_encoding():
    old = bytes(PS)
    new = bytearray(old)
    new[10:13] = b"abc"
    new[200] = 1
    enc = xbzrle.encode(old, bytes(new))
    # zrun 10, nzrun 3 "abc", zrun 187, nzrun 1 0x01; trailing zero run omitted
    assert enc == b"\x0a\x03abc" + b"\xbb\x01" + b"\x01\x01"
    assert xbzrle.decode(enc, old) == bytes(new)


def test_unchanged_and_overflow():
    page = os.urandom(PS)
    assert xbzrle.encode(page, page) == b""
    # Every other byte changed: the encoding cannot fit in a page.
    other = bytes(b ^ (0xFF if i % 2 else 0) for i, b in enumerate(page))
    assert xbzrle.encode(page, other) is None
    # Whole page different: one nzrun of 4096 needs 1+2+4096 bytes > 4096.
    assert xbzrle.encode(bytes(PS), b"\x01" * PS) is None
    assert xbzrle.encode(bytes(PS), b"\x01" * PS, dlen=PS + 3) == b"\x00\x80\x20" + b"\x01" * PS


@pytest.mark.parametrize("data,msg", [
    (b"\x00", "fewer than 2"),
    (b"\x00\x00\x00", "empty non-zero run"),
    (b"\x01\x01a\x00\x01b", "empty zero run after the first"),
    (b"\x80\x80\x01a", "longer than 14 bits"),
    (b"\x80\x20\x01a", "past the end"),        # zero run of 4096 then more data
    (b"\x00\x05ab", "past the end of the page or the data"),
])
def test_decode_rejects_like_qemu(data, msg):
    with pytest.raises(StreamError, match=msg) as e:
        xbzrle.decode(data, bytes(PS), offset=1000)
    assert e.value.offset >= 1000


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=64, max_size=64), st.lists(st.tuples(st.integers(0, 63), st.binary(min_size=1, max_size=8)), max_size=12))
def test_encode_decode_property(old, edits):
    new = bytearray(old)
    for pos, b in edits:
        new[pos:pos + len(b)] = b
    new = bytes(new[:64])
    enc = xbzrle.encode(old, new)
    if enc is None:
        return
    if enc == b"":
        assert new == old
    else:
        assert xbzrle.decode(enc, old) == new
        # Canonical: encoding the result again gives the same bytes.
        assert xbzrle.encode(old, xbzrle.decode(enc, old)) == enc
