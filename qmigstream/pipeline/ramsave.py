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
import sys
from array import array

from .. import xbzrle
from ..codec.ram_records import RamPage, RamXbzrle, RamZero
from ..wire.ram import RamFlag
from .guest import marked_runs

F_ZERO, F_PAGE, F_XBZRLE, F_CONT = (int(RamFlag.ZERO), int(RamFlag.PAGE), int(RamFlag.XBZRLE),
                                    int(RamFlag.CONTINUE))
_U64 = struct.Struct(">Q")
#: Pages looked at together (one list of pieces for the writer).
BATCH = 4096

CACHED_PAGE_LIFETIME = 2
DEFAULT_XBZRLE_CACHE = 64 << 20


def zero_records(first: int, count: int, page_size: int) -> bytearray:
    """The ZERO|CONTINUE records (be64 word, fill 0) of pages ``first ..
    first+count-1``: the words made by ``array`` from a ``range``, then laid out
    with a stride of 9 by eight strided slice copies."""
    fl = F_ZERO | F_CONT
    words = array("Q", range(first * page_size | fl, (first + count) * page_size | fl,
                             page_size))
    if sys.byteorder == "little":
        words.byteswap()
    wb = words.tobytes()
    out = bytearray(9 * count)
    for k in range(8):
        out[k::9] = wb[k::8]
    return out


def _page_pieces(view, first: int, end: int, page_size: int, base: int = 0,
                 stride: int | None = None) -> list:
    """PAGE|CONTINUE records of pages ``first .. end-1``: header, page, header, ...
    (page ``i`` lies at ``view[base + i * stride:]``; ``stride`` defaults to the
    page size, 0 is one page's bytes for every page)."""
    fp = F_PAGE | F_CONT
    stride = page_size if stride is None else stride
    heads = list(map(_U64.pack, range(first * page_size | fp, end * page_size | fp,
                                       page_size)))
    if stride:
        pages = [view[o:o + page_size] for o in range(base + first * stride,
                                                       base + end * stride, stride)]
    else:
        pages = [view[base:base + page_size]] * (end - first)
    out = [None] * (2 * len(heads))
    out[0::2] = heads
    out[1::2] = pages
    return out


