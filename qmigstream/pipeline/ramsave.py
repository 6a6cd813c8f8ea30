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
"""

from __future__ import annotations

import numpy as np

from .. import xbzrle
from ..codec.ram_records import RamPage, RamXbzrle, RamZero
from ..wire.ram import RamFlag

CACHED_PAGE_LIFETIME = 2
DEFAULT_XBZRLE_CACHE = 64 << 20


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
        self.sync_count = 0
        self.counts = {"normal": 0, "zero": 0, "xbzrle": 0, "xbzrle_unchanged": 0,
                       "xbzrle_overflow": 0, "cache_miss": 0}
        for b in ram:
            b.dirty[:] = True

    def setup(self):
        """``ram_save_setup``: forget the last block sent."""
        self.last_block = None

    def sync(self):
        """``migration_bitmap_sync``: one more dirty-sync generation."""
        self.sync_count += 1

    def dirty_bytes(self) -> int:
        return sum(int(b.dirty.sum()) for b in self.ram) * self.page_size

    def _flags(self, kind, block):
        cont = RamFlag.CONTINUE if block == self.last_block else 0
        self.last_block = block
        return kind | cont

    def pass_records(self, *, last_stage: bool = False):
        """Yield the records of one pass over every dirty page."""
        ps = self.page_size
        counts = self.counts
        for blk in self.ram:
            idx = np.flatnonzero(blk.dirty)
            if not len(idx):
                continue
            blk.dirty[idx] = False
            nz = blk.nonzero(idx)
            name = blk.name
            key_base = id(blk) << 40
            for i, data_page in zip(idx.tolist(), nz.tolist()):
                addr = i * ps
                if not data_page:
                    counts["zero"] += 1
                    if self.xbzrle_enabled:
                        self.cache.insert(key_base + i, bytes(ps), self.sync_count)
                    yield RamZero(name, addr, self._flags(RamFlag.ZERO, name), 0)
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
                yield RamPage(name, addr, page, self._flags(RamFlag.PAGE, name))
        if self.xbzrle_on:
            self.xbzrle_enabled = True          # after the first complete round

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
        return RamXbzrle(name, addr, enc, self._flags(RamFlag.XBZRLE, name))
