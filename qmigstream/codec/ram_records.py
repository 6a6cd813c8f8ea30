"""Records of the ``ram`` section payload (migration/ram.c)."""

from __future__ import annotations

import struct

from ..wire import ram as W
from ..wire.ram import RamFlag
from .records import Record

_U64 = struct.Struct(">Q")
_ZERO = struct.Struct(">QB")
_CONT = int(RamFlag.CONTINUE)     # plain int: IntFlag operators are slow on the hot path


def _page_header(flags: int, addr: int, block: str | None) -> bytes:
    """Fast form of :data:`qmigstream.wire.ram.page_header` (tested equal)."""
    word = _U64.pack(addr | flags)
    if flags & _CONT:
        return word
    b = block.encode("latin-1")
    return word + bytes((len(b),)) + b


def _page_header_size(flags: int, block: str | None) -> int:
    """``len(_page_header(...))`` without building it."""
    if flags & _CONT:
        return 8
    return 9 + len(block.encode("latin-1"))


# --- runs of ZERO records as bytes, a group of pages at a time ---------------------

_GROUP_TEMPLATES = {}


def zero_group_size(ps: int) -> int:
    """Pages per group: ``2**m`` with ``m + log2(ps)`` a multiple of 8.

    Within an aligned group the page number's higher bits fill whole leading
    bytes of the record word, so the ZERO records of any group are one
    template (:func:`_group_template`) with those bytes set.
    """
    b = ps.bit_length() - 1
    return 1 << (8 + (-b) % 8)


def _group_template(ps: int, flags: int) -> bytes:
    """ZERO records (fill 0) for pages ``0 .. zero_group_size(ps) - 1``."""
    t = _GROUP_TEMPLATES.get((ps, flags))
    if t is None:
        count = zero_group_size(ps)
        t = struct.Struct(">" + "Qx" * count).pack(*range(flags, flags + count * ps, ps))
        _GROUP_TEMPLATES[(ps, flags)] = t
    return t


def zero_group_bytes(ps: int, flags: int, page: int, k: int):
    """Wire bytes of ``k`` ZERO records (fill 0, ``flags`` < ``ps``) for pages
    ``page .. page + k - 1``, which must lie in one aligned group."""
    group = zero_group_size(ps)
    r = page % group
    seg = _group_template(ps, flags)[9 * r:9 * (r + k)]
    high = page // group
    if high:
        lead = 8 - ((ps.bit_length() - 1) + group.bit_length() - 1) // 8
        seg = bytearray(seg)
        for j, v in enumerate(high.to_bytes(lead, "big")):
            if v:
                seg[j::9] = bytes((v,)) * k
    return seg


def zero_run_bytes(addr: int, flags: int, count: int, ps: int) -> bytes:
    """``b"".join(be64((addr + i*ps) | flags) + b"\\0" for i in range(count))``, fast."""
    if addr % ps or not 0 <= flags < ps or ps & (ps - 1):
        return b"".join(_ZERO.pack((addr + i * ps) | flags, 0) for i in range(count))
    group = zero_group_size(ps)
    page0 = addr // ps
    out = []
    i = 0
    while i < count:
        page = page0 + i
        k = min(group - page % group, count - i)
        out.append(zero_group_bytes(ps, flags, page, k))
        i += k
    return b"".join(out)


class RamBlockInfo:
    """One entry of the MEM_SIZE block list."""

    __slots__ = ("name", "used_length", "page_size", "mr_addr", "mapped_ram")

    def __init__(self, name, used_length, page_size=None, mr_addr=None, mapped_ram=None):
        self.name, self.used_length = name, used_length
        self.page_size, self.mr_addr, self.mapped_ram = page_size, mr_addr, mapped_ram

    def to_json(self):
        d = {"name": self.name, "used_length": self.used_length}
        if self.page_size is not None:
            d["page_size"] = self.page_size
        if self.mr_addr is not None:
            d["mr_addr"] = self.mr_addr
        if self.mapped_ram is not None:
            d["mapped_ram"] = dict(self.mapped_ram)
        return d


