"""The VMDESCRIPTION trailer search: one implementation for the reader, check and vmdesc."""

from __future__ import annotations

import struct

from qmigstream import vmdesc
from qmigstream.codec import trailer
from qmigstream.codec.reader import StreamReader
from qmigstream.vmdesc import JsonObject, find_trailer, locate_trailer

BODY = b"QEVM\x00\x00\x00\x03" + b"\x05" * 40      # stands in for the sections


def with_trailer(js: bytes, before: bytes = BODY) -> bytes:
    return before + b"\x00\x06" + struct.pack(">I", len(js)) + js


def test_the_codec_uses_the_same_function():
    assert trailer.locate_trailer is vmdesc.locate_trailer


def test_found_at_the_record_byte_with_its_json():
    js = b'{"page_size": 4096, "devices": [{"name": "a", "instance_id": 0}]}'
    data = with_trailer(js)
    at = len(BODY) + 1
    assert locate_trailer(data, 0) == (at, js, {"page_size": 4096,
                                              "devices": [{"name": "a", "instance_id": 0}]})
    # on a tail that starts further in, offsets stay absolute
    tail = data[20:]
    assert locate_trailer(tail, 20)[0] == at
    assert find_trailer(tail, len(data)) == at


def test_repeated_keys_are_kept():
    js = (b'{"page_size": 4096, "devices": [{"name": "q", "instance_id": 0, '
          b'"fields": [{"name": "e", "e": 1, "e": 2}]}]}')
    obj = locate_trailer(with_trailer(js), 0)[2]
    inner = obj["devices"][0]["fields"][0]
    assert isinstance(inner, JsonObject) and inner.pairs == [("name", "e"), ("e", 1), ("e", 2)]


def test_qjson_strings_are_raw():
    """QEMU <= 5.2 copies strings without escaping: a backslash is just a byte."""
    js = b'{ "page_size" : 4096, "devices" : [ { "name" : "a\\q", "instance_id" : 0 } ] }'
    found = locate_trailer(with_trailer(js), 0)
    assert found is not None and found[2]["devices"][0]["name"] == "a\\q"
    assert find_trailer(with_trailer(js), len(with_trailer(js))) == len(BODY) + 1


def test_any_json_object_is_the_trailer_but_checked_wants_a_description():
    for js in (b'{"devices": 3}', b'{"a": NaN}', b'{}'):
        data = with_trailer(js)
        assert locate_trailer(data, 0)[1] == js
        assert locate_trailer(data, 0, checked=True) is None
        assert find_trailer(data, len(data)) is None


def test_nothing_that_is_not_exactly_a_trailer():
    js = b'{"page_size": 4096, "devices": []}'
    assert locate_trailer(with_trailer(js) + b"x", 0) is None          # bytes after it
    assert locate_trailer(with_trailer(js)[:-1], 0) is None            # cut
    assert locate_trailer(with_trailer(b"[1, 2]"), 0) is None          # not an object
    assert locate_trailer(with_trailer(b'{"a": 1'), 0) is None         # not JSON
    assert locate_trailer(b"\x06" + struct.pack(">I", len(js))[1:] + js, 0) is None
    assert locate_trailer(b"", 0) is None
    deep = b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert locate_trailer(with_trailer(deep), 0) is None               # no RecursionError


def test_the_reader_finds_it_ahead():
    """The reader's look-ahead (device entries before the sections) uses the same search."""
    js = b'{"page_size": 4096, "devices": [{"name": "a", "instance_id": 0}]}'
    data = b"QEVM\x00\x00\x00\x03" + with_trailer(js, b"")
    r = StreamReader(data)
    it = r.records()
    assert next(it).kind == "file_header"
    assert next(it).kind == "eof"          # the trailer is not read yet, but known
    assert r.description is not None and r.description.offset == 9
    assert [x.kind for x in it] == ["vmdescription"]


def test_trailer_followed_by_trailing_bytes_is_found():
    import struct
    from qmigstream.vmdesc import locate_trailer, locate_trailer_before_trailing_bytes
    js = b'{"page_size": 4096, "devices": [{"name": "a", "instance_id": 0}]}'
    rec = b"\x00\x06" + struct.pack(">I", len(js)) + js
    data = b"\x11" * 100 + rec
    assert locate_trailer(data, 1000) == (1000 + 101, js, {"page_size": 4096,
                                                           "devices": [{"name": "a", "instance_id": 0}]})
    for junk in (b"\x00", b"\x00\x06\x00\x00\x00\x02{}", b"garbage\x00\x00"):
        got = locate_trailer_before_trailing_bytes(data + junk, 1000)
        assert got is not None and got[0] == 1000 + 101 and got[1] == js
    assert locate_trailer(data + b"garbage\x00\x00", 1000) is None
    # JSON without a devices list, or not JSON, is not taken for a trailer
    fake = b"\x00\x06" + struct.pack(">I", 4) + b"{xx}" + b"\x00"
    assert locate_trailer_before_trailing_bytes(b"\x11" * 10 + fake, 0) is None
