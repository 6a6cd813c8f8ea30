"""The ``ram`` section payload: a sequence of records ending with EOS.

Two implementations of one format: :func:`read_record_schema` follows the
construct schemas of :mod:`qmigstream.wire.ram` record by record; the fast path
in :meth:`RamSection.read` walks the buffered window with precompiled
``struct`` formats and collapses runs of ZERO records.  Tests check that both
give identical records on every capture.
"""

from __future__ import annotations

import struct

from ...errors import LimitExceeded, StreamError, Truncated
from ...wire import ram as W
from ...wire.ram import RamFlag
from ..ram_records import (MappedRamBitmap, MappedRamChunk, RamBlockEntry, RamBlockInfo,
                           RamCompressed, RamPageRun,
                           RamEos, RamHook, RamMemSize, RamMultifdFlush, RamPage, RamXbzrle,
                           RamZero, RamZeroRun, zero_group_bytes, zero_group_size)
from . import register

_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

F_ZERO, F_PAGE, F_XBZRLE, F_COMP = (int(RamFlag.ZERO), int(RamFlag.PAGE),
                                    int(RamFlag.XBZRLE), int(RamFlag.COMPRESS_PAGE))
F_CONT, F_EOS, F_MEM, F_FLUSH, F_HOOK = (int(RamFlag.CONTINUE), int(RamFlag.EOS),
                                         int(RamFlag.MEM_SIZE), int(RamFlag.MULTIFD_FLUSH),
                                         int(RamFlag.HOOK))
PAGE_BITS = F_ZERO | F_PAGE | F_XBZRLE | F_COMP
_PAGE_CONT, _ZERO_CONT = F_PAGE | F_CONT, F_ZERO | F_CONT

#: zlib's compressBound(4096) + slack: the loader's upper bound for COMPRESS_PAGE.
def compress_bound(n: int) -> int:
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13


class RamState:
    """What the RAM loader remembers across sections (ram.c ``last_recv_block``)."""

    def __init__(self):
        self.blocks = {}          # name -> RamBlockInfo
        self.last_block = None    # persists across sections
        self.mem_size_seen = False


def _err(msg, off, **kw):
    return StreamError(msg, off, section="ram", **kw)


