"""The emulated device's migration data: a sequence of versioned, CRC-checked blobs.

What a saving device streams (over the v2 data fd or through the v1 region
window) and a resuming device consumes is a concatenation of blobs::

    off  size  field
    0    4     magic      b"QMDV"
    4    2     version    2 (1: the same layout with a CRC-32C, still accepted)
    6    1     kind       1 = FULL (payload is the whole device image)
                          2 = DELTA (payload is a list of patches to the image)
    7    1     flags      bit 0 = LAST (the stream ends after this blob)
    8    4     profile    profile id of the device that wrote it
    12   4     seq        0, 1, 2, ... within one data session
    16   8     length     payload length in bytes
    24   n     payload
    24+n 4     crc        CRC-32 (zlib's ``crc32``, ISO-HDLC) of bytes 0 .. 24+n;
                          version 1: CRC-32C (crcmod ``crc-32c``)

All integers little-endian (the device's native order on x86 hosts; the data is
opaque to the user, who must only preserve byte order and never re-segment
meaning into it).  A DELTA payload is ``u32 count`` then ``count`` patches of
``u64 offset, u32 length, length bytes``.  A data session is FULL (pre-copy's
initial bytes, or the whole state in a stop-and-copy without pre-copy), then
zero or more DELTAs (pre-copy's dirty bytes), the last blob flagged LAST.

:class:`BlobAssembler` is the resuming side: it takes writes of any size,
checks each header as soon as it is complete and each blob as soon as its CRC
is in, and keeps the staged image; nothing reaches the device until
:meth:`BlobAssembler.finish` succeeds (called when the device leaves
RESUMING).  A FULL blob of the device's image size is staged as it arrives:
its payload is copied straight into the new image and its CRC computed on
the way, so the image is held once, not also as a buffered blob.  Rejections are :class:`~qmigstream.errors.DeviceError` with the
errno a kernel driver returns (see :class:`Rejects`).
"""

from __future__ import annotations

import errno as _errno
import struct
import zlib
from collections import namedtuple
from dataclasses import dataclass

import crcmod.predefined

from ..crc32 import combine
from ..errors import DeviceError
from ..pieces import Pieces
from ..wire import schemas_on_first_use
from .image import copy_image, new_image

MAGIC = b"QMDV"
VERSION = 2
KIND_FULL = 1
KIND_DELTA = 2
FLAG_LAST = 0x01

crc32c = crcmod.predefined.mkCrcFun("crc-32c")
#: The checksum of each blob version: ``fn(data, crc=0) -> crc`` (chainable).
CRCS = {1: crc32c, 2: zlib.crc32}



def _schemas():
    """The blob's construct schemas (made the first time one is asked for)."""
    import construct as c

    #: The blob header, described once (:func:`pack_header` / :func:`parse_header`
    #: are its fast form, tested equal).
    BlobHeader = c.Struct(
        "magic" / c.Bytes(4),
        "version" / c.Int16ul,
        "kind" / c.Int8ul,
        "flags" / c.Int8ul,
        "profile" / c.Int32ul,
        "seq" / c.Int32ul,
        "length" / c.Int64ul,
    )
    #: A DELTA payload, described once.
    DeltaPatch = c.Struct("offset" / c.Int64ul, "length" / c.Int32ul,
                          "data" / c.Bytes(c.this.length))
    DeltaPayload = c.Struct("count" / c.Int32ul,
                            "patches" / c.Array(c.this.count, DeltaPatch))
    return locals()


__getattr__ = schemas_on_first_use(__name__, _schemas)

HEADER_SIZE = 24                   # BlobHeader.sizeof() (tested)
CRC_SIZE = 4
BLOB_OVERHEAD = HEADER_SIZE + CRC_SIZE
PATCH_OVERHEAD = 12
_PATCH_HEAD = struct.Struct("<QI")
_HEADER = struct.Struct("<4sHBBIIQ")


#: A parsed blob header: the fields ``BlobHeader.parse`` gives, as attributes.
BlobHead = namedtuple("BlobHead", "magic version kind flags profile seq length")


