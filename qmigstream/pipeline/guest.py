"""The guest RAM model: RAM blocks, a dirty log, a CPU workload, and loading records into it.

Each :class:`RamBlock` is an anonymous memory mapping of its ``used_length``:
the kernel gives pages only when they are first written, so the model is
**sparse** — an untouched 16 GiB guest costs nothing, and its resident size
grows with the pages actually written.  ``pages`` is a numpy view
(``pages x page_size`` bytes) used for vectorised zero detection.

``written`` (one bool per page) marks every page ever written: a page not
marked is zero and is never read, so zero detection, digests and zero runs
on a fresh model touch only the pages that hold something (reading an
untouched page would make the kernel map its zero page, about a microsecond
each).  Every write goes through :meth:`RamBlock.write`,
:meth:`RamBlock.store_pages` or marks the pages with
:meth:`RamBlock.mark_written`; code writing ``mem`` or ``pages`` directly must
mark them too.

RAM digests (:meth:`RamBlock.digest`): ``pages-crc32`` (the default) covers
the pages holding a non-zero byte — sha256 over the page size, the block
length, the indexes of those pages and, for each 64 MiB region of the block,
the CRC-32 of those pages' contents in index order — so it costs a CRC of the
data (2-3 GB/s, on two threads) instead of a sha256 over the whole block,
zero pages included (1 GB/s); any difference confined to 32 consecutive bits
(a byte, a word) is always caught, any other with probability 1 - 2^-32.
``sha256`` is the sha256 of the whole block.

Guest-physical addresses (:meth:`GuestRam.write`, what a device's DMA engine
writes) map onto the first block (``pc.ram`` on pc/q35) one to one, which is
how QEMU lays out RAM below the PCI hole; the pipeline keeps DMA there.

The dirty log is one boolean per page, set by every write, read and cleared
by the saver at each pass (QEMU's ``migration_bitmap_sync``).

:class:`RamLoader` applies the RAM records of a stream to the model, the way
``ram_load_precopy`` (migration/ram.c) applies them to guest memory.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import sys
import zlib

import numpy as np

from .. import xbzrle
from ..codec import ram_records as R
from ..device.pci_device import MASK64, splitmix64
from ..errors import QmigstreamError, StreamError

def pattern(seed: int, n: int) -> bytes:
    """``n`` deterministic pseudo-random bytes for ``seed``, the same on every machine.

    Small amounts come from SHAKE-128; large ones from numpy's PCG64 bit
    generator (``random_raw``), whose output numpy keeps stable across releases.
    """
    if n <= 0:
        return b""
    if n < 1 << 16:
        return hashlib.shake_128(struct.pack("<Q", seed & MASK64)).digest(n)
    words = np.random.PCG64(seed & MASK64).random_raw(-(-n // 8))
    return words.astype("<u8", copy=False).tobytes()[:n]


#: madvise(MADV_POPULATE_WRITE) (Linux 5.14+): make pages about to be written resident
#: in one call instead of one page fault each (about a third cheaper); None: not here.
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE",
                          23 if sys.platform.startswith("linux") else None)


def _native_madvise(blk):
    """``madvise(offset, length)`` on ``blk``'s mapping: through libc with ctypes,
    which lets go of the GIL (mmap.madvise holds it), else mmap.madvise."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            libc.madvise.restype = ctypes.c_int
            _LIBC = (libc, ctypes)
        libc, ctypes = _LIBC
        base = blk.pages.__array_interface__["data"][0]
    except (ImportError, OSError, AttributeError):
        return lambda off, n: blk.mem.madvise(_POPULATE_WRITE, off, n)

    def call(off, n):
        if libc.madvise(base + off, n, _POPULATE_WRITE) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    return call


_LIBC = None


def _runs(idx):
    """(first, count) of each run of consecutive values in sorted ``idx``."""
    if not len(idx):
        return []
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], cut))]
    ends = idx[np.concatenate((cut - 1, [len(idx) - 1]))] + 1
    return list(zip(starts.tolist(), (ends - starts).tolist()))


