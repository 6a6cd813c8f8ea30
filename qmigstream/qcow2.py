"""The vmstate of a qcow2 internal snapshot (``savevm``), read straight from the image.

HMP ``savevm NAME`` writes an ordinary migration stream into the qcow2 image's
address space *past the guest disk*: it starts at the first L1 entry that maps
no guest cluster (``qcow2_vm_state_offset`` in QEMU's block/qcow2.h: the
virtual size rounded up to what one L1 entry covers, 512 MiB for 64 KiB
clusters) and is ``vm_state_size`` bytes long.  Only the *snapshot's* L1
table reaches it.  Layout from QEMU's docs/interop/qcow2.txt.

>>> with open("disk.qcow2", "rb") as f:                     # doctest: +SKIP
...     img = Qcow2Image(f)
...     snap = img.snapshot("snap1")
...     img.copy_vmstate(snap, open("snap1.mig", "wb"))

Unallocated clusters (and zero-flagged ones) read as zeros; compressed
clusters (zlib) are inflated.  Every table offset and size is checked
against the file before it is used; problems are :class:`~qmigstream.errors.StreamError`.

``vm_state_size`` is only a number in the snapshot table: a small image can
declare terabytes that no cluster backs.  The vmstate is therefore read as
extents (:meth:`Qcow2Image.vmstate_extents`): the pieces the image holds, and
holes given by their length alone, found from the L1 entries and L2 tables
that are in the file, so the work is bounded by what the image holds, not by
``vm_state_size``.  :meth:`~Qcow2Image.copy_vmstate` leaves holes as holes in
a regular output file; where a hole has to become zero bytes (a pipe,
:meth:`~Qcow2Image.read_vmstate`) at most :data:`MAX_FILLED_ZEROS` are written.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
import zlib

import numpy as np

from .errors import BadMagic, LimitExceeded, StreamError, Truncated, UnsupportedVersion

QCOW_MAGIC = b"QFI\xfb"
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")          # 72 bytes
HEADER_V3_EXTRA = struct.Struct(">QQQII")               # bytes 72..103
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")            # 40 bytes, then extra data, id, name

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1

INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 8, 16
INCOMPAT_KNOWN = 0x1F

#: QEMU's own limits (block/qcow2.h): clusters up to 2 MiB, L1 up to 32 MiB of entries.
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024

#: Holes are handed out in pieces of this many zero bytes (one shared buffer).
HOLE_PIECE = 1 << 20
_ZEROS = bytes(HOLE_PIECE)
#: Most zero bytes written for holes where they cannot stay holes (a pipe, memory).
MAX_FILLED_ZEROS = 1 << 30


@dataclasses.dataclass
class Snapshot:
    """One entry of the snapshot table."""
    index: int
    entry_offset: int            # where the table entry is in the file
    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int           # the 64-bit field when present, else the 32-bit one
    disk_size: int | None        # virtual disk size when the snapshot was taken (v3)
    icount: int | None

    def to_json(self):
        return dataclasses.asdict(self)


class Qcow2Image:
    """A qcow2 image opened for reading snapshots' vmstate (file object or path)."""

    def __init__(self, f):
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "rb")
            self._owned = f
        else:
            self._owned = None
        self.f = f
        f.seek(0, os.SEEK_END)
        self.file_size = f.tell()
        self._parse_header()
        self.snapshots = self._parse_snapshots()

    def close(self):
        if self._owned is not None:
            self._owned.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw access -------------------------------------------------------------
    def _read(self, off, n, what):
        if off < 0 or n < 0 or off + n > self.file_size:
            raise Truncated(f"{what} lies outside the image file", off, needed=n,
                            available=max(0, self.file_size - off))
        self.f.seek(off)
        data = self.f.read(n)
        if len(data) != n:
            raise Truncated(f"short read of {what}", off, needed=n, available=len(data))
        return data

    # -- header ---------------------------------------------------------------
    def _parse_header(self):
        if self.file_size < 4:
            raise Truncated("file too short for a qcow2 header", 0, needed=72,
                            available=self.file_size)
        magic = self._read(0, 4, "magic")
        if magic != QCOW_MAGIC:
            raise BadMagic("not a qcow2 image (bad magic)", 0, expected=QCOW_MAGIC, found=magic)
        head = self._read(0, HEADER_V2.size, "qcow2 header")
        (magic, self.version, self.backing_file_offset, self.backing_file_size,
         self.cluster_bits, self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
         self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
         self.snapshots_offset) = HEADER_V2.unpack(head)
        if self.version not in (2, 3):
            raise UnsupportedVersion("unsupported qcow2 version", 4, expected="2 or 3",
                                     found=self.version)
        if not 9 <= self.cluster_bits <= MAX_CLUSTER_BITS:
            raise LimitExceeded("cluster_bits out of range", 20, expected=f"9..{MAX_CLUSTER_BITS}",
                                found=self.cluster_bits)
        self.cluster_size = 1 << self.cluster_bits
        self.incompatible_features = self.compatible_features = self.autoclear_features = 0
        self.compression_type = 0
        self.header_length = 72
        if self.version == 3:
            (self.incompatible_features, self.compatible_features, self.autoclear_features,
             self.refcount_order, self.header_length) = HEADER_V3_EXTRA.unpack(
                self._read(72, HEADER_V3_EXTRA.size, "qcow2 v3 header"))
            if self.header_length < 104 or self.header_length > self.cluster_size:
                raise StreamError("bad qcow2 header_length", 100, expected=">= 104",
                                  found=self.header_length)
            if self.header_length > 104:
                self.compression_type = self._read(104, 1, "compression type")[0]
        unknown = self.incompatible_features & ~INCOMPAT_KNOWN
        if unknown:
            raise UnsupportedVersion("unknown qcow2 incompatible features", 72,
                                     found=hex(unknown))
        if self.incompatible_features & INCOMPAT_DATA_FILE:
            raise UnsupportedVersion("qcow2 with an external data file has no internal "
                                     "snapshots", 72)
        if self.crypt_method:
            raise UnsupportedVersion("encrypted qcow2 images are not supported", 32,
                                     expected=0, found=self.crypt_method)
        self.extended_l2 = bool(self.incompatible_features & INCOMPAT_EXTL2)
        if self.extended_l2 and self.cluster_bits < 14:
            raise StreamError("extended L2 entries need clusters of at least 16 KiB", 20,
                              found=self.cluster_bits)
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_bits = self.cluster_bits - (4 if self.extended_l2 else 3)
        self.l2_entries = 1 << self.l2_bits

    # -- snapshot table ---------------------------------------------------------
    def _parse_snapshots(self):
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise LimitExceeded("too many snapshots", 60, expected=f"<= {MAX_SNAPSHOTS}",
                                found=self.nb_snapshots)
        if self.nb_snapshots and self.snapshots_offset % self.cluster_size:
            raise StreamError("snapshot table not cluster aligned", 64,
                              found=self.snapshots_offset)
        snaps = []
        off = self.snapshots_offset
        for i in range(self.nb_snapshots):
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsz32,
             extra_len) = SNAPSHOT_ENTRY.unpack(self._read(off, SNAPSHOT_ENTRY.size,
                                                           f"snapshot table entry {i}"))
            if extra_len > MAX_SNAPSHOT_EXTRA:
                raise LimitExceeded("snapshot extra data too large", off + 36,
                                    expected=f"<= {MAX_SNAPSHOT_EXTRA}", found=extra_len)
            extra = self._read(off + 40, extra_len, "snapshot extra data")
            vmsz, disk, icount = vmsz32, None, None
            if extra_len >= 8:
                vmsz = struct.unpack_from(">Q", extra, 0)[0]
            if extra_len >= 16:
                disk = struct.unpack_from(">Q", extra, 8)[0]
            if extra_len >= 24:
                icount = struct.unpack_from(">q", extra, 16)[0]
            if self.version == 3 and extra_len < 16:
                raise StreamError("qcow2 v3 snapshot without the disk size extra data",
                                  off + 36, expected=">= 16", found=extra_len)
            p = off + 40 + extra_len
            id_str = self._read(p, id_len, "snapshot id").decode("utf-8", "replace")
            name = self._read(p + id_len, name_len, "snapshot name").decode("utf-8", "replace")
            if l1_size * 8 > MAX_L1_BYTES:
                raise LimitExceeded("snapshot L1 table too large", off + 8,
                                    expected=f"<= {MAX_L1_BYTES // 8}", found=l1_size)
            if l1_off % self.cluster_size:
                raise StreamError("snapshot L1 table not cluster aligned", off, found=l1_off)
            snaps.append(Snapshot(i, off, id_str, name, l1_off, l1_size, dsec, dnsec, clock,
                                  vmsz, disk, icount))
            end = p + id_len + name_len
            off = end + (-end % 8)
        return snaps

    def snapshot(self, name_or_id: str | None = None) -> Snapshot:
        """The snapshot with this name (or id); None: the only (or the last) one."""
        if not self.snapshots:
            raise StreamError("the image has no snapshots", 60)
        if name_or_id is None:
            return self.snapshots[-1]
        for s in self.snapshots:
            if s.name == name_or_id:
                return s
        for s in self.snapshots:
            if s.id_str == name_or_id:
                return s
        raise StreamError(f"no snapshot named {name_or_id!r}", self.snapshots_offset,
                          expected=[s.name for s in self.snapshots], found=name_or_id)

    # -- the vmstate area -------------------------------------------------------
    def vmstate_offset(self, snap: Snapshot) -> int:
        """Guest-visible offset where the snapshot's vmstate starts."""
        disk = snap.disk_size if snap.disk_size is not None else self.size
        shift = self.cluster_bits + self.l2_bits
        return ((disk + (1 << shift) - 1) >> shift) << shift

    def _l1_table(self, snap):
        if snap.l1_size == 0:
            return np.zeros(0, dtype=np.uint64)
        raw = self._read(snap.l1_table_offset, snap.l1_size * 8, "snapshot L1 table")
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    def vmstate_extents(self, snap: Snapshot):
        """Yield the vmstate as ``(data, length)`` pieces in order, ``vm_state_size``
        bytes in all: ``data`` the bytes of a cluster (or its used part) the image
        holds, or None for a hole of ``length`` bytes that reads as zeros (no L2
        table, unallocated or zero clusters, merged where they follow each other).

        Only L1 entries with an L2 table and, in each L2 table, runs of entries
        are visited: the work grows with the tables and clusters in the file."""
        size = snap.vm_state_size
        if size == 0:
            return
        l1 = self._l1_table(snap)
        start = self.vmstate_offset(snap)
        end = start + size
        cs = self.cluster_size
        span = cs << self.l2_bits            # guest bytes one L1 entry maps
        first, last = start // span, (end - 1) // span
        present = l1[first:last + 1] & np.uint64(L1E_OFFSET_MASK)
        cache = {}
        hole = 0
        pos = start
        for idx in (first + np.flatnonzero(present)).tolist():
            base = idx * span
            hole += base - pos
            stop = min(end, base + span)
            l2_off = int(l1[idx]) & L1E_OFFSET_MASK
            if l2_off % cs:
                raise StreamError("L2 table not cluster aligned", l2_off)
            for data, n in self._l2_extents(l2_off, base, stop, cache):
                if data is None:
                    hole += n
                    continue
                if hole:
                    yield None, hole
                    hole = 0
                yield data, n
            pos = stop
        covered = min(end, len(l1) * span)
        if covered > pos:
            hole += covered - pos
            pos = covered
        if hole:
            yield None, hole
        if pos < end:
            raise StreamError("vmstate lies beyond the snapshot's L1 table", None,
                              expected=f"< {len(l1)} L1 entries", found=pos // span)

    def _l2_extents(self, l2_off, base, stop, cache):
        """``(data, length)`` of the guest range ``base .. stop`` one L2 table maps."""
        got = cache.get(l2_off)
        if got is None:
            l2 = self._read(l2_off, self.cluster_size, "L2 table")
            got = cache[l2_off] = (l2, self._l2_runs(l2))
        l2, runs = got
        cs = self.cluster_size
        limit = -(-(stop - base) // cs)      # clusters of this table in the range
        for first, count, is_hole in runs:
            if first >= limit:
                break
            count = min(count, limit - first)
            if is_hole:
                yield None, min(stop, base + (first + count) * cs) - (base + first * cs)
                continue
            for k in range(first, first + count):
                data = self._cluster_data(l2, k, l2_off)
                at = base + k * cs
                yield (data, cs) if at + cs <= stop else (data[:stop - at], stop - at)

    def _l2_runs(self, l2):
        """Runs ``(first entry, count, is_hole)`` of an L2 table: a hole is an entry
        that reads as zeros without touching the file (checked as :meth:`_cluster_data`
        would: not compressed, and zero-flagged or without a host cluster, or with
        extended L2 entries no subcluster allocated)."""
        arr = np.frombuffer(l2, dtype=">u8").astype(np.uint64)
        if self.extended_l2:
            entry, bitmap = arr[0::2], arr[1::2]
            hole = (bitmap & np.uint64(0xFFFFFFFF)) == 0
        else:
            entry = arr
            hole = ((entry & np.uint64(QCOW_OFLAG_ZERO)) != 0) | \
                ((entry & np.uint64(L2E_OFFSET_MASK)) == 0)
        hole &= (entry & np.uint64(QCOW_OFLAG_COMPRESSED)) == 0
        edges = np.flatnonzero(np.diff(hole.astype(np.int8))) + 1
        starts = [0] + edges.tolist()
        ends = edges.tolist() + [len(hole)]
        return [(a, b - a, bool(hole[a])) for a, b in zip(starts, ends)]

    def iter_vmstate(self, snap: Snapshot, chunk: int | None = None):
        """Yield the vmstate bytes (``vm_state_size`` in total): each cluster the
        image holds, holes as zero pieces of at most ``chunk`` (default
        :data:`HOLE_PIECE`) bytes from one shared buffer."""
        zeros = _ZEROS if not chunk or chunk >= HOLE_PIECE else bytes(chunk)
        piece = len(zeros)
        for data, n in self.vmstate_extents(snap):
            if data is not None:
                yield data
                continue
            while n:
                k = min(n, piece)
                yield zeros if k == piece else zeros[:k]
                n -= k

    def read_vmstate(self, snap: Snapshot, *, max_zeros: int = MAX_FILLED_ZEROS) -> bytes:
        """The vmstate in memory; :class:`LimitExceeded` when its holes hold more
        than ``max_zeros`` bytes (write it with :meth:`copy_vmstate` instead)."""
        extents = list(self.vmstate_extents(snap))
        zeros = sum(n for d, n in extents if d is None)
        if zeros > max_zeros:
            raise LimitExceeded("the vmstate is mostly holes: too many zero bytes to "
                                "hold in memory", None, expected=f"<= {max_zeros}",
                                found=zeros)
        return b"".join(bytes(n) if d is None else d for d, n in extents)

    def copy_vmstate(self, snap: Snapshot, out, *, max_zeros: int = MAX_FILLED_ZEROS) -> int:
        """Write the vmstate to a binary file object; return its length.

        To a regular file (not in append mode) holes are skipped with a seek and
        stay holes (the file is extended to the full length at the end);
        elsewhere they are written as zeros, at most ``max_zeros`` bytes in all
        (:class:`LimitExceeded` before a hole that would pass that)."""
        sparse = _sparse_target(out)
        filled = 0
        for data, length in self.vmstate_extents(snap):
            if data is not None:
                out.write(data)
            elif sparse:
                out.seek(length, os.SEEK_CUR)
            else:
                if filled + length > max_zeros:
                    raise LimitExceeded("the vmstate's holes are too large to write as "
                                        "zeros here (write to a regular file: they stay "
                                        "holes)", None, expected=f"<= {max_zeros} bytes",
                                        found=filled + length)
                filled += length
                while length:
                    k = min(length, HOLE_PIECE)
                    out.write(_ZEROS if k == HOLE_PIECE else _ZEROS[:k])
                    length -= k
        if sparse:
            out.flush()
            pos = out.tell()
            if os.fstat(out.fileno()).st_size < pos:
                out.truncate(pos)
        return snap.vm_state_size

    def _cluster_data(self, l2, k, l2_off):
        """The bytes of entry ``k`` of the L2 table ``l2`` (at ``l2_off``)."""
        i = k * self.l2_entry_size
        entry = struct.unpack_from(">Q", l2, i)[0]
        if entry & QCOW_OFLAG_COMPRESSED:
            return self._read_compressed(entry, l2_off + i)
        if self.extended_l2:
            return self._read_subclusters(entry, struct.unpack_from(">Q", l2, i + 8)[0],
                                          l2_off + i)
        host = entry & L2E_OFFSET_MASK
        if entry & QCOW_OFLAG_ZERO or host == 0:
            return bytes(self.cluster_size)
        if host % self.cluster_size:
            raise StreamError("data cluster not cluster aligned", l2_off + i, found=host)
        return self._read(host, self.cluster_size, "data cluster")

    def _read_subclusters(self, entry, bitmap, where):
        host = entry & L2E_OFFSET_MASK
        sc = self.cluster_size // 32
        alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
        if alloc & zero:
            raise StreamError("subcluster both allocated and zero", where + 8, found=hex(bitmap))
        if alloc and (host == 0 or host % self.cluster_size):
            raise StreamError("bad data cluster offset in extended L2 entry", where, found=host)
        out = bytearray(self.cluster_size)
        for k in range(32):
            if alloc >> k & 1:
                out[k * sc:(k + 1) * sc] = self._read(host + k * sc, sc, "data subcluster")
        return bytes(out)

    def _read_compressed(self, entry, where):
        if self.compression_type != 0:
            raise UnsupportedVersion("only zlib-compressed clusters are supported", 104,
                                     expected=0, found=self.compression_type)
        x = 62 - (self.cluster_bits - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (62 - x)) - 1)) + 1
        n = sectors * 512 - (host & 511)
        n = min(n, self.file_size - host)
        raw = self._read(host, n, "compressed cluster")
        d = zlib.decompressobj(-12)
        try:
            out = d.decompress(raw, self.cluster_size)
        except zlib.error as e:
            raise StreamError(f"bad compressed cluster: {e}", where) from None
        if len(out) != self.cluster_size:
            raise StreamError("compressed cluster inflates to the wrong size", where,
                              expected=self.cluster_size, found=len(out))
        return out


def _sparse_target(out) -> bool:
    """Can holes be left as holes in ``out``: a regular file, seekable, not O_APPEND?"""
    try:
        fd = out.fileno()
        st = os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    try:
        import fcntl
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return False
    except (ImportError, OSError):
        return False
    return out.seekable()