def pack_header(*, magic=MAGIC, version, kind, flags, profile, seq, length) -> bytes:
    """``BlobHeader.build`` of these fields."""
    return _HEADER.pack(magic, version, kind, flags, profile, seq, length)


def parse_header(raw) -> BlobHead:
    """``BlobHeader.parse`` of the first 24 bytes of ``raw``."""
    return BlobHead._make(_HEADER.unpack_from(raw, 0))


@dataclass(frozen=True)
class Rejects:
    """The errno a device driver returns for each kind of bad input.

    Defaults follow the in-tree drivers: a header (magic, version, identity)
    that does not match -> ``bad_header`` (mtty returns EFAULT, most drivers
    EINVAL); more data than the device can hold -> ENOMEM (mtty, mlx5);
    corrupt or inconsistent data -> EINVAL; data that ends short when the
    device leaves RESUMING -> EINVAL (mtty_load_state).
    """

    bad_header: int = _errno.EINVAL
    oversized: int = _errno.ENOMEM
    corrupt: int = _errno.EINVAL
    short: int = _errno.EINVAL


def build_blob(kind: int, payload, *, profile: int, seq: int, last: bool,
               version: int = VERSION) -> bytes:
    """One blob around ``payload`` (any bytes-like object; copied once, into the blob)."""
    head = pack_header(version=version, kind=kind, flags=FLAG_LAST if last else 0,
                       profile=profile, seq=seq, length=len(payload))
    crcf = CRCS[version]
    crc = crcf(payload, crcf(head))
    return b"".join((head, payload, struct.pack("<I", crc)))


def byte_view(data) -> memoryview:
    """``data`` (any bytes-like object) as a flat memoryview of bytes, without a copy
    when it can be."""
    mv = memoryview(data)
    if mv.format == "B" and mv.ndim == 1 and mv.c_contiguous:
        return mv
    try:
        return mv.cast("B")
    except TypeError:                 # not contiguous
        return memoryview(mv.tobytes())


def stable(mv: memoryview) -> bool:
    """Whether the bytes behind ``mv`` cannot change while it lives: a view of a
    ``bytes`` object or of a buffer that says so (``stable_bytes``, e.g. a
    read-only mapping of a stream file), so that keeping the view is as good as
    keeping a copy."""
    obj = mv.obj
    return type(obj) is bytes or getattr(obj, "stable_bytes", False)


class BlobParts:
    """A blob held as header, payload and CRC without copying the payload (what
    :func:`blob_parts` makes); ``len()`` is the blob's size, :meth:`view` reads it."""

    __slots__ = ("parts", "size")

    def __init__(self, parts):
        self.parts = [byte_view(p) for p in parts]
        self.size = sum(len(p) for p in self.parts)

    def __len__(self):
        return self.size

    def view(self, pos: int, n: int, *, gather: bool = False):
        """Bytes ``pos .. pos+n``: a view of one part; when they span parts, a copy
        (``gather=True``: a :class:`~qmigstream.pieces.Pieces` of views instead)."""
        out = []
        for p in self.parts:
            if pos >= len(p):
                pos -= len(p)
                continue
            take = p[pos:pos + n]
            if len(take) == n and not out:
                return take
            out.append(take)
            n -= len(take)
            pos = 0
            if not n:
                break
        return Pieces(out) if gather else b"".join(out)

    def tobytes(self) -> bytes:
        return b"".join(self.parts)


def blob_parts(kind: int, payload, *, profile: int, seq: int, last: bool,
               version: int = VERSION, payload_crc: int | None = None) -> BlobParts:
    """:func:`build_blob` without the copy: the payload object itself is a part
    (the caller must not change it while the blob is in use).  ``payload`` may
    also be a list of pieces or a :class:`~qmigstream.pieces.Pieces`.
    ``payload_crc``: zlib's CRC-32 of the payload, if the caller has it (version
    2 then combines it with the header's instead of reading the payload)."""
    if isinstance(payload, Pieces):
        payload = payload.parts
    pieces = payload if isinstance(payload, list) else [payload]
    length = sum(len(p) for p in pieces)
    head = pack_header(version=version, kind=kind, flags=FLAG_LAST if last else 0,
                       profile=profile, seq=seq, length=length)
    if version == 2 and payload_crc is not None:
        crc = combine(zlib.crc32(head), payload_crc, length)
    else:
        crcf = CRCS[version]
        crc = crcf(head)
        for p in pieces:
            crc = crcf(p, crc)
    return BlobParts([head] + pieces + [struct.pack("<I", crc)])


