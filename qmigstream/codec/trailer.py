"""Finding the VMDESCRIPTION trailer from the end of a stream.

QEMU writes ``QEMU_VM_EOF`` (0x00), then ``0x06``, ``be32 N`` and ``N`` bytes of
JSON, and nothing after.  So the trailer is the position ``p`` with
``data[p-1] == 0x00``, ``data[p] == 0x06``, ``p + 5 + N == end`` and a JSON
object in between: an exact test, not a guess from the last NUL byte.
"""

from __future__ import annotations

import json
import struct

#: How much of the end of a stream is searched for the trailer.
TAIL_BYTES = 16 << 20


def locate_trailer(tail: bytes, tail_base: int):
    """Return ``(offset, json_bytes, obj)`` of the trailer in ``tail`` or None.

    ``tail`` holds the last bytes of the stream and starts at absolute offset
    ``tail_base``; the stream ends where ``tail`` ends.
    """
    end = len(tail)
    p = tail.rfind(b"\x00\x06", 0, max(0, end - 5))
    while p >= 0:
        q = p + 1                       # position of 0x06
        (n,) = struct.unpack_from(">I", tail, q + 1)
        if q + 5 + n == end and n >= 2 and tail[q + 5] == 0x7B and tail[end - 1] == 0x7D:
            raw = tail[q + 5:end]
            try:
                obj = json.loads(raw.decode("utf-8", "surrogateescape"))
            except (ValueError, UnicodeDecodeError):
                obj = None
            if isinstance(obj, dict):
                return tail_base + q, bytes(raw), obj
        p = tail.rfind(b"\x00\x06", 0, p)
    return None