def _block_entry_bytes(b) -> bytes:
    if b.mapped_ram is None:
        # mem_size_block's fast form (tested equal): counted name, be64 fields
        name = b.name.encode("latin-1")
        extra = [v for v in (b.page_size, b.mr_addr) if v is not None]
        if len(name) < 256 and all(0 <= v < 1 << 64 for v in [b.used_length] + extra):
            return bytes((len(name),)) + name + struct.pack(f">{1 + len(extra)}Q",
                                                            b.used_length, *extra)
    schema = W.mem_size_block(b.page_size is not None, b.mr_addr is not None,
                              b.mapped_ram is not None)
    d = dict(name=b.name, used_length=b.used_length)
    if b.page_size is not None:
        d["page_size"] = b.page_size
    if b.mr_addr is not None:
        d["mr_addr"] = b.mr_addr
    if b.mapped_ram is not None:
        d["mapped_ram"] = b.mapped_ram
    return schema.build(d)


def _block_entry_size(b) -> int:
    """``len(_block_entry_bytes(b))`` without building it."""
    return 9 + len(b.name.encode("latin-1")) + 8 * ((b.page_size is not None) +
                                                   (b.mr_addr is not None)) + \
        (28 if b.mapped_ram is not None else 0)


class RamMemSize(Record):
    """MEM_SIZE: total size and the block list (``ram_save_setup``).

    With mapped-ram each block's entry is followed in the file by that block's
    bitmap and page area, so the entries are separate :class:`RamBlockEntry`
    records and this record (``inline=False``) is the word alone.
    """

    __slots__ = ("flags", "total", "blocks", "inline")
    kind = "ram_mem_size"

    def __init__(self, total, blocks, flags=RamFlag.MEM_SIZE, offset=None, depth=0, inline=True):
        self.total, self.blocks, self.flags = total, list(blocks), int(flags)
        self.offset, self.depth, self.inline = offset, depth, inline

    def encode(self):
        out = [_U64.pack(self.total | self.flags)]
        if self.inline:
            out += [_block_entry_bytes(b) for b in self.blocks]
        return b"".join(out)

    @property
    def size(self) -> int:
        """``len(self.encode())`` from the fields (tested equal)."""
        if not self.inline:
            return 8
        return 8 + sum(_block_entry_size(b) for b in self.blocks)

    def fields(self):
        d = {"total": self.total, "blocks": [b.to_json() for b in self.blocks]}
        if not self.inline:
            d["entries"] = "separate (mapped-ram)"
        return d


class RamBlockEntry(Record):
    """One block-list entry written on its own (mapped-ram layout)."""

    __slots__ = ("info",)
    kind = "ram_block_entry"

    def __init__(self, info, offset=None, depth=0):
        self.info, self.offset, self.depth = info, offset, depth

    def encode(self):
        return _block_entry_bytes(self.info)

    @property
    def size(self) -> int:
        return _block_entry_size(self.info)

    def fields(self):
        return self.info.to_json()


class _PageRecord(Record):
    __slots__ = ("flags", "addr", "block")

    @property
    def continued(self) -> bool:
        return bool(self.flags & _CONT)

    def header_bytes(self) -> bytes:
        return _page_header(self.flags, self.addr, self.block)

    @property
    def size(self) -> int:
        """``len(self.encode())``, computed from the fields (tested equal)."""
        return _page_header_size(self.flags, self.block) + self._body_size()

    def fields(self):
        return {"block": self.block, "addr": self.addr, "continue": self.continued}


