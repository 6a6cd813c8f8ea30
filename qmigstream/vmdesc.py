"""The VMDESCRIPTION trailer: QEMU's JSON description of the device sections.

After ``QEMU_VM_EOF`` a precopy stream ends with ``0x06``, ``be32 N`` and ``N``
bytes of JSON (no NUL), written by ``qemu_savevm_state_complete_precopy_non_iterable``
in ``migration/savevm.c``.  Two writers have produced those bytes, and a
re-encoder must reproduce each exactly:

``qjson``  (QEMU <= 5.2, ``migration/qjson.c``)
    ``{ `` ... `` }`` and ``[ `` ... `` ]`` (so an empty container is ``{  }`` /
    ``[  ]``), members separated by ``, ``, keys written ``"k" : v``, strings
    copied between quotes *without any escaping*.

``jsonwriter``  (QEMU 6.0+, ``qobject/json-writer.c``, non-pretty)
    ``{`` ... ``}``, ``[`` ... ``]``, separator ``, ``, keys ``"k": v``; strings
    escaped: ``\\"`` ``\\\\`` ``\\b`` ``\\f`` ``\\n`` ``\\r`` ``\\t``, any other code
    point below 0x20 or from 0x7f on as ``\\uXXXX`` (upper-case hex), code points
    above the BMP as a surrogate pair.  The output is pure ASCII.

Numbers are always integers (``%PRId64``).  The top level is
``{"page_size": P, "devices": [...]}``; from 8.2 on a ``"configuration"``
object (the description of the configuration vmstate) comes first.

Some VMStateInfo ``put`` hooks (``qtailq``, ``qlist``, ``gtree`` in
``migration/vmstate-types.c``) write one nested vmsd description per element
*into the same JSON object*, so keys can repeat; such objects parse to a
:class:`JsonObject` that keeps every member in order.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field

from .errors import DescriptionError

#: ``QEMU_VM_EOF`` and ``QEMU_VM_VMDESCRIPTION`` (migration/savevm.h).
QEMU_VM_EOF = 0x00
QEMU_VM_VMDESCRIPTION = 0x06

#: Writer styles.
QJSON = "qjson"
JSONWRITER = "jsonwriter"
STYLES = (QJSON, JSONWRITER)

#: Deepest nesting accepted in a description (QEMU's real ones stay below 30).
MAX_DEPTH = 128

_BE32 = struct.Struct(">I")


class JsonObject(dict):
    """A JSON object whose keys repeat.

    ``pairs`` holds every member in order (what :func:`dump` writes); the dict
    itself maps each key to its *last* value, as a plain JSON reader would.
    """

    __slots__ = ("pairs",)

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = list(pairs)


def members(obj: dict) -> list:
    """Every ``(key, value)`` member of a parsed object, repeats included."""
    return obj.pairs if isinstance(obj, JsonObject) else list(obj.items())


@dataclass
class VmDescription:
    """A parsed VMDESCRIPTION trailer.

    ``offset`` is the absolute stream offset of the JSON's first byte, ``data``
    the JSON bytes, ``style`` the writer that produced them.
    """

    obj: dict
    style: str
    offset: int
    data: bytes
    #: Absolute offset of each ``devices[]`` entry's JSON text.
    device_offsets: list = field(default_factory=list, repr=False)
    _index: dict | None = field(default=None, repr=False)

    @property
    def page_size(self) -> int:
        return self.obj["page_size"]

    @property
    def devices(self) -> list:
        return self.obj["devices"]

    @property
    def configuration(self) -> dict | None:
        """The ``configuration`` vmsd description (8.2+), or None."""
        return self.obj.get("configuration")

    def device(self, name: str, instance_id: int, occurrence: int = 0) -> dict | None:
        """The ``devices[]`` entry of section ``name``/``instance_id`` (None if absent)."""
        if self._index is None:
            index: dict = {}
            for entry in self.devices:
                index.setdefault((entry["name"], entry["instance_id"]), []).append(entry)
            self._index = index
        found = self._index.get((name, instance_id), ())
        return found[occurrence] if occurrence < len(found) else None

    def is_exact(self) -> bool:
        """True when :func:`dump` gives back these very bytes."""
        return dump(self.obj, self.style) == self.data


# --------------------------------------------------------------------------
# Parsing
#
# The top level and the ``devices`` list are walked here, so that each device
# entry's offset is known; every value below them is read by the json module's
# C scanner (``raw_decode``), with an ``object_pairs_hook`` that keeps repeated
# keys.  QJSON strings are raw: doubling every backslash before scanning makes
# the scanner give them back as they are (outside strings a backslash is an
# error either way), and ``strict=False`` lets raw control characters through.

_WS = re.compile(r"[ \t\n\r]*")


def _object(pairs):
    obj = dict(pairs)
    return obj if len(obj) == len(pairs) else JsonObject(pairs)


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


_DECODERS = {
    JSONWRITER: json.JSONDecoder(object_pairs_hook=_object, parse_constant=_no_constant),
    QJSON: json.JSONDecoder(object_pairs_hook=_object, parse_constant=_no_constant,
                            strict=False),
}
#: The same, taking NaN and Infinity: the trailer search (:func:`locate_trailer`)
#: accepts any JSON object, as a plain JSON reader would.
_LENIENT_DECODERS = {
    JSONWRITER: json.JSONDecoder(object_pairs_hook=_object),
    QJSON: json.JSONDecoder(object_pairs_hook=_object, strict=False),
}


def detect_style(data: bytes) -> str | None:
    """``qjson`` if the text starts as QJSON does (``{ ``), ``jsonwriter`` for ``{``."""
    if data[:2] == b"{ ":
        return QJSON
    if data[:1] == b"{":
        return JSONWRITER
    return None


def parse(data: bytes, offset: int = 0) -> VmDescription:
    """Parse the JSON bytes of a VMDESCRIPTION trailer.

    ``offset`` is the absolute stream offset of ``data[0]`` and is used in error
    offsets.  Raises :class:`DescriptionError` at the first byte that is not JSON
    or when the top level is not ``{["configuration": {...},] "page_size": int,
    "devices": [{"name": str, "instance_id": int, ...}, ...]}``.
    """
    data = bytes(data)
    style, reader, (obj, key_offsets, device_offsets) = _scan(data, offset, _DECODERS)
    reader.check_depth(obj)
    desc = VmDescription(obj, style, offset, data, device_offsets)
    _check_shape(desc, key_offsets, reader)
    return desc


def _scan(data: bytes, offset: int, decoders):
    """``(style, reader, reader.run())``: the JSON object read, nothing checked
    beyond it being one JSON object (:class:`DescriptionError` otherwise)."""
    style = detect_style(data)
    if style is None:
        raise DescriptionError("VMDESCRIPTION JSON does not start with '{'", offset,
                               expected=b"{", found=data[:1])
    reader = _Reader(data, style, offset, decoders[style])
    return style, reader, reader.run()


class _Reader:
    def __init__(self, data: bytes, style: str, base: int, decoder):
        self.data = data
        self.base = base
        self.source = data.decode("utf-8", "surrogateescape")
        self.escaped = style == QJSON and "\\" in self.source
        self.text = self.source.replace("\\", "\\\\") if self.escaped else self.source
        self.decoder = decoder

    def offset(self, pos: int) -> int:
        """Absolute stream offset of position ``pos`` of the scanned text."""
        if self.escaped:                # each source backslash is two in the text
            pos -= self.text.count("\\", 0, pos) // 2
        if len(self.source) == len(self.data):
            return self.base + pos
        return self.base + len(self.source[:pos].encode("utf-8", "surrogateescape"))

    def fail(self, message: str, pos: int, **kw):
        raise DescriptionError(message, self.offset(pos), **kw)

    def skip(self, pos: int) -> int:
        return _WS.match(self.text, pos).end()

    def expect(self, pos: int, ch: str, what: str) -> int:
        pos = self.skip(pos)
        if self.text[pos:pos + 1] != ch:
            self.fail(f"expected {what}", pos, expected=ch, found=self.text[pos:pos + 8] or "end")
        return pos + 1

    def value(self, pos: int):
        pos = self.skip(pos)
        try:
            return self.decoder.raw_decode(self.text, pos)
        except json.JSONDecodeError as e:
            self.fail(f"not JSON: {e.msg}", e.pos)
        except RecursionError:
            self.fail(f"JSON nested deeper than {MAX_DEPTH} levels", pos)
        except ValueError as e:         # NaN/Infinity, numbers too long for int()
            self.fail(f"not JSON: {e}", pos)

    def run(self):
        """Walk the top-level object and the ``devices`` list; scan the rest."""
        text = self.text
        pos = self.expect(0, "{", "'{'")
        pairs, key_offsets, device_offsets = [], [], []
        if self.skip(pos) < len(text) and text[self.skip(pos)] == "}":
            pos = self.skip(pos) + 1
        else:
            while True:
                pos = self.skip(pos)
                if text[pos:pos + 1] != '"':
                    self.fail("expected a quoted key", pos, found=text[pos:pos + 8] or "end")
                key_at = self.offset(pos)
                key, pos = self.value(pos)
                key_offsets.append((key, key_at))
                pos = self.expect(pos, ":", "':'")
                pos = self.skip(pos)
                if key == "devices" and text[pos:pos + 1] == "[":
                    value, pos = self.devices(pos + 1, device_offsets)
                else:
                    value, pos = self.value(pos)
                pairs.append((key, value))
                pos = self.skip(pos)
                ch = text[pos:pos + 1]
                pos += 1
                if ch == "}":
                    break
                if ch != ",":
                    self.fail("expected ',' or '}'", pos - 1, found=ch or "end")
        end = self.skip(pos)
        if end != len(text):
            self.fail("bytes after the JSON text", end, found=text[end:end + 8])
        return _object(pairs), key_offsets, device_offsets

    def devices(self, pos: int, offsets: list):
        text = self.text
        items: list = []
        pos = self.skip(pos)
        if text[pos:pos + 1] == "]":
            return items, pos + 1
        while True:
            pos = self.skip(pos)
            offsets.append(self.offset(pos))
            item, pos = self.value(pos)
            items.append(item)
            pos = self.skip(pos)
            ch = text[pos:pos + 1]
            pos += 1
            if ch == "]":
                return items, pos
            if ch != ",":
                self.fail("expected ',' or ']'", pos - 1, found=ch or "end")

    def check_depth(self, obj):
        """Refuse nesting deeper than :data:`MAX_DEPTH` (checked without recursion)."""
        stack = [(obj, 1)]
        while stack:
            value, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise DescriptionError(f"JSON nested deeper than {MAX_DEPTH} levels", self.base)
            if isinstance(value, dict):
                children = (v for _, v in members(value))
            else:
                children = value
            stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))


def _check_shape(desc: VmDescription, key_offsets, reader: _Reader):
    obj = desc.obj
    keys = [k for k, _ in key_offsets]
    where = dict(key_offsets)
    if keys and keys[0] == "configuration":
        if not isinstance(obj["configuration"], dict):
            raise DescriptionError("'configuration' is not an object", where["configuration"])
        keys = keys[1:]
    if keys != ["page_size", "devices"]:
        wrong = [k for k, want in zip(keys + [None], ["page_size", "devices", None]) if k != want]
        raise DescriptionError("top-level keys are not [configuration,] page_size, devices",
                               where.get(wrong[0], reader.base), expected="page_size, devices",
                               found=", ".join(keys))
    if type(obj["page_size"]) is not int:
        raise DescriptionError("'page_size' is not an integer", where["page_size"])
    if not isinstance(obj["devices"], list):
        raise DescriptionError("'devices' is not a list", where["devices"])
    for entry, at in zip(obj["devices"], desc.device_offsets):
        if not isinstance(entry, dict):
            raise DescriptionError("a 'devices' element is not an object", at)
        if not isinstance(entry.get("name"), str) or type(entry.get("instance_id")) is not int:
            raise DescriptionError("device entry without 'name' string and "
                                   "'instance_id' integer", at)


# --------------------------------------------------------------------------
# Writing

_PLAIN = re.compile(r"[ !#-\[\]-~]*\Z")          # printable ASCII but '"' and '\'
_NEEDS_ESCAPE = re.compile(r'["\\]|[^ -~]')
_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n",
          "\r": "\\r", "\t": "\\t"}


def _escape_char(m) -> str:
    ch = m.group()
    short = _SHORT.get(ch)
    if short is not None:
        return short
    cp = ord(ch)
    if cp > 0xFFFF:
        cp -= 0x10000
        return "\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))
    return "\\u%04X" % cp


def _quote_jsonwriter(text: str) -> str:
    """``quoted_str`` of qobject/json-writer.c."""
    if _PLAIN.match(text):
        return '"' + text + '"'
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, text) + '"'


def _quote_qjson(text: str) -> str:
    """``json_prop_str`` of migration/qjson.c: no escaping at all."""
    return '"' + text + '"'


_PUNCT = {
    # open object, close object, open array, close array, key separator, quote
    QJSON: ("{ ", " }", "[ ", " ]", " : ", _quote_qjson),
    JSONWRITER: ("{", "}", "[", "]", ": ", _quote_jsonwriter),
}


def dump(obj, style: str) -> bytes:
    """Write ``obj`` exactly as QEMU's writer of ``style`` would."""
    if style not in _PUNCT:
        raise ValueError(f"unknown JSON writer style {style!r}")
    open_obj, close_obj, open_arr, close_arr, colon, quote = _PUNCT[style]
    out: list = []
    put = out.append
    quoted: dict = {}

    def string(text):
        q = quoted.get(text)
        if q is None:
            q = quoted[text] = quote(text)
        return q

    def write(value, depth):
        if depth > MAX_DEPTH:
            raise ValueError(f"object nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            put(string(value))
        elif isinstance(value, dict):
            put(open_obj)
            sep = ""
            for key, item in members(value):
                put(sep)
                put(string(key))
                put(colon)
                write(item, depth + 1)
                sep = ", "
            put(close_obj)
        elif isinstance(value, (list, tuple)):
            put(open_arr)
            sep = ""
            for item in value:
                put(sep)
                write(item, depth + 1)
                sep = ", "
            put(close_arr)
        elif value is True or value is False or value is None:
            put("true" if value else "false" if value is False else "null")
        elif isinstance(value, int):
            put(str(int(value)))
        elif isinstance(value, float):
            put("%.17g" % value)
        else:
            raise TypeError(f"cannot write {type(value).__name__} as JSON")

    write(obj, 1)
    return "".join(out).encode("utf-8", "surrogateescape")


def without_array_index(obj):
    """``obj`` (a description, or part of one) with the ``"index"`` member left
    out of every field entry (the objects in a ``"fields"`` list), as QEMU 11.1
    writes the per-element entries of an array; everything else, repeated keys
    and member order included, as it was."""
    def walk(value, is_field=False):
        if isinstance(value, dict):
            return JsonObject([(k, member(k, v)) for k, v in members(value)
                               if not (is_field and k == "index")])
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return value

    def member(key, value):
        if key == "fields" and isinstance(value, (list, tuple)):
            return [walk(v, True) for v in value]
        return walk(value)

    return walk(obj)


# --------------------------------------------------------------------------
# Finding the trailer

def locate_trailer(tail, tail_base: int, *, checked: bool = False):
    """Find the VMDESCRIPTION record that ends a stream: ``(offset, json_bytes, obj)``
    or None.

    ``tail`` holds the last bytes of the stream and starts at absolute offset
    ``tail_base``; the stream ends where ``tail`` ends.  ``offset`` is that of the
    record's ``0x06`` byte, ``obj`` the JSON object read as :func:`parse` reads
    it (repeated keys kept, QJSON strings raw).

    The record is the position ``p`` with ``tail[p-1] == 0x00`` (QEMU_VM_EOF),
    ``tail[p] == 0x06``, ``be32 N`` at ``p+1`` with ``p + 5 + N == len(tail)``
    and one JSON object in between: an exact test, not a guess.  QEMU's JSON is
    a C string (``strlen`` gives N), so it holds no NUL byte: the EOF byte is at
    most five bytes before the last NUL of the tail (the length field may hold
    NULs), which leaves at most six positions to test, the last one first.

    Any JSON object will do (a damaged description is still the trailer); with
    ``checked`` it must be one :func:`parse` accepts (shape and depth).
    """
    if not isinstance(tail, (bytes, bytearray)):
        tail = bytes(tail)
    end = len(tail)
    last_nul = tail.rfind(b"\x00")
    if last_nul < 0:
        return None
    for p in range(min(last_nul + 1, end - 5), max(1, last_nul - 4) - 1, -1):
        if tail[p - 1] != QEMU_VM_EOF or tail[p] != QEMU_VM_VMDESCRIPTION:
            continue
        (n,) = _BE32.unpack_from(tail, p + 1)
        if n == 0 or p + 5 + n != end or tail[p + 5] != 0x7B:
            continue
        raw = bytes(tail[p + 5:])
        try:
            if checked:
                obj = parse(raw, tail_base + p + 5).obj
            else:
                obj = _scan(raw, tail_base + p + 5, _LENIENT_DECODERS)[2][0]
        except DescriptionError:
            continue
        return tail_base + p, raw, obj
    return None


def locate_trailer_before_trailing_bytes(tail, tail_base: int, *, max_candidates: int = 4096):
    """Like :func:`locate_trailer` for a stream with bytes after its trailer
    (QEMU ignores them): the last VMDESCRIPTION record (EOF byte, 0x06, be32 N,
    N bytes of a JSON object with a ``devices`` list) that ends before the end
    of ``tail``, as ``(offset, json_bytes, obj)``, or None."""
    if not isinstance(tail, (bytes, bytearray)):
        tail = bytes(tail)
    end = len(tail)
    q = tail.rfind(b"\x00\x06", 0, max(0, end - 6))
    tries = 0
    while q >= 0 and tries < max_candidates:
        tries += 1
        p = q + 1                                   # the 0x06 byte
        (n,) = _BE32.unpack_from(tail, p + 1)
        e = p + 5 + n
        if n >= 2 and e < end and tail[p + 5] == 0x7B and tail[e - 1] == 0x7D:
            raw = bytes(tail[p + 5:e])
            try:
                obj = _scan(raw, tail_base + p + 5, _LENIENT_DECODERS)[2][0]
            except DescriptionError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("devices"), list):
                return tail_base + p, raw, obj
        q = tail.rfind(b"\x00\x06", 0, q)
    return None


def find_trailer(tail: bytes, file_size: int) -> int | None:
    """Absolute offset of the VMDESCRIPTION record (its ``0x06`` byte), or None:
    :func:`locate_trailer` for a description :func:`parse` accepts.

    ``tail`` is the last ``len(tail)`` bytes of a stream of ``file_size`` bytes.
    """
    found = locate_trailer(tail, file_size - len(tail), checked=True)
    return None if found is None else found[0]