#: pages-crc32 digests a CRC-32 per region of this many bytes of a block.
DIGEST_REGION = 64 << 20
#: Threads :func:`run_parallel` uses at most (the caller's included).
THREADS = min(2, os.cpu_count() or 1)


def run_parallel(fns, weights=None) -> list:
    """``[fn() for fn in fns]``, spread over :data:`THREADS` threads (for work that
    lets go of the GIL: zlib, hashlib, numpy); ``weights``: each one's cost, to
    balance them.  The first exception is raised."""
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
            self.mem = mmap.mmap(-1, max(used_length, page_size),
                                 flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, OverflowError) as e:
            # A length from the stream the host cannot map (ENOMEM, or beyond ssize_t).
            why = e.strerror if isinstance(e, OSError) else "beyond the largest mapping"
            raise QmigstreamError(f"RAM block {name!r}: cannot map {used_length:#x} bytes: "
                                  f"{why}") from None
        self.pages = np.frombuffer(self.mem, dtype=np.uint8,
                                   count=used_length).reshape(self.npages, page_size) \
            if used_length else np.zeros((0, page_size), np.uint8)
        self._words = self.pages.view(np.uint64) if page_size % 8 == 0 else self.pages
        self.dirty = np.zeros(self.npages, dtype=bool)
        # pages ever written; a bytearray (fast to mark one page) seen as numpy bools
        self._written = bytearray(self.npages)
        self.written = np.frombuffer(self._written, dtype=bool)

    def write(self, offset: int, data) -> None:
        n = len(data)
        if offset < 0 or offset + n > self.used_length:
            raise QmigstreamError(f"write of {n} bytes at 0x{offset:x} outside RAM block "
                                  f"{self.name!r} ({self.used_length} bytes)")
        self.mem[offset:offset + n] = data
        if n:
            ps = self.page_size
            first, end = offset // ps, (offset + n - 1) // ps + 1
            self.dirty[first:end] = True
            self.written[first:end] = True

    def mark_written(self, first: int, count: int = 1) -> None:
        """Pages ``first .. first+count-1`` were written (by a direct store to ``mem``)."""
        self.written[first:first + count] = True

    def store_pages(self, indexes, data) -> None:
        """Whole pages at once: ``data[k]`` (``page_size`` bytes) to page ``indexes[k]``.

        One numpy scatter; what a run of PAGE records turns into."""
        indexes = np.asarray(indexes)
        if len(indexes) >= 64:
            self.populate(indexes[~self.written[indexes]])
        self.pages[indexes] = data
        self.written[indexes] = True

    def populate(self, indexes) -> None:
        """Make pages ``indexes`` (any order) resident ahead of writing them, in one
        madvise(MADV_POPULATE_WRITE) per run of consecutive pages, the runs split
        over two threads (a hint: pages the caller then leaves unwritten would
        only cost memory)."""
        global _POPULATE_WRITE
        if _POPULATE_WRITE is None or len(indexes) < 16:
            return
        ps = self.page_size
        if ps % mmap.PAGESIZE:
            return
        spans = []                           # (offset, length), split into two halves
        for first, count in _runs(np.sort(indexes)):
            if count >= 16:
                spans.append((first * ps, count * ps))
        total = sum(n for _, n in spans)
        halves, acc = ([], []), 0
        for off, n in spans:
            if acc < total // 2 < acc + n and n >= 32 * ps:   # this span holds the middle
                cut = (total // 2 - acc) // ps * ps
                halves[0].append((off, cut))
                halves[1].append((off + cut, n - cut))
            else:
                halves[0 if acc + n <= total // 2 else 1].append((off, n))
            acc += n
        madvise = _native_madvise(self)
        try:
            run_parallel([lambda h=h: [madvise(off, n) for off, n in h] for h in halves],
                         weights=[sum(n for _, n in h) for h in halves])
        except OSError:                      # an older kernel: fault them one by one
            _POPULATE_WRITE = None

    def page(self, index: int) -> memoryview:
        ps = self.page_size
        return memoryview(self.mem)[index * ps:(index + 1) * ps]

    def nonzero(self, indices) -> np.ndarray:
        """For each page index (ascending), whether the page has a non-zero byte.

        Pages never written are zero without being read; of the others, a page
        whose first word is non-zero is decided by that word, the rest by a scan."""
        n = len(indices)
        if n == 0:
            return np.zeros(0, dtype=bool)
        words = self._words
        first, last = int(indices[0]), int(indices[-1])
        contiguous = last - first + 1 == n
        written = self.written[first:last + 1] if contiguous else self.written[indices]
        if not written.any():
            return np.zeros(n, dtype=bool)
        if written.all():
            sel = indices
            out = (words[first:last + 1, 0] if contiguous else words[indices, 0]) != 0
            pos = None
        else:
            pos = np.flatnonzero(written)
            sel = indices[pos]
            out = words[sel, 0] != 0
        maybe = np.flatnonzero(~out)
        if len(maybe):
            out[maybe] = words[sel[maybe]].any(axis=1)
        if pos is None:
            return out
        full = np.zeros(n, dtype=bool)
        full[pos] = out
        return full

    def nonzero_pages(self) -> np.ndarray:
        """Indexes (ascending) of the pages that hold a non-zero byte."""
        idx = np.flatnonzero(self.written)
        return idx[self.nonzero(idx)] if len(idx) else idx

    def digest(self, scheme: str = DEFAULT_RAM_DIGEST) -> str:
        if scheme == "sha256":
            h = hashlib.sha256()
            view = memoryview(self.mem)
            for pos in range(0, self.used_length, 64 << 20):
                h.update(view[pos:min(self.used_length, pos + (64 << 20))])
            return h.hexdigest()
        if scheme != "pages-crc32":
            raise QmigstreamError(f"unknown RAM digest {scheme!r} (one of "
                                  f"{', '.join(RAM_DIGESTS)})")
        idx = self.nonzero_pages()
        crcs = self._region_crcs(idx)
        h = hashlib.sha256(_PAGES_CRC32_TAG)
        h.update(struct.pack("<QQQQ", self.page_size, self.used_length, len(idx), len(crcs)))
        h.update(idx.astype("<u8").tobytes())
        h.update(np.asarray(crcs, dtype="<u4").tobytes())
        return h.hexdigest()

    def _region_crcs(self, idx) -> list:
        """CRC-32 of the contents of pages ``idx`` (sorted) in each 64 MiB region of
        the block (fixed boundaries: the result does not depend on how it is
        computed), regions computed on two threads (zlib lets go of the GIL)."""
        ps = self.page_size
        per = max(1, DIGEST_REGION // ps)
        nreg = -(-self.npages // per)
        cuts = np.searchsorted(idx, np.arange(nreg + 1) * per).tolist()
        view = memoryview(self.mem)

        def crc_of(r):
            c = 0
            for first, count in _runs(idx[cuts[r]:cuts[r + 1]]):
                c = zlib.crc32(view[first * ps:(first + count) * ps], c)
            return c
        return run_parallel([lambda r=r: crc_of(r) for r in range(nreg)],
                            weights=np.diff(cuts).tolist())

    def close(self):
        self.pages = self._words = None
        self.mem.close()


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
        return bytes(self.main.mem[gpa:gpa + n])

    @property
    def total(self) -> int:
        return sum(b.used_length for b in self)

    def digests(self, scheme: str = DEFAULT_RAM_DIGEST) -> dict:
        return {b.name: b.digest(scheme) for b in self}

    def resident_pages(self) -> int:
        """Pages holding a non-zero byte."""
        return sum(len(b.nonzero_pages()) for b in self)

    def clear_dirty(self):
        for b in self:
            b.dirty[:] = False

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


def _splitmix64_array(x) -> np.ndarray:
    """:func:`splitmix64` of each value of the uint64 array ``x`` (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def fill_initial(ram: GuestRam, *, seed: int, fraction: float = 0.25, uniform: float = 0.05):
    """Give a synthetic guest something to migrate: ``fraction`` of the main block's
    pages hold pseudo-random data, ``uniform`` hold one repeated non-zero byte, the
    rest stay zero.  Deterministic for ``seed``."""
    blk = ram.main
    state = splitmix64(seed ^ 0xF111)
    n_data = int(blk.npages * fraction)
    n_uni = int(blk.npages * uniform)
    if not n_data and not n_uni:
        return
    # choose pages by a deterministic stride walk (no numpy RNG: portable)
    step = 2 * (blk.npages // 3) + 1
    while np.gcd(step, blk.npages) != 1:
        step += 2
    idx = (np.arange(n_data + n_uni, dtype=np.int64) * step + (state % blk.npages)) % blk.npages
    blk.populate(idx[~blk.written[idx]])          # exactly the pages written below
    # data pages: 64 pseudo-random bytes per page, repeated over the page (cheap to make,
    # different on every page); made and stored in batches
    reps = blk.page_size // 64
    # pages as (reps, 64) rows: the 64 bytes of a page are broadcast over it in place
    rows = blk.pages.reshape(blk.npages, reps, 64) if blk.page_size % 64 == 0 else None
    per = 4096
    pat = np.empty((n_data, 64), np.uint8)
    for start in range(0, n_data, per):
        k = min(n_data, start + per) - start
        words = np.random.PCG64((seed + start) & MASK64).random_raw(k * 8)
        pat[start:start + k] = words.astype("<u8").view(np.uint8).reshape(k, 64)
    didx = idx[:n_data]
    if rows is not None:
        runs = _runs(np.sort(didx)) if n_data + n_uni <= blk.npages else None
        if runs is not None and len(runs) <= max(1, n_data // 64):
            # few runs of consecutive pages (the stride walk makes a few long ones):
            # a plain slice each instead of a scatter
            order = np.argsort(didx, kind="stable")
            spat = pat[order]
            k = 0
            for first, count in runs:
                rows[first:first + count] = spat[k:k + count, None, :]
                k += count
        else:
            rows[didx] = pat[:, None, :]
    else:
        blk.pages[didx] = np.tile(pat, (1, reps))
    blk.written[didx] = True
    uni = idx[n_data:]
    if len(uni):
        fills = (1 + _splitmix64_array(
            (np.uint64(state) + np.arange(len(uni), dtype=np.uint64))) % np.uint64(255)
                 ).astype(np.uint8)
        blk.pages[uni] = fills[:, None]
        blk.written[uni] = True
    ram.clear_dirty()


class RamLoader:
    """Applies RAM records to a :class:`GuestRam` (``ram_load_precopy``).

    One record at a time (:meth:`feed`, or the handlers in ``_dispatch`` by
    record type); a reader that hands over a run of PAGE records as one
    object (block, page indexes, an ``n x page_size`` array) has it applied
    with one numpy scatter by :meth:`pages_run`.
    """

    def __init__(self, ram: GuestRam):
        self.ram = ram
        self.pages = 0
        self.chunks = 0                 # mapped-ram chunks applied

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
        start = rec.addr // blk.page_size
        self._bounds(blk, rec.addr + (rec.count - 1) * blk.page_size, rec)
        # as ram_handle_zero: write only pages that are not zero already (a fresh
        # page stays untouched, so the model stays sparse); pages never written
        # are zero and not even read
        written = blk.written[start:start + rec.count]
        if written.any():
            idx = start + np.flatnonzero(written)
            dirty = blk.nonzero(idx)
            if dirty.any():
                blk.pages[idx[dirty]] = 0
        self.pages += rec.count

    def _zero(self, rec):
        blk = self.ram.block(rec.block)
        self._bounds(blk, rec.addr, rec)
        i = rec.addr // blk.page_size
        if rec.fill:
            blk.pages[i] = rec.fill
            blk._written[i] = 1
        elif blk._written[i] and blk.pages[i].any():
            blk.pages[i] = 0
        self.pages += 1

    def _page(self, rec):
        blk = self.ram.blocks.get(rec.block) or self.ram.block(rec.block)
        a = rec.addr
        if a >= blk.used_length:
            self._bounds(blk, a, rec)
        ps = blk.page_size
        blk.mem[a:a + ps] = rec.data
        blk._written[a // ps] = 1
        if a % ps:                              # not page-aligned: it spans two pages
            blk.mark_written(a // ps, 2)
        self.pages += 1

    def pages_run(self, block: str, indexes, data) -> None:
        """A run of whole pages at once (``data[k]`` to page ``indexes[k]``, ascending):
        one numpy scatter, for a reader that hands over runs of PAGE records."""
        blk = self.ram.blocks.get(block) or self.ram.block(block)
        if len(indexes):
            last = int(indexes[-1])
            if last >= blk.npages or int(indexes[0]) < 0:
                raise StreamError(f"page offset beyond the end of RAM block {blk.name!r}",
                                  None, section="ram", expected=f"< 0x{blk.used_length:x}",
                                  found=last * blk.page_size)
            blk.store_pages(indexes, data)
        self.pages += len(indexes)

    def _xbzrle(self, rec):
        blk = self.ram.block(rec.block)
        self._bounds(blk, rec.addr, rec)
        old = bytes(blk.page(rec.addr // blk.page_size))
        blk.mem[rec.addr:rec.addr + blk.page_size] = xbzrle.decode(
            bytes(rec.data), old, offset=rec.offset)
        blk.mark_written(rec.addr // blk.page_size, 1 + (rec.addr % blk.page_size > 0))
        self.pages += 1

    def _compressed(self, rec):
        blk = self.ram.block(rec.block)
        self._bounds(blk, rec.addr, rec)
        out = rec.inflate(blk.page_size)    # a short output leaves the rest of the page
        blk.mem[rec.addr:rec.addr + len(out)] = out
        blk.mark_written(rec.addr // blk.page_size, 1 + (rec.addr % blk.page_size > 0))
        self.pages += 1

    def _mapped(self, rec):
        if rec.area == "pages" and rec.data is not None:
            blk = self.ram.block(rec.block)
            if rec.start + rec.length > blk.used_length:
                self._bounds(blk, rec.start + rec.length, rec)
            blk.mem[rec.start:rec.start + rec.length] = rec.data
            self.chunks += 1
            if rec.length:
                ps = blk.page_size
                first = rec.start // ps
                blk.mark_written(first, (rec.start + rec.length - 1) // ps + 1 - first)

    def _page_run(self, rec):
        """A :class:`~qmigstream.codec.ram_records.RamPageRun`: whole pages at
        ascending page addresses go in with :meth:`pages_run`; any other run
        (unaligned or out of order addresses) record by record."""
        blk = self.ram.blocks.get(rec.block) or self.ram.block(rec.block)
        ps = blk.page_size
        addrs = np.array(rec.words, dtype=np.uint64) - np.uint64(rec.flags)
        if rec.page_size == ps and not (addrs % np.uint64(ps)).any() and \
                (len(addrs) < 2 or bool((addrs[1:] > addrs[:-1]).all())):
            data = np.ndarray((rec.count, ps), dtype=np.uint8, buffer=rec.buf,
                              offset=rec.start + 8, strides=(ps + 8, 1))
            self.pages_run(rec.block, (addrs // np.uint64(ps)).astype(np.intp), data)
            return
        for r in rec.expand():
            self._page(r)

    _dispatch = {R.RamZeroRun: _zero_run, R.RamZero: _zero, R.RamPage: _page,
                 R.RamPageRun: _page_run,
                 R.RamXbzrle: _xbzrle, R.RamCompressed: _compressed, R.MappedRamChunk: _mapped}

    @staticmethod
    def _bounds(blk, addr, rec):
        if addr >= blk.used_length:
            raise StreamError(f"page offset beyond the end of RAM block {blk.name!r}",
                              rec.offset, section="ram", expected=f"< 0x{blk.used_length:x}",
                              found=addr)
