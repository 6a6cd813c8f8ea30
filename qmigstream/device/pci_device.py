"""A deterministic emulated PCI device: config space, an internal image, a DMA engine.

:class:`EmulatedPciDevice` is the device behind both migration interfaces
(:mod:`.region_v1`, :mod:`.device_v2`); it knows nothing about either.  It has

* a 256-byte PCI config space (:class:`PciConfigSpace`): IDs, class, BARs with
  sizes (sizing by writing all-ones works), capability list with MSI and MSI-X;
* an *image*: every byte of device state that migrates, laid out by the
  device's :class:`Profile`.  :class:`MttyProfile` follows the Linux sample
  driver ``samples/vfio-mdev/mtty.c`` (its 24-byte header, then 36 bytes of
  UART registers and FIFO per port); :class:`SizedProfile` has a 64-byte
  register block followed by ``state_size`` bytes (0 .. 64 MiB and more)
  generated from the seed;
* a DMA engine that, while the device runs, writes ``dma_pages_per_tick``
  pages per :meth:`EmulatedPciDevice.run` tick into guest memory (any object
  with ``write(gpa, data)``), chosen and filled deterministically from the
  seed, records each written page for dirty tracking and updates the image.

Migration core (used by the interfaces, usable directly)::

    dev.open_save(precopy: bool) -> SaveSession   # read() blobs, precopy_info()
    dev.open_resume() -> BlobAssembler             # write() blobs, finish() -> image
    dev.apply_image(image)                         # after a successful finish()
    dev.state_digest(), dev == other               # source == destination check
    dev.config_space() / dev.load_config_space(b)  # what QEMU's config record carries

The config space is not part of the migration data (QEMU sends it in its own
config record, see docs/vfio.md); :meth:`EmulatedPciDevice.state_digest`
covers image and config space, :meth:`EmulatedPciDevice.image_digest` the image alone.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import struct
import sys
import zlib

from ..crc32 import combine, shift
from ..errors import DeviceError
from ..pieces import Pieces
from ..wire import schemas_on_first_use
from .blob import (BLOB_OVERHEAD, KIND_DELTA, KIND_FULL, BlobAssembler, BlobParts,
                   Rejects, blob_parts, build_blob, build_delta_payload, delta_size)
from .image import copy_image, image_crc32, is_image, new_image


def _schemas():
    """The device images' construct schemas (made the first time one is asked for:
    a sized device needs none, so loading one never imports construct)."""
    import construct as c

    #: mtty's migration data header (``struct mtty_data`` up to ``ports``).
    MttyHeader = c.Struct(
        "magic" / c.Int64ul,
        "major_ver" / c.Int32ul,
        "minor_ver" / c.Int32ul,
        "nr_ports" / c.Int32ul,
        "flags" / c.Int32ul,
    )
    #: One port (``struct serial_port``: 8 UART registers, 16-byte loop-back FIFO, ...).
    MttyPort = c.Struct(
        "uart_reg" / c.Bytes(8),
        "fifo" / c.Bytes(16),
        "head" / c.Int8ul,
        "tail" / c.Int8ul,
        "count" / c.Int8ul,
        "dlab" / c.Int8ul,
        "overrun" / c.Int8ul,
        c.Padding(1),
        "divisor" / c.Int16ul,
        "fcr" / c.Int8ul,
        "max_fifo_size" / c.Int8ul,
        "intr_trigger_level" / c.Int8ul,
        c.Padding(1),
    )

    #: The register block at the start of a SizedProfile image.
    SizedRegs = c.Struct(
        "dma_count" / c.Int64ul,
        "last_gpa" / c.Int64ul,
        "seed" / c.Int64ul,
        "state_size" / c.Int64ul,
        "ctrl" / c.Int32ul,
        "status" / c.Int32ul,
        c.Padding(24),
    )
    return locals()


__getattr__ = schemas_on_first_use(__name__, _schemas)
_mod = sys.modules[__name__]


PAGE = 4096
MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One step of SplitMix64 (deterministic on every platform and Python)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


# --------------------------------------------------------------------------
# PCI config space
# --------------------------------------------------------------------------

class Bar:
    """One BAR: ``kind`` is ``"io"``, ``"mem32"`` or ``"mem64"`` (takes two slots)."""

    def __init__(self, index: int, size: int, kind: str = "mem32", prefetch: bool = False):
        if size & (size - 1) or size < (4 if kind == "io" else 16):
            raise ValueError(f"BAR size {size} is not a power of two >= the minimum")
        self.index, self.size, self.kind, self.prefetch = index, size, kind, prefetch

    @property
    def type_bits(self) -> int:
        if self.kind == "io":
            return 0x1
        return (0x4 if self.kind == "mem64" else 0x0) | (0x8 if self.prefetch else 0)


class PciConfigSpace:
    """Conventional (256-byte) config space with per-bit write masks."""

    SIZE = 256
    CAP_PM, CAP_MSI, CAP_MSIX = 0x01, 0x05, 0x11

    def __init__(self, *, vendor, device, revision=0, class_code=0, subsys_vendor=0,
                 subsys_id=0, command=0, status=0, int_pin=0, bars=(),
                 msi_vectors=0, msix_vectors=0, msix_bar=None, extra=None):
        self.data = bytearray(self.SIZE)
        self.wmask = bytearray(self.SIZE)
        self.bars = {b.index: b for b in bars}
        self._put(0x00, 2, vendor)
        self._put(0x02, 2, device)
        self._put(0x04, 2, command)
        self._mask(0x04, 2, 0x0547)           # IO, MEM, BM, parity, SERR, INTx disable
        self._put(0x06, 2, status)
        self._put(0x08, 1, revision)
        self._put(0x09, 3, class_code)         # prog-if, subclass, base class
        self._put(0x0E, 1, 0)                  # header type 0
        for b in bars:
            off = 0x10 + 4 * b.index
            self._put(off, 4, b.type_bits)
            low = 0xFFFFFFFC if b.kind == "io" else 0xFFFFFFF0
            self._mask(off, 4, low & ~(b.size - 1) & 0xFFFFFFFF)
            if b.kind == "mem64":
                self._mask(off + 4, 4, 0xFFFFFFFF)
        self._put(0x2C, 2, subsys_vendor)
        self._put(0x2E, 2, subsys_id)
        self._mask(0x3C, 1, 0xFF)              # interrupt line
        self._put(0x3D, 1, int_pin)
        caps = []
        if msi_vectors:
            caps.append(("msi", msi_vectors))
        if msix_vectors:
            caps.append(("msix", msix_vectors))
        off = 0x50
        prev_next = 0x34
        for kind, n in caps:
            self._put(prev_next, 1, off)
            if kind == "msi":
                mmc = max(0, (n - 1).bit_length())
                self._put(off, 1, self.CAP_MSI)
                self._put(off + 2, 2, 0x0080 | (mmc << 1))   # 64-bit capable
                self._mask(off + 2, 2, 0x0071)                # enable, MME
                self._mask(off + 4, 4, 0xFFFFFFFC)
                self._mask(off + 8, 4, 0xFFFFFFFF)
                self._mask(off + 12, 2, 0xFFFF)
                size = 16
            else:
                bir = msix_bar if msix_bar is not None else 0
                self._put(off, 1, self.CAP_MSIX)
                self._put(off + 2, 2, n - 1)
                self._mask(off + 2, 2, 0xC000)                # enable, function mask
                self._put(off + 4, 4, 0x0000 | bir)           # table at offset 0
                self._put(off + 8, 4, ((16 * n + 0xFFF) & ~0xFFF) | bir)  # PBA after it
                size = 12
            prev_next = off + 1
            off += (size + 0xF) & ~0xF
        if caps:
            self._put(0x06, 2, self.read(0x06, 2) | 0x0010)   # capabilities list
        for o, v in (extra or {}).items():
            self.data[o] = v

    def _put(self, off, size, value):
        self.data[off:off + size] = int(value).to_bytes(size, "little")

    def _mask(self, off, size, mask):
        self.wmask[off:off + size] = int(mask).to_bytes(size, "little")

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > self.SIZE:
            raise DeviceError(f"config read of {size} at 0x{offset:x}", _errno.EINVAL)
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > self.SIZE:
            raise DeviceError(f"config write of {size} at 0x{offset:x}", _errno.EINVAL)
        new = int(value).to_bytes(size, "little")
        for i in range(size):
            m = self.wmask[offset + i]
            self.data[offset + i] = (self.data[offset + i] & ~m & 0xFF) | (new[i] & m)

    def capabilities(self) -> list:
        """``[(offset, cap_id), ...]`` walking the list from 0x34."""
        out = []
        if not self.read(0x06, 2) & 0x0010:
            return out
        off = self.data[0x34] & 0xFC
        seen = set()
        while off and off not in seen:
            seen.add(off)
            out.append((off, self.data[off]))
            off = self.data[off + 1] & 0xFC
        return out

    def bar_size(self, index: int) -> int:
        """Size found by the standard sizing dance (write ~0, read, restore)."""
        off = 0x10 + 4 * index
        saved = bytes(self.data[off:off + 4])
        self.write(off, 4, 0xFFFFFFFF)
        v = self.read(off, 4)
        self.data[off:off + 4] = saved
        if v == 0:
            return 0
        v &= 0xFFFFFFFC if v & 1 else 0xFFFFFFF0
        return (~v + 1) & 0xFFFFFFFF


# --------------------------------------------------------------------------
# Profiles: the image layout and what a DMA tick changes in it
# --------------------------------------------------------------------------

class Profile:
    """What a device looks like and how its migrating state is laid out."""

    name = "profile"
    profile_id = 0
    rejects = Rejects()
    image_size = 0

    def make_config(self) -> PciConfigSpace:  # pragma: no cover - abstract
        raise NotImplementedError

    def initial_crc32(self, seed: int) -> int:
        """CRC-32 of :meth:`initial_image` (profiles may compute it without the image)."""
        return zlib.crc32(self.initial_image(seed))

    def initial_pieces(self, seed: int):
        """:meth:`initial_image` as a list of read-only pieces that need not be
        copied into an image, or None (the image is made then)."""
        return None

    def initial_image(self, seed: int) -> bytearray:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate_image(self, image) -> None:
        """Raise DeviceError (with the driver's errno) if ``image`` cannot be loaded."""

    def tick(self, dev: "EmulatedPciDevice", rnd: int, gpa: int) -> None:
        """Change the image as one DMA write at ``gpa`` does (``rnd``: 64 random bits)."""

    def describe(self, image) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


MTTY_MAGIC = 0x7E9D09898C3E2C4E     # mtty.c's MTTY_MAGIC: the payload is byte-compatible
MTTY_MAJOR, MTTY_MINOR = 1, 0
_PORT_FIFO = 8 + 0            # offset of fifo inside a port
_PORT_HEAD, _PORT_COUNT, _PORT_OVERRUN = 24, 26, 28


class MttyProfile(Profile):
    """The Linux ``mtty`` sample device: a 16550-style serial card with 1 or 2 ports.

    Config space as mtty builds it (vendor 0x4348, device 0x3253, class 07/00/02,
    one 8-byte I/O BAR per port, no capabilities); image = mtty's migration data:
    24-byte header then 36 bytes per port, so 60 or 96 bytes, exactly what
    ``mtty_data_size()`` gives.  Rejections use mtty's errnos: a header that
    does not match -> EFAULT (mtty_resume_write), too much data -> ENOMEM,
    too little when leaving RESUMING -> EINVAL (mtty_load_state).
    """

    name = "mtty"
    rejects = Rejects(bad_header=_errno.EFAULT)

    def __init__(self, nr_ports: int = 1):
        if nr_ports not in (1, 2):
            raise ValueError("mtty has 1 or 2 ports")
        self.nr_ports = nr_ports
        self.profile_id = 0x6D747400 | nr_ports          # "mtt" + ports
        self.image_size = _mod.MttyHeader.sizeof() + nr_ports * _mod.MttyPort.sizeof()

    def make_config(self):
        bars = [Bar(i, 8, "io") for i in range(self.nr_ports)]
        return PciConfigSpace(vendor=0x4348, device=0x3253, revision=0x10,
                              class_code=0x070002, subsys_vendor=0x4348, subsys_id=0x3253,
                              command=0x0001, status=0x0200, int_pin=1, bars=bars)

    def initial_image(self, seed):
        img = bytearray(_mod.MttyHeader.build(dict(magic=MTTY_MAGIC, major_ver=MTTY_MAJOR,
                                                   minor_ver=MTTY_MINOR, nr_ports=self.nr_ports,
                                                   flags=0)))
        r = seed
        for _ in range(self.nr_ports):
            r = splitmix64(r)
            regs = bytearray(8)
            regs[3] = 0x03                      # LCR: 8 data bits
            regs[7] = r & 0xFF                  # SCR: scratch, from the seed
            img += _mod.MttyPort.build(dict(uart_reg=bytes(regs), fifo=bytes(16), head=0,
                                            tail=0, count=0, dlab=0, overrun=0,
                                            divisor=(r >> 8) & 0xFFFF, fcr=0,
                                            max_fifo_size=16, intr_trigger_level=1))
        return img

    def validate_image(self, image):
        if len(image) < _mod.MttyHeader.sizeof():
            raise DeviceError("mtty data shorter than its header", _errno.EINVAL)
        h = _mod.MttyHeader.parse(bytes(image[:_mod.MttyHeader.sizeof()]))
        if (h.magic != MTTY_MAGIC or h.flags or h.major_ver != MTTY_MAJOR
                or h.minor_ver != MTTY_MINOR or h.nr_ports != self.nr_ports):
            raise DeviceError("mtty data header does not match this device", _errno.EFAULT)
        if len(image) != self.image_size:
            raise DeviceError(f"mtty data of {len(image)} bytes, expected {self.image_size}",
                              _errno.EINVAL if len(image) < self.image_size else _errno.ENOMEM)

    def tick(self, dev, rnd, gpa):
        # A byte arrives on port (rnd % nr_ports): into the loop-back FIFO.
        port = rnd % self.nr_ports
        base = _mod.MttyHeader.sizeof() + port * _mod.MttyPort.sizeof()
        img = dev._image
        head, count = img[base + _PORT_HEAD], img[base + _PORT_COUNT]
        if count < 16:
            dev._poke(base + _PORT_FIFO + head, bytes([(rnd >> 8) & 0xFF]))
            dev._poke(base + _PORT_HEAD, bytes([(head + 1) & 15]))
            dev._poke(base + _PORT_COUNT, bytes([count + 1]))
        else:
            dev._poke(base + _PORT_OVERRUN, b"\x01")

    def describe(self, image):
        h = _mod.MttyHeader.parse(bytes(image[:24]))
        ports = [_mod.MttyPort.parse(bytes(image[24 + 36 * i:60 + 36 * i]))
                 for i in range(min(h.nr_ports, 2))]
        return {"header": {k: v for k, v in h.items() if not k.startswith("_")},
                "ports": [{k: (v.hex() if isinstance(v, bytes) else v)
                           for k, v in p.items() if not k.startswith("_")} for p in ports]}


#: What :meth:`EmulatedPciDevice.image_digest` is (and what ``state_digest`` covers).
IMAGE_DIGEST = "crc32"

#: Generation of the SizedProfile state generator (3: a SHAKE-128 MiB, rotated for
#: each further MiB; 2: a PCG64 MiB XOR a word per MiB; 1: PCG64 over the whole state).
SIZED_CONTENT_GENERATION = 3
_MIB = 1 << 20

#: The register block at the start of a SizedProfile image (SizedRegs, below): its
#: size and its fast form, tested equal to the schema.
REGS_SIZE = 64
_SIZED_REGS = struct.Struct("<QQQQII24x")


_bases = {}


def _sized_base(seed: int, n: int) -> bytes:
    """The state's first MiB (or all of it, if shorter): SHAKE-128 of the seed
    (the last few made are kept: a device's pieces, CRC and image each need it)."""
    key = (seed & MASK64, min(n, _MIB))
    got = _bases.get(key)
    if got is None:
        got = hashlib.shake_128(b"qmigstream sized state\0" +
                                struct.pack("<Q", key[0])).digest(key[1])
        if len(_bases) >= 4:
            _bases.pop(next(iter(_bases)))
        _bases[key] = got
    return got


def _sized_segments(base: bytes, n: int, start: int = 0):
    """The state of :func:`sized_state_pieces` from MiB ``start`` on, as segments:
    ``(a, b)`` for the bytes ``base[a:b]``, or a bytes object (the XORed MiBs
    from 512 on)."""
    tables = {}
    for pos in range(start * _MIB, n, _MIB):
        k = pos // _MIB
        m = min(_MIB, n - pos)
        if k == 0:
            yield (0, m)
            continue
        r = (k * 4104) % _MIB
        t = (k >> 9) & 0xFF
        if t:
            table = tables.get(t)
            if table is None:
                table = tables[t] = bytes(x ^ t for x in range(256))
            yield (base[r:] + base[:r])[:m].translate(table)
            continue
        first = min(m, _MIB - r)
        yield (r, r + first)
        if m > first:
            yield (0, m - first)


def sized_state_pieces(seed: int, n: int):
    """The ``n`` state bytes of a :class:`SizedProfile` device of ``seed``, as pieces
    (bytes-like, in order; content generation :data:`SIZED_CONTENT_GENERATION`)."""
    base = _sized_base(seed, n)
    bv = memoryview(base)
    for seg in _sized_segments(base, n):
        yield bv[seg[0]:seg[1]] if type(seg) is tuple else seg


def sized_state_crc32(seed: int, n: int) -> int:
    """zlib's CRC-32 of the ``n`` state bytes, without reading the rotated MiBs:
    one pass over the first MiB for the CRCs of its prefixes at the rotation
    points, then arithmetic (:mod:`..crc32`).  With ``P[j]`` the CRC of the
    first MiB's first ``j`` bytes (``L`` of them), the MiB rotated by ``r`` has
    the CRC ``shift(P[L], r) ^ shift(P[r], L) ^ P[r]``; ``shift(P[L], r)`` goes
    from one MiB to the next by a shift of 4104 bytes (the rotation step), so
    every shift but a few is by one of three lengths (byte tables)."""
    base = _sized_base(seed, n)
    bv = memoryview(base)
    L = len(base)
    full = min(n // _MIB, 512) if L == _MIB else 0      # whole MiBs, no XOR
    rots = [(k * 4104) % _MIB for k in range(1, full)]
    prefix = {0: 0}
    crc = last = 0
    for cut in sorted(set(rots) | {L}):
        crc = prefix[cut] = zlib.crc32(bv[last:cut], crc)
        last = cut
    pl = prefix[L]
    out = pl if full else 0                            # MiB 0
    q = None                                           # shift(P[L], r) of the last MiB
    prev = 0
    for r in rots:
        q = shift(q, 4104) if q is not None and r == prev + 4104 else shift(pl, r)
        prev = r
        pr = prefix[r]
        out = shift(out, _MIB) ^ q ^ shift(pr, L) ^ pr
    for s in _sized_segments(base, n, full):         # the rest: segment by segment
        out = zlib.crc32(bv[s[0]:s[1]] if type(s) is tuple else s, out)
    return out


def sized_state(seed: int, n: int, out, at: int = 0) -> None:
    """Write :func:`sized_state_pieces` into ``out[at:at+n]``."""
    for piece in sized_state_pieces(seed, n):
        k = len(piece)
        out[at:at + k] = piece
        at += k


class SizedProfile(Profile):
    """A device with ``state_size`` bytes of internal state (any size, 0 allowed).

    Image = 64-byte register block (:data:`SizedRegs`) then the state, which is
    generated from the seed (:func:`sized_state`): its first MiB is SHAKE-128
    of the seed, MiB ``k`` after it is that MiB rotated left by ``k * 4104``
    bytes (so no two pages of the first 512 MiB are alike), and from MiB 512 on
    every byte is also XORed with ``k >> 9`` (mod 256): slice copies, 64 MiB in
    a few milliseconds plus the memory's first touch.  Each DMA tick
    bumps ``dma_count``/``last_gpa`` and, if the state is at least 8 bytes,
    writes the counter at a random 8-byte slot of it.  Config space: vendor
    0x1b36 device 0x11f0 (a number not used by QEMU), class 12/00/00, BAR0 64-bit
    16 KiB, BAR2 32-bit 8 KiB holding the MSI-X table, MSI (4 vectors) and MSI-X
    (8 vectors) capabilities.
    """

    name = "sized"

    def __init__(self, state_size: int = 4096, *, msi_vectors: int = 4,
                 msix_vectors: int = 8):
        if state_size < 0:
            raise ValueError("state_size must be >= 0")
        self.state_size = state_size
        self.msi_vectors = msi_vectors
        self.msix_vectors = msix_vectors
        self.profile_id = 0x535A4431        # "SZD1"
        self.image_size = REGS_SIZE + state_size

    def make_config(self):
        bars = [Bar(0, 16 * 1024, "mem64"), Bar(2, 8 * 1024, "mem32")]
        return PciConfigSpace(vendor=0x1B36, device=0x11F0, revision=0x01,
                              class_code=0x120000, subsys_vendor=0x1B36, subsys_id=0x0001,
                              command=0, status=0, int_pin=1, bars=bars,
                              msi_vectors=self.msi_vectors, msix_vectors=self.msix_vectors,
                              msix_bar=2)

    def initial_image(self, seed):
        regs = self._regs(seed)
        img = new_image(REGS_SIZE + self.state_size)
        img[:REGS_SIZE] = regs
        if self.state_size:
            sized_state(seed, self.state_size, img, REGS_SIZE)
        return img

    def _regs(self, seed) -> bytes:
        return _SIZED_REGS.pack(0, 0, seed & MASK64, self.state_size, 1, 0)

    def initial_crc32(self, seed):
        return combine(zlib.crc32(self._regs(seed)), sized_state_crc32(seed, self.state_size),
                       self.state_size)

    def initial_pieces(self, seed):
        return [self._regs(seed)] + list(sized_state_pieces(seed, self.state_size))

    def validate_image(self, image):
        if len(image) < REGS_SIZE:
            raise DeviceError("device image shorter than its registers", _errno.EINVAL)
        (size,) = struct.unpack("<Q", image[24:32])
        if size != self.state_size or len(image) != self.image_size:
            raise DeviceError(f"device image for {size} state bytes, this device has "
                              f"{self.state_size}", _errno.EINVAL)

    def tick(self, dev, rnd, gpa):
        count = struct.unpack_from("<Q", dev._image, 0)[0] + 1
        dev._poke(0, struct.pack("<QQ", count, gpa))
        slots = self.state_size // 8
        if slots:
            dev._poke(REGS_SIZE + 8 * (rnd % slots), struct.pack("<Q", count))

    def describe(self, image):
        r = _mod.SizedRegs.parse(bytes(image[:REGS_SIZE]))
        return {k: v for k, v in r.items() if not k.startswith("_")}


def make_profile(spec) -> Profile:
    """``"mtty"``, ``"mtty2"``, ``"sized:65536"``, an int (sized) or a Profile."""
    if isinstance(spec, Profile):
        return spec
    if isinstance(spec, int):
        return SizedProfile(spec)
    s = str(spec).lower()
    if s in ("mtty", "mtty1"):
        return MttyProfile(1)
    if s == "mtty2":
        return MttyProfile(2)
    if s.startswith("sized"):
        _, _, n = s.partition(":")
        return SizedProfile(_parse_size(n) if n else 4096)
    raise ValueError(f"unknown device profile {spec!r}")


def _parse_size(text: str) -> int:
    t = text.strip().lower()
    for suffix, mul in (("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30),
                        ("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30)):
        if t.endswith(suffix):
            return int(t[:-len(suffix)]) * mul
    return int(t)


# --------------------------------------------------------------------------
# Guest memory and the device
# --------------------------------------------------------------------------

class SparseGuestMemory:
    """A minimal guest memory: ``write(gpa, data)`` / ``read(gpa, n)``, zero elsewhere."""

    def __init__(self, page_size: int = PAGE):
        self.page_size = page_size
        self.pages = {}

    def write(self, gpa: int, data) -> None:
        data = bytes(data)
        ps = self.page_size
        pos = 0
        while pos < len(data):
            a = gpa + pos
            pn, off = divmod(a, ps)
            n = min(ps - off, len(data) - pos)
            page = self.pages.setdefault(pn, bytearray(ps))
            page[off:off + n] = data[pos:pos + n]
            pos += n

    def read(self, gpa: int, n: int) -> bytes:
        out = bytearray()
        ps = self.page_size
        while len(out) < n:
            a = gpa + len(out)
            pn, off = divmod(a, ps)
            k = min(ps - off, n - len(out))
            page = self.pages.get(pn)
            out += page[off:off + k] if page is not None else bytes(k)
        return bytes(out)


class EmulatedPciDevice:
    """The emulated device.  See the module docstring."""

    def __init__(self, profile="sized", *, seed: int = 0, memory=None,
                 dma_pages_per_tick: int = 1, dma_base: int = 0x100000,
                 dma_pages: int = 256, dma_page_size: int = PAGE, chunk_size: int = 1 << 20):
        self.profile = make_profile(profile)
        self.seed = seed
        self.memory = memory
        self.dma_pages_per_tick = dma_pages_per_tick
        self.dma_base = dma_base
        self.dma_pages = dma_pages
        self.dma_page_size = dma_page_size
        self.chunk_size = chunk_size
        self.config = self.profile.make_config()
        self.msix_table = bytearray(16 * getattr(self.profile, "msix_vectors", 0))
        self._img = None                  # the image; None: still the initial one, unmade
        self._image_version = 0           # bumped by every change of the image
        self._image_hash = None           # (version, CRC-32) last computed
        self._image_shared = False        # a save session holds the image as its FULL blob
        self._image_dirty = None          # set of image pages while a save session runs
        self._rng = splitmix64(seed ^ 0x51D3A)
        self._dma_listeners = []
        self.written_pages = set()        # every guest page (4 KiB units) ever written
        self.running = True

    # -- image -------------------------------------------------------------
    @property
    def _image(self):
        """The image, made from the seed the first time it is needed: a destination
        whose load installs a new image never makes its initial one (its digest
        comes from the profile without it)."""
        img = self._img
        if img is None:
            img = self._img = self.profile.initial_image(self.seed)
        elif type(img) is Pieces:         # loaded as views: a writable image from here on
            img = self._img = copy_image(img)
        return img

    @_image.setter
    def _image(self, value):
        self._img = value

    def image(self) -> bytes:
        return bytes(self._image)

    def describe(self) -> dict:
        return self.profile.describe(self._image)

    def _poke(self, offset: int, data: bytes) -> None:
        if self._image_shared and self._img is not None:
            # copy on write: the save session's FULL blob keeps the image it was given
            self._img = copy_image(self._img)
        self._image_shared = False
        self._image[offset:offset + len(data)] = data
        self._image_version += 1
        if self._image_dirty is not None and data:
            first, last = offset // PAGE, (offset + len(data) - 1) // PAGE
            self._image_dirty.update(range(first, last + 1))

    def apply_image(self, image, crc: int | None = None) -> None:
        """Install a new image (a bytearray, ImageBuffer or Pieces is taken over as it
        is, not copied); ``crc``: its CRC-32, if the caller knows it."""
        self.profile.validate_image(image)
        self._image = image if is_image(image) else bytearray(image)
        self._image_shared = False
        self._image_version += 1
        self._know_image_crc(crc)

    def restore_initial_image(self) -> None:
        """Go back to the image the device started with (made from the seed again
        when it is next needed)."""
        self._img = None
        self._image_shared = False
        self._image_version += 1

    def _image_crc(self) -> int:
        """zlib's CRC-32 of the image, computed once per image state (every change of
        the image goes through :meth:`_poke` or :meth:`apply_image`, which bump a
        version; a save or load that has the CRC anyway hands it over)."""
        c = self._image_hash
        if c is None or c[0] != self._image_version:
            crc = self.profile.initial_crc32(self.seed) if self._img is None else \
                image_crc32(self._img)
            c = self._image_hash = (self._image_version, crc)
        return c[1]

    def _know_image_crc(self, crc) -> None:
        """The current image's CRC-32, known to the caller (None: not known)."""
        if crc is not None:
            self._image_hash = (self._image_version, crc)

    def image_digest(self) -> str:
        """CRC-32 of the image (8 hex digits)."""
        return f"{self._image_crc():08x}"

    def state_digest(self) -> str:
        """sha256 over profile id, the image's CRC-32, config space and MSI-X table."""
        return self._state_digest(self._image_crc(), self.config.data, self.msix_table)

    def _state_digest(self, image_crc, config, msix) -> str:
        h = hashlib.sha256()
        h.update(struct.pack("<II", self.profile.profile_id, image_crc))
        h.update(config)
        h.update(msix)
        return h.hexdigest()

    def state_digest_later(self):
        """A function that returns :meth:`state_digest` as it is now, whatever the
        device does meanwhile; the image's CRC is computed on another thread in the
        meantime (zlib lets go of the GIL)."""
        version, image = self._image_version, self._img
        config, msix = bytes(self.config.data), bytes(self.msix_table)
        c = self._image_hash
        if c is not None and c[0] == version or image is None or \
                self.profile.image_size < (1 << 20):
            # known, small, or the initial image (its CRC is arithmetic on the seed)
            digest = self._state_digest(self._image_crc(), config, msix)
            return lambda: digest
        import threading
        self._image_shared = True         # the thread reads it: copy on the next change

        def make():
            return image_crc32(image)
        box = []
        t = threading.Thread(target=lambda: box.append(make()), daemon=True)
        t.start()

        def result():
            t.join()
            if not box:                   # the thread failed: do it here
                box.append(make())
            if self._image_version == version:
                self._image_hash = (version, box[0])
            return self._state_digest(box[0], config, msix)
        return result

    def __eq__(self, other):
        if not isinstance(other, EmulatedPciDevice):
            return NotImplemented
        return (self.profile.profile_id == other.profile.profile_id
                and self._image == other._image and self.config.data == other.config.data
                and self.msix_table == other.msix_table)

    __hash__ = None

    def config_space(self) -> bytes:
        return bytes(self.config.data)

    def load_config_space(self, data) -> None:
        if len(data) != PciConfigSpace.SIZE:
            raise DeviceError(f"config space of {len(data)} bytes", _errno.EINVAL)
        self.config.data[:] = data

    # -- DMA ---------------------------------------------------------------
    def add_dma_listener(self, fn) -> None:
        """``fn(gpa, length)`` is called for every DMA write."""
        self._dma_listeners.append(fn)

    def remove_dma_listener(self, fn) -> None:
        if fn in self._dma_listeners:
            self._dma_listeners.remove(fn)

    def dma_write(self, gpa: int, data) -> None:
        """One DMA write by the device (raises EBUSY while the device is stopped)."""
        if not self.running:
            raise DeviceError("device is stopped: no DMA", _errno.EBUSY)
        data = bytes(data)
        if self.memory is not None:
            self.memory.write(gpa, data)
        if data:
            self.written_pages.update(range(gpa // PAGE, (gpa + len(data) - 1) // PAGE + 1))
        for fn in list(self._dma_listeners):
            fn(gpa, len(data))

    def _next_rand(self) -> int:
        self._rng = splitmix64(self._rng)
        return self._rng

    def run(self, ticks: int = 1) -> list:
        """Advance the DMA engine; returns the guest addresses written ([] if stopped)."""
        out = []
        if not self.running:
            return out
        for _ in range(ticks):
            for _ in range(self.dma_pages_per_tick):
                rnd = self._next_rand()
                gpa = self.dma_base + (rnd % max(1, self.dma_pages)) * self.dma_page_size
                word = struct.pack("<QQ", self.seed & MASK64, rnd)
                self.dma_write(gpa, word * (self.dma_page_size // 16))
                self.profile.tick(self, rnd, gpa)
                out.append(gpa)
        return out

    # -- migration core ------------------------------------------------------
    def open_save(self, precopy: bool) -> "SaveSession":
        return SaveSession(self, precopy)

    def open_resume(self) -> BlobAssembler:
        p = self.profile
        return BlobAssembler(profile=p.profile_id, image_size=p.image_size,
                             rejects=p.rejects, validate_image=p.validate_image)

    def stop_copy_length(self) -> int:
        """Estimate of the bytes a stop-and-copy still produces (MIG_DATA_SIZE)."""
        return self.profile.image_size + BLOB_OVERHEAD


class SaveSession:
    """The saving side of one data session: blobs queued, read out in chunks.

    ``precopy=True``: the FULL image is queued as the initial bytes; image pages
    changed afterwards become DELTA blobs (dirty bytes), generated when the queue
    runs dry; :meth:`stop_copy` queues the final DELTA (LAST).  ``precopy=False``:
    one FULL blob flagged LAST.
    """

    def __init__(self, dev: EmulatedPciDevice, precopy: bool):
        self.dev = dev
        self.seq = 0
        self._queue = []          # [bytearray-like, pos, kind]
        self.final = False
        self.closed = False
        self.bytes_out = 0
        dev._image_dirty = set()
        # an initial image never made goes out as the profile's pieces, an image
        # loaded as views as those views (neither is copied)
        img = dev._img
        payload = dev.profile.initial_pieces(dev.seed) if img is None else \
            img if type(img) is Pieces else None
        self._push(KIND_FULL, dev._image if payload is None else payload,
                   last=not precopy, name="initial")
        if not precopy:
            self.final = True
            dev._image_dirty = None

    def _push(self, kind, payload, *, last, name):
        pid = self.dev.profile.profile_id
        if kind == KIND_FULL:
            # the FULL blob holds the image itself (or the initial image's pieces),
            # not a copy: the device copies it before its next change
            # (EmulatedPciDevice._poke); the blob's CRC comes from the image's
            blob = blob_parts(kind, payload, profile=pid, seq=self.seq, last=last,
                              payload_crc=self.dev._image_crc())
            if payload is self.dev._img:
                self.dev._image_shared = True
        else:
            blob = build_blob(kind, payload, profile=pid, seq=self.seq, last=last)
        self.seq += 1
        self._queue.append([blob, 0, name])

    def _delta(self, last: bool) -> bool:
        dev = self.dev
        pages = sorted(dev._image_dirty or ())
        if not pages and not last:
            return False
        img = dev._image if pages else None           # an unchanged image stays unmade
        patches = [(p * PAGE, img[p * PAGE:(p + 1) * PAGE]) for p in pages]
        dev._image_dirty = set() if not last else None
        self._push(KIND_DELTA, build_delta_payload(patches), last=last,
                   name="final" if last else "dirty")
        return True

    def stop_copy(self) -> None:
        """The device stopped: queue the last blob (idempotent)."""
        if not self.final:
            self._delta(last=True)
            self.final = True

    def close(self) -> None:
        self.closed = True
        self._queue.clear()
        if not self.final:
            self.dev._image_dirty = None

    def _remaining(self, kinds) -> int:
        return sum(len(b) - pos for b, pos, k in self._queue if k in kinds)

    def initial_bytes(self) -> int:
        return self._remaining(("initial",))

    def dirty_bytes(self) -> int:
        n = self._remaining(("dirty",))
        if not self.final and self.dev._image_dirty:
            pages = self.dev._image_dirty
            last_page = (self.dev.profile.image_size - 1) // PAGE
            n += delta_size(PAGE if p < last_page else
                            self.dev.profile.image_size - p * PAGE for p in pages)
        return n

    def pending(self) -> int:
        """Bytes still to come: queued, plus (in pre-copy) the current dirty estimate."""
        return self._remaining(("initial", "dirty", "final")) + (
            0 if self.final else self.dirty_bytes() - self._remaining(("dirty",)))

    def read(self, n: int, *, chunk: int | None = None, gather: bool = False):
        """Up to ``n`` bytes (never across a blob end, at most ``chunk``).

        Returns a read-only view of the queued blob (no copy; bytes spanning two
        parts of it are copied, or with ``gather=True`` come as a
        :class:`~qmigstream.pieces.Pieces` of views), ``b""`` at the end of a
        final session, ``None`` when pre-copy has nothing now (the caller maps
        that to ENOMSG or pending_bytes == 0).
        """
        if not self._queue:
            if self.final:
                return b""
            if not self._delta(last=False):
                return None
        blob, pos, _ = self._queue[0]
        k = min(n, len(blob) - pos, chunk or self.dev.chunk_size)
        out = blob.view(pos, k, gather=gather) if type(blob) is BlobParts else \
            memoryview(blob)[pos:pos + k]
        if pos + k == len(blob):
            self._queue.pop(0)
        else:
            self._queue[0][1] = pos + k
        self.bytes_out += k
        return out