def _group_pieces(blk, group, out) -> int:
    """Append the records of a group of written pages (:meth:`RamBlock.groups`) to
    ``out``; returns how many are PAGE records (the rest are ZERO).  The zero
    pages come from :meth:`RamBlock.zero_pages` (first words gathered at once);
    the runs of data pages between them go out as header and page pieces made
    by two comprehensions."""
    ps = blk.page_size
    start, n, view, off, stride = group
    if view is None:
        view = blk.anon_view
    end = start + n
    base = off - start * stride                 # page i lies at base + i * stride
    fz = F_ZERO | F_CONT
    normal = 0
    p = start
    for z in blk.zero_pages(start, end) + [end]:
        if z > p:
            out += _page_pieces(view, p, z, ps, base, stride)
            normal += z - p
        if z < end:
            out.append(_U64.pack(z * ps | fz) + b"\0")
        p = z + 1
    return normal


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
            b.dirty[:] = b"\x01" * b.npages

    def setup(self):
        """``ram_save_setup``: forget the last block sent and the scan position."""
        self.last_block = None
        self.scan_pos = None

    def scan_pass(self):
        """One section's scan as QEMU 10.x runs it with multifd, at block granularity.

        Yields ``("pages", block, page_indices)`` (dirty pages in the order they are
        sent, an ``array('q')``; their dirty bits are cleared) and ``("wrap",)`` each
        time the scan passes the end of the block list.  Follows
        ``ram_find_and_save_block``: each call starts at (last_seen_block, last_page)
        with ``complete_round`` false; ``find_dirty_block`` gives up
        (``PAGE_ALL_CLEAN``) when, after a wrap in the same call, it reaches that
        block at a page >= last_page.  After a page is sent the next call starts
        right after it, so every dirty page of a block from that page on goes out
        in one batch.
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
                nd = blk.dirty.find(1, p) if p < blk.npages else -1
                if nd < 0:
                    nd = blk.npages
                if complete and b == lb and nd >= lp:  # PAGE_ALL_CLEAN
                    self.scan_pos = (b, nd)
                    return
                if nd == blk.npages:
                    b, p = b + 1, 0
                    if b == n:
                        yield ("wrap",)
                        b, complete = 0, True
                    continue
                dirty = array("q")
                for first, count in list(marked_runs(blk.dirty, nd)):
                    dirty.extend(range(first, first + count))
                    blk.dirty[first:first + count] = bytes(count)
                yield ("pages", blk, dirty)
                lb, lp = b, dirty[-1] + 1
                break

    def sync(self):
        """``migration_bitmap_sync``: one more dirty-sync generation."""
        self.sync_count += 1

    def dirty_bytes(self) -> int:
        return sum(b.dirty_count() for b in self.ram) * self.page_size

    def _flags(self, kind, block):
        cont = F_CONT if block == self.last_block else 0
        self.last_block = block
        return kind | cont

    def _batches(self):
        """(block, key base, first page, page count) of the dirty pages in bounded
        batches; their dirty bits are cleared."""
        for bi, blk in enumerate(self.ram):
            runs = list(marked_runs(blk.dirty))
            for first, count in runs:
                blk.dirty[first:first + count] = bytes(count)
            for first, count in runs:
                for k in range(first, first + count, BATCH):
                    yield blk, bi << 40, k, min(BATCH, first + count - k)

    def pass_records(self, *, last_stage: bool = False):
        """Yield the records of one pass over every dirty page (the reference path)."""
        ps = self.page_size
        counts = self.counts
        for blk, key_base, first, n in self._batches():
            name = blk.name
            for i in range(first, first + n):
                addr = i * ps
                if blk.page_is_zero(i):
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

    def pass_bytes(self, *, last_stage: bool = False):
        """The same pass as :meth:`pass_records`, as lists of encoded pieces (bytes,
        and memoryviews of guest RAM for the pages: nothing is copied), a list per
        batch; written out with one ``writev`` per 1024 pieces.  Pages never
        written are ZERO records without being read, a run of them made at once
        (:func:`zero_records`); a written page is read for its zero check.  The
        pieces must be written before guest RAM changes (nothing changes it during
        a section).  Pages that XBZRLE may touch go through :meth:`pass_records`'
        logic.  ``b"".join(pass_bytes()) == b"".join(r.encode() for r in
        pass_records())`` (tested).
        """
        ps = self.page_size
        counts = self.counts
        for blk, key_base, first, n in self._batches():
            if self.xbzrle_enabled:
                yield self._pieces_xbzrle(blk, key_base, first, n, last_stage)
                continue
            out = []
            name = blk.name
            end = first + n
            if self.last_block != name:
                # the first record after another block's: it names its block
                zero = blk.page_is_zero(first)
                out.append(self._named_record(blk, first, not zero,
                                              self._flags(F_ZERO if zero else F_PAGE, name)))
                counts["zero" if zero else "normal"] += 1
                first += 1
            written = blk.written
            normal = 0
            i = first
            while i < end:
                w = written.find(1, i, end)
                if w < 0:
                    w = end
                if w > i:                       # never written: zero, unread
                    out.append(zero_records(i, w - i, ps))
                    i = w
                    if i == end:
                        break
                e = written.find(0, i, end)
                if e < 0:
                    e = end
                for g in blk.groups(i, e):
                    normal += _group_pieces(blk, g, out)
                i = e
            counts["normal"] += normal
            counts["zero"] += end - first - normal
            yield out
        if self.xbzrle_on:
            self.xbzrle_enabled = True

    def _named_record(self, blk, i, data_page, flags) -> bytes:
        nameb = blk.name.encode("latin-1")
        ps = self.page_size
        head = _U64.pack(i * ps | flags) + bytes((len(nameb),)) + nameb
        return head + (bytes(blk.page(i)) if data_page else b"\0")

    def _pieces_xbzrle(self, blk, key_base, first, n, last_stage) -> list:
        """One batch's pieces once XBZRLE is enabled (page by page)."""
        ps = self.page_size
        counts = self.counts
        pack = _U64.pack
        name = blk.name
        nameb = name.encode("latin-1")
        named = bytes((len(nameb),)) + nameb
        out = []
        i, end = first, first + n
        while i < end:
            if blk.page_is_zero(i):
                z = i
                while z < end and blk.page_is_zero(z):
                    z += 1
                counts["zero"] += z - i
                for k in range(i, z):
                    self.cache.insert(key_base + k, bytes(ps), self.sync_count)
                f = self._flags(F_ZERO, name)
                if not f & F_CONT:
                    out.append(pack(i * ps | f) + named + b"\0")
                    i += 1
                if z > i:
                    out.append(zero_records(i, z - i, ps))
                i = z
                continue
            addr = i * ps
            pv = blk.page(i)
            page = bytes(pv)
            rec = self._xbzrle(name, key_base + i, addr, page, last_stage)
            i += 1
            if rec is False:
                continue
            if rec is not None:
                out.append(rec.encode())
                continue
            counts["normal"] += 1
            flags = self._flags(F_PAGE, name)
            out.append(pack(addr | flags) if flags & F_CONT else pack(addr | flags) + named)
            out.append(pv)
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
