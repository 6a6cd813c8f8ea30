"""Pages placed on a backing (RamBlock.place): read where they lie, the same as
copied pages for every reader, copied in on the first write; a mapped stream
file as the window of the reader and the backing of replay's RAM."""

import os
import random
import zlib

import pytest

from qmigstream.codec.reader import read_records
from qmigstream.codec.source import MappedFile, open_mapped
from qmigstream.pipeline.guest import (RAM_DIGESTS, GuestRam, fill_initial, load_stream_ram,
                                       tape)
from qmigstream.pipeline.migrate import MigrateConfig, migrate
from qmigstream.pipeline.ramsave import RamSaver
from qmigstream.pipeline.replay import replay

PS = 4096


def _copied_twin(blk):
    """A block of the same size holding blk's bytes, all copied (nothing placed)."""
    twin = GuestRam([(blk.name, blk.used_length)]).main
    for first, count in blk.nonzero_runs():
        twin.write(first * PS, blk.read(first * PS, count * PS), dirty=False)
    return twin


def _same_everywhere(blk, twin):
    """Every way of reading the block agrees with its copied twin."""
    assert list(blk.nonzero_runs()) == list(twin.nonzero_runs())
    for scheme in RAM_DIGESTS:
        assert blk.digest(scheme) == twin.digest(scheme), scheme
    for i in range(0, blk.npages, 7):
        assert bytes(blk.page(i)) == bytes(twin.page(i)), i
        assert blk.page_is_zero(i) == twin.page_is_zero(i)
    assert blk.read(PS - 3, 2 * PS + 6) == twin.read(PS - 3, 2 * PS + 6)
    assert b"".join(blk.page_pieces(0, blk.npages)) == bytes(twin.anon)
    assert blk.crc32(0, blk.npages) == zlib.crc32(twin.anon)


def test_placed_pages_read_like_copied_ones():
    ram = GuestRam([("pc.ram", 512 * PS)])
    blk = ram.main
    rnd = random.Random(7)
    backing = bytes(rnd.getrandbits(8) for _ in range(64 * PS + 123))
    uniform = b"\x5a" * PS
    zero = bytes(PS)
    blk.place(10, 40, backing, 5, PS)                  # contiguous, unaligned offset
    blk.place(60, 30, backing, 0, PS + 8)              # strided, like a stream's pages
    blk.place(100, 16, uniform, 0, 0)                  # one page for all
    blk.place(120, 3, zero, 0, 0)                      # placed zero pages
    blk.place(30, 40, backing, 1000, PS + 16)          # over the ends of two runs
    assert blk.placed == 80 + 16 + 3                  # pages 10..89, 100..115, 120..122
    assert blk.placed == blk.onback.count(1)
    twin = GuestRam([("pc.ram", 512 * PS)]).main
    # the same bytes, copied
    for first, count, off, stride in ((10, 40, 5, PS), (60, 30, 0, PS + 8)):
        for k in range(count):
            o = off + k * stride
            twin.write((first + k) * PS, backing[o:o + PS], dirty=False)
    for k in range(16):
        twin.write((100 + k) * PS, uniform, dirty=False)
    for k in range(3):
        twin.write((120 + k) * PS, zero, dirty=False)
    for k in range(40):
        o = 1000 + k * (PS + 16)
        twin.write((30 + k) * PS, backing[o:o + PS], dirty=False)
    _same_everywhere(blk, twin)
    assert blk.zero_pages(0, 512) == twin.zero_pages(0, 512)


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_indexed_backings_with_and_without_a_zero_page(kind):
    """A backing placed with index=True is searched once for a page of zeros; the
    zero check skips its pages only where it holds none.  Zero pages lying on a
    backing that has one (at a page's or any other offset) are found, and the
    pages-crc32 digest is the one of the same bytes copied."""
    rnd = random.Random(11)
    noise = bytes(rnd.randrange(1, 256) for _ in range(8 * PS))
    holed = kind(noise[:3 * PS + 17] + bytes(PS + 5) + noise[3 * PS + 17:])
    for backing, zeros in ((kind(noise), []), (holed, [203])):
        ram = GuestRam([("pc.ram", 256 * PS)])
        blk = ram.main
        blk.place(200, 6, backing, 0, PS, index=True)
        blk.place(203, 1, backing, 3 * PS + 17, PS, index=True)   # the zeros, if any
        assert blk.zero_pages(200, 206) == zeros
        twin = GuestRam([("pc.ram", 256 * PS)])
        for i in range(200, 206):
            twin.main.write(i * PS, bytes(blk.page(i)), dirty=False)
        assert twin.main.zero_pages(200, 206) == zeros
        assert ram.digests() == twin.digests()
        assert list(blk.nonzero_runs()) == list(twin.main.nonzero_runs())


def test_writes_copy_a_placed_page_in_first():
    ram = GuestRam([("pc.ram", 64 * PS)])
    blk = ram.main
    backing = os.urandom(32 * PS)
    blk.place(0, 32, backing, 0, PS)
    twin = _copied_twin(blk)
    before = blk.placed
    for r in (blk, twin):
        r.write(3 * PS + 100, b"hello")                # partial: the rest is kept
        r.write(5 * PS, b"\x01" * PS)                  # whole page
        r.write(7 * PS - 2, b"abcd")                   # across two pages
    assert blk.placed == before - 4
    assert not blk.onback[3] and not blk.onback[5] and not blk.onback[6]
    assert blk.dirty[3] and blk.dirty[6]               # guest stores make pages dirty
    _same_everywhere(blk, twin)
    # the whole-memory views copy every placed page in first
    m = bytes(blk.mem)
    assert blk.placed == 0 and m == bytes(twin.anon)


