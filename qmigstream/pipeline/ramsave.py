"""The source's RAM saver: which record QEMU writes for each dirty page.

Follows ``ram_save_target_page`` / ``save_zero_page`` / ``save_xbzrle_page`` in
migration/ram.c and ``migration/page_cache.c``:

* every page starts dirty (the bitmap is all ones after setup);
* a pass walks the blocks in MEM_SIZE order and each block's dirty pages in
  ascending order, clearing their dirty bits;
* an all-zero page is a ZERO record (fill 0);
* otherwise, once XBZRLE is enabled (after the first complete pass, QEMU's
  ``xbzrle_enabled``): a page not in the cache is inserted and sent as PAGE;
  a cached page is delta-encoded against the cached copy — unchanged pages are
  not sent at all, a delta longer than a page is sent as PAGE, anything else
  as XBZRLE; the cache copy is updated except in the last stage;
* the cache is direct-mapped, ``pow2floor(cache_size / page_size)`` slots,
  slot = page number mod slots, and a slot held by another page younger than
  ``CACHED_PAGE_LIFETIME`` (2) dirty syncs is not replaced;
* CONTINUE is set when a page is in the same block as the previous page
  record; that memory carries across sections (``last_sent_block``).

With multifd (:meth:`RamSaver.scan_pass`, 10.x) the pass follows QEMU's scan
itself (``ram_find_and_save_block`` / ``find_dirty_block``): it starts where
the previous section's scan stopped (``last_seen_block`` / ``last_page``),
reports each wrap past the last block (where 10.x flushes and syncs the
channels and writes ``MULTIFD_FLUSH``) and ends when a scan that wrapped comes
back to where its call started.  The passes above walk the blocks from the
first each time, a simplification of the same scan.
"""

from __future__ import annotations

import struct

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import xbzrle
from ..codec.ram_records import RamPage, RamXbzrle, RamZero
from ..wire.ram import RamFlag

F_ZERO, F_PAGE, F_XBZRLE, F_CONT = (int(RamFlag.ZERO), int(RamFlag.PAGE), int(RamFlag.XBZRLE),
                                    int(RamFlag.CONTINUE))
_U64 = struct.Struct(">Q")
#: One ZERO|CONTINUE record (be64 word, u8 fill), as a numpy record for whole runs.
_ZERO_REC = np.dtype([("word", ">u8"), ("fill", "u1")])
#: Pages looked at together (zero detection, batching of writes).
BATCH = 4096

CACHED_PAGE_LIFETIME = 2
DEFAULT_XBZRLE_CACHE = 64 << 20


def _run_size(n: int, n_data: int, page_size: int) -> int:
    """Bytes of ``n`` CONTINUE records, ``n_data`` of them PAGE, the rest ZERO."""
    return n * 9 + n_data * (page_size - 1)


def _encode_run(buf, blk, idx, nz) -> None:
    """Fill ``buf`` with the CONTINUE records of pages ``idx`` of ``blk`` (ascending):
    ``nz`` true: PAGE (header word, the page), false: ZERO (header word, fill 0).

    Each record's place comes from a cumulative sum of the sizes; the words,
    fill bytes and pages are scattered there through byte-granular sliding
    views of ``buf`` (rows of 8 and of ``page_size`` bytes starting at every
    byte), whose rows the records never share; a run of consecutive pages is
    copied in one go into a view with the records' stride."""
    ps = blk.page_size
    sizes = np.where(nz, np.int64(8 + ps), np.int64(9))
    offs = np.cumsum(sizes) - sizes
    total = len(buf)
    words = idx.astype(np.uint64) * np.uint64(ps) | np.where(
        nz, np.uint64(F_PAGE | F_CONT), np.uint64(F_ZERO | F_CONT))
    heads = as_strided(buf, shape=(total - 7, 8), strides=(1, 1))
    heads[offs] = words.astype(">u8").view(np.uint8).reshape(-1, 8)
    zeros = ~nz
    if zeros.any():
        buf[offs[zeros] + 8] = 0
    dpos = np.flatnonzero(nz)
    if not len(dpos):
        return
    didx = idx[dpos]
    # runs of data records that are consecutive pages too: their pages go in with
    # one strided copy each (no gather); many short runs: one scatter of them all
    cut = np.flatnonzero((np.diff(dpos) != 1) | (np.diff(didx) != 1)) + 1
    if len(cut) < len(dpos) // 16:
        starts = np.concatenate(([0], cut)).tolist()
        ends = np.concatenate((cut, [len(dpos)])).tolist()
        firsts = (offs[dpos[starts]] + 8).tolist()
        for a, b, o in zip(starts, ends, firsts):
            i0 = int(didx[a])
            dst = as_strided(buf[o:], shape=(b - a, ps), strides=(ps + 8, 1))
            dst[...] = blk.pages[i0:i0 + b - a]
    else:
        rows = as_strided(buf, shape=(total - ps + 1, ps), strides=(1, 1))
        rows[offs[dpos] + 8] = blk.pages[didx]


def pow2floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