@register("ram")
class RamSection:
    name = "ram"
    self_delimiting = True

    # -- block list ---------------------------------------------------------
    @staticmethod
    def mem_size_records(reader, src, depth):
        """MEM_SIZE and the block list; with mapped-ram also each block's areas."""
        st = reader.ram
        ps = reader.page_size
        off = src.offset
        word = src.be64("RAM record word")
        flags = word & (ps - 1)
        total = word & ~(ps - 1)
        caps = reader.capabilities
        mr_addr = "x-ignore-shared" in caps
        mapped = "mapped-ram" in caps or reader.options.get("mapped_ram", False)
        postcopy = reader.postcopy_advised
        blocks = []
        if mapped:
            # Entries and areas are interleaved in the file: yield the word
            # first and fill its block list while walking the entries.
            yield RamMemSize(total, blocks, flags=flags, offset=off, depth=depth, inline=False)
        acc = 0
        while acc < total:
            boff = src.offset
            name = src.counted_string("RAM block name")
            if not name:
                raise _err("empty RAM block name in the block list", boff)
            used = src.be64("RAM block length")
            page_size = None
            if postcopy and _page_size_follows(src.peek(24), mr_addr, acc + used >= total):
                page_size = src.be64("RAM block page size")
            addr = src.be64("RAM block address") if mr_addr else None
            mhdr = None
            if mapped:
                hoff = src.offset
                raw = src.read(W.MappedRamHeader.sizeof(), "mapped-ram header")
                mhdr = {k: v for k, v in W.MappedRamHeader.parse(raw).items()
                        if not k.startswith("_")}
                if mhdr["version"] > W.MAPPED_RAM_HDR_VERSION:
                    raise _err("unsupported mapped-ram header version", hoff,
                               expected=f"<= {W.MAPPED_RAM_HDR_VERSION}", found=mhdr["version"])
            info = RamBlockInfo(name, used, page_size, addr, mhdr)
            blocks.append(info)
            st.blocks[name] = info
            if len(blocks) > 65536:
                raise LimitExceeded("more than 65536 RAM blocks", boff, section="ram")
            acc += used
            if acc > total:
                raise _err("RAM block lengths exceed MEM_SIZE", boff, expected=total, found=acc)
            if mapped:
                yield RamBlockEntry(info, boff, depth)
                yield from RamSection._mapped_area(src, info, ps, depth)
        st.blocks = {b.name: b for b in blocks}
        st.last_block = None
        st.mem_size_seen = True
        if not mapped:
            yield RamMemSize(total, blocks, flags=flags, offset=off, depth=depth)

    @staticmethod
    def _mapped_area(src, info, ps, depth):
        """Bitmap, padding and page area of one block (ram.c mapped_ram_setup_ramblock)."""
        h = info.mapped_ram
        name = info.name
        if h["bitmap_offset"] == 0 and h["pages_offset"] == 0:
            return          # 11.0+: an ignored (shared) block has no area
        here = src.offset
        if h["bitmap_offset"] != here:
            raise _err(f"mapped-ram bitmap of block {name!r} is not right after its header",
                       here - 16, expected=here, found=h["bitmap_offset"])
        tps = h["page_size"] or ps
        if tps & (tps - 1) or tps < 512:
            raise _err("mapped-ram page size is not a power of two", here - 20, found=tps)
        pages = info.used_length // tps
        bmap_size = (pages + 63) // 64 * 8
        if h["pages_offset"] < here + bmap_size:
            raise _err(f"mapped-ram pages of block {name!r} overlap its bitmap", here - 8,
                       expected=f">= {here + bmap_size}", found=h["pages_offset"])
        left = src.remaining_known()
        need = h["pages_offset"] + info.used_length - here
        if left is not None and need > left:
            raise Truncated(f"stream ends inside the mapped-ram area of block {name!r}",
                            here, needed=need, available=left)
        yield MappedRamBitmap(name, src.read(bmap_size, "mapped-ram bitmap"), here, depth)
        yield from _chunks(src, name, "padding", h["pages_offset"] - src.offset, depth)
        yield from _chunks(src, name, "pages", info.used_length, depth)

    # -- one record via the schemas ----------------------------------------
    @staticmethod
    def read_record_schema(reader, src, depth):
        """Parse one record with the construct schemas (reference path)."""
        off = src.offset
        ps = reader.page_size
        word = _U64.unpack(src.read(8, "RAM record word"))[0]
        flags = word & (ps - 1)
        addr = word & ~(ps - 1)
        kind = flags & ~F_CONT
        if kind == F_MEM:
            raise AssertionError("MEM_SIZE is read by mem_size_records")
        if flags & PAGE_BITS:
            block = RamSection._block(reader, src, flags, off)
            RamSection._check_addr(reader, block, addr, off)
            if kind == F_ZERO:
                fill = W.ZeroBody.parse(src.read(1, "zero page fill byte")).fill
                return RamZero(block if not flags & F_CONT else block, addr, flags, fill, off, depth), False
            if kind == F_PAGE:
                data = W.page_body(ps).parse(src.read(ps, "RAM page")).data
                return RamPage(block, addr, data, flags, off, depth), False
            if kind == F_XBZRLE:
                eoff = src.offset
                enc, ln = struct.unpack(">BH", src.read(3, "XBZRLE header"))
                if enc != W.ENCODING_FLAG_XBZRLE:
                    raise _err("XBZRLE page with wrong encoding flag", eoff,
                               expected=W.ENCODING_FLAG_XBZRLE, found=enc)
                if ln > ps:
                    raise _err("XBZRLE length larger than a page", eoff + 1,
                               expected=f"<= {ps}", found=ln)
                data = src.read(ln, "XBZRLE data")
                body = W.XbzrleBody.parse(bytes((enc,)) + _U16.pack(ln) + data)
                return RamXbzrle(block, addr, body.data, flags, enc, off, depth), False
            if kind == F_COMP:
                loff = src.offset
                ln = src.be32("compressed page length")
                if ln == 0 or ln > compress_bound(ps):
                    raise _err("invalid compressed page length", loff,
                               expected=f"1..{compress_bound(ps)}", found=ln)
                data = src.read(ln, "compressed page")
                return RamCompressed(block, addr, data, flags, off, depth), False
            raise _err("unknown combination of RAM flags", off, found=f"0x{flags:x}")
        if kind == F_EOS:
            return RamEos(flags, addr, off, depth), True
        if kind == F_FLUSH:
            return RamMultifdFlush(flags, addr, off, depth), False
        if flags & F_HOOK:
            return RamHook(flags, addr, off, depth), False
        raise _err("unknown combination of RAM flags", off, found=f"0x{flags:x}")

    @staticmethod
    def _block(reader, src, flags, off):
        st = reader.ram
        if flags & F_CONT:
            if st.last_block is None:
                raise _err("CONTINUE flag with no previous RAM block", off)
            return st.last_block
        noff = src.offset
        name = src.counted_string("RAM block name")
        if st.mem_size_seen and name not in st.blocks:
            raise _err(f"unknown RAM block {name!r}", noff)
        st.last_block = name
        return name

    @staticmethod
    def _check_addr(reader, block, addr, off):
        info = reader.ram.blocks.get(block)
        if info is not None and addr >= info.used_length:
            raise _err(f"page offset beyond the end of RAM block {block!r}", off,
                       expected=f"< 0x{info.used_length:x}", found=addr)

    # -- the payload -----------------------------------------------------------
    def read(self, reader, src, header):
        depth = header.depth
        compact = reader.options.get("compact", True)
        fast = reader.options.get("fast", True)
        self.page_runs = bool(reader.options.get("page_runs", False))
        mapped = "mapped-ram" in reader.capabilities
        while True:
            if fast and not mapped:
                recs, done = self._fast_batch(reader, src, depth, compact)
                if recs:
                    yield from recs
                    recs = None         # let the window go before the next is read
                    if done:
                        return
                    continue
            w = src.peek(8)
            if len(w) == 8 and (_U64.unpack(w)[0] & (reader.page_size - 1)) & ~F_CONT == F_MEM:
                yield from self.mem_size_records(reader, src, depth)
                continue
            rec, done = self.read_record_schema(reader, src, depth)
            yield rec
            if done:
                return

    def _fast_batch(self, reader, src, depth, compact):
        """Parse as many whole records as the buffered window holds.

        Returns ``(records, saw_eos)``; an empty list means the next record
        needs the schema path (MEM_SIZE, truncation, errors, window end).
        """
        ps = reader.page_size
        mask = ps - 1
        st = reader.ram
        blocks = st.blocks
        buf, pos = src.window(ps + 300)
        end = len(buf)
        base = src.offset - pos
        out = []
        append = out.append
        unpack64 = _U64.unpack_from
        last = st.last_block
        # 0 when there is no usable previous block: every address is then "beyond" it.
        last_len = blocks[last].used_length if last in blocks else 0
        need_max = ps + 8 + 256 + 8
        page_cont, zero_cont = _PAGE_CONT, _ZERO_CONT
        runs = self.page_runs
        while end - pos >= need_max or (end - pos >= 9 and _small_enough(buf, pos, end, mask)):
            word = unpack64(buf, pos)[0]
            flags = word & mask
            addr = word - flags
            if flags == page_cont:
                if addr >= last_len:
                    break
                if runs:
                    k, words = _page_run(buf, pos, end, ps, last_len)
                    if k > 1:
                        append(RamPageRun(last, buf, pos, words, ps, flags, base + pos, depth))
                        pos += k * (ps + 8)
                        continue
                q = pos + 8
                append(RamPage(last, addr, buf[q:q + ps], flags, base + pos, depth))
                pos = q + ps
            elif flags == zero_cont:
                if addr >= last_len:
                    break
                if buf[pos + 8] == 0:
                    n = _zero_run(buf, pos, end, word, ps, last_len)
                    if n > 1 and compact:
                        append(RamZeroRun(last, addr, n, ps, flags, base + pos, depth))
                        pos += 9 * n
                        continue
                append(RamZero(last, addr, flags, buf[pos + 8], base + pos, depth))
                pos += 9
            elif flags == F_EOS:
                append(RamEos(flags, 0 if addr == 0 else addr, base + pos, depth))
                pos += 8
                st.last_block = last
                src.advance_to(pos)
                return out, True
            elif flags in (F_ZERO, F_PAGE):
                n = buf[pos + 8]
                name = buf[pos + 9:pos + 9 + n].decode("latin-1")
                info = blocks.get(name)
                if info is None or addr >= info.used_length or n == 0:
                    break
                last, last_len = name, info.used_length
                q = pos + 9 + n
                if flags == F_ZERO:
                    append(RamZero(name, addr, flags, buf[q], base + pos, depth))
                    pos = q + 1
                else:
                    append(RamPage(name, addr, buf[q:q + ps], flags, base + pos, depth))
                    pos = q + ps
            elif flags == F_FLUSH:
                append(RamMultifdFlush(flags, addr, base + pos, depth))
                pos += 8
            else:
                break       # XBZRLE, COMPRESS_PAGE, MEM_SIZE, HOOK, errors: schema path
        st.last_block = last
        src.advance_to(pos)
        return out, False