def test_fill_initial_places_the_tape_and_saves_the_same_bytes():
    """The initial fill costs no memory (pages placed on the tape) and saves as the
    same records as the same pages copied."""
    a = GuestRam([("pc.ram", 16 << 20)])
    fill_initial(a, seed=5)
    assert a.main.placed > 0 and a.main.placed == a.main.written.count(1)
    b = GuestRam([("pc.ram", 16 << 20)])
    fill_initial(b, seed=5)
    b.main.materialize()
    assert b.main.placed == 0
    _same_everywhere(a.main, b.main)
    tp = tape(5)
    first = next(a.main.nonzero_runs())[0]
    pos = first * PS % len(tp)
    assert bytes(a.main.page(first)) == (tp + tp)[pos:pos + PS]
    sa, sb = RamSaver(a), RamSaver(b)
    assert b"".join(b"".join(p) for p in sa.pass_bytes()) == \
        b"".join(b"".join(p) for p in sb.pass_bytes())


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("placement")
    path = d / "s.mig"
    res = migrate(path, MigrateConfig(profile="qemu-8.2", ram_size=16 << 20, iterations=2,
                                      dirty_rate=30000, seed=4, stream_sha256=True))
    return path, res.to_json()


def test_a_mapped_file_reads_as_the_same_records(stream):
    stream, _ = stream
    src = open_mapped(stream)
    assert isinstance(src._buf, MappedFile)
    plain = [(type(r).__name__, r.offset) for r in read_records(str(stream))]
    mapped = [(type(r).__name__, r.offset) for r in read_records(src)]
    assert plain == mapped and len(plain) > 100
    assert open_mapped(stream.parent / "absent.mig") is None
    empty = stream.parent / "empty.mig"
    empty.write_bytes(b"")
    assert open_mapped(empty) is None


def test_replay_places_the_pages_of_a_mapped_stream(stream):
    """Mapped or read, replay restores the same RAM and verifies it; mapped, the
    RAM model's pages lie in the file."""
    stream, expect = stream
    a = replay(str(stream), expect=expect)
    b = replay(str(stream), expect=expect, map_file=False)
    assert a.ok and b.ok and a.verified and b.verified
    assert a.ram == b.ram and a.pages == b.pages
    from qmigstream.codec.ram_records import RamMemSize, RamPageRun
    from qmigstream.pipeline.guest import RamLoader
    ram = loader = None
    runs = 0
    for rec in read_records(open_mapped(stream), page_runs=True):
        if isinstance(rec, RamMemSize):
            ram = GuestRam([(b.name, b.used_length) for b in rec.blocks])
            loader = RamLoader(ram)
        elif loader is not None:
            loader.feed(rec)
            runs += isinstance(rec, RamPageRun)
    assert runs and ram.main.placed > 0
    copied = load_stream_ram(stream)
    assert ram.digests() == copied.digests()
    assert ram.digests("sha256") == copied.digests("sha256")


def test_a_run_placed_inside_another_keeps_the_older_run_after_it():
    """A later run over part of an older one, with a page written (copied in) right
    after it: the older run's pages past the gap still read from their place."""
    backing = os.urandom(128 * PS)
    for gap in (0, 1, 3):
        ram = GuestRam([("pc.ram", 128 * PS)])
        blk = ram.main
        blk.place(10, 60, backing, 0, PS)
        for k in range(gap):                             # copied in: no longer placed
            blk.write((22 + k) * PS, b"\x02" * PS, dirty=False)
        blk.place(20, 2, backing, 90 * PS, PS + 8)
        twin = GuestRam([("pc.ram", 128 * PS)]).main
        twin.write(10 * PS, backing[:60 * PS], dirty=False)
        for k in range(gap):
            twin.write((22 + k) * PS, b"\x02" * PS, dirty=False)
        for k in range(2):
            o = 90 * PS + k * (PS + 8)
            twin.write((20 + k) * PS, backing[o:o + PS], dirty=False)
        _same_everywhere(blk, twin)


def test_a_page_record_inside_a_run_that_names_another_page_lands_there(tmp_path):
    """A run of PAGE records whose first and last addresses are consecutive but one
    in the middle names another page (a damaged or hostile stream): that page's
    data goes where its record says, whether the stream is mapped, read in
    windows, or loaded record by record (a run was once judged by its ends)."""
    import struct
    from qmigstream.pipeline.guest import RamLoader
    path = tmp_path / "a.mig"
    migrate(path, MigrateConfig(profile="qemu-8.2", ram_size=8 << 20, iterations=1, seed=2,
                                devices=[]))
    data = bytearray(path.read_bytes())
    run = next(r for r in read_records(str(path), page_runs=True)
               if type(r).__name__ == "RamPageRun" and len(r.words) > 20)
    k = len(run.words) // 2
    at = run.offset + k * (PS + 8)                  # the k-th record's header word
    (word,) = struct.unpack_from(">Q", data, at)
    moved = word & ~(PS - 1) & 0xFFFFFFFFFFFF       # its page's address
    payload = bytes(data[at + 8:at + 8 + PS])
    struct.pack_into(">Q", data, at, word & (PS - 1))     # same flags, address 0
    path.write_bytes(bytes(data))
    per_record = GuestRam([("pc.ram", 8 << 20)])
    loader = RamLoader(per_record)
    seen_block = False
    for rec in read_records(str(path)):
        if type(rec).__name__ == "RamMemSize":
            seen_block = True
            continue
        if seen_block and type(rec) in RamLoader._dispatch:
            loader.feed(rec)
    assert per_record.main.read(0, PS) == payload
    want = per_record.digests()
    for kw in ({}, {"map_file": False}):
        got = replay(str(path), **kw)
        assert got.ok, got.error
        assert got.ram == want, kw
    assert moved != 0