class RamZero(_PageRecord):
    """ZERO: a page whose bytes all equal ``fill`` (always 0 from QEMU)."""

    __slots__ = ("fill",)
    kind = "ram_zero"

    def __init__(self, block, addr, flags=RamFlag.ZERO, fill=0, offset=None, depth=0):
        self.block, self.addr, self.flags, self.fill = block, addr, int(flags), fill
        self.offset, self.depth = offset, depth

    def encode(self):
        if self.flags & _CONT:
            return _ZERO.pack(self.addr | self.flags, self.fill)
        return self.header_bytes() + bytes((self.fill,))

    def _body_size(self):
        return 1

    @property
    def size(self) -> int:
        if self.flags & _CONT:
            return 9
        return 10 + len(self.block.encode("latin-1"))

    def fields(self):
        d = super().fields()
        if self.fill:
            d["fill"] = self.fill
        return d


class RamZeroRun(Record):
    """``count`` ZERO records with CONTINUE and fill 0 at consecutive page addresses.

    A compact form of what is on the wire (9 bytes per record); record ``i``
    sits at ``offset + 9*i`` and names page ``addr + i*page_size``.
    """

    __slots__ = ("flags", "addr", "block", "count", "page_size")
    kind = "ram_zero_run"

    def __init__(self, block, addr, count, page_size, flags=RamFlag.ZERO | RamFlag.CONTINUE,
                 offset=None, depth=0):
        self.block, self.addr, self.count, self.page_size = block, addr, count, page_size
        self.flags = int(flags)
        self.offset, self.depth = offset, depth

    def encode(self):
        return zero_run_bytes(self.addr, self.flags, self.count, self.page_size)

    @property
    def size(self):
        return 9 * self.count

    def expand(self):
        ps = self.page_size
        for i in range(self.count):
            yield RamZero(self.block, self.addr + i * ps, self.flags, 0,
                          None if self.offset is None else self.offset + 9 * i, self.depth)

    def fields(self):
        return {"block": self.block, "addr": self.addr, "count": self.count,
                "record_size": 9}


class RamPage(_PageRecord):
    """PAGE: the page's raw bytes."""

    __slots__ = ("data",)
    kind = "ram_page"

    def __init__(self, block, addr, data, flags=RamFlag.PAGE, offset=None, depth=0):
        self.block, self.addr, self.data, self.flags = block, addr, data, int(flags)
        self.offset, self.depth = offset, depth

    def encode(self):
        return self.header_bytes() + bytes(self.data)

    def encode_parts(self):
        """The encoding as (page header, page bytes): no copy of the page."""
        return self.header_bytes(), self.data

    def _body_size(self):
        return len(self.data)

    @property
    def size(self) -> int:
        if self.flags & _CONT:
            return 8 + len(self.data)
        return 9 + len(self.block.encode("latin-1")) + len(self.data)

    def fields(self):
        d = super().fields()
        d["length"] = len(self.data)
        return d


