"""The guest RAM model: RAM blocks, a dirty log, a CPU workload, and loading records into it.

Each :class:`RamBlock` is an anonymous memory mapping of its ``used_length``:
the kernel gives pages only when they are first written, so the model is
**sparse** — an untouched 16 GiB guest costs nothing, and its resident size
grows with the pages actually written.  ``pages`` is a numpy view
(``pages x page_size`` bytes) used for vectorised zero detection.

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
import struct

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
        self.dirty = np.zeros(self.npages, dtype=bool)

    def write(self, offset: int, data) -> None:
        n = len(data)
        if offset < 0 or offset + n > self.used_length:
            raise QmigstreamError(f"write of {n} bytes at 0x{offset:x} outside RAM block "
                                  f"{self.name!r} ({self.used_length} bytes)")
        self.mem[offset:offset + n] = data
        if n:
            ps = self.page_size
            self.dirty[offset // ps:(offset + n - 1) // ps + 1] = True

    def page(self, index: int) -> memoryview:
        ps = self.page_size
        return memoryview(self.mem)[index * ps:(index + 1) * ps]

    def nonzero(self, indices) -> np.ndarray:
        """For each page index, whether the page has a non-zero byte."""
        if len(indices) == 0:
            return np.zeros(0, dtype=bool)
        words = self.pages.view(np.uint64) if self.page_size % 8 == 0 else self.pages
        first, last = int(indices[0]), int(indices[-1])
        if last - first + 1 == len(indices):          # a contiguous run: a view, no copy
            return words[first:last + 1].any(axis=1)
        return words[indices].any(axis=1)

    def digest(self) -> str:
        h = hashlib.sha256()
        view = memoryview(self.mem)
        for pos in range(0, self.used_length, 64 << 20):
            h.update(view[pos:min(self.used_length, pos + (64 << 20))])
        return h.hexdigest()

    def close(self):
        self.pages = None
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

    def digests(self) -> dict:
        return {b.name: b.digest() for b in self}

    def resident_pages(self) -> int:
        return sum(int(b.nonzero(np.arange(b.npages)).sum()) for b in self)

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
    # data pages: 64 pseudo-random bytes per page, repeated over the page (cheap to make,
    # different on every page); made and stored in batches
    reps = blk.page_size // 64
    per = 4096
    for start in range(0, n_data, per):
        pages = idx[start:min(n_data, start + per)]
        words = np.random.PCG64((seed + start) & MASK64).random_raw(len(pages) * 8)
        blk.pages[pages] = np.tile(words.astype("<u8").view(np.uint8).reshape(len(pages), 64),
                                   (1, reps))
    uni = idx[n_data:]
    if len(uni):
        fills = np.array([1 + (splitmix64(state + k) % 255) for k in range(len(uni))],
                         dtype=np.uint8)
        blk.pages[uni] = fills[:, None]
    ram.clear_dirty()


class RamLoader:
    """Applies RAM records to a :class:`GuestRam` (``ram_load_precopy``).

    ``iteration`` counts RAM sections (START = 0, each PART +1, END last).
    """

    def __init__(self, ram: GuestRam):
        self.ram = ram
        self.pages = 0

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
        # page stays untouched, so the model stays sparse)
        dirty = blk.nonzero(np.arange(start, start + rec.count))
        if dirty.any():
            blk.pages[start + np.flatnonzero(dirty)] = 0
        self.pages += rec.count

    def _zero(self, rec):
        blk = self.ram.block(rec.block)
        self._bounds(blk, rec.addr, rec)
        i = rec.addr // blk.page_size
        if rec.fill or blk.pages[i].any():
            blk.pages[i] = rec.fill
        self.pages += 1

    def _page(self, rec):
        blk = self.ram.blocks.get(rec.block) or self.ram.block(rec.block)
        if rec.addr >= blk.used_length:
            self._bounds(blk, rec.addr, rec)
        blk.mem[rec.addr:rec.addr + blk.page_size] = rec.data
        self.pages += 1

    def _xbzrle(self, rec):
        blk = self.ram.block(rec.block)
        self._bounds(blk, rec.addr, rec)
        old = bytes(blk.page(rec.addr // blk.page_size))
        blk.mem[rec.addr:rec.addr + blk.page_size] = xbzrle.decode(
            bytes(rec.data), old, offset=rec.offset)
        self.pages += 1

    def _compressed(self, rec):
        blk = self.ram.block(rec.block)
        self._bounds(blk, rec.addr, rec)
        out = rec.inflate(blk.page_size)    # a short output leaves the rest of the page
        blk.mem[rec.addr:rec.addr + len(out)] = out
        self.pages += 1

    def _mapped(self, rec):
        if rec.area == "pages" and rec.data is not None:
            blk = self.ram.block(rec.block)
            if rec.start + rec.length > blk.used_length:
                self._bounds(blk, rec.start + rec.length, rec)
            blk.mem[rec.start:rec.start + rec.length] = rec.data

    _dispatch = {R.RamZeroRun: _zero_run, R.RamZero: _zero, R.RamPage: _page,
                 R.RamXbzrle: _xbzrle, R.RamCompressed: _compressed, R.MappedRamChunk: _mapped}

    @staticmethod
    def _bounds(blk, addr, rec):
        if addr >= blk.used_length:
            raise StreamError(f"page offset beyond the end of RAM block {blk.name!r}",
                              rec.offset, section="ram", expected=f"< 0x{blk.used_length:x}",
                              found=addr)