class XbzrleCache:
    def __init__(self, cache_size: int, page_size: int):
        self.slots = max(1, pow2floor(cache_size // page_size))
        self.page_size = page_size
        self.items = {}          # slot -> [addr, data(bytes), age]

    def _slot(self, key):
        return key % self.slots

    def cached(self, key, age) -> bool:
        it = self.items.get(self._slot(key))
        if it is not None and it[0] == key:
            it[2] = age
            return True
        return False

    def get(self, key) -> bytes:
        return self.items[self._slot(key)][1]

    def insert(self, key, data, age) -> bool:
        s = self._slot(key)
        it = self.items.get(s)
        if it is not None and it[0] != key and it[2] + CACHED_PAGE_LIFETIME > age:
            return False
        self.items[s] = [key, bytes(data), age]
        return True


class RamSaver:
    """Turns dirty pages of a :class:`~qmigstream.pipeline.guest.GuestRam` into records."""

    def __init__(self, ram, *, xbzrle_on: bool = False, cache_size: int = DEFAULT_XBZRLE_CACHE):
        self.ram = ram
        self.page_size = ram.page_size
        self.xbzrle_on = xbzrle_on
        self.xbzrle_enabled = False
        self.cache = XbzrleCache(cache_size, ram.page_size) if xbzrle_on else None
        self.last_block = None
        self.scan_pos = None
        self.sync_count = 0
        self.counts = {"normal": 0, "zero": 0, "xbzrle": 0, "xbzrle_unchanged": 0,
                       "xbzrle_overflow": 0, "cache_miss": 0}
        for b in ram:
            b.dirty[:] = True

    def setup(self):
        """``ram_save_setup``: forget the last block sent and the scan position."""
        self.last_block = None
        self.scan_pos = None

    def scan_pass(self):
        """One section's scan as QEMU 10.x runs it with multifd, at block granularity.

        Yields ``("pages", block, page_indices)`` (dirty pages in the order they are
        sent; their dirty bits are cleared) and ``("wrap",)`` each time the scan
        passes the end of the block list.  Follows ``ram_find_and_save_block``:
        each call starts at (last_seen_block, last_page) with ``complete_round``
        false; ``find_dirty_block`` gives up (``PAGE_ALL_CLEAN``) when, after a
        wrap in the same call, it reaches that block at a page >= last_page.
        After a page is sent the next call starts right after it, so every dirty
        page of a block from that page on goes out in one batch.
        """
        blocks = list(self.ram)
        n = len(blocks)
        if not n or not sum(b.used_length for b in blocks):
            return
        lb, lp = self.scan_pos or (0, 0)
        while True:                                    # one ram_find_and_save_block call
            b, p, complete = lb, lp, False
            while True:
                blk = blocks[b]
                dirty = np.flatnonzero(blk.dirty[p:]) + p if p < blk.npages else \
                    np.zeros(0, dtype=np.int64)
                nd = int(dirty[0]) if len(dirty) else blk.npages
                if complete and b == lb and nd >= lp:  # PAGE_ALL_CLEAN
                    self.scan_pos = (b, nd)
                    return
                if not len(dirty):
                    b, p = b + 1, 0
                    if b == n:
                        yield ("wrap",)
                        b, complete = 0, True
                    continue
                blk.dirty[dirty] = False
                yield ("pages", blk, dirty)
                lb, lp = b, int(dirty[-1]) + 1
                break

    def sync(self):
        """``migration_bitmap_sync``: one more dirty-sync generation."""
        self.sync_count += 1

    def dirty_bytes(self) -> int:
        return sum(int(b.dirty.sum()) for b in self.ram) * self.page_size

    def _flags(self, kind, block):
        cont = F_CONT if block == self.last_block else 0
        self.last_block = block
        return kind | cont

    def _batches(self):
        """(block, key base, page indices, nonzero mask) of the dirty pages, bounded batches."""
        for bi, blk in enumerate(self.ram):
            idx = np.flatnonzero(blk.dirty)
            if not len(idx):
                continue
            blk.dirty[idx] = False
            for k in range(0, len(idx), BATCH):
                part = idx[k:k + BATCH]
                yield blk, bi << 40, part, blk.nonzero(part)

    def pass_records(self, *, last_stage: bool = False):
        """Yield the records of one pass over every dirty page (the reference path)."""
        ps = self.page_size
        counts = self.counts
        for blk, key_base, idx, nz in self._batches():
            name = blk.name
            for i, data_page in zip(idx.tolist(), nz.tolist()):
                addr = i * ps
                if not data_page:
                    counts["zero"] += 1
                    if self.xbzrle_enabled:
                        self.cache.insert(key_base + i, bytes(ps), self.sync_count)
                    yield RamZero(name, addr, self._flags(F_ZERO, name), 0)
                    continue
                page = bytes(blk.page(i))
                if self.xbzrle_enabled:
                    rec = self._xbzrle(name, key_base + i, addr, page, last_stage)
                    if rec is False:
                        continue
                    if rec is not None:
                        yield rec
                        continue
                counts["normal"] += 1
                yield RamPage(name, addr, page, self._flags(F_PAGE, name))
        if self.xbzrle_on:
            self.xbzrle_enabled = True          # after the first complete round

    def pass_bytes(self, *, last_stage: bool = False, scratch: bool = False):
        """The same pass as :meth:`pass_records`, as encoded pieces (bytes-like objects).

        The fast path of the same rules: without XBZRLE a batch of pages becomes
        one buffer built by numpy (each record's header word and fill byte or
        page contents scattered into place); pages that XBZRLE may touch go
        through :meth:`pass_records`' logic.  ``scratch`` (a number N >= 1, or
        True for 1): the buffers rotate among N reused ones, so each yielded
        list must be written out before N more are asked for (``migrate``
        writes one list while the next is encoded, with N = 2).
        ``b"".join(pass_bytes()) == b"".join(r.encode() for r in pass_records())``
        (tested).
        """
        nbuf = int(scratch)
        bufs = [None] * nbuf
        turn = 0
        for blk, key_base, idx, nz in self._batches():
            if self.xbzrle_enabled:
                yield self._pieces_xbzrle(blk, key_base, idx, nz, last_stage)
                continue
            out = []
            name = blk.name
            n = len(idx)
            nzc = int(np.count_nonzero(nz))
            self.counts["normal"] += nzc
            self.counts["zero"] += n - nzc
            first = self._flags(F_PAGE if nz[0] else F_ZERO, name)
            if not first & F_CONT:
                # the first record after another block's: it names its block
                out.append(self._named_record(blk, int(idx[0]), bool(nz[0]), first))
                idx, nz = idx[1:], nz[1:]
                if not len(idx):
                    yield out
                    continue
            need = _run_size(len(idx), int(np.count_nonzero(nz)), self.page_size)
            if nbuf:
                b = bufs[turn]
                if b is None or len(b) < need:
                    b = bufs[turn] = np.empty(max(need, BATCH * (self.page_size + 8)),
                                              np.uint8)
                turn = (turn + 1) % nbuf
                buf = b[:need]
            else:
                buf = np.empty(need, np.uint8)
            _encode_run(buf, blk, idx, nz)
            out.append(buf)
            yield out
        if self.xbzrle_on:
            self.xbzrle_enabled = True

    def _named_record(self, blk, i, data_page, flags) -> bytes:
        nameb = blk.name.encode("latin-1")
        ps = self.page_size
        head = _U64.pack(i * ps | flags) + bytes((len(nameb),)) + nameb
        return head + (bytes(blk.page(i)) if data_page else b"\0")

    def _pieces_xbzrle(self, blk, key_base, idx, nz, last_stage) -> list:
        """One batch's pieces once XBZRLE is enabled (page by page)."""
        ps = self.page_size
        counts = self.counts
        pack = _U64.pack
        name = blk.name
        nameb = name.encode("latin-1")
        named = bytes((len(nameb),)) + nameb
        view = memoryview(blk.mem)
        out = []
        n = len(idx)
        pos = 0
        idx_l = idx.tolist()
        nz_l = nz.tolist()
        while pos < n:
            if not nz_l[pos]:
                end = pos
                while end < n and not nz_l[end]:
                    end += 1
                run = idx[pos:end]
                counts["zero"] += end - pos
                for i in idx_l[pos:end]:
                    self.cache.insert(key_base + i, bytes(ps), self.sync_count)
                first = self._flags(F_ZERO, name)
                if not first & F_CONT:
                    out.append(pack(idx_l[pos] * ps | first) + named + b"\0")
                    run = run[1:]
                if len(run):
                    recs = np.empty(len(run), dtype=_ZERO_REC)
                    recs["word"] = run.astype(np.uint64) * np.uint64(ps) | \
                        np.uint64(F_ZERO | F_CONT)
                    recs["fill"] = 0
                    out.append(recs.tobytes())
                pos = end
                continue
            i = idx_l[pos]
            addr = i * ps
            page = bytes(view[addr:addr + ps])
            rec = self._xbzrle(name, key_base + i, addr, page, last_stage)
            pos += 1
            if rec is False:
                continue
            if rec is not None:
                out.append(rec.encode())
                continue
            counts["normal"] += 1
            flags = self._flags(F_PAGE, name)
            out.append(pack(addr | flags) if flags & F_CONT else pack(addr | flags) + named)
            out.append(view[addr:addr + ps])
        return out

    def _xbzrle(self, name, key, addr, page, last_stage):
        """XBZRLE record, None (send as PAGE) or False (unchanged: nothing sent)."""
        cache, age = self.cache, self.sync_count
        if not cache.cached(key, age):
            self.counts["cache_miss"] += 1
            if not last_stage:
                cache.insert(key, page, age)
            return None
        old = cache.get(key)
        enc = xbzrle.encode(old, page, self.page_size)
        if enc is None or enc == -1:
            self.counts["xbzrle_overflow"] += 1
            if not last_stage:
                cache.insert(key, page, age)
            return None
        if len(enc) == 0:
            self.counts["xbzrle_unchanged"] += 1
            return False
        if not last_stage:
            cache.insert(key, page, age)
        self.counts["xbzrle"] += 1
        return RamXbzrle(name, addr, enc, self._flags(F_XBZRLE, name))