class RamPageRun(Record):
    """``count`` PAGE records with CONTINUE, one after the other on the wire.

    A compact form the reader yields when asked (``page_runs=True``): record
    ``i`` sits at ``offset + i * (8 + page_size)``, its word is ``words[i]``
    (page address | ``flags``) and its page is :meth:`page` ``(i)``, a
    memoryview of the bytes read — no page is copied.  ``expand()`` gives the
    :class:`RamPage` records the reader yields without the option (tested equal).

    ``buf`` holds the records themselves (word, page, word, page, ...) from
    ``start``: a window of the input, or what :meth:`from_pages` lays out.
    """

    __slots__ = ("block", "flags", "page_size", "words", "buf", "start")
    kind = "ram_page_run"

    def __init__(self, block, buf, start, words, page_size,
                 flags=RamFlag.PAGE | RamFlag.CONTINUE, offset=None, depth=0):
        self.block, self.buf, self.start = block, buf, start
        self.words, self.page_size, self.flags = tuple(words), page_size, int(flags)
        self.offset, self.depth = offset, depth

    @classmethod
    def from_pages(cls, block, addrs, pages, page_size,
                   flags=RamFlag.PAGE | RamFlag.CONTINUE, offset=None, depth=0):
        flags = int(flags)
        words = [a | flags for a in addrs]
        parts = []
        for w, p in zip(words, pages):
            if len(p) != page_size:
                raise ValueError("a page of a run must be exactly one page long")
            parts += (_U64.pack(w), p)
        return cls(block, b"".join(parts), 0, words, page_size, flags, offset, depth)

    @property
    def count(self) -> int:
        return len(self.words)

    @property
    def stride(self) -> int:
        return 8 + self.page_size

    @property
    def addrs(self):
        f = self.flags
        return [w - f for w in self.words]

    @property
    def size(self) -> int:
        return len(self.words) * (8 + self.page_size)

    def page(self, i: int):
        """Page ``i``'s bytes: a memoryview of the buffer (no copy)."""
        q = self.start + i * (8 + self.page_size) + 8
        return memoryview(self.buf)[q:q + self.page_size]

    def pages(self):
        mv = memoryview(self.buf)
        ps, stride = self.page_size, 8 + self.page_size
        q = self.start + 8
        for _ in range(len(self.words)):
            yield mv[q:q + ps]
            q += stride

    def encode_parts(self):
        """The wire bytes: every word packed from ``words`` over the page bytes."""
        out = bytearray(self.size)
        self.encode_into(out, 0)
        return (out,)

    def encode(self):
        return bytes(self.encode_parts()[0])

    def encode_into(self, out, at: int) -> int:
        """Write the wire bytes into ``out[at:]`` (a bytearray); return their length.

        The page bytes come from the pages, each record's word is packed from
        ``words`` over them."""
        n = self.size
        out[at:at + n] = memoryview(self.buf)[self.start:self.start + n]
        words = struct.pack(">%dQ" % len(self.words), *self.words)
        stride = 8 + self.page_size
        for j in range(8):          # byte j of every word, as one strided assignment
            out[at + j:at + n:stride] = words[j::8]
        return n

    def expand(self):
        """The same records as :class:`RamPage` objects (each page copied to bytes)."""
        f, ps, stride = self.flags, self.page_size, 8 + self.page_size
        buf, q = self.buf, self.start
        off = self.offset
        for i, w in enumerate(self.words):
            yield RamPage(self.block, w - f, bytes(buf[q + 8:q + 8 + ps]), f,
                          None if off is None else off + i * stride, self.depth)
            q += stride

    def fields(self):
        a = self.addrs
        return {"block": self.block, "addr": a[0] if a else None, "count": len(a),
                "record_size": 8 + self.page_size,
                "consecutive": all(y - x == self.page_size for x, y in zip(a, a[1:]))}


class RamXbzrle(_PageRecord):
    """XBZRLE: a delta against the previous copy of the page (xbzrle.c)."""

    __slots__ = ("data", "encoding")
    kind = "ram_xbzrle"

    def __init__(self, block, addr, data, flags=RamFlag.XBZRLE, encoding=W.ENCODING_FLAG_XBZRLE,
                 offset=None, depth=0):
        self.block, self.addr, self.data, self.flags = block, addr, data, int(flags)
        self.encoding = encoding
        self.offset, self.depth = offset, depth

    def encode(self):
        return self.header_bytes() + W.XbzrleBody.build(
            dict(length=len(self.data), data=bytes(self.data)))

    def _body_size(self):
        return 3 + len(self.data)

    def fields(self):
        d = super().fields()
        d["length"] = len(self.data)
        return d


