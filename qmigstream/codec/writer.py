"""The stream writer: records in, bytes out.

A record written here produces exactly the bytes it was decoded from, so
``StreamWriter`` over ``read_records`` reproduces the input.  The writer sets
each record's ``offset`` to where it was written.
"""

from __future__ import annotations

from .ram_records import MappedRamChunk


class StreamWriter:
    def __init__(self, fileobj, *, sparse: bool = True):
        self.f = fileobj
        self.offset = 0
        self.sparse = sparse and _seekable(fileobj)

    def write(self, rec) -> int:
        rec.offset = self.offset
        if isinstance(rec, MappedRamChunk) and rec.is_hole and self.sparse:
            self.f.seek(rec.length, 1)
            self.offset += rec.length
            return rec.length
        n = 0
        for part in record_chunks(rec):
            self.f.write(part)
            n += len(part)
        self.offset += n
        return n

    def write_all(self, records) -> int:
        for r in records:
            self.write(r)
        return self.offset

    def close(self):
        if self.sparse:
            # A trailing hole needs the file length set explicitly.
            self.f.truncate(self.offset)
        self.f.flush()


def _seekable(f) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, ValueError, OSError):
        return False


def record_chunks(rec):
    """A record's bytes as a sequence of bytes-like parts, in order.

    Page records give their header and their page bytes as two parts, so a
    writer or a comparison can pass the page through without copying it into
    a new ``header + page`` object; every other record is one part,
    ``encode()``.  ``b"".join(record_chunks(r)) == r.encode()`` (tested).
    """
    parts = getattr(rec, "encode_parts", None)
    if parts is not None:
        return parts()
    return (rec.encode(),)


def encode_records(records) -> bytes:
    """All records' bytes, concatenated (for tests and small streams)."""
    return b"".join(r.encode() for r in records)