def build_delta_payload(patches) -> bytes:
    """``patches``: iterable of ``(offset, bytes)``."""
    parts = [b""]
    n = 0
    for off, data in patches:
        parts.append(_PATCH_HEAD.pack(off, len(data)))
        parts.append(bytes(data))
        n += 1
    parts[0] = struct.pack("<I", n)
    return b"".join(parts)


def delta_size(page_lengths) -> int:
    """Size of the DELTA blob holding patches of these lengths."""
    return BLOB_OVERHEAD + 4 + sum(PATCH_OVERHEAD + n for n in page_lengths)


def parse_blobs(data: bytes) -> list:
    """Decode a whole saved stream into header dicts (with ``payload``); for inspection."""
    out = []
    pos = 0
    mv = memoryview(data)
    while pos < len(data):
        if len(data) - pos < HEADER_SIZE:
            raise DeviceError(f"blob header truncated at {pos}", _errno.EINVAL)
        h = parse_header(mv[pos:pos + HEADER_SIZE])
        end = pos + HEADER_SIZE + h.length + CRC_SIZE
        if end > len(data):
            raise DeviceError(f"blob at {pos} truncated", _errno.EINVAL)
        payload = bytes(mv[pos + HEADER_SIZE:end - CRC_SIZE])
        out.append(dict(offset=pos, magic=h.magic, version=h.version, kind=h.kind,
                        flags=h.flags, profile=h.profile, seq=h.seq, length=h.length,
                        payload=payload,
                        crc=struct.unpack_from("<I", data, end - CRC_SIZE)[0]))
        pos = end
    return out