class RamCompressed(_PageRecord):
    """COMPRESS_PAGE: one page as a zlib stream (QEMU <= 9.0)."""

    __slots__ = ("data",)
    kind = "ram_compressed"

    def __init__(self, block, addr, data, flags=RamFlag.COMPRESS_PAGE, offset=None, depth=0):
        self.block, self.addr, self.data, self.flags = block, addr, data, int(flags)
        self.offset, self.depth = offset, depth

    def encode(self):
        return self.header_bytes() + W.CompressBody.build(
            dict(length=len(self.data), data=bytes(self.data)))

    def _body_size(self):
        return 4 + len(self.data)

    def fields(self):
        d = super().fields()
        d["length"] = len(self.data)
        return d

    def inflate(self, page_size: int) -> bytes:
        """The bytes QEMU's loader writes at the start of the page.

        As ``qemu_uncompress_data`` (migration/ram.c, QEMU 7.2): one
        ``inflate(Z_NO_FLUSH)`` of the whole record into a ``page_size`` buffer
        must end the zlib stream.  Output shorter than a page is accepted (the
        rest of the page keeps what it held), bytes after the stream's end are
        ignored; a zlib error, a preset dictionary, a stream that is cut or that
        would inflate to more than a page raise
        :class:`~qmigstream.errors.CompressedPageError` at the record's offset.
        """
        import zlib
        from ..errors import CompressedPageError
        d = zlib.decompressobj()
        try:
            out = d.decompress(bytes(self.data), page_size + 1)
        except zlib.error as e:
            raise CompressedPageError(f"compressed page does not inflate: {e}", self.offset,
                                      section="ram") from None
        if len(out) > page_size or not d.eof:
            found = (f"more than {page_size} bytes" if len(out) > page_size
                     else f"{len(out)} bytes, zlib stream unfinished")
            raise CompressedPageError("compressed page does not inflate within one page",
                                      self.offset, section="ram",
                                      expected=f"a zlib stream ending within {page_size} bytes",
                                      found=found)
        return out


class _BareRamRecord(Record):
    __slots__ = ("flags", "addr")

    def __init__(self, flags=None, addr=0, offset=None, depth=0):
        self.flags = int(self.default_flag if flags is None else flags)
        self.addr, self.offset, self.depth = addr, offset, depth

    def encode(self):
        return _U64.pack(self.addr | self.flags)

    size = 8

    def fields(self):
        d = {}
        if self.flags != self.default_flag:
            d["flags"] = self.flags
        if self.addr:
            d["addr"] = self.addr
        return d


class RamEos(_BareRamRecord):
    __slots__ = ()
    kind = "ram_eos"
    default_flag = RamFlag.EOS


class RamMultifdFlush(_BareRamRecord):
    __slots__ = ()
    kind = "ram_multifd_flush"
    default_flag = RamFlag.MULTIFD_FLUSH


class RamHook(_BareRamRecord):
    __slots__ = ()
    kind = "ram_hook"
    default_flag = RamFlag.HOOK


# --- mapped-ram areas (file: migration with the mapped-ram capability) ----------

class MappedRamBitmap(Record):
    """The block's page bitmap at ``bitmap_offset`` (host unsigned longs)."""

    __slots__ = ("block", "data")
    kind = "mapped_ram_bitmap"

    def __init__(self, block, data, offset=None, depth=0):
        self.block, self.data, self.offset, self.depth = block, bytes(data), offset, depth

    def encode(self):
        return self.data

    @property
    def size(self):
        return len(self.data)

    def pages_set(self) -> int:
        return sum(bin(b).count("1") for b in self.data)

    def fields(self):
        return {"block": self.block, "length": len(self.data), "pages_set": self.pages_set()}


class MappedRamChunk(Record):
    """A piece of a block's page area (or the padding before it).

    ``data`` is None when every byte of the piece is zero (a hole in the file):
    the writer then seeks over it when it can.
    """

    __slots__ = ("block", "area", "start", "length", "data")
    kind = "mapped_ram_chunk"

    def __init__(self, block, area, start, length, data=None, offset=None, depth=0):
        self.block, self.area, self.start, self.length = block, area, start, length
        self.data = None if data is None else bytes(data)
        self.offset, self.depth = offset, depth

    def encode(self):
        return self.data if self.data is not None else bytes(self.length)

    @property
    def size(self):
        return self.length

    @property
    def is_hole(self):
        return self.data is None

    def fields(self):
        return {"block": self.block, "area": self.area, "start": self.start,
                "length": self.length, "hole": self.data is None}