#: Most records one run of PAGE records takes (a window holds ~256 of 4 KiB).
RUN_MAX = 512
_RUN_STRUCTS = {}


def _page_run(buf, pos, end, ps, block_len):
    """How many PAGE|CONTINUE records inside the block start at ``pos``, and their words.

    The record at ``pos`` is known to be one.  Same answer as reading record
    by record while the word's flags are PAGE|CONTINUE and its address is
    below ``block_len`` (tests compare the two); the words of all records that
    fit in the buffer are unpacked in one call.
    """
    stride = ps + 8
    n = min((end - pos) // stride, RUN_MAX)
    if n < 2:
        return 1, None
    st = _RUN_STRUCTS.get((ps, n))
    if st is None:
        st = _RUN_STRUCTS[(ps, n)] = struct.Struct(">" + ("Q%dx" % ps) * n)
    words = st.unpack_from(buf, pos)
    mask = ps - 1
    lim = block_len + _PAGE_CONT       # address < block_len  <=>  word < this
    if max(words) < lim and _flag_bytes_match(buf, pos, n, stride, ps):
        return n, words
    k = 0
    for w in words:
        if w & mask != _PAGE_CONT or w >= lim:
            break
        k += 1
    return k, words[:k]


_NIBBLE_TABLES = {}


def _flag_bytes_match(buf, pos, n, stride, ps) -> bool:
    """Do all ``n`` words at ``pos``, ``pos + stride``, ... have flags PAGE|CONTINUE?

    The flags are the low ``log2(ps)`` bits of each big-endian word: whole low
    bytes are compared as strided slices, a partial byte through a table
    that keeps only its flag bits.
    """
    bits = ps.bit_length() - 1
    end = pos + n * stride
    j = 0
    while bits >= 8:
        want = (_PAGE_CONT >> (8 * j)) & 0xFF
        if buf[pos + 7 - j:end:stride] != bytes((want,)) * n:
            return False
        bits -= 8
        j += 1
    if bits:
        keep = (1 << bits) - 1
        table = _NIBBLE_TABLES.get(keep)
        if table is None:
            table = _NIBBLE_TABLES[keep] = bytes(b & keep for b in range(256))
        want = (_PAGE_CONT >> (8 * j)) & keep
        if buf[pos + 7 - j:end:stride].translate(table) != bytes((want,)) * n:
            return False
    return True


def _small_enough(buf, pos, end, mask) -> bool:
    """Near the window's end: is the next record surely complete in the buffer?"""
    word = _U64.unpack_from(buf, pos)[0]
    flags = word & mask
    if flags in (F_EOS, F_FLUSH):
        return True
    if flags == (F_ZERO | F_CONT):
        return end - pos >= 9
    if flags == (F_PAGE | F_CONT):
        return end - pos >= 8 + mask + 1
    if flags in (F_ZERO, F_PAGE) and end - pos >= 9:
        n = buf[pos + 8]
        need = 9 + n + (1 if flags == F_ZERO else mask + 1)
        return end - pos >= need
    return False


def _zero_run(buf, pos, end, word, ps, block_len) -> int:
    """How many ZERO|CONTINUE records with fill 0 and consecutive pages start at pos."""
    # Probe a few records in Python first: short runs are common in busy guests.
    n = 1
    limit = min((end - pos) // 9, (block_len - (word & ~(ps - 1))) // ps)
    while n < limit and n < 16:
        q = pos + 9 * n
        if _U64.unpack_from(buf, q)[0] != word + n * ps or buf[q + 8] != 0:
            return n
        n += 1
    if n < limit:
        n = _zero_run_bulk(buf, pos, n, limit, word, ps)
    return n


def _zero_run_bulk(buf, pos, n, limit, word, ps) -> int:
    """Extend a verified run of ``n`` records towards ``limit`` (bulk compares).

    Same answer as checking record by record that record ``i`` is
    ``be64(word + i*ps) + b"\0"``, but compares whole groups of records
    with :func:`~qmigstream.codec.ram_records.zero_group_bytes` (tests check it
    against the record loop).  Whole groups reuse one buffer: from one group
    to the next only the leading bytes of the page number change.
    """
    flags = word & (ps - 1)
    group = zero_group_size(ps)
    page0 = word // ps
    lead = 8 - ((ps.bit_length() - 1) + group.bit_length() - 1) // 8
    full = full_high = None
    i = n
    while i < limit:
        page = page0 + i
        r = page % group
        k = min(group - r, limit - i)
        if r == 0 and k == group:
            high = page // group
            if full is None:
                full = bytearray(zero_group_bytes(ps, flags, page, group))
            elif high != full_high:
                new, old = high.to_bytes(lead, "big"), full_high.to_bytes(lead, "big")
                for j in range(lead):
                    if new[j] != old[j]:
                        full[j::9] = bytes((new[j],)) * group
            full_high = high
            want = full
        else:
            want = zero_group_bytes(ps, flags, page, k)
        q = pos + 9 * i
        if buf[q:q + len(want)] != want:
            # Find the first differing record: bisect on equal prefixes.
            got = buf[pos + 9 * i:pos + 9 * (i + k)]
            want = bytes(want)
            lo, hi = 0, k          # the first lo records match, the first hi do not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if got[:9 * mid] == want[:9 * mid]:
                    lo = mid
                else:
                    hi = mid
            return i + lo
        i += k
    return limit


_ZEROS = bytes(1 << 20)


def _chunks(src, block, area, length, depth, size=1 << 20):
    """Read ``length`` bytes as MappedRamChunk records; all-zero pieces become holes."""
    start = 0
    while start < length:
        n = min(size, length - start)
        off = src.offset
        data = src.read(n, f"mapped-ram {area}")
        hole = data == _ZEROS[:n]
        yield MappedRamChunk(block, area, start, n, None if hole else data, off, depth)
        start += n


def _is_page_size(v: int) -> bool:
    return 0x1000 <= v <= 1 << 40 and not v & (v - 1)


def _page_size_follows(ahead: bytes, mr_addr: bool, last: bool) -> bool:
    """Does a be64 page size follow this block's length?

    The saver writes it only for blocks whose page size differs from the
    host's, and the loader knows its own blocks; a decoder has to tell from
    the bytes.  A block name starts with its length (never 0), a guest address
    (x-ignore-shared) is below 2**56 so starts with 0, and the record after
    the last block is a bare EOS/MULTIFD_FLUSH word.
    """
    if len(ahead) < 8:
        return False
    a = int.from_bytes(ahead[:8], "big")
    if not _is_page_size(a):
        return False
    if not last:
        # Without the page size, a name length (never 0) comes 8 bytes
        # earlier than with it: at 0 (no address field) or at 8.
        return ahead[8:9] == b"\x00" if mr_addr else ahead[0:1] == b"\x00"
    # Last block: what follows the extras must be a bare RAM word.
    follow = ahead[16:24] if mr_addr else ahead[8:16]
    if len(follow) < 8:
        return True
    w = int.from_bytes(follow, "big")
    return w in (F_EOS, F_FLUSH, F_EOS | F_CONT) or w < 0x1000
