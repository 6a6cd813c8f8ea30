"""Guest memory: replay a stream's RAM records into one sparse file per RAM block.

What the destination's RAM loader (``ram_load_precopy`` in migration/ram.c)
does with each record, done to a file instead of guest memory:

* ``PAGE`` writes the page;
* ``ZERO`` sets every byte of the page to its fill byte (``ram_handle_compressed``:
  QEMU memsets only when the fill is non-zero or the page is not zero already);
  :class:`~qmigstream.codec.ram_records.RamZeroRun` is a run of those;
* ``XBZRLE`` applies the delta to the *current* content of the page
  (``load_xbzrle`` decodes straight into guest memory);
* ``COMPRESS_PAGE`` inflates one zlib stream into the page
  (:meth:`~qmigstream.codec.ram_records.RamCompressed.inflate`): the stream
  must end within one page (:class:`~qmigstream.errors.CompressedPageError`
  otherwise); a shorter output overwrites the start of the page only, bytes
  after the stream's end are ignored;
* ``POSTCOPY_RAM_DISCARD`` zeroes the byte ranges it names (``ram_discard_range``);
* mapped-ram areas: page *i* of a block is at ``pages_offset + i*page_size`` in
  the file and holds data when bit *i* of the block's bitmap is set
  (``parse_ramblock_mapped_ram``); clear bits leave the page as it was (zero);
* recorded multifd channels (:class:`MultifdChannel`): the normal pages of
  each packet and, from 9.0, its zero pages (written as zeros); at each point
  where the destination syncs with the channels (each RAM section's EOS, or
  each MULTIFD_FLUSH record when the source syncs per round, 8.1+) every
  channel's next epoch (its packets up to its next SYNC packet) is applied.

Iterations are counted on the RAM section: the START section (setup) is
iteration 0, the k-th PART section iteration k, the END section (completion)
the one after the last PART.  ``until_iteration=N`` stops after iteration N,
giving memory as the destination holds it at that point.

Files stay sparse: all-zero pages are never written (they become holes, and a
page that was data and is zeroed later is punched back into a hole), pages that
follow each other are written with one ``pwritev``, and no block is ever held
in memory.  Bookkeeping is one byte per page (:class:`PageMarks`), allocated
1 GiB of guest at a time.  Each block's sha256 is computed in a second thread
while it is written (:class:`_RunningHash`).

File names are never taken from the stream: :func:`safe_file_names` maps block
names (``pc.ram``, ``/rom@etc/acpi/tables``, or a hostile ``../../x``) to
unique, readable names made of ``[A-Za-z0-9._+@-]`` only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import re
import stat
import struct
import threading
import zlib
from itertools import repeat
from operator import getitem

from .codec.ram_records import (MappedRamBitmap, MappedRamChunk, RamBlockEntry,
                                RamCompressed, RamEos, RamMemSize, RamMultifdFlush, RamPage,
                                RamPageRun,
                                RamXbzrle, RamZero, RamZeroRun)
from .codec.reader import StreamReader
from .codec.records import Command, SectionHeader
from .errors import QmigstreamError, StreamError
from .wire.commands import MigCmd
from .wire.header import SectionType as T
from . import xbzrle

#: Page kinds counted per block (manifest ``pages``).
PAGE_KINDS = ("page", "zero", "xbzrle", "compressed", "mapped_ram", "multifd")
#: Most buffers in one ``pwritev`` call (Linux IOV_MAX is 1024).
MAX_IOV = 1024
#: File names reserved inside an extraction directory.
RESERVED_NAMES = ("manifest.json", "physical.img")
_SAFE = re.compile(r"[^A-Za-z0-9._+@-]")
_NAME_MAX = 96


class ExtractError(QmigstreamError):
    """The output directory or a requested view cannot be made."""


# -- file names -----------------------------------------------------------------

def safe_file_name(block_name: str) -> str:
    """The readable part of a block's file name (before uniqueness is settled).

    Every character outside ``[A-Za-z0-9._+@-]`` becomes ``_``; leading ``.``,
    ``_`` and ``-`` are dropped (no hidden files, no ``..``); the result is cut
    to 96 characters; an empty result becomes ``block``; ``.img`` is appended.
    """
    s = _SAFE.sub("_", block_name).lstrip("._-")[:_NAME_MAX].rstrip(".")
    return (s or "block") + ".img"


def safe_file_names(block_names, taken=()) -> dict:
    """Map each block name to a unique safe file name, in list order.

    A name that is taken already (compared without regard to case, so the
    files are distinct on case-insensitive file systems too, and including
    :data:`RESERVED_NAMES`) gets ``-2``, ``-3``, ... before ``.img``.
    """
    used = {n.lower() for n in (*RESERVED_NAMES, *taken)}
    out = {}
    for name in block_names:
        if name in out:
            continue
        base = safe_file_name(name)
        cand, k = base, 1
        while cand.lower() in used:
            k += 1
            cand = f"{base[:-4]}-{k}.img"
        used.add(cand.lower())
        out[name] = cand
    return out


# -- sparse file helpers ----------------------------------------------------------

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = None


def _fallocate():
    global _libc
    if _libc is None:
        import ctypes               # only once a hole is punched
        import ctypes.util
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = lib.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            _libc = fn
        except (OSError, AttributeError):
            _libc = False
    return _libc


_ZERO_CHUNK = bytes(1 << 20)
_BIG_ZEROS = bytes(16 << 20)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` read as zeros, as a hole where the FS can."""
    fn = _fallocate()
    if fn and fn(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    while length:
        n = min(length, len(_ZERO_CHUNK))
        os.pwrite(fd, _ZERO_CHUNK[:n], offset)
        offset += n
        length -= n


def data_ranges(fd: int, start: int, end: int):
    """Yield ``(s, e)`` ranges of ``[start, end)`` that may hold data (not holes)."""
    pos = start
    while pos < end:
        try:
            s = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            yield pos, end          # no SEEK_DATA here: treat everything as data
            return
        if s >= end:
            return
        try:
            e_ = os.lseek(fd, s, os.SEEK_HOLE)
        except OSError:
            e_ = end
        yield s, min(e_, end)
        pos = e_


def sha256_file(path: str, length: int | None = None) -> str:
    """sha256 of a (sparse) file, feeding holes from a zero buffer instead of reading them."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size if length is None else length
        pos = 0
        for s, e in data_ranges(fd, 0, size):
            _hash_zeros(h, s - pos)
            while s < e:
                n = min(e - s, 8 << 20)
                chunk = os.pread(fd, n, s)
                if not chunk:
                    break
                h.update(chunk)
                s += len(chunk)
            pos = s
        _hash_zeros(h, size - pos)
    finally:
        os.close(fd)
    return h.hexdigest()


def _hash_zeros(h, n, zeros=_ZERO_CHUNK):
    z = memoryview(zeros)
    while n > 0:
        k = min(n, len(zeros))
        h.update(z[:k])
        n -= k


class _RunningHash:
    """sha256 of a block computed while it is written, as long as writes only move forward.

    Every byte below ``cursor`` is final as far as the writes so far go and has
    been queued for hashing; every byte at or above it is still zero.  A write
    below the cursor (a page sent again in a later iteration) makes the hash
    ``valid = False``; the file is then hashed at the end instead.
    """

    __slots__ = ("h", "cursor", "valid", "worker", "batch", "batched")

    #: Bytes collected before they go to the hashing thread in one piece.
    BATCH = 8 << 20

    def __init__(self, worker):
        self.h = hashlib.sha256()
        self.cursor = 0
        self.valid = True
        self.worker = worker
        self.batch = []
        self.batched = 0

    def wrote(self, addr: int, bufs, length: int):
        """``length`` bytes at ``addr`` now hold ``bufs`` (a list; None for zeros)."""
        if not self.valid:
            return
        if addr < self.cursor:
            self.valid = False
            self.batch = []
            return
        if addr > self.cursor:
            self._zeros(addr - self.cursor)
        if bufs is None:
            self._zeros(length)
        else:
            self.batch.extend(bufs)
            self.batched += length
            if self.batched >= self.BATCH:
                self.send()
        self.cursor = addr + length

    def _zeros(self, n):
        self.send()
        self.worker.put(self.h, n)

    def send(self):
        if self.batch:
            # Joined here, not in the hashing thread: hashing is the longest
            # job, and bytes.join drops the GIL for a join of 1 MiB or more.
            self.worker.put(self.h, b"".join(self.batch))
            self.batch, self.batched = [], 0


class _HashWorker:
    """One thread that feeds queued pieces to sha256 (hashlib drops the GIL while hashing).

    An item is bytes or a count of zero bytes.
    """

    def __init__(self):
        self.q = queue.Queue(maxsize=2)
        self.error = None
        self.t = threading.Thread(target=self._run, name="qmigstream-hash", daemon=True)
        self.t.start()

    def put(self, h, item):
        self.q.put((h, item))

    def _run(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            h, item = job
            try:
                if isinstance(item, int):
                    _hash_zeros(h, item, _BIG_ZEROS)
                else:
                    h.update(item)
            except BaseException as e:  # reported by close()
                self.error = e

    def close(self):
        self.q.put(None)
        self.t.join()
        if self.error is not None:
            raise self.error


def _write_pages(fd, bufs, start, total):
    """Write ``bufs`` (``total`` bytes) at ``start``: one ``pwritev``, finishing a short one."""
    if len(bufs) == 1:
        done = os.pwrite(fd, bufs[0], start)
    else:
        done = os.pwritev(fd, bufs, start)
    if done != total:        # short write: finish the rest plainly
        rest = memoryview(b"".join(bufs))[done:]
        while rest:
            n = os.pwrite(fd, rest, start + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            rest, done = rest[n:], done + n


class _Writer:
    """One thread that does the ``pwritev`` of each run of pages (the call drops the GIL),
    so writing overlaps reading and parsing the stream.

    Every other use of a block's file (punching holes, reading a page back for
    XBZRLE, single writes, truncating, closing) calls :meth:`drain` first; a
    write that failed raises there.
    """

    def __init__(self):
        self.q = queue.Queue(maxsize=2)
        self.error = None
        self.t = threading.Thread(target=self._run, name="qmigstream-write", daemon=True)
        self.t.start()

    def put(self, fd, bufs, start, total):
        if self.error is not None:
            self.drain()
        self.q.put((fd, bufs, start, total))

    def _run(self):
        while True:
            job = self.q.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    _write_pages(*job)
            except BaseException as e:  # reported by drain()
                self.error = e
            finally:
                self.q.task_done()

    def drain(self):
        """Wait until every queued write is done; raise the first that failed."""
        self.q.join()
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def close(self):
        """Stop the thread once the queued writes are done (or skipped after an error)."""
        self.q.put(None)
        self.t.join()


def create_file(path: str) -> int:
    """Open a new empty file at ``path`` for writing, replacing a file already there.

    An existing file is unlinked rather than truncated (truncating a big file and
    rewriting it makes ext4 flush it on close), and a symlink there is replaced,
    never followed.  An existing regular file holding 64 MiB or more is renamed
    to a hidden name and unlinked by a thread (freeing its blocks can take a
    good part of a second); :func:`wait_removed` waits for those threads.
    """
    _remove_old(path)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | \
        getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o644)


#: Old files holding this many bytes are unlinked by a thread.
_REMOVE_LATER = 64 << 20
_removing = []


def _remove_old(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_blocks * 512 >= _REMOVE_LATER:
        d, base = os.path.split(path)
        # Block file names never start with ".", so this takes no block's name.
        old = os.path.join(d, f".{base}.old-{os.getpid()}-{len(_removing)}")
        try:
            os.rename(path, old)
        except OSError:
            pass
        else:
            t = threading.Thread(target=_unlink_quietly, args=(old,),
                                 name="qmigstream-unlink", daemon=True)
            t.start()
            _removing.append(t)
            return
    os.unlink(path)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def wait_removed() -> None:
    """Wait until the old files :func:`create_file` replaced are unlinked."""
    while _removing:
        _removing.pop().join()


class PageMarks:
    """One mark per page (1: may hold data, 0: a hole), allocated 1 GiB of guest at a time.

    A block of any length costs nothing until pages in it are written, so a
    hostile MEM_SIZE naming a huge block does not allocate anything.  The
    pieces are bytearrays (no numpy: importing it costs more than marking).
    """

    CHUNK = 1 << 18            # pages per piece (1 GiB of 4 KiB pages)
    _ONES = memoryview(b"\1" * CHUNK)
    _NONE = memoryview(bytes(CHUNK))

    def __init__(self, pages: int = 0):
        self.pages = pages
        self._c = {}

    def _pieces(self, i, n):
        """``(piece index, start, end)`` within pieces for pages ``[i, i+n)``."""
        C = self.CHUNK
        end = min(i + n, self.pages)
        while i < end:
            k, lo = divmod(i, C)
            hi = min(C, lo + end - i)
            yield k, lo, hi
            i += hi - lo

    def set(self, i, n=1):
        for k, lo, hi in self._pieces(i, n):
            a = self._c.get(k)
            if a is None:
                a = self._c[k] = bytearray(self.CHUNK)
            a[lo:hi] = self._ONES[:hi - lo]

    def clear(self, i, n=1):
        for k, lo, hi in self._pieces(i, n):
            a = self._c.get(k)
            if a is not None:
                a[lo:hi] = self._NONE[:hi - lo]

    def any(self, i, n=1) -> bool:
        for k, lo, hi in self._pieces(i, n):
            a = self._c.get(k)
            if a is not None and a.find(1, lo, hi) >= 0:
                return True
        return False

    def __getitem__(self, i) -> bool:
        a = self._c.get(i // self.CHUNK)
        return a is not None and a[i % self.CHUNK] == 1

    def count(self) -> int:
        return sum(a.count(1) for a in self._c.values())

    def resize(self, pages: int):
        if pages < self.pages:
            self.clear(pages, self.pages - pages)
        self.pages = pages


# -- one block ------------------------------------------------------------------

class BlockImage:
    """The memory image of one RAM block, kept in a sparse file.

    ``written`` (:class:`PageMarks`) marks the pages that may hold non-zero
    data (they were written); the others are holes.  ``pages`` counts the records that
    touched the block, by kind (:data:`PAGE_KINDS`).
    """

    def __init__(self, name: str, path: str, used_length: int, page_size: int):
        self.name = name
        self.path = path
        self.file = os.path.basename(path)
        self.page_size = page_size
        self.used_length = 0
        self.pages = dict.fromkeys(PAGE_KINDS, 0)
        self.written = PageMarks()
        self.running = None          # _RunningHash while the block is written
        self.sha256 = None           # hex digest once known
        self.fd = create_file(path)
        try:
            self.resize(used_length)
        except ExtractError:
            self.close()
            raise

    def resize(self, used_length: int):
        """Set the block's length (MEM_SIZE may name it again with another length)."""
        ps = self.page_size
        self.written.resize(-(-used_length // ps))
        if self.running is not None and used_length < self.running.cursor:
            self.running.valid = False
        try:
            os.ftruncate(self.fd, used_length)
        except (OSError, OverflowError) as e:
            # A length from the stream no file here can have (EFBIG, or beyond off_t).
            why = e.strerror if isinstance(e, OSError) else "beyond the largest file offset"
            raise ExtractError(f"RAM block {self.name!r}: cannot make a file of "
                               f"{used_length:#x} bytes: {why}") from None
        self.used_length = used_length
        self.sha256 = None

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def digest(self) -> str:
        """sha256 of the block's contents (from the running hash, else from the file)."""
        if self.sha256 is None:
            self.sha256 = sha256_file(self.path, self.used_length)
        return self.sha256

    def to_json(self, hash: bool = True) -> dict:
        d = {"name": self.name, "file": self.file, "used_length": self.used_length,
             "page_size": self.page_size, "pages": dict(self.pages),
             "data_pages": self.written.count()}
        if hash:
            d["sha256"] = self.digest()
        return d


# -- multifd channels ------------------------------------------------------------------

from .vfio import multifd as _MF        # the one definition of the 9.0+/10.x packet layouts
from .wire import vfio as _MW

MULTIFD_MAGIC, MULTIFD_VERSION = _MW.MULTIFD_MAGIC, _MW.MULTIFD_VERSION
#: MULTIFD_PACKET_SIZE (migration/multifd.h): a packet holds at most this many bytes of pages.
MULTIFD_PACKET_SIZE = _MW.MULTIFD_PACKET_SIZE
#: Flags: SYNC; the compression bits (3 in 7.2-9.0, 4 in 9.1, 5 since 9.2: the
#: mask takes the widest, older senders never set the extra bits); device state (10.0+).
MULTIFD_FLAG_SYNC, MULTIFD_FLAG_ZLIB = _MW.MULTIFD_FLAG_SYNC, 0x2
MULTIFD_FLAG_COMPRESSION_MASK = _MW.MULTIFD_FLAG_COMPRESSION_MASK
MULTIFD_FLAG_DEVICE_STATE = _MW.MULTIFD_FLAG_DEVICE_STATE
_MF_HDR = _MW.MULTIFD_HDR_SIZE                  # MultiFDPacketHdr_t: magic, version, flags
_MF_FIXED = _MW.MULTIFD_RAM_FIXED_SIZE          # MultiFDPacket_t up to the offset array
_MF_DEV = _MW.MULTIFD_DEVICE_STATE_HEADER_SIZE  # MultiFDPacketDeviceState_t


class MultifdChannel:
    """One recorded multifd channel (QEMU 7.2-10.x), read packet by packet.

    The channel starts with ``MultiFDInit_t`` (64 bytes); then packets, each
    starting with magic, version 1 and flags (``MultiFDPacketHdr_t``):

    * a RAM packet (``MultiFDPacket_t``): a 320-byte fixed part, then an offset
      array of ``MULTIFD_PACKET_SIZE / page size`` be64 entries (128 for 4 KiB
      pages) whatever ``pages_alloc`` says: the receiver always reads its fixed
      ``packet_len`` (7.2-9.1 senders set ``pages_alloc`` to that count, 9.2+
      SYNC packets leave it 0).  The array lists ``normal_pages`` offsets, then
      ``zero_pages`` ones (9.0+, ``zero-page-detection=multifd``; the field is
      reserved and 0 before), checked as ``multifd_ram_unfill_packet`` does:
      ``normal + zero <= pages_alloc <= count``.  Then ``normal_pages`` raw
      pages (``multifd_nocomp_recv``) or, with ``multifd-compression=zlib``,
      ``next_packet_size`` bytes of one zlib stream that runs on across the
      channel's packets, flushed at the end of each (``multifd_zlib_recv``,
      migration/multifd-zlib.c).  Zero pages are pages that are zero
      (``multifd_recv_zero_page_process``); they are yielded before the
      packet's normal pages, the order the receiver applies them in.
    * a device-state packet (10.0+, flag ``MULTIFD_FLAG_DEVICE_STATE``,
      ``MultiFDPacketDeviceState_t``): idstr, instance id and
      ``next_packet_size``, then that many bytes of device state (VFIO), which
      is no RAM: skipped, counted in ``packets["device_state"]``.

    The layouts are those of :mod:`qmigstream.vfio.multifd` (its
    :class:`~qmigstream.vfio.multifd.RamPacket` decodes the RAM header here);
    a 7.2-8.x RAM packet is a 9.0+ one with no zero pages, so one rule reads
    both, as a 9.0+ receiver does.

    Packets up to and including a ``MULTIFD_FLAG_SYNC`` one form an epoch.  With
    per-section sync (7.2-8.0 machine types) the source syncs the channels
    right before the EOS of every RAM section (``multifd_send_sync_main``), so
    epoch *k* holds the pages of RAM iteration *k*; with per-round sync (8.1+
    machine types, every 10.x one) a SYNC goes with each ``MULTIFD_FLUSH`` on
    the main channel instead, not one per section.
    """

    def __init__(self, path, page_size: int = 4096):
        self.name = str(path)
        self.f = open(path, "rb")
        self.page_size = page_size
        self.page_count = _MF.ram_page_count(page_size)
        self.offset = 0
        self.epoch = 0
        self.done = False
        self.packets = {"ram": 0, "sync": 0, "device_state": 0}
        self.zero_pages = 0              # zero-page entries seen (9.0+ senders)
        init = self._read(64, "MultiFDInit_t")
        magic, version = struct.unpack_from(">II", init)
        if magic != MULTIFD_MAGIC:
            raise StreamError(f"{self.name}: not a multifd channel", 0,
                              expected=MULTIFD_MAGIC, found=magic)
        if version != MULTIFD_VERSION:
            raise StreamError(f"{self.name}: unsupported multifd version", 4,
                              expected=MULTIFD_VERSION, found=version)
        self.channel_id = init[24]
        self._inflate = None             # the channel's zlib stream, once it has one
        self._zeros = None               # page_count zero pages, once a packet has any

    def _read(self, n, what):
        data = self.f.read(n)
        if len(data) != n:
            from .errors import Truncated
            raise Truncated(f"{self.name}: channel ends inside {what}", self.offset,
                            needed=n, available=len(data))
        self.offset += n
        return data

    def _skip(self, n, what):
        """Step over ``n`` bytes that must all be in the channel."""
        if self.f.seekable():
            left = os.fstat(self.f.fileno()).st_size - self.offset
            if left < n:
                from .errors import Truncated
                raise Truncated(f"{self.name}: channel ends inside {what}", self.offset,
                                needed=n, available=max(left, 0))
            self.f.seek(n, os.SEEK_CUR)
            self.offset += n
            return
        while n:
            k = min(n, 1 << 20)
            self._read(k, what)
            n -= k

    def epoch_packets(self):
        """Yield ``(block, offsets, data, offset)`` for each packet of the current epoch.

        ``data`` holds one page per offset; a packet with zero pages yields them
        first, with zero-filled ``data``, then its normal pages.
        """
        ps = self.page_size
        count = self.page_count
        while not self.done:
            off = self.offset
            head = self.f.read(_MF_HDR)
            if not head:
                self.done = True
                return
            if len(head) < _MF_HDR:
                from .errors import Truncated
                raise Truncated(f"{self.name}: channel ends inside a packet header", off,
                                needed=_MF_HDR, available=len(head))
            self.offset += _MF_HDR
            magic, version, flags = struct.unpack_from(">III", head)
            if magic != MULTIFD_MAGIC or version != MULTIFD_VERSION:
                raise StreamError(f"{self.name}: bad multifd packet header", off,
                                  expected=f"magic {MULTIFD_MAGIC:#x} version 1",
                                  found=f"magic {magic:#x} version {version}")
            if flags & MULTIFD_FLAG_DEVICE_STATE:
                tail = self._read(_MF_DEV - _MF_HDR, "a device-state packet header")
                size = struct.unpack_from(">I", tail, len(tail) - 4)[0]
                self._skip(size, "device-state packet data")
                self.packets["device_state"] += 1
                continue
            pkt = _MF.RamPacket(head + self._read(_MF_FIXED - _MF_HDR + 8 * count,
                                                  "a packet header"), off, ps)
            alloc, normal, nps, _num, zero = pkt.fields()
            if alloc > count or normal > alloc or zero > alloc - normal:
                raise StreamError(f"{self.name}: multifd packet page counts out of range", off + 12,
                                  expected=f"normal + zero <= pages_alloc <= {count}",
                                  found=f"{normal} + {zero} of {alloc}")
            self.packets["sync" if flags & MULTIFD_FLAG_SYNC else "ram"] += 1
            if normal or zero:
                name = pkt.ramblock[:255]          # QEMU NUL-terminates ramblock[255]
                normal_offs, zero_offs = pkt.offsets()
                method = flags & MULTIFD_FLAG_COMPRESSION_MASK
                if method not in (0, MULTIFD_FLAG_ZLIB):
                    raise StreamError(f"{self.name}: multifd compression other than zlib is "
                                      "not supported", off + 8, found=f"flags {flags:#x}")
                if zero:
                    self.zero_pages += zero
                    if self._zeros is None:
                        self._zeros = memoryview(bytes(count * ps))
                    yield name, zero_offs, self._zeros[:zero * ps], off
                if normal and method:
                    yield name, normal_offs, self._inflated(nps, normal * ps, off), off
                elif normal:
                    yield name, normal_offs, self._read(normal * ps, "packet pages"), off
            if flags & MULTIFD_FLAG_SYNC:
                self.epoch += 1
                return

    def _inflated(self, size, want, off):
        """Read ``size`` compressed bytes and inflate exactly ``want`` bytes of pages."""
        if size > 2 * MULTIFD_PACKET_SIZE:         # zbuff_len in multifd-zlib.c
            raise StreamError(f"{self.name}: compressed multifd packet larger than its "
                              "buffer", off + 20, expected=f"<= {2 * MULTIFD_PACKET_SIZE}",
                              found=size)
        data = self._read(size, "compressed packet pages")
        if self._inflate is None:
            self._inflate = zlib.decompressobj()
        try:
            out = self._inflate.decompress(data, want + 1)
        except zlib.error as e:
            raise StreamError(f"{self.name}: multifd zlib data does not inflate: {e}",
                              off + _MF_FIXED) from None
        if len(out) != want or self._inflate.unconsumed_tail:
            raise StreamError(f"{self.name}: multifd packet inflates to the wrong size", off,
                              expected=want, found=f"{len(out)} bytes" +
                              (" and more" if self._inflate.unconsumed_tail else ""))
        return out

    def close(self):
        self.f.close()


# -- the replay -------------------------------------------------------------------

class GuestMemory:
    """Replay RAM records into :class:`BlockImage` files inside ``outdir``.

    Feed every record of a stream to :meth:`feed` (it returns False once
    ``until_iteration`` has passed and RAM records are no longer wanted), then
    call :meth:`close`.  ``blocks`` maps block names to their images in block
    list order.
    """

    def __init__(self, outdir: str, *, page_size: int = 4096, until_iteration: int | None = None,
                 reserved=(), hash: bool = True):
        if until_iteration is not None and until_iteration < 0:
            raise ValueError("until_iteration must be >= 0")
        self.outdir = outdir
        self.page_size = page_size
        self.until = until_iteration
        self.reserved = tuple(reserved)
        self.blocks: dict[str, BlockImage] = {}
        self.ram_section_id = None
        self.iteration = None        # iteration of the RAM section being read
        self.parts = 0               # PART sections applied
        self.setup_seen = False
        self.last_iteration = None
        self.end_seen = False
        self.stopped = False
        self._names = {}
        self._pend_block = None      # pending run of PAGE records at consecutive addresses
        self._pend_name = None
        self._pend_start = 0
        self._pend_next = -1
        self._pend_room = 0
        self._pend_bufs = []
        self._mr_bits = {}           # mapped-ram bitmaps: block -> bool array
        self._zero_page = bytes(page_size)
        self._hasher = _HashWorker() if hash else None
        self._writer = None          # _Writer, from the first run of pages written
        self.channels = []
        self.multifd_flushes = 0     # MULTIFD_FLUSH records seen (8.1+ multifd)
        self._sync_on = None         # "eos" or "flush": where channels sync (_sync_point)

    def add_channel(self, channel: MultifdChannel):
        """Apply this multifd channel's pages along with the stream's RAM sections."""
        self.channels.append(channel)

    def _sync_point(self, kind: str) -> None:
        """A point where the destination waits for every channel's SYNC packet
        (``multifd_recv_sync_main``): each RAM section's EOS when the source syncs
        per section (7.2-8.0, and later machine types that keep it), each
        MULTIFD_FLUSH record when it syncs per round (8.1+ otherwise).  The
        first of the two in the stream says which (ram_save_setup syncs too, so
        a per-round stream has a MULTIFD_FLUSH before its first EOS)."""
        if not self.channels:
            return
        if self._sync_on is None:
            self._sync_on = kind
        if kind != self._sync_on:
            return
        for ch in self.channels:             # each channel's next epoch, in order
            if not ch.done:
                self._apply_epoch(ch)

    def _apply_channels(self):
        """Apply what is left on the channels, round by round across them (every
        channel's epoch *k* before any epoch *k + 1*): a page sent again in a later
        round may come on another channel."""
        while True:
            live = [c for c in self.channels if not c.done]
            if not live:
                break
            low = min(c.epoch for c in live)
            for ch in (c for c in live if c.epoch == low):
                self._apply_epoch(ch)

    def _apply_epoch(self, ch) -> None:
        """The packets of ``ch`` up to and including its next SYNC packet."""
        ps = self.page_size
        for name, offsets, data, off in ch.epoch_packets():
            b = self.blocks.get(name)
            if b is None:
                raise StreamError(f"{ch.name}: multifd packet for unknown RAM block "
                                  f"{name!r}", off + 64)
            for i, a in enumerate(offsets):
                if a % ps or a > b.used_length - ps:
                    raise StreamError(f"{ch.name}: multifd page offset beyond block "
                                      f"{name!r}", off, expected=f"< {b.used_length:#x}",
                                      found=a)
                # bytes, not a memoryview: _page compares it with a zero page
                self._page(RamPage(name, a, data[i * ps:(i + 1) * ps]))
            # _page counts each page as "page"; these came from the channel.
            b.pages["page"] -= len(offsets)
            b.pages["multifd"] += len(offsets)

    # -- bookkeeping ------------------------------------------------------
    def _declare(self, info, offset):
        b = self.blocks.get(info.name)
        if b is not None:
            self._flush()
            self._drain()
            b.resize(info.used_length)
            return
        if info.used_length % self.page_size:
            raise StreamError(f"RAM block {info.name!r} length is not a whole number of pages",
                              offset, section="ram", found=info.used_length)
        taken = set(self._names.values()) | set(self.reserved)
        fname = safe_file_names([info.name], taken)[info.name]
        self._names[info.name] = fname
        b = BlockImage(info.name, os.path.join(self.outdir, fname), info.used_length,
                       self.page_size)
        if self._hasher is not None:
            b.running = _RunningHash(self._hasher)
        self.blocks[info.name] = b

    def _block(self, name, offset):
        b = self.blocks.get(name)
        if b is None:
            raise StreamError(f"page of RAM block {name!r} before the block list names it",
                              offset, section="ram")
        return b

    # -- records --------------------------------------------------------------
    def feed(self, rec) -> bool:
        """Apply one record; False once the wanted iterations are all applied."""
        if type(rec) is RamPageRun and self.iteration is not None:
            self._page_run(rec)
            return True
        if type(rec) is RamPage and self.iteration is not None:
            self._page(rec)
            return True
        if self.stopped:
            return False
        if isinstance(rec, SectionHeader):
            return self._section(rec)
        if isinstance(rec, Command) and rec.cmd == MigCmd.POSTCOPY_RAM_DISCARD:
            self._discard(rec)
            return True
        if self.iteration is None:
            return True
        if isinstance(rec, RamPage):
            self._page(rec)
        elif isinstance(rec, RamPageRun):
            self._page_run(rec)
        elif isinstance(rec, RamZeroRun):
            b = self._block(rec.block, rec.offset)
            b.pages["zero"] += rec.count
            self._zero(b, rec.addr, rec.count)
        elif isinstance(rec, RamZero):
            b = self._block(rec.block, rec.offset)
            b.pages["zero"] += 1
            if rec.fill:
                self._write_other(b, rec.addr, bytes((rec.fill,)) * self.page_size)
            else:
                self._zero(b, rec.addr, 1)
        elif isinstance(rec, RamXbzrle):
            self._xbzrle(rec)
        elif isinstance(rec, RamCompressed):
            self._compressed(rec)
        elif isinstance(rec, RamMemSize):
            for info in rec.blocks:
                self._declare(info, rec.offset)
        elif isinstance(rec, RamBlockEntry):
            self._declare(rec.info, rec.offset)
        elif isinstance(rec, MappedRamBitmap):
            self._bitmap(rec)
        elif isinstance(rec, MappedRamChunk):
            if rec.area == "pages":
                self._mapped_pages(rec)
        elif isinstance(rec, RamMultifdFlush):
            self.multifd_flushes += 1
            self._sync_point("flush")
        elif isinstance(rec, RamEos):
            self._sync_point("eos")
        return True

    def _section(self, h) -> bool:
        if h.type in (T.SECTION_START, T.SECTION_FULL):
            if h.idstr != "ram":
                self.iteration = None
                return True
            self.ram_section_id = h.section_id
            nxt = 0
        elif h.section_id == self.ram_section_id:
            nxt = self.parts + 1
        else:
            self.iteration = None
            return True
        if self.until is not None and nxt > self.until:
            self._flush()
            self.iteration = None
            self.stopped = True
            return False
        self.iteration = self.last_iteration = nxt
        if h.type == T.SECTION_PART:
            self.parts += 1
        elif h.type == T.SECTION_END:
            self.end_seen = True
        else:
            self.setup_seen = True
        return True

    def _discard(self, rec):
        """POSTCOPY_RAM_DISCARD: the destination drops these byte ranges of a block
        (``loadvm_postcopy_ram_handle_discard`` -> ``ram_discard_range``); they read
        as zero until sent again."""
        name = rec.args.get("block")
        b = self.blocks.get(name)
        if b is None:
            raise StreamError(f"POSTCOPY_RAM_DISCARD for unknown RAM block {name!r}",
                              rec.offset)
        ps = self.page_size
        for r in rec.args.get("ranges", []):
            start, length = r["start"], r["length"]
            if start % ps or length % ps or start + length > b.used_length:
                raise StreamError(f"POSTCOPY_RAM_DISCARD range outside RAM block {name!r} "
                                  "or not whole pages", rec.offset,
                                  expected=f"page-aligned, within 0x{b.used_length:x}",
                                  found=f"0x{start:x}+0x{length:x}")
            if length:
                self._zero(b, start, length // ps)

    def _page(self, rec):
        data = rec.data
        addr = rec.addr
        if addr == self._pend_next and self._pend_room and rec.block == self._pend_name \
                and data != self._zero_page:
            # The common case: the next page of a run being collected.
            self._pend_bufs.append(data)
            self._pend_next = addr + self.page_size
            self._pend_room -= 1
            return
        self._flush()
        self._page_at(self._block(rec.block, rec.offset), addr, data, data == self._zero_page)

    def _page_run(self, run):
        """A run of PAGE records: its pages join the pending run without a copy.

        The common case (pages at consecutive addresses, none all zero) is
        handled for the run as a whole; otherwise page by page as :meth:`_page`.
        """
        ps = self.page_size
        words, n = run.words, len(run.words)
        if run.page_size != ps or not n:
            for rec in run.expand():
                self._page(rec)
            return
        b = self._block(run.block, run.offset)
        buf = run.buf
        q0 = run.start + 8
        mv = memoryview(buf)[q0:]
        pages = list(map(getitem, repeat(mv, n), _page_slices(ps, n)))
        # A page can only be all zero if its first 8 bytes are: one unpack for the
        # run, then only those pages are compared (as bytes: comparing a
        # memoryview goes item by item, ~40 times slower).
        firsts = _first_qwords(ps, n).unpack_from(buf, q0)
        zeros = ()
        if 0 in firsts:
            zero, stride = self._zero_page, ps + 8
            zeros = {i for i, v in enumerate(firsts)
                     if not v and buf[q0 + i * stride:q0 + i * stride + ps] == zero}
        w0 = words[0]
        if not zeros and words[-1] - w0 == (n - 1) * ps and \
                words == tuple(range(w0, w0 + n * ps, ps)):
            self._pend_pages(b, w0 - run.flags, pages)
            return
        f = run.flags
        for i, (w, p) in enumerate(zip(words, pages)):
            self._page_at(b, w - f, p, i in zeros)

    def _pend_pages(self, b, addr, pages):
        """Add pages at consecutive addresses from ``addr`` (none all zero) to the pending run."""
        ps = self.page_size
        while pages:
            if self._pend_block is not b or self._pend_next != addr or not self._pend_room:
                self._flush()
                self._pend_block, self._pend_name, self._pend_start = b, b.name, addr
                self._pend_bufs = []
                self._pend_room = MAX_IOV
            k = min(self._pend_room, len(pages))
            if k == len(pages):
                self._pend_bufs += pages
            else:
                self._pend_bufs += pages[:k]
            pages = pages[k:]
            addr += k * ps
            self._pend_next = addr
            self._pend_room -= k

    def _page_at(self, b, addr, data, zero):
        """One page of a run (``zero``: its bytes are all zero); as :meth:`_page`."""
        if not zero and self._pend_block is b and addr == self._pend_next and self._pend_room:
            self._pend_bufs.append(data)
            self._pend_next = addr + self.page_size
            self._pend_room -= 1
            return
        self._flush()
        if zero:
            b.pages["page"] += 1
            if b.written[addr // self.page_size]:
                self._punch(b, addr, 1)
            return
        self._pend_block, self._pend_name, self._pend_start = b, b.name, addr
        self._pend_bufs = [data]
        self._pend_next = addr + self.page_size
        self._pend_room = MAX_IOV - 1

    def _flush(self):
        """Write the pending run of pages (one ``pwritev``)."""
        b = self._pend_block
        if b is None:
            return
        bufs, start = self._pend_bufs, self._pend_start
        self._pend_block = self._pend_name = None
        self._pend_bufs, self._pend_next, self._pend_room = [], -1, 0
        n = len(bufs)
        b.pages["page"] += n
        i = start // self.page_size
        b.written.set(i, n)
        if b.running is not None:
            b.running.wrote(start, bufs, n * self.page_size)
        w = self._writer
        if w is None:
            w = self._writer = _Writer()
        w.put(b.fd, bufs, start, n * self.page_size)

    def _drain(self):
        """Wait for the queued writes (before any other use of the files)."""
        if self._writer is not None:
            self._writer.drain()

    def _stop_writer(self):
        w, self._writer = self._writer, None
        if w is not None:
            w.close()

    def _zero(self, b, addr, count):
        if self._pend_block is b:
            self._flush()           # ``written`` covers pending pages once flushed
        i = addr // self.page_size
        if not b.written.any(i, count):
            return
        self._punch(b, addr, count)

    def _punch(self, b, addr, count):
        i = addr // self.page_size
        self._drain()
        punch_hole(b.fd, addr, count * self.page_size)
        b.written.clear(i, count)
        if b.running is not None:
            b.running.wrote(addr, None, count * self.page_size)

    def _write_other(self, b, addr, page):
        """Write one page outside the PAGE fast path (flushing the pending run first)."""
        self._flush()
        if page == self._zero_page:
            if b.written[addr // self.page_size]:
                self._punch(b, addr, 1)
            return
        self._drain()
        os.pwrite(b.fd, page, addr)
        b.written.set(addr // self.page_size)
        if b.running is not None:
            b.running.wrote(addr, [page], self.page_size)

    def _current(self, b, addr) -> bytes:
        if self._pend_block is b:
            self._flush()
        if not b.written[addr // self.page_size]:
            return self._zero_page
        self._drain()
        return os.pread(b.fd, self.page_size, addr)

    def _xbzrle(self, rec):
        b = self._block(rec.block, rec.offset)
        b.pages["xbzrle"] += 1
        head = 8 if rec.continued else 9 + len(rec.block.encode("latin-1"))
        new = xbzrle.decode(rec.data, self._current(b, rec.addr),
                            offset=None if rec.offset is None else rec.offset + head + 3)
        self._write_other(b, rec.addr, new)

    def _compressed(self, rec):
        b = self._block(rec.block, rec.offset)
        b.pages["compressed"] += 1
        page = rec.inflate(self.page_size)
        if len(page) < self.page_size:      # the rest of the page keeps what it held
            page += self._current(b, rec.addr)[len(page):]
        self._write_other(b, rec.addr, page)

    # -- mapped-ram ------------------------------------------------------------
    def _bitmap(self, rec):
        b = self._block(rec.block, rec.offset)
        pages = b.used_length // self.page_size
        import numpy as np          # mapped-ram only: not imported for the stream path
        # Host unsigned longs, little-endian on x86: bit i is byte i//8, bit i%8.
        bits = np.unpackbits(np.frombuffer(rec.data, dtype=np.uint8), bitorder="little")
        self._mr_bits[rec.block] = bits[:pages].astype(bool)

    def _mapped_pages(self, rec):
        b = self._block(rec.block, rec.offset)
        ps = self.page_size
        if rec.start % ps or rec.length % ps:
            raise StreamError("mapped-ram page area piece not page aligned", rec.offset,
                              section="ram", found=f"start {rec.start} length {rec.length}")
        bits = self._mr_bits.get(rec.block)
        if bits is None:
            raise StreamError(f"mapped-ram pages of block {rec.block!r} before its bitmap",
                              rec.offset, section="ram")
        first = rec.start // ps
        sel = bits[first:first + rec.length // ps]
        n = int(sel.sum())
        if not n:
            return
        b.pages["mapped_ram"] += n
        if rec.data is None:
            for s, e in _runs(sel):
                self._zero(b, (first + s) * ps, e - s)
            return
        self._flush()
        self._drain()
        mv = memoryview(rec.data)
        for s, e in _runs(sel):
            piece = mv[s * ps:e * ps]
            if len(piece) <= len(_ZERO_CHUNK) and piece == _ZERO_CHUNK[:len(piece)]:
                self._zero(b, (first + s) * ps, e - s)
                continue
            os.pwrite(b.fd, piece, rec.start + s * ps)
            b.written.set(first + s, e - s)
            if b.running is not None:
                b.running.wrote(rec.start + s * ps, [bytes(piece)], len(piece))

    # -- end ---------------------------------------------------------------------
    def close(self, finish: bool = True):
        """Write what is pending, finish the running hashes, close the files.

        ``finish=False`` (after an error) only stops the hashing thread and
        closes the files.
        """
        if not finish:
            self._stop_writer()
            if self._hasher is not None:
                h, self._hasher = self._hasher, None
                h.close()
            for x in (*self.blocks.values(), *self.channels):
                x.close()
            wait_removed()
            return
        try:
            if self.channels and not self.stopped:
                self._apply_channels()
            self._flush()
            self._drain()
            if self._hasher is not None:
                for b in self.blocks.values():
                    r = b.running
                    if r is not None and r.valid:
                        r.wrote(b.used_length, None, 0)
                        r.send()
                h, self._hasher = self._hasher, None
                h.close()
                for b in self.blocks.values():
                    r, b.running = b.running, None
                    if r is not None and r.valid and r.cursor == b.used_length:
                        b.sha256 = r.h.hexdigest()
        finally:
            self._stop_writer()                   # before the files are closed
            if self._hasher is not None:          # an error above: stop the thread
                h, self._hasher = self._hasher, None
                h.close()
            for x in (*self.blocks.values(), *self.channels):
                x.close()
            wait_removed()

    def iterations(self) -> dict:
        """Which RAM sections were applied: setup, how many PARTs, END, the last one."""
        return {"setup": self.setup_seen, "parts": self.parts, "end": self.end_seen,
                "last_applied": self.last_iteration, "stopped_early": self.stopped}


_PAGE_SLICES = {}


def _page_slices(ps, n):
    """Slices of ``n`` pages ``ps + 8`` bytes apart (a run's pages from its first page)."""
    sl = _PAGE_SLICES.get((ps, n))
    if sl is None:
        stride = ps + 8
        sl = _PAGE_SLICES[(ps, n)] = tuple(slice(q, q + ps) for q in range(0, n * stride, stride))
    return sl


_FIRST_QWORDS = {}


def _first_qwords(ps, n):
    """A struct reading the first 8 bytes of each of ``n`` pages ``ps + 8`` bytes apart."""
    st = _FIRST_QWORDS.get((ps, n))
    if st is None:
        st = _FIRST_QWORDS[(ps, n)] = struct.Struct("=" + ("Q%dx" % ps) * (n - 1) + "Q")
    return st


def _runs(mask):
    """``(start, end)`` of each run of True in a bool array."""
    import numpy as np
    m = np.concatenate(([False], np.asarray(mask, dtype=bool), [False]))
    d = np.flatnonzero(m[1:] != m[:-1])
    return list(zip(d[0::2].tolist(), d[1::2].tolist()))


# -- guest-physical view (pc, q35) ---------------------------------------------------

GiB = 1 << 30
#: pc_memory_init (hw/i386/pc.c): with an AMD vCPU on a 7.1+ machine type, RAM
#: above 4G moves to 1 TiB once the highest used address reaches this.
AMD_HT_START = 0xfd00000000
_PC_OLD = re.compile(r"^pc-i440fx-(\d+)\.(\d+)$")


def ram_split(machine: str, ram_size: int, *, machine_type: str | None = None,
              max_ram_below_4g: int | None = None) -> tuple:
    """``(below_4g_mem_size, above_4g_mem_size)`` as QEMU 7.2 computes them.

    ``machine`` is ``pc`` (``pc_init1``, hw/i386/pc_piix.c lines 133-157) or
    ``q35`` (``pc_q35_init``, hw/i386/pc_q35.c lines 150-180); ``machine_type``
    the versioned name from the stream's configuration (pc machine types up to
    ``pc-i440fx-1.7`` have ``gigabyte_align`` false, pc_piix.c line 810);
    ``max_ram_below_4g`` the machine property (not in the stream; QEMU's
    default when None).
    """
    if machine == "pc":
        limit = max_ram_below_4g or 0xe0000000
        lowmem = limit
        if ram_size >= limit and _gigabyte_align(machine_type):
            lowmem = min(lowmem, 0xc0000000)
    elif machine == "q35":
        lowmem = 0x80000000 if ram_size >= 0xb0000000 else 0xb0000000
        limit = max_ram_below_4g or 4 * GiB
        lowmem = min(lowmem, limit)
    else:
        raise ValueError(f"no physical layout for machine {machine!r} (pc or q35)")
    if ram_size >= lowmem:
        return lowmem, ram_size - lowmem
    return ram_size, 0


def _gigabyte_align(machine_type) -> bool:
    m = _PC_OLD.match(machine_type or "")
    return not (m and (int(m.group(1)), int(m.group(2))) <= (1, 7))


def physical_map(machine: str, ram_size: int, **kw) -> list:
    """The pieces of the main RAM block in guest-physical space.

    ``[{"gpa", "block_offset", "length", "region"}]``: ``ram-below-4g`` maps
    block offset 0 at address 0, ``ram-above-4g`` maps the rest at 4 GiB
    (``pc_memory_init``, hw/i386/pc.c lines 992-1008; ``above_4g_mem_start``
    is 4 GiB, hw/i386/x86.c line 1434).
    """
    below, above = ram_split(machine, ram_size, **kw)
    out = [{"region": "ram-below-4g", "gpa": 0, "block_offset": 0, "length": below}]
    if above:
        out.append({"region": "ram-above-4g", "gpa": 4 * GiB, "block_offset": below,
                    "length": above})
    return out


def write_physical(block_path: str, out_path: str, pieces: list) -> int:
    """Write the sparse guest-physical image; return its size."""
    size = max(p["gpa"] + p["length"] for p in pieces)
    src = os.open(block_path, os.O_RDONLY)
    dst = create_file(out_path)
    try:
        os.ftruncate(dst, size)
        for p in pieces:
            lo, hi = p["block_offset"], p["block_offset"] + p["length"]
            delta = p["gpa"] - lo
            for s, e in data_ranges(src, lo, hi):
                _copy_range(src, dst, s, s + delta, e - s)
    finally:
        os.close(src)
        os.close(dst)
        wait_removed()
    return size


def _copy_range(src, dst, soff, doff, n):
    while n:
        k = min(n, 8 << 20)
        chunk = os.pread(src, k, soff)
        if not chunk:
            break
        os.pwrite(dst, chunk, doff)
        soff += len(chunk)
        doff += len(chunk)
        n -= len(chunk)


# -- one call ----------------------------------------------------------------------

def replay(stream, outdir: str, *, until_iteration: int | None = None, reserved=(),
           on_record=None, hash: bool = True, channels=(), **reader_options) -> tuple:
    """Read ``stream`` and replay its RAM into ``outdir``.

    Returns ``(memory, reader)``; ``memory`` is closed.  ``on_record(rec)`` is
    called for every record read (the diff collects device state through it);
    without it reading stops as soon as the wanted iterations are applied.
    Runs of PAGE records come as :class:`RamPageRun` unless ``page_runs=False``.
    """
    reader_options.setdefault("page_runs", True)
    reader = StreamReader(stream, **reader_options)
    mem = None
    try:
        for rec in reader.records():
            if mem is None and isinstance(rec, SectionHeader):
                # The reader knows the target page size once sections start.
                mem = GuestMemory(outdir, page_size=reader.page_size,
                                  until_iteration=until_iteration, reserved=reserved,
                                  hash=hash)
                for c in channels:
                    mem.add_channel(MultifdChannel(c, reader.page_size))
            more = mem.feed(rec) if mem is not None else True
            if on_record is not None:
                on_record(rec)
            elif not more:
                break
    except BaseException:
        if mem is not None:
            mem.close(finish=False)
        raise
    if mem is not None:
        mem.close()
    if mem is None:
        mem = GuestMemory(outdir, until_iteration=until_iteration, reserved=reserved,
                          hash=False)
    return mem, reader


def extract(stream, outdir: str, *, until_iteration: int | None = None,
            physical: str | None = None, max_ram_below_4g: int | None = None,
            hash: bool = True, channels=()) -> dict:
    """Extract every RAM block of ``stream`` into ``outdir``; return the manifest.

    Writes one sparse file per block (names from :func:`safe_file_names`),
    ``physical.img`` when ``physical`` is ``pc`` or ``q35``, and
    ``manifest.json``.  ``channels``: recorded multifd channel files whose
    pages are applied too (see :class:`MultifdChannel`).
    """
    if physical not in (None, "pc", "q35"):
        raise ValueError("physical must be None, 'pc' or 'q35'")
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as e:
        raise ExtractError(f"cannot create {outdir}: {e.strerror}") from None
    mem, reader = replay(stream, outdir, until_iteration=until_iteration, hash=hash,
                         channels=channels)
    cfg = reader.configuration
    machine_type = cfg.machine.decode("latin-1") if cfg is not None else None
    manifest = {
        "format": "qmigstream-ram-extract/1",
        "stream": stream if isinstance(stream, str) else None,
        "machine_type": machine_type,
        "page_size": mem.page_size,
        "until_iteration": until_iteration,
        "iterations": mem.iterations(),
        "blocks": [b.to_json(hash) for b in mem.blocks.values()],
    }
    notes = _notes(reader, mem, channels)
    if notes:
        manifest["notes"] = notes
    if physical:
        manifest["physical"] = _physical(mem, outdir, physical, machine_type,
                                         max_ram_below_4g, hash)
    tmp = os.path.join(outdir, ".manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(outdir, "manifest.json"))
    return manifest


def _notes(reader, mem, channels) -> list:
    """What the stream itself says is missing from the extracted memory."""
    out = []
    if "x-ignore-shared" in reader.capabilities:
        out.append("x-ignore-shared: blocks backed by shared memory are not sent; "
                   "their files hold only what the stream carries (zeros)")
    if mem.multifd_flushes and not channels:
        out.append("the stream has MULTIFD_FLUSH records: with multifd the normal pages "
                   "travel on the channels (give them with --multifd)")
    return out


def _physical(mem, outdir, machine, machine_type, max_below, hash):
    b = mem.blocks.get("pc.ram")
    if b is None:
        raise ExtractError(f"--physical {machine}: the stream has no RAM block 'pc.ram' "
                           f"(blocks: {', '.join(mem.blocks) or 'none'})")
    pieces = physical_map(machine, b.used_length, machine_type=machine_type,
                          max_ram_below_4g=max_below)
    out = os.path.join(outdir, "physical.img")
    size = write_physical(b.path, out, pieces)
    d = {"file": "physical.img", "machine": machine, "block": "pc.ram", "size": size,
         "max_ram_below_4g": max_below, "map": pieces}
    if 4 * GiB + b.used_length + 64 * GiB >= AMD_HT_START:     # the PCI hole64 comes on top
        d["note"] = ("with an AMD vCPU on a 7.1+ machine type QEMU would place RAM above 4G "
                     "at 1 TiB instead (pc_memory_init); this image uses 4 GiB")
    if hash:
        d["sha256"] = sha256_file(out, size)
    return d
