"""The guest RAM model: RAM blocks, a dirty log, a CPU workload, and loading records into it.

Each :class:`RamBlock` is an anonymous memory mapping of its ``used_length``:
the kernel gives pages only when they are first written, so the model is
**sparse** — an untouched 16 GiB guest costs nothing, and its resident size
grows with the pages actually written.  Long runs of pages written at once
(the initial fill, runs of PAGE records) are made resident ahead of the
copy, as transparent huge pages where the kernel offers them (``madvise``).

Pages can also be *placed* (:meth:`RamBlock.place`): a run of pages holds the
bytes of a read-only buffer (the fill's tape, a mapped stream file) at an
offset and a stride, read where they lie, costing no memory of the block's
own.  A write copies a placed page in first; ``mem``, ``view`` and ``words``
(the block as one buffer) copy every placed page in before they are handed
out.  Readers that know about placement (:meth:`RamBlock.groups`, pages,
zero checks, digests, the saver) go group by group.

Per page the block keeps two marks, one byte each in a ``bytearray``:

* ``written`` — the page was ever written.  A page not marked is zero and is
  never read, so zero detection, digests and zero runs on a fresh model touch
  only the pages that hold something (reading an untouched page would make the
  kernel map its zero page, about a microsecond each).  Every write goes
  through :meth:`RamBlock.write` or marks its pages with
  :meth:`RamBlock.mark_written` (or :meth:`RamBlock.touch` for pages already
  marked); code writing ``mem`` directly must mark them: the pages-crc32
  digest keeps each 64 MiB region's part and makes it again only for regions
  written since.
* ``dirty`` — the dirty log, set by every write, read and cleared by the
  saver at each pass (QEMU's ``migration_bitmap_sync``).

Runs of marked pages are found with ``bytearray.find`` (a C scan), so the
model needs no array library.  :meth:`RamBlock.touch` counts the writes per
64 MiB region: a region's digest part made on another thread is reused only
while its count stays the same.

RAM digests (:meth:`RamBlock.digest`): ``pages-crc32`` (the default) covers
the pages holding a non-zero byte — sha256 over the page size, the block
length, the indexes of those pages and, for each 64 MiB region of the block,
the CRC-32 of those pages' contents in index order — so it costs a CRC of the
data (2 GB/s and more, on two threads) instead of a sha256 over the whole
block, zero pages included (1.4 GB/s); any difference confined to 32
consecutive bits (a byte, a word) is always caught, any other with
probability 1 - 2^-32.  ``sha256`` is the sha256 of the whole block.

Guest-physical addresses (:meth:`GuestRam.write`, what a device's DMA engine
writes) map onto the first block (``pc.ram`` on pc/q35) one to one, which is
how QEMU lays out RAM below the PCI hole; the pipeline keeps DMA there.

:func:`fill_initial` gives a synthetic guest its data: a few long runs of
pages placed on a SHAKE-128 tape (see there).

:class:`RamLoader` applies the RAM records of a stream to the model, the way
``ram_load_precopy`` (migration/ram.c) applies them to guest memory.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import struct
import sys
import zlib
from array import array

from .. import xbzrle
from ..crc32 import combine, remove_prefix, repeat, shift
from ..codec import ram_records as R
from ..codec.source import MappedFile
from ..device.pci_device import MASK64, splitmix64
from ..errors import QmigstreamError, StreamError

_Z8 = bytes(8)


def pattern(seed: int, n: int) -> bytes:
    """``n`` deterministic pseudo-random bytes for ``seed`` (SHAKE-128), the same on
    every machine."""
    if n <= 0:
        return b""
    return hashlib.shake_128(struct.pack("<Q", seed & MASK64)).digest(n)


#: madvise(MADV_POPULATE_WRITE) (Linux 5.14+): make pages about to be written resident
#: in one call instead of one page fault each; None: not here (or refused once).
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE",
                          23 if sys.platform.startswith("linux") else None)
#: madvise(MADV_HUGEPAGE): back a range with 2 MiB pages where the kernel can
#: (transparent huge pages in "madvise" mode); None: not here.
_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_HUGE = 2 << 20

#: pages-crc32 digests a CRC-32 per region of this many bytes of a block.
DIGEST_REGION = 64 << 20
#: ... made from the parts of pieces of this many bytes (what threads share out).
DIGEST_PIECE = 8 << 20
#: Digests that read fewer bytes than this (the rest is arithmetic, which keeps the
#: GIL) are made on the calling thread; more, on two threads.
DIGEST_THREAD_MIN = 32 << 20
#: Threads :func:`run_parallel` uses at most (the caller's included).
THREADS = min(2, os.cpu_count() or 1)


def run_parallel(fns, weights=None) -> list:
    """``[fn() for fn in fns]``, spread over :data:`THREADS` threads (for work that
    lets go of the GIL: zlib, hashlib, file writes); ``weights``: each one's cost,
    to balance them.  The first exception is raised."""
    n = len(fns)
    if THREADS < 2 or n < 2:
        return [fn() for fn in fns]
    import threading
    weights = weights or [1] * n
    # the heaviest first, each to the less loaded of the two lists
    order = sorted(range(n), key=lambda i: -weights[i])
    lists, load = ([], []), [0, 0]
    for i in order:
        k = 0 if load[0] <= load[1] else 1
        lists[k].append(i)
        load[k] += weights[i]
    out = [None] * n
    errors = []

    def work(items):
        try:
            for i in items:
                out[i] = fns[i]()
        except BaseException as e:        # handed to the caller
            errors.append(e)
    t = threading.Thread(target=work, args=(lists[1],))
    t.start()
    work(lists[0])
    t.join()
    if errors:
        raise errors[0]
    return out


_HAVE_PREADV = hasattr(os, "preadv")
_GATHER_PAGES = 256
_gather = None


def _gathered_crc32(fd: int, offset: int, n: int, ps: int, stride: int, crc: int) -> int:
    """CRC-32 of ``n`` pages of file ``fd`` at ``offset``, ``offset + stride``, ...:
    up to :data:`_GATHER_PAGES` pages a ``preadv`` into a buffer of this thread
    (the gaps into a scratch buffer), then one CRC call; neither holds the GIL."""
    global _gather
    if _gather is None:
        import threading
        _gather = threading.local()
    key = (ps, stride)
    got = getattr(_gather, "bufs", None)
    if got is None or got[0] != key:
        buf = bytearray(_GATHER_PAGES * ps)
        bv = memoryview(buf)
        gap = memoryview(bytearray(stride - ps))
        iov = []
        for k in range(_GATHER_PAGES):
            iov.append(bv[k * ps:(k + 1) * ps])
            iov.append(gap)
        got = _gather.bufs = (key, bv, iov)
    _, bv, iov = got
    while n:
        m = min(n, _GATHER_PAGES)
        want = m * ps + (m - 1) * (stride - ps)
        if os.preadv(fd, iov[:2 * m - 1], offset) != want:
            raise QmigstreamError("a mapped stream file changed while it was read")
        crc = zlib.crc32(bv[:m * ps], crc)
        offset += m * stride
        n -= m
    return crc


class SliceCrc:
    """zlib's CRC-32 of any slice of one read-only buffer from the CRCs of its
    prefixes (:func:`qmigstream.crc32.remove_prefix`): the prefix CRC at each
    slice end asked for is made once, from the nearest known one before it, so
    a buffer read by many slices is read about once in all.  Thread-safe."""

    def __init__(self, view, step: int = 4096):
        import threading
        self.view = view
        # the prefix CRCs every ``step`` bytes, in one pass: any other cut is then
        # less than ``step`` bytes from a known one
        self._cuts = list(range(0, len(view), step))
        self._prefix = {}
        crc = 0
        for c in self._cuts:
            if c:
                crc = zlib.crc32(view[c - step:c], crc)
            self._prefix[c] = crc
        self._lock = threading.Lock()

    def _at(self, c: int) -> int:
        p = self._prefix.get(c)
        if p is None:
            i = bisect.bisect(self._cuts, c) - 1
            k = self._cuts[i]
            p = zlib.crc32(self.view[k:c], self._prefix[k])
            self._prefix[c] = p
            self._cuts.insert(i + 1, c)
        return p

    def crc(self, a: int, b: int) -> int:
        """CRC-32 of ``view[a:b]``."""
        with self._lock:
            return remove_prefix(self._at(b), self._at(a), b - a)

    def extend(self, crc: int, a: int, b: int) -> int:
        """The CRC-32 ``crc`` going on over ``view[a:b]`` (one shift:
        combine(crc, P[b] ^ shift(P[a], n), n) = shift(crc ^ P[a], n) ^ P[b])."""
        with self._lock:
            pa, pb = self._at(a), self._at(b)
        return shift(crc ^ pa, b - a) ^ pb


def _has_zero_page(buf, view, ps: int) -> bool:
    """Whether ``ps`` zero bytes in a row lie anywhere in backing ``buf`` (searched
    where it lies, else in a copy of its ``view``): where none do, no page placed
    on it is a zero page."""
    find = buf.find if isinstance(buf, (bytes, bytearray, mmap.mmap)) else bytes(view).find
    return find(bytes(ps)) >= 0


def _index0(arr, start: int) -> int:
    try:
        return arr.index(0, start)
    except ValueError:
        return -1


def marked_runs(marks, start: int = 0, end: int | None = None):
    """``(first, count)`` of each run of marked (non-zero) bytes of ``marks`` in
    ``[start, end)``, in order (two ``find`` calls a run)."""
    end = len(marks) if end is None else min(end, len(marks))
    find = marks.find
    pos = start
    while pos < end:
        a = find(1, pos, end)
        if a < 0:
            return
        b = find(0, a, end)
        if b < 0:
            b = end
        yield a, b - a
        pos = b


def _ones(n: int) -> bytes:
    return b"\x01" * n


def _index_bytes(idx) -> bytes:
    """Page indexes as little-endian u64s."""
    a = idx if isinstance(idx, array) and idx.typecode == "q" else array("q", idx)
    if sys.byteorder != "little":
        a = array("q", a)
        a.byteswap()
    return a.tobytes()


def _u32le_bytes(values) -> bytes:
    a = array("L" if array("L").itemsize == 4 else "I", values)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


#: RAM digest schemes (see the module docstring); the first is the default.
RAM_DIGESTS = ("pages-crc32", "sha256")
DEFAULT_RAM_DIGEST = RAM_DIGESTS[0]
_PAGES_CRC32_TAG = b"qmigstream ram digest pages-crc32 v1\0"


class RamBlock:
    def __init__(self, name: str, used_length: int, page_size: int, info=None):
        if used_length % page_size:
            raise QmigstreamError(f"RAM block {name!r}: length {used_length} is not a "
                                  f"multiple of the page size {page_size}")
        self.name = name
        self.used_length = used_length
        self.page_size = page_size
        self.info = info                     # the template's RamBlockInfo (extras kept)
        self.npages = used_length // page_size
        try:
            # private anonymous memory: untouched pages read as the shared zero page
            # and cost nothing; only written pages become resident
            self.anon = mmap.mmap(-1, max(used_length, page_size),
                                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, OverflowError) as e:
            # A length from the stream the host cannot map (ENOMEM, or beyond ssize_t).
            why = e.strerror if isinstance(e, OSError) else "beyond the largest mapping"
            raise QmigstreamError(f"RAM block {name!r}: cannot map {used_length:#x} bytes: "
                                  f"{why}") from None
        self.anon_view = memoryview(self.anon)
        #: the anonymous memory as u64 words (the page size is a multiple of 8)
        self.anon_words = self.anon_view.cast("Q") if page_size % 8 == 0 else None
        self.dirty = bytearray(self.npages)      # 1: dirty since the last pass
        self.written = bytearray(self.npages)    # 1: ever written
        self.zero_page = bytes(page_size)
        # pages placed on a backing (see place()): onback[i] = 1, and the run of
        # pages placed together that page i is in starts at the last 1 of
        # _starts[:i + 1]
        self.onback = None
        self._starts = None                      # 1: a placed run starts here
        self._runs = {}                          # start page -> (backing, offset, stride)
        self._backings = []
        self._backing_ids = {}
        self._slice_crcs = {}             # backing id -> SliceCrc (placed with index=True)
        self._zero_free = set()           # ids of indexed backings no zero page lies in
        self._repeat_crcs = {}            # (backing id, offset, count) -> CRC-32
        self.placed = 0                          # pages on a backing now
        self._placed_end = 0                     # no placed page at or after this one
        # pages-crc32 by region: writes per region, and each region's part of the
        # digest as last computed with the count it was computed at
        self._per_region = max(1, DIGEST_REGION // page_size)
        self._region_writes = [0] * -(-self.npages // self._per_region)
        self._region_parts = {}
        self._digest_cache = None                # (region writes, pages-crc32 digest)
        self._per_piece = max(1, min(self._per_region, DIGEST_PIECE // page_size))
        self._piece_parts = {}
        self._piece_locks = {}

    # -- the whole block as memory -----------------------------------------------------
    @property
    def mem(self):
        """The block as one writable buffer (pages on a backing are copied in
        first: code that reads or stores ``mem`` directly sees every page)."""
        if self.placed:
            self.materialize()
        return self.anon

    @property
    def view(self) -> memoryview:
        if self.placed:
            self.materialize()
        return self.anon_view

    @property
    def words(self):
        if self.placed:
            self.materialize()
        return self.anon_words

    # -- pages on a backing ------------------------------------------------------------
    def backing_id(self, buf) -> int:
        """The id of read-only buffer ``buf`` as a backing of this block (added once).
        A :class:`~qmigstream.codec.source.MappedFile` is also read through its
        file (``preadv`` gathers its pages without holding the GIL)."""
        bid = self._backing_ids.get(id(buf))
        if bid is None or self._backings[bid][0] is not buf:
            bid = len(self._backings)
            fd = buf.fileno() if isinstance(buf, MappedFile) else None
            self._backings.append((buf, memoryview(buf).cast("B"), fd))
            self._backing_ids[id(buf)] = bid
        return bid

    def place(self, first: int, count: int, buf, offset: int, stride: int, *,
              index: bool = False) -> None:
        """Pages ``first .. first+count-1`` now hold the bytes of ``buf`` (read-only,
        kept alive while pages use it) at ``offset``, ``offset + stride``, ...,
        without copying them: a page is read where it lies until something
        writes it (then it is copied into the block's own memory first).  The
        pages count as written (not as dirty).  ``index``: many pages lie on
        ``buf`` (it is read again and again): CRCs of its slices are made from
        its prefix CRCs (:class:`SliceCrc`) instead of reading them."""
        ps = self.page_size
        if count <= 0:
            return
        if first < 0 or first + count > self.npages:
            raise QmigstreamError(f"pages {first}..{first + count - 1} outside RAM block "
                                  f"{self.name!r} ({self.npages} pages)")
        bid = self.backing_id(buf)
        size = len(self._backings[bid][1])
        if index and bid not in self._slice_crcs:
            view = self._backings[bid][1]
            self._slice_crcs[bid] = SliceCrc(view)
            if not _has_zero_page(buf, view, ps):
                self._zero_free.add(bid)
        if offset < 0 or stride < 0 or offset + (count - 1) * stride + ps > size:
            raise QmigstreamError(f"RAM block {self.name!r}: placed pages beyond their "
                                  f"backing ({size} bytes)")
        if self.onback is None:
            self.onback = bytearray(self.npages)
            self._starts = bytearray(self.npages)
        ob, st, runs = self.onback, self._starts, self._runs
        end = first + count
        # (no placed page at or after _placed_end: placing in order looks no further)
        nxt = ob.find(1, end, self._placed_end) if self.placed and end < self._placed_end else -1
        if nxt >= 0 and st.find(1, end, nxt + 1) < 0:
            # the next placed page goes on with a run that starts before this
            # one ends: it starts the rest of that run
            runs[nxt] = self._run_at(nxt)
            st[nxt] = 1
        if self.placed and first < self._placed_end:
            k = st.find(1, first, end)
            while k >= 0:                    # runs this one covers from their start
                del runs[k]
                k = st.find(1, k + 1, end)
            st[first:end] = bytes(count)
            already = ob.count(1, first, end)
        else:
            already = 0
        st[first] = 1
        runs[first] = (bid, offset, stride)
        ones = _ones(count)
        ob[first:end] = ones
        self.placed += count - already
        if end > self._placed_end:
            self._placed_end = end
        self.written[first:end] = ones
        self.touch(first, count)

    def _run_at(self, i: int):
        """(backing id, offset, stride) of the placed run as seen from page ``i`` on."""
        r = self._starts.rfind(1, 0, i + 1)
        bid, off, stride = self._runs[r]
        return bid, off + (i - r) * stride, stride

    def _unplace(self, first: int, end: int, keep: bool) -> None:
        """Pages of ``[first, end)`` leave their backing: into the block's own memory
        (``keep``: their bytes copied there first; else the caller overwrites
        them whole)."""
        ob = self.onback
        if not self.placed or ob.find(1, first, end) < 0:
            return
        runs = list(marked_runs(ob, first, end))
        if keep:
            self.populate_runs(runs)
        ps = self.page_size
        anon = self.anon
        for a, n in runs:
            if keep:
                for start, k, v, o, stride in self.groups(a, a + n):
                    for i in range(start, start + k):
                        anon[i * ps:(i + 1) * ps] = v[o:o + ps]
                        o += stride
            ob[a:a + n] = bytes(n)
            self.placed -= n
        if not self.placed:
            self._drop_backings()

    def _drop_backings(self):
        self.onback = self._starts = None
        self._placed_end = 0
        self._runs = {}
        for _, v, _ in self._backings:
            v.release()
        self._backings, self._backing_ids = [], {}
        self._slice_crcs, self._repeat_crcs = {}, {}
        self._zero_free = set()

    def materialize(self) -> None:
        """Copy every page on a backing into the block's own memory."""
        self._unplace(0, self.npages, True)

    def _page_at(self, i: int):
        """(buffer, offset) of page ``i``'s bytes: a backing's view, or the block's
        own memory."""
        if self.placed and self.onback[i]:
            bid, off, _ = self._run_at(i)
            return self._backings[bid][1], off
        return self.anon_view, i * self.page_size

    def groups(self, first: int, end: int, *, ids: bool = False):
        """Pages ``first .. end-1`` in order as ``(start, count, view, offset,
        stride)``: page ``start + k`` is ``view[offset + k*stride:][:page_size]``
        (``view`` is None for the block's own memory, where the stride is the page
        size); the pages of one placed run are one group.  ``ids``: the tuples
        have the backing's id (or None for the block's own memory) as a sixth item."""
        ps = self.page_size
        if end <= first:
            return
        ob = self.onback
        if not self.placed or ob.find(1, first, end) < 0:
            yield (first, end - first, None, first * ps, ps) + ((None,) if ids else ())
            return
        st, bk = self._starts, self._backings
        i = first
        while i < end:
            if not ob[i]:
                j = ob.find(1, i, end)
                j = end if j < 0 else j
                yield (i, j - i, None, i * ps, ps) + ((None,) if ids else ())
                i = j
                continue
            j = ob.find(0, i, end)
            j = end if j < 0 else j
            while i < j:                     # the placed pages [i, j), run by run
                k = st.find(1, i + 1, j)
                k = j if k < 0 else k
                bid, off, stride = self._run_at(i)
                yield (i, k - i, bk[bid][1], off, stride) + ((bid,) if ids else ())
                i = k

    def crc32(self, first: int, end: int, crc: int = 0) -> int:
        """zlib's CRC-32 of pages ``first .. end-1`` in order, going on from ``crc``.
        Long pieces, so that zlib lets go of the GIL (it keeps it for pieces
        under 5 KiB): pages lying one after the other in one call; the pages of
        a mapped file at a stride gathered by ``preadv`` into a buffer first.
        Pages on a backing placed with ``index=True`` (a buffer many pages are
        placed on, such as the synthetic guest's tape) and runs of one repeated
        page are not read again: their CRCs come from the backing's prefix CRCs
        (:class:`SliceCrc`) or from a cache, combined arithmetically
        (:mod:`qmigstream.crc32`)."""
        ps = self.page_size
        bk = self._backings
        for start, n, v, o, stride, bid in self.groups(first, end, ids=True):
            if v is None:
                v = self.anon_view
            if stride == ps:
                index = self._slice_crcs.get(bid) if bid is not None else None
                if index is not None:
                    crc = index.extend(crc, o, o + n * ps)
                else:
                    crc = zlib.crc32(v[o:o + n * ps], crc)
            elif stride == 0:
                crc = combine(crc, self._repeated_crc(bid, v, o, n), n * ps)
            elif bid is not None and bk[bid][2] is not None and stride > ps and _HAVE_PREADV:
                crc = _gathered_crc32(bk[bid][2], o, n, ps, stride, crc)
            else:
                for p in range(o, o + n * stride, stride):
                    crc = zlib.crc32(v[p:p + ps], crc)
        return crc

    def crc_read_bytes(self) -> int:
        """Bytes :meth:`crc32` of every written page reads (pages on an indexed
        backing and runs of one repeated page are not read): what deciding
        whether the digests are worth a thread (zlib lets go of the GIL; the
        arithmetic does not) looks at."""
        ps = self.page_size
        total = 0
        for a, n in marked_runs(self.written):
            for _, k, v, _, stride, bid in self.groups(a, a + n, ids=True):
                if stride and not (bid is not None and bid in self._slice_crcs):
                    total += k * ps
        return total

    def _repeated_crc(self, bid, v, o: int, n: int) -> int:
        """CRC-32 of ``n`` copies of the page at ``v[o:]`` (cached per backing page
        and count: runs of one repeated page come in a few kinds)."""
        key = (bid, o, n)
        got = self._repeat_crcs.get(key)
        if got is None:
            ps = self.page_size
            got = repeat(zlib.crc32(v[o:o + ps]), ps, n)
            if bid is not None:
                self._repeat_crcs[key] = got
        return got

    def page_pieces(self, first: int, end: int) -> list:
        """Memoryviews of pages ``first .. end-1`` in order, where each lies (no copy):
        consecutive pages lying one after the other are one view."""
        ps = self.page_size
        out = []
        av = self.anon_view
        for start, n, v, o, stride in self.groups(first, end):
            if v is None:
                v = av
            if stride == ps:
                out.append(v[o:o + n * ps])
            else:
                out.extend(v[p:p + ps] for p in range(o, o + n * stride, stride)) \
                    if stride else out.extend([v[o:o + ps]] * n)
        return out

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` of the block."""
        if offset < 0 or offset + n > self.used_length:
            raise QmigstreamError(f"read of {n} bytes at 0x{offset:x} outside RAM block "
                                  f"{self.name!r} ({self.used_length} bytes)")
        ps = self.page_size
        first, end = offset // ps, -(-(offset + n) // ps)
        if not self.placed or self.onback.find(1, first, end) < 0:
            return bytes(self.anon[offset:offset + n])
        whole = b"".join(self.page_pieces(first, end))
        a = offset - first * ps
        return whole[a:a + n]

    def touch(self, first: int, count: int = 1) -> None:
        """Pages ``first .. first+count-1`` changed (every write path calls this)."""
        per = self._per_region
        rw = self._region_writes
        for r in range(first // per, min(len(rw), (first + max(count, 1) - 1) // per + 1)):
            rw[r] += 1

    # -- writing ---------------------------------------------------------------------
    def write(self, offset: int, data, *, dirty: bool = True) -> None:
        """Store ``data`` at ``offset``: its pages are marked written (and dirty,
        as a guest store or DMA makes them; a load from a stream does not)."""
        n = len(data)
        if offset < 0 or offset + n > self.used_length:
            raise QmigstreamError(f"write of {n} bytes at 0x{offset:x} outside RAM block "
                                  f"{self.name!r} ({self.used_length} bytes)")
        if not n:
            return
        ps = self.page_size
        first, end = offset // ps, (offset + n - 1) // ps + 1
        if self.placed:
            # pages this write covers whole leave their backing; the rest keep
            # their bytes (copied in first)
            if offset % ps:
                self._unplace(first, first + 1, True)
            if (offset + n) % ps:
                self._unplace(end - 1, end, True)
            self._unplace(first, end, False)
        self.anon[offset:offset + n] = data
        if end - first == 1:
            self.written[first] = 1
            if dirty:
                self.dirty[first] = 1
        else:
            ones = _ones(end - first)
            self.written[first:end] = ones
            if dirty:
                self.dirty[first:end] = ones
        self.touch(first, end - first)

    def mark_written(self, first: int, count: int = 1) -> None:
        """Pages ``first .. first+count-1`` were written (by a direct store to ``mem``)."""
        if count == 1:
            self.written[first] = 1
        else:
            self.written[first:first + count] = _ones(count)
        self.touch(first, count)

    def mark_dirty(self, first: int, count: int = 1) -> None:
        if count == 1:
            self.dirty[first] = 1
        else:
            self.dirty[first:first + count] = _ones(count)

    def store_pages(self, indexes, data) -> None:
        """Whole pages at once: ``data[k]`` (``page_size`` bytes) to page ``indexes[k]``."""
        ps = self.page_size
        mem = self.anon
        idx = [int(i) for i in indexes]
        if len(idx) >= 16:
            self.populate_runs(_index_runs(sorted(i for i in idx if not self.written[i])))
        for k, i in enumerate(idx):
            if self.placed:
                self._unplace(i, i + 1, False)
            mem[i * ps:(i + 1) * ps] = memoryview(data[k]).cast("B")
            self.written[i] = 1
            self.touch(i)

    def populate_runs(self, runs, *, whole_huge: bool = False) -> None:
        """Make the pages of ``runs`` ((first, count), any order) resident ahead of
        writing them: the 2 MiB-aligned parts of each run as huge pages where the
        kernel offers them (``whole_huge``: every 2 MiB page a run touches, for
        runs that the next ones continue), then one madvise(MADV_POPULATE_WRITE)
        per run (a hint: pages the caller then leaves unwritten would only cost
        memory, never more than the block's length)."""
        global _POPULATE_WRITE, _HUGEPAGE
        ps = self.page_size
        if ps % mmap.PAGESIZE:
            return
        mem = self.anon
        for first, count in runs:
            if count < 16:
                continue
            off, n = first * ps, count * ps
            if _HUGEPAGE is not None and (n >= _HUGE or whole_huge):
                if whole_huge:
                    a = off // _HUGE * _HUGE
                    b = min(-(-(off + n) // _HUGE) * _HUGE, len(mem))
                else:
                    a = -(-off // _HUGE) * _HUGE
                    b = (off + n) // _HUGE * _HUGE
                if b > a:
                    try:
                        mem.madvise(_HUGEPAGE, a, b - a)
                    except OSError:
                        _HUGEPAGE = None
            if _POPULATE_WRITE is not None:
                try:
                    mem.madvise(_POPULATE_WRITE, off, n)
                except OSError:              # an older kernel: fault them one by one
                    _POPULATE_WRITE = None

    # -- reading ---------------------------------------------------------------------
    def page(self, index: int) -> memoryview:
        """Page ``index``'s bytes where they lie (read-only if on a backing)."""
        v, o = self._page_at(index)
        return v[o:o + self.page_size]

    def page_is_zero(self, index: int) -> bool:
        """Whether page ``index`` holds only zeros (a page never written is, unread)."""
        if not self.written[index]:
            return True
        ps = self.page_size
        v, a = self._page_at(index)
        return v[a:a + 8] == _Z8 and v[a:a + ps] == self.zero_page

    def zero_pages(self, first: int, end: int) -> list:
        """The pages of ``first .. end-1`` that hold only zeros, ascending (pages
        never written among them; the caller usually asks about written ones).
        Each group of pages (:meth:`groups`) has its first words gathered by one
        strided slice; only pages whose first word is zero are compared whole."""
        ps = self.page_size
        zp = self.zero_page
        out = []
        free = self._zero_free
        for start, n, v, o, stride, bid in self.groups(first, end, ids=True):
            if v is None:
                v = self.anon_view
            elif bid in free:
                continue                     # no page of this backing is all zeros
            if stride == 0:
                if v[o:o + ps] == zp:
                    out.extend(range(start, start + n))
                continue
            if stride % 8 or ps % 8:
                cand = range(n)
            else:
                fw = v[o:o + (n - 1) * stride + 8].cast("Q")
                got = array("Q")
                got.frombytes(fw[::stride // 8].tobytes())
                fw.release()
                cand = []
                k = _index0(got, 0)
                while k >= 0:
                    cand.append(k)
                    k = _index0(got, k + 1)
            for k in cand:
                p = o + k * stride
                if v[p:p + ps] == zp:
                    out.append(start + k)
        return out

    def nonzero_runs(self, start: int = 0, end: int | None = None):
        """``(first, count)`` of each run of pages holding a non-zero byte in
        ``[start, end)`` (only written pages are read)."""
        for first, count in marked_runs(self.written, start, end):
            p = first
            for z in self.zero_pages(first, first + count):
                if z > p:
                    yield p, z - p
                p = z + 1
            if first + count > p:
                yield p, first + count - p

    def nonzero(self, indices) -> list:
        """For each page index, whether the page has a non-zero byte."""
        return [not self.page_is_zero(int(i)) for i in indices]

    def nonzero_pages(self) -> array:
        """Indexes (ascending) of the pages that hold a non-zero byte."""
        out = array("q")
        for first, count in self.nonzero_runs():
            out.extend(range(first, first + count))
        return out

    def dirty_count(self) -> int:
        return self.dirty.count(1)

    def digest(self, scheme: str = DEFAULT_RAM_DIGEST) -> str:
        if scheme == "sha256":
            h = hashlib.sha256()
            per = max(1, (64 << 20) // self.page_size)
            for first in range(0, self.npages, per):
                for piece in self.page_pieces(first, min(self.npages, first + per)):
                    h.update(piece)
            return h.hexdigest()
        if scheme != "pages-crc32":
            raise QmigstreamError(f"unknown RAM digest {scheme!r} (one of "
                                  f"{', '.join(RAM_DIGESTS)})")
        mark = tuple(self._region_writes)
        if self._digest_cache is not None and self._digest_cache[0] == mark:
            return self._digest_cache[1]            # nothing written since
        parts = self._region_digest_parts()
        crcs = [crc for _, crc in parts]
        idx = array("q")
        for runs, _ in parts:
            for first, count in runs:
                idx.extend(range(first, first + count))
        h = hashlib.sha256(_PAGES_CRC32_TAG)
        h.update(struct.pack("<QQQQ", self.page_size, self.used_length, len(idx), len(crcs)))
        h.update(_index_bytes(idx))
        h.update(_u32le_bytes(crcs))
        out = h.hexdigest()
        if tuple(self._region_writes) == mark:
            self._digest_cache = (mark, out)
        return out

    def region_part(self, r: int):
        """Region ``r``'s part of the pages-crc32 digest: (runs of non-zero pages,
        CRC-32 of their contents), reused while no write touched the region since
        it was made (safe to call from another thread while the region's
        neighbours are written: a write to the region itself makes it stale).
        Made from the parts of its 8 MiB pieces (:meth:`piece_part`), which
        threads can make side by side, combined arithmetically."""
        writes = self._region_writes[r]
        got = self._region_parts.get(r)
        if got is not None and got[0] == writes:
            return got[1]
        runs = []
        c = 0
        for k in self._region_pieces(r):
            pruns, pc, nbytes = self.piece_part(k, writes)
            runs += pruns
            c = combine(c, pc, nbytes)
        part = (runs, c)
        self._region_parts[r] = (writes, part)
        return part

    def _region_pieces(self, r: int) -> range:
        """The pieces of region ``r`` (the last region's last piece may be short)."""
        per, sub = self._per_region, self._per_piece
        return range(r * per // sub, -(-min(self.npages, (r + 1) * per) // sub))

    def piece_part(self, k: int, writes: int | None = None):
        """(runs of non-zero pages, their CRC-32, their bytes) of 8 MiB piece ``k``
        of the block (pieces never cross a region); made once by one thread
        while the others that ask wait for it."""
        sub = self._per_piece
        a = k * sub
        if writes is None:
            writes = self._region_writes[a // self._per_region]
        got = self._piece_parts.get(k)
        if got is not None and got[0] == writes:
            return got[1]
        with self._piece_lock(k):
            got = self._piece_parts.get(k)
            if got is not None and got[0] == writes:
                return got[1]
            runs = list(self.nonzero_runs(a, min(self.npages, a + sub)))
            c = 0
            for first, count in runs:
                c = self.crc32(first, first + count, c)
            part = (runs, c, sum(n for _, n in runs) * self.page_size)
            self._piece_parts[k] = (writes, part)
            return part

    def _piece_lock(self, k: int):
        locks = self._piece_locks
        lock = locks.get(k)
        if lock is None:
            import threading
            lock = locks.setdefault(k, threading.Lock())
        return lock

    def _region_digest_parts(self) -> list:
        """Every region's :meth:`region_part` (fixed 64 MiB boundaries: the result
        does not depend on how it is computed), the stale ones' pieces made on two
        threads when they read enough bytes (zlib lets go of the GIL; the
        arithmetic of pages on an indexed backing does not)."""
        n = len(self._region_writes)
        stale = [r for r in range(n) if (self._region_parts.get(r) or (None,))[0]
                 != self._region_writes[r]]
        sub = self._per_piece
        pieces = [k for r in stale for k in self._region_pieces(r)]
        weights = [self.written.count(1, k * sub, (k + 1) * sub) for k in pieces]
        if sum(weights) * self.page_size >= DIGEST_THREAD_MIN and \
                self.crc_read_bytes() >= DIGEST_THREAD_MIN:
            run_parallel([lambda k=k: self.piece_part(k) for k in pieces], weights=weights)
        return [self.region_part(r) for r in range(n)]

    def close(self):
        try:
            if self.placed:
                self.placed = 0
                self._drop_backings()
            if self.anon_words is not None:
                self.anon_words.release()
            self.anon_view.release()
            self.anon.close()
        except BufferError:                   # a view someone still holds: freed with it
            pass


def _index_runs(idx):
    """(first, count) of each run of consecutive values in sorted ``idx``."""
    out = []
    first = prev = None
    for i in idx:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if first is not None:
            out.append((first, prev - first + 1))
        first = prev = i
    if first is not None:
        out.append((first, prev - first + 1))
    return out


class GuestRam:
    """RAM blocks in MEM_SIZE order.  ``blocks``: [(name, used_length[, RamBlockInfo])]."""

    def __init__(self, blocks, page_size: int = 4096):
        self.page_size = page_size
        self.blocks = {}
        for b in blocks:
            name, length = b[0], b[1]
            info = b[2] if len(b) > 2 else None
            if name in self.blocks:
                raise QmigstreamError(f"RAM block {name!r} twice")
            self.blocks[name] = RamBlock(name, length, page_size, info)
        if not self.blocks:
            raise QmigstreamError("a guest needs at least one RAM block")
        self.main = next(iter(self.blocks.values()))

    def __iter__(self):
        return iter(self.blocks.values())

    def block(self, name: str) -> RamBlock:
        try:
            return self.blocks[name]
        except KeyError:
            raise QmigstreamError(f"no RAM block {name!r}") from None

    def write(self, gpa: int, data) -> None:
        """A guest-physical write (DMA): the main block, offset = gpa."""
        self.main.write(gpa, data)

    def read(self, gpa: int, n: int) -> bytes:
        return self.main.read(gpa, n)

    @property
    def total(self) -> int:
        return sum(b.used_length for b in self)

    def digests(self, scheme: str = DEFAULT_RAM_DIGEST) -> dict:
        return {b.name: b.digest(scheme) for b in self}

    def crc_read_bytes(self) -> int:
        """:meth:`RamBlock.crc_read_bytes` of all blocks."""
        return sum(b.crc_read_bytes() for b in self)

    def resident_pages(self) -> int:
        """Pages holding a non-zero byte."""
        return sum(n for b in self for _, n in b.nonzero_runs())

    def any_dirty(self) -> bool:
        return any(b.dirty.find(1) >= 0 for b in self)

    def clear_dirty(self):
        for b in self:
            b.dirty[:] = bytes(b.npages)

    def close(self):
        for b in self:
            b.close()


class CpuWorkload:
    """A guest CPU that dirties pages: ``rate`` stores per second of modelled time.

    Each store writes ``store_size`` pseudo-random bytes at a pseudo-random
    page and offset of the main block (within ``[start, start+length)``), so a
    dirtied page changes in a few bytes — what makes XBZRLE worth it.  Every
    choice comes from SplitMix64 over ``seed``: the same seed dirties the same
    pages with the same bytes on every machine.
    """

    def __init__(self, ram: GuestRam, *, seed: int = 0, rate: int = 0, store_size: int = 64,
                 start: int = 0, length: int | None = None):
        self.ram = ram
        self.rate = rate
        self.store_size = store_size
        self.start = start
        blk = ram.main
        self.length = (blk.used_length - start) if length is None else length
        if self.length <= 0 or start + self.length > blk.used_length:
            raise QmigstreamError("workload range outside the main RAM block")
        self.state = splitmix64(seed ^ 0xC0FFEE)
        self.stores = 0
        self._carry = 0

    def run_stores(self, n: int) -> int:
        blk = self.ram.main
        ps = blk.page_size
        span_pages = max(1, self.length // ps)
        size = min(self.store_size, ps)
        for _ in range(n):
            self.state = splitmix64(self.state)
            r = self.state
            page = (r % span_pages)
            off = ((r >> 32) % (ps - size + 1)) & ~7
            addr = self.start + page * ps + off
            blk.write(addr, pattern(r, size))
        self.stores += n
        return n

    def run_for(self, nanoseconds: int) -> int:
        """Run for a stretch of modelled time (integer arithmetic: deterministic)."""
        total = self.rate * nanoseconds + self._carry
        n, self._carry = divmod(total, 1_000_000_000)
        return self.run_stores(n)


#: The content generation of :func:`fill_initial` (3: runs of pages cut from a tape).
FILL_GENERATION = 3
#: Length of the tape the data pages are cut from: one more than a MiB, so page ``i``
#: starts at tape position ``i * page_size mod TAPE_LEN`` and no two pages of a
#: 4 GiB guest start at the same place.
TAPE_LEN = (1 << 20) + 1
#: Uniform pages come in groups of this many with the same byte.
UNIFORM_GROUP = 16
#: The main block is cut into this many zones, each with one run of data pages and
#: one of uniform pages.
FILL_ZONES = 4


def tape(seed: int, tag: bytes = b"ram") -> bytes:
    """The SHAKE-128 tape of :data:`TAPE_LEN` bytes for ``seed``."""
    return hashlib.shake_128(b"qmigstream tape " + tag + b"\0" +
                             struct.pack("<Q", seed & MASK64)).digest(TAPE_LEN)


def fill_plan(npages: int, *, seed: int, fraction: float = 0.25, uniform: float = 0.05):
    """Where :func:`fill_initial` puts its pages: ``[(data_first, data_count,
    uniform_count)]``, one per zone; the uniform run follows the data run."""
    n_data = min(npages, int(npages * fraction))
    n_uni = min(npages - n_data, int(npages * uniform))
    if not n_data and not n_uni:
        return []
    zones = max(1, min(FILL_ZONES, npages))
    state = splitmix64(seed ^ 0xF111)
    plan = []
    for z in range(zones):
        z0, z1 = z * npages // zones, (z + 1) * npages // zones
        d = n_data * (z + 1) // zones - n_data * z // zones
        u = n_uni * (z + 1) // zones - n_uni * z // zones
        d = min(d, z1 - z0)
        u = min(u, z1 - z0 - d)
        state = splitmix64(state)
        free = z1 - z0 - d - u
        plan.append((z0 + state % (free + 1), d, u))
    return plan


def fill_initial(ram: GuestRam, *, seed: int, fraction: float = 0.25, uniform: float = 0.05):
    """Give a synthetic guest something to migrate: about ``fraction`` of the main
    block's pages hold pseudo-random data, ``uniform`` one repeated non-zero byte
    each, the rest stay zero.  Deterministic for ``seed``.

    The block is cut into :data:`FILL_ZONES` zones; each gets one run of data
    pages at a place drawn from ``seed`` (SplitMix64) and a run of uniform pages
    right after it.  Data page ``i`` holds the SHAKE-128 tape of ``seed``
    (:func:`tape`) from position ``i * page_size`` on, wrapping round; so a run
    of pages is a few long copies of the tape, every page of a guest up to 4 GiB
    differs from every other, and two pages 256 apart differ by a shift of one
    byte.  Uniform page ``k`` of the guest (counted over the zones) holds byte
    ``1 + ((k // 16) * golden + mix(seed)) mod 255``: pages come in groups of
    :data:`UNIFORM_GROUP` with one byte each."""
    blk = ram.main
    plan = fill_plan(blk.npages, seed=seed, fraction=fraction, uniform=uniform)
    if not plan:
        return
    ps = blk.page_size
    tp = tape(seed)
    L = len(tp)
    # The pages are placed (RamBlock.place), not copied: a data page lies in the
    # tape followed by its first page (any page is then one slice of it), a
    # uniform page in one page of its byte.
    tape2 = tp + tp[:ps]
    uniform_pages = {}
    k = 0
    mix = splitmix64(seed ^ 0x0F11)
    for first, d, u in plan:
        i, stop = first, first + d
        while i < stop:                      # as far as the tape goes without wrapping
            pos = i * ps % L
            n = min(stop - i, (L - pos) // ps + 1)
            blk.place(i, n, tape2, pos, ps, index=True)
            i += n
        i, stop = first + d, first + d + u
        while i < stop:                      # a group of UNIFORM_GROUP pages
            v = 1 + ((k // UNIFORM_GROUP * 0x9E3779B97F4A7C15 + mix) & MASK64) % 255
            cnt = min(stop - i, UNIFORM_GROUP - k % UNIFORM_GROUP)
            fill = uniform_pages.get(v)
            if fill is None:
                fill = uniform_pages[v] = bytes((v,)) * ps
            blk.place(i, cnt, fill, 0, 0)
            i += cnt
            k += cnt
    ram.clear_dirty()


class DigestAhead:
    """Makes :meth:`RamBlock.piece_part` of the pieces a load has gone past, on
    one thread (CRC-32 lets go of the GIL), a piece behind the loader; at
    :meth:`close` the caller's thread shares what is left."""

    def __init__(self):
        import queue
        import threading
        self._q = queue.SimpleQueue()
        self._next = {}                      # block name -> first piece not sent yet
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _make(item):
        blk, k = item
        try:
            blk.piece_part(k)
        except (ValueError, BufferError, OSError):   # a block closed meanwhile
            pass

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            self._make(item)

    def passed(self, blk, page: int) -> None:
        """The load is at ``page`` of ``blk``: pieces before its piece are done."""
        k = page // blk._per_piece
        first = self._next.get(blk.name, 0)
        for q in range(first, k):
            self._q.put((blk, q))
        if k > first:
            self._next[blk.name] = k

    def close(self):
        """Wait for the pieces sent; the caller's thread makes them too meanwhile."""
        import queue
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._make(item)
        self._q.put(None)
        self._thread.join()


class RamLoader:
    """Applies RAM records to a :class:`GuestRam` (``ram_load_precopy``).

    One record at a time (:meth:`feed`, or the handlers in ``_dispatch`` by
    record type); a reader that hands over a run of PAGE records as one
    object (:class:`~qmigstream.codec.ram_records.RamPageRun`) has its pages
    copied one after the other straight from the bytes read, the long runs of
    fresh pages made resident first.
    """

    def __init__(self, ram: GuestRam, *, digest_ahead: bool = False):
        self.ram = ram
        self.pages = 0
        self.chunks = 0                 # mapped-ram chunks applied
        # digest_ahead: the pages-crc32 part of each 64 MiB region the runs of pages
        # have gone past is made on a thread while the load goes on (used if the
        # region is not written again)
        self._ahead = DigestAhead() if digest_ahead else None

    def close(self):
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    @property
    def changes(self) -> int:
        """Grows with every record applied (pages and mapped-ram chunks)."""
        return self.pages + self.chunks

    def feed(self, rec) -> None:
        """Apply one record (records that are not RAM pages are ignored)."""
        fn = self._dispatch.get(type(rec))
        if fn is not None:
            fn(self, rec)

    def _zero_run(self, rec):
        blk = self.ram.block(rec.block)
        ps = blk.page_size
        start = rec.addr // ps
        self._bounds(blk, rec.addr + (rec.count - 1) * ps, rec)
        # as ram_handle_zero: write only pages that are not zero already (a fresh
        # page stays untouched, so the model stays sparse); pages never written
        # are zero and not even read
        for first, count in list(blk.nonzero_runs(start, start + rec.count)):
            blk.write(first * ps, bytes(count * ps), dirty=False)
        self.pages += rec.count

    def _zero(self, rec):
        blk = self.ram.block(rec.block)
        self._bounds(blk, rec.addr, rec)
        ps = blk.page_size
        i = rec.addr // ps
        if rec.fill:
            blk.write(i * ps, bytes((rec.fill,)) * ps, dirty=False)
        elif not blk.page_is_zero(i):
            blk.write(i * ps, blk.zero_page, dirty=False)
        self.pages += 1

    def _page(self, rec):
        blk = self.ram.blocks.get(rec.block) or self.ram.block(rec.block)
        a = rec.addr
        if a >= blk.used_length:
            self._bounds(blk, a, rec)
        if blk.placed:
            blk.write(a, rec.data, dirty=False)
        else:
            ps = blk.page_size
            blk.anon[a:a + ps] = rec.data
            blk.mark_written(a // ps, 2 if a % ps else 1)   # not page-aligned: two pages
        self.pages += 1

    def pages_run(self, block: str, indexes, data) -> None:
        """A run of whole pages at once (``data[k]`` to page ``indexes[k]``)."""
        blk = self.ram.blocks.get(block) or self.ram.block(block)
        idx = [int(i) for i in indexes]
        if idx:
            bad = max(idx) if max(idx) >= blk.npages else (min(idx) if min(idx) < 0 else None)
            if bad is not None:
                raise StreamError(f"page offset beyond the end of RAM block {blk.name!r}",
                                  None, section="ram", expected=f"< 0x{blk.used_length:x}",
                                  found=bad * blk.page_size)
            blk.store_pages(idx, data)
        self.pages += len(idx)

    def _xbzrle(self, rec):
        blk = self.ram.block(rec.block)
        self._bounds(blk, rec.addr, rec)
        old = blk.read(rec.addr, blk.page_size)
        blk.write(rec.addr, xbzrle.decode(bytes(rec.data), old, offset=rec.offset),
                  dirty=False)
        self.pages += 1

    def _compressed(self, rec):
        blk = self.ram.block(rec.block)
        self._bounds(blk, rec.addr, rec)
        out = rec.inflate(blk.page_size)    # a short output leaves the rest of the page
        blk.write(rec.addr, out, dirty=False)
        self.pages += 1

    def _mapped(self, rec):
        if rec.area == "pages" and rec.data is not None:
            blk = self.ram.block(rec.block)
            if rec.start + rec.length > blk.used_length:
                self._bounds(blk, rec.start + rec.length, rec)
            blk.write(rec.start, rec.data, dirty=False)
            self.chunks += 1

    def _page_run(self, rec):
        """A :class:`~qmigstream.codec.ram_records.RamPageRun`: its pages copied in
        order straight from the bytes read (the same as its PAGE records one by
        one); a run of consecutive fresh pages is made resident first."""
        blk = self.ram.blocks.get(rec.block) or self.ram.block(rec.block)
        ps = blk.page_size
        if rec.page_size != ps:
            for r in rec.expand():
                self._page(r)
            return
        flags = rec.flags
        words = rec.words
        n = len(words)
        first = words[0] - flags
        last = words[-1] - flags
        # every address one page after the one before (not only first and last:
        # a record in the middle may name any page)
        consecutive = (last - first == (n - 1) * ps and not first % ps and
                       last + ps <= blk.used_length and
                       words == tuple(range(words[0], words[0] + n * ps, ps)))
        if consecutive and isinstance(rec.buf, MappedFile):
            # read from a mapped stream file (the caller chose to map it): the
            # pages are placed where they lie in it, not copied
            if self._ahead is not None:
                self._ahead.passed(blk, first // ps)
            blk.place(first // ps, n, rec.buf, rec.start + 8, ps + 8)
            self.pages += n
            return
        if n >= 64 and consecutive and blk.written.find(1, first // ps,
                                                        last // ps + 1) < 0:
            # fresh consecutive pages: the stream goes on with the pages after them
            # (QEMU sends a block's dirty pages in ascending order), so the huge
            # pages they touch are asked for whole
            blk.populate_runs(((first // ps, n),), whole_huge=True)
        if consecutive:
            # consecutive whole pages inside the block: marked at once, copied in a
            # loop that does nothing else; touched after the copy (a digest being
            # made of the region meanwhile is then seen to be stale)
            if self._ahead is not None:
                self._ahead.passed(blk, first // ps)
            if blk.placed:
                blk._unplace(first // ps, first // ps + n, False)
            blk.written[first // ps:first // ps + n] = _ones(n)
            mem = blk.anon
            src = memoryview(rec.buf)
            o = rec.start + 8
            try:
                for a, b in zip(range(first, last + 1, ps),
                                range(o, o + n * (ps + 8), ps + 8)):
                    mem[a:a + ps] = src[b:b + ps]
            finally:
                blk.touch(first // ps, n)
            self.pages += n
            return
        lo, hi = min(words) - flags, max(words) - flags
        if blk.placed:                       # the general case, page by page
            for r in rec.expand():
                self._page(r)
            return
        mem = blk.anon
        src = memoryview(rec.buf)
        written = blk.written
        size = blk.used_length
        o = rec.start + 8
        stride = ps + 8
        try:
            for w in words:
                a = w - flags
                if a % ps or a + ps > size:
                    if a >= size:
                        at = None if rec.offset is None else rec.offset + o - rec.start - 8
                        raise StreamError(f"page offset beyond the end of RAM block "
                                          f"{blk.name!r}", at,
                                          section="ram", expected=f"< 0x{size:x}", found=a)
                    mem[a:a + ps] = src[o:o + ps]
                    blk.mark_written(a // ps, 2 if a % ps else 1)
                else:
                    mem[a:a + ps] = src[o:o + ps]
                    written[a // ps] = 1
                o += stride
        finally:
            blk.touch(lo // ps, max(0, min(hi, size - 1)) // ps - lo // ps + 2)
        self.pages += n

    _dispatch = {R.RamZeroRun: _zero_run, R.RamZero: _zero, R.RamPage: _page,
                 R.RamPageRun: _page_run,
                 R.RamXbzrle: _xbzrle, R.RamCompressed: _compressed, R.MappedRamChunk: _mapped}

    @staticmethod
    def _bounds(blk, addr, rec):
        if addr >= blk.used_length:
            raise StreamError(f"page offset beyond the end of RAM block {blk.name!r}",
                              rec.offset, section="ram", expected=f"< 0x{blk.used_length:x}",
                              found=addr)


def load_stream_ram(path, page_size=None) -> GuestRam | None:
    """The guest RAM a stream leaves behind, loaded with :class:`RamLoader` (None: the
    stream has no RAM block list).  For streams known to be good: nothing is
    checked beyond what the reader and the loader check."""
    from ..codec.reader import read_records
    ram = loader = None
    for rec in read_records(str(path), page_runs=True):
        if isinstance(rec, R.RamMemSize):
            if ram is not None:
                ram.close()
            ram = GuestRam([(b.name, b.used_length) for b in rec.blocks], page_size or 4096)
            loader = RamLoader(ram)
        elif loader is not None:
            loader.feed(rec)
    return ram