class BlobAssembler:
    """Resuming side: stage written bytes, validate blob by blob, build the new image.

    ``image_size`` is the exact size of the device image a FULL blob must carry;
    ``validate_image(image)`` (optional) checks a complete FULL image and raises
    DeviceError itself.  Nothing is applied anywhere: :meth:`finish` returns
    the new image, or raises.

    ``_buf`` holds the bytes of the blob being received that are not staged
    elsewhere: its header, its CRC, and the payload of a DELTA (or of a FULL
    blob whose length is not the image size, which is then rejected as such).
    The payload of a FULL blob of the right size goes straight into the new
    image (``_full``) with a running CRC.
    """

    def __init__(self, *, profile: int, image_size: int, rejects: Rejects = Rejects(),
                 validate_image=None):
        self.profile = profile
        self.image_size = image_size
        self.rejects = rejects
        self.validate_image = validate_image
        # Largest payload a blob may carry: a FULL image, or a DELTA patching
        # every byte of the image in one patch per 4 KiB page.
        pages = max(1, -(-image_size // 4096))
        self.max_payload = max(image_size, 4 + image_size + PATCH_OVERHEAD * pages)
        self._buf = bytearray()
        self._header = None
        self._full = None           # the FULL blob's image (or list of pieces) while it arrives
        self._pos = 0               # payload bytes staged into _full
        self._crc = 0               # running CRC over the staged payload (version 1: and header)
        self._head_crc = 0          # version 2: the header's CRC, combined at the end
        #: zlib's CRC-32 of the finished image when the session was one FULL blob
        #: (version 2), else None
        self.image_crc = None
        self._image = None
        self._seq = 0
        self._undo = None
        self.done = False
        self.blobs = 0
        self.bytes_in = 0

    # -- incremental input -------------------------------------------------
    def write(self, data) -> int:
        """Accept ``data``; returns its length.  A rejected write changes nothing."""
        mv = byte_view(data)
        n = len(mv)
        if not n:
            return 0
        if self.done:
            raise DeviceError("data after the last blob of the session", self.rejects.corrupt)
        # A write is atomic: on rejection everything is put back as it was,
        # including blobs of this write that were accepted before the bad one.
        # _buf is only appended to until a blob of this write completes; then
        # its bytes from earlier writes are kept (_pre_bytes) and it is replaced.
        saved = (self._header, self._full, self._pos, self._crc, self._image, self._seq,
                 self.done, self.blobs, self.image_crc)
        saved_parts = len(self._full) if type(self._full) is list else 0
        self._keep = stable(mv)
        self._pre = len(self._buf)
        self._pre_bytes = None
        self._undo = []
        try:
            self._drain(mv)
        except DeviceError:
            for off, old in reversed(self._undo):
                self._image[off:off + len(old)] = old
            if self._pre_bytes is None:
                self._buf = bytearray(memoryview(self._buf)[:self._pre])
            else:
                self._buf = bytearray(self._pre_bytes)
            (self._header, self._full, self._pos, self._crc, self._image, self._seq,
             self.done, self.blobs, self.image_crc) = saved
            if type(self._full) is list:
                del self._full[saved_parts:]
            raise
        finally:
            self._undo = None
        self.bytes_in += n
        return n

    def _take(self, mv, want):
        """Move up to ``want - len(_buf)`` bytes of ``mv`` into _buf; the rest of ``mv``."""
        k = min(len(mv), max(0, want - len(self._buf)))
        if k:
            self._buf += mv[:k]
        return mv[k:]

    def _consume_buf(self):
        """The blob in _buf is done with: keep what earlier writes had put there."""
        if self._pre_bytes is None:
            self._pre_bytes = bytes(memoryview(self._buf)[:self._pre])
        self._buf = bytearray()       # replaced, not cleared: views of it may be alive

    def _drain(self, mv):
        while True:
            if self._header is None:
                mv = self._take(mv, HEADER_SIZE)
                if len(self._buf) < HEADER_SIZE:
                    return
                self._header = h = self._check_header(bytes(self._buf[:HEADER_SIZE]))
                if h.kind == KIND_FULL and h.length == self.image_size:
                    # stage the payload straight into the new image; bytes that do not
                    # change (stable()) are kept as views instead (the image is then
                    # Pieces, copied only if the device writes it)
                    head_crc = CRCS[h.version](memoryview(self._buf)[:HEADER_SIZE])
                    self._head_crc = head_crc
                    self._crc = 0 if h.version == 2 else head_crc
                    self._full = [] if self._keep else new_image(self.image_size)
                    self._pos = 0
                    self._consume_buf()
            h = self._header
            if self._full is not None:
                if self._pos < h.length:
                    k = min(len(mv), h.length - self._pos)
                    if k:
                        piece = mv[:k]
                        if type(self._full) is list:
                            self._full.append(piece if self._keep else bytes(piece))
                        else:
                            self._full[self._pos:self._pos + k] = piece
                        self._crc = CRCS[h.version](piece, self._crc)
                        self._pos += k
                        mv = mv[k:]
                    if self._pos < h.length:
                        return
                mv = self._take(mv, CRC_SIZE)
                if len(self._buf) < CRC_SIZE:
                    return
                (crc,) = struct.unpack_from("<I", self._buf, 0)
                want = combine(self._head_crc, self._crc, h.length) if h.version == 2 \
                    else self._crc
                if crc != want:
                    raise DeviceError(f"blob {h.seq} CRC mismatch", self.rejects.corrupt)
                image, self._full = self._full, None
                if type(image) is list:
                    image = Pieces(image)
                self.image_crc = self._crc if h.version == 2 else None
                if self.validate_image is not None:
                    self.validate_image(image)
                self._image = image
                self._accepted(h)
            else:
                need = HEADER_SIZE + h.length + CRC_SIZE
                mv = self._take(mv, need)
                if len(self._buf) < need:
                    return
                self._accept(h, memoryview(self._buf))
            self._consume_buf()
            self._header = None
            if self.done:
                if len(mv):
                    raise DeviceError("data after the last blob of the session",
                                      self.rejects.corrupt)
                return

    def _check_header(self, raw: bytes):
        h = parse_header(raw)
        r = self.rejects
        if h.magic != MAGIC:
            raise DeviceError(f"bad blob magic {h.magic!r}", r.bad_header)
        if h.version not in CRCS:
            raise DeviceError(f"unsupported blob version {h.version}", r.bad_header)
        if h.profile != self.profile:
            raise DeviceError(f"blob from device profile 0x{h.profile:08x}, this device is "
                              f"0x{self.profile:08x}", r.bad_header)
        if h.kind not in (KIND_FULL, KIND_DELTA) or h.flags & ~FLAG_LAST:
            raise DeviceError(f"bad blob kind {h.kind} / flags 0x{h.flags:x}", r.corrupt)
        if h.seq != self._seq:
            raise DeviceError(f"blob sequence {h.seq}, expected {self._seq}", r.corrupt)
        if (h.kind == KIND_FULL) != (self._image is None):
            raise DeviceError("a session is one FULL blob followed by DELTA blobs", r.corrupt)
        if h.length > self.max_payload:
            raise DeviceError(f"blob payload of {h.length} bytes exceeds the device's "
                              f"{self.max_payload}", r.oversized)
        return h

    def _accept(self, h, blob: memoryview):
        """A whole blob in ``blob`` (a DELTA, or a FULL of the wrong size)."""
        r = self.rejects
        body = blob[:HEADER_SIZE + h.length]
        (crc,) = struct.unpack_from("<I", blob, HEADER_SIZE + h.length)
        if CRCS[h.version](body) != crc:
            raise DeviceError(f"blob {h.seq} CRC mismatch", r.corrupt)
        payload = blob[HEADER_SIZE:HEADER_SIZE + h.length]
        if h.kind == KIND_FULL:
            # only a FULL blob whose length is not the image size is buffered
            raise DeviceError(f"device image of {h.length} bytes, expected "
                              f"{self.image_size}",
                              r.oversized if h.length > self.image_size else r.short)
        patches = self._parse_delta(payload)
        if patches and type(self._image) is Pieces:
            self._image = copy_image(self._image)      # patched: a writable copy
        if patches:
            self.image_crc = None
        for off, data in patches:
            if self._undo is not None:
                self._undo.append((off, bytes(self._image[off:off + len(data)])))
            self._image[off:off + len(data)] = data
        self._accepted(h)

    def _accepted(self, h):
        self._seq += 1
        self.blobs += 1
        if h.flags & FLAG_LAST:
            self.done = True

    def _parse_delta(self, payload: memoryview) -> list:
        r = self.rejects
        n = len(payload)
        if n < 4:
            raise DeviceError("DELTA payload too short", r.corrupt)
        (count,) = struct.unpack_from("<I", payload, 0)
        pos = 4
        out = []
        for _ in range(count):
            if n - pos < PATCH_OVERHEAD:
                raise DeviceError("DELTA patch header truncated", r.corrupt)
            off, ln = _PATCH_HEAD.unpack_from(payload, pos)
            pos += PATCH_OVERHEAD
            if ln > n - pos:
                raise DeviceError("DELTA patch data truncated", r.corrupt)
            if off + ln > self.image_size:
                raise DeviceError(f"DELTA patch [{off}, {off + ln}) outside the "
                                  f"{self.image_size}-byte image", r.corrupt)
            out.append((off, payload[pos:pos + ln]))
            pos += ln
        if pos != n:
            raise DeviceError("DELTA payload has trailing bytes", r.corrupt)
        return out

    # -- end of session ----------------------------------------------------
    def finish(self) -> bytes:
        """The staged image, if the session is complete; else DeviceError (``short``)."""
        if not self.done:
            what = ("partial blob" if self._buf or self._header is not None else
                    "no data" if self._image is None else "no LAST blob")
            raise DeviceError(f"incomplete device data ({what})", self.rejects.short)
        if self.validate_image is not None:
            self.validate_image(self._image)
        return self._image          # handed over: the session is over
