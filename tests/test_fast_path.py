"""The RAM fast path is an optimisation of the schema path: equal record by record.

``qmigstream.codec.sections.ram`` parses RAM records two ways: the construct
schemas (``fast=False``) and a memoryview/struct walk with bulk compares for
ZERO runs (the default).  These tests build streams with every RAM record kind
and check both give the same records (type, offset, fields, bytes), that a
record's ``size`` is the length of its encoding, and that the bulk run check
answers exactly what a record-by-record loop answers.
"""

from __future__ import annotations

import io
import struct

import pytest

from qmigstream.codec.build import StreamBuilder
from qmigstream.codec.ram_records import (RamCompressed, RamEos, RamHook, RamMultifdFlush,
                                          RamPage, RamZero, RamZeroRun)
from qmigstream.codec.reader import StreamReader, read_records
from qmigstream.codec.sections.ram import _zero_run
from qmigstream.codec.source import Source
from qmigstream.codec.writer import encode_records, record_chunks
from qmigstream.summary import StreamSummary
from qmigstream.wire.header import SectionType as T
from qmigstream.wire.ram import RamFlag

ZC = int(RamFlag.ZERO | RamFlag.CONTINUE)


def _ram_stream_start(ps, blocks):
    """A builder past the header, the configuration and the RAM setup section."""
    b = StreamBuilder(page_size=ps)
    b.header()
    b.configuration("pc-i440fx-7.2", target_page_bits=ps.bit_length() - 1)
    b.section(T.SECTION_START, "ram", b.ram_setup_records(blocks), version_id=4)
    return b


def every_kind_stream(ps=4096, run=300):
    """Header, configuration, MEM_SIZE, then every RAM record kind over three blocks,
    with long ZERO runs broken in every way a run can end."""
    b = _ram_stream_start(ps, [("pc.ram", 4 * run * ps), ("pc.rom", 8 * ps),
                               ("/rom@etc/acpi/tables", 4 * ps)])
    recs = []
    page = lambda blk, i, v: b.ram_page_record(blk, i * ps, bytes([v]) * ps)  # noqa: E731
    zero = lambda blk, i: b.ram_page_record(blk, i * ps, zero=True)  # noqa: E731
    recs += [zero("pc.ram", i) for i in range(run)]                  # a long run
    recs.append(page("pc.ram", run, 7))                              # ended by a PAGE
    recs += [zero("pc.ram", i) for i in range(run + 1, 2 * run)]
    recs += [zero("pc.ram", i) for i in range(2 * run + 5, 3 * run)]  # a gap in addresses
    recs.append(zero("pc.rom", 0))                                   # block change
    recs += [zero("pc.rom", i) for i in range(1, 8)]                 # run to the block end
    recs.append(page("pc.rom", 3, 1))
    recs.append(RamZero("pc.rom", 4 * ps, ZC, 0x5a))                 # fill byte not 0
    recs.append(RamZero("pc.rom", 5 * ps, ZC, 0))
    recs.append(b.ram_page_record("/rom@etc/acpi/tables", 0, xbzrle=b"\x01\x02\x03"))
    b.last_block = "/rom@etc/acpi/tables"
    recs.append(RamCompressed("/rom@etc/acpi/tables", ps, b"x\x9c\x03\x00",
                              RamFlag.COMPRESS_PAGE | RamFlag.CONTINUE))
    recs.append(RamMultifdFlush())
    recs.append(zero("/rom@etc/acpi/tables", 2))
    recs.append(RamHook())
    recs.append(zero("/rom@etc/acpi/tables", 3))
    recs += [zero("pc.ram", i) for i in range(3 * run, 4 * run)]
    recs.append(RamEos())
    b.section(T.SECTION_PART, "ram", recs)
    # CONTINUE carries across sections; a run starts the next section.
    b.section(T.SECTION_PART, "ram", [RamZero("pc.ram", 0, ZC), RamZero("pc.ram", ps, ZC),
                                      RamPage("pc.ram", 2 * ps, bytes(ps), RamFlag.PAGE | RamFlag.CONTINUE),
                                      RamEos()])
    b.section(T.SECTION_END, "ram", [RamEos()])
    b.eof()
    return b.encode()


def key(r):
    return (type(r).__name__, r.offset, r.depth, r.fields(), r.encode())


def flat(recs):
    for r in recs:
        if isinstance(r, RamZeroRun):
            yield from r.expand()
        else:
            yield r


@pytest.mark.parametrize("ps", [1024, 4096, 16384, 65536])
def test_fast_and_schema_paths_agree_on_every_record_kind(ps):
    data = every_kind_stream(ps)
    schema = list(read_records(data, fast=False, compact=False))
    kinds = {r.kind for r in schema}
    assert {"ram_mem_size", "ram_zero", "ram_page", "ram_xbzrle", "ram_compressed",
            "ram_multifd_flush", "ram_hook", "ram_eos"} <= kinds
    fast = list(read_records(data, compact=False))
    assert [key(r) for r in fast] == [key(r) for r in schema]
    compact = list(read_records(data))
    assert any(isinstance(r, RamZeroRun) and r.count > 100 for r in compact)
    assert [key(r) for r in flat(compact)] == [key(r) for r in schema]
    assert encode_records(compact) == data
    for r in schema + compact:
        assert r.size == len(r.encode()), r
        assert b"".join(bytes(p) for p in record_chunks(r)) == r.encode()
    # The same through small read chunks (records straddle the window's end).
    for chunk in (9, 4099, 65536 + 3):
        got = StreamReader(Source(io.BytesIO(data), chunk=chunk), compact=False).records()
        assert [key(r) for r in got] == [key(r) for r in schema]


def test_summary_counts_runs_as_their_records():
    data = every_kind_stream()
    a, b = StreamSummary(), StreamSummary()
    for r in read_records(data):
        a.feed(r)
    for r in read_records(data, fast=False, compact=False):
        b.feed(r)
    assert a.to_json() == b.to_json()
    assert a.to_json()["ram"]["pages"]["zero"] > 1000


def naive_run(buf, pos, end, word, ps, block_len):
    n = 0
    while pos + 9 * (n + 1) <= end and (word & ~(ps - 1)) + n * ps < block_len:
        w, f = struct.unpack_from(">QB", buf, pos + 9 * n)
        if w != word + n * ps or f != 0:
            break
        n += 1
    return n


@pytest.mark.parametrize("ps", [1024, 4096, 16384, 65536, 1 << 21])
@pytest.mark.parametrize("first_page", [0, 5, 255, 4090, 16380, (1 << 20) - 7, (1 << 33) + 11])
def test_bulk_zero_run_check_equals_the_record_loop(ps, first_page):
    count = 9000
    word = first_page * ps | ZC
    rec = struct.Struct(">" + "QB" * count)
    base = bytearray(rec.pack(*[x for i in range(count) for x in (word + i * ps, 0)]))
    big_len = (first_page + count) * ps
    assert _zero_run(bytes(base), 0, len(base), word, ps, big_len) == count
    # Break the run at many places, in every way, and with every limit.
    for at in (1, 15, 16, 17, 255, 256, 257, 4095, 4096, 4097, 5000, count - 1):
        for how in ("fill", "flag", "addr", "high", "low"):
            buf = bytearray(base)
            o = 9 * at
            if how == "fill":
                buf[o + 8] = 1
            elif how == "flag":
                buf[o + 7] ^= 0x08
            elif how == "addr":
                buf[o:o + 8] = struct.pack(">Q", word + (at + 1) * ps)
            elif how == "high":
                buf[o] ^= 0x80
            else:
                buf[o + 5] ^= 0x01
            buf = bytes(buf)
            assert _zero_run(buf, 0, len(buf), word, ps, big_len) == at
        for end_page in (first_page + at, first_page + at + 1):
            assert _zero_run(bytes(base), 0, len(base), word, ps, end_page * ps) == \
                naive_run(base, 0, len(base), word, ps, end_page * ps)
    # A window that ends inside a record, and a run that starts mid-buffer.
    assert _zero_run(bytes(base), 0, 9 * 4100 + 4, word, ps, big_len) == 4100
    w2 = word + 3 * ps
    assert _zero_run(bytes(base), 27, len(base), w2, ps, big_len) == count - 3


@pytest.mark.parametrize("ps", [1024, 4096, 16384, 65536, 1 << 21])
@pytest.mark.parametrize("first_page", [0, 3, 255, 4090, (1 << 20) - 7, (1 << 33) + 11])
def test_zero_run_bytes_equals_packing_each_record(ps, first_page):
    from qmigstream.codec.ram_records import zero_run_bytes
    for count in (1, 2, 300, 5000):
        for flags in (ZC, int(RamFlag.ZERO)):
            addr = first_page * ps
            want = b"".join(struct.pack(">QB", (addr + i * ps) | flags, 0) for i in range(count))
            assert zero_run_bytes(addr, flags, count, ps) == want
            run = RamZeroRun("pc.ram", addr, count, ps, flags)
            assert run.encode() == want and run.size == len(want)
    # Not page aligned or flags above the page size: the plain loop.
    assert zero_run_bytes(5, ZC, 3, 4096) == b"".join(
        struct.pack(">QB", (5 + i * 4096) | ZC, 0) for i in range(3))


@pytest.mark.parametrize("batch", [1000, 4096, 1 << 22])
@pytest.mark.parametrize("change", ["none", "early", "late", "longer", "shorter"])
def test_batched_roundtrip_reports_what_a_record_by_record_compare_reports(
        tmp_path, monkeypatch, batch, change):
    import hashlib
    from qmigstream.cli import cmd_roundtrip
    data = every_kind_stream(run=100)
    other = bytearray(data)
    if change == "early":
        other[20] ^= 1
    elif change == "late":
        other[len(data) - 3000] ^= 1
    elif change == "longer":
        other += b"\x00\x01\x02"
    elif change == "shorter":
        del other[-2:]
    path = tmp_path / "orig.mig"
    path.write_bytes(bytes(other))

    class Reader:                     # the records of `data`, compared with `other`
        def __init__(self, _path, **_options):
            pass

        def records(self):
            return read_records(data)
    monkeypatch.setattr(cmd_roundtrip, "StreamReader", Reader)
    monkeypatch.setattr(cmd_roundtrip, "BATCH", batch)
    out = tmp_path / "out.mig"
    got = cmd_roundtrip.roundtrip(str(path), str(out))
    diff = next((i for i, (x, y) in enumerate(zip(other, data)) if x != y), None)
    if diff is None and len(other) != len(data):
        diff = min(len(other), len(data))
    n_in = len(data) + max(0, len(other) - len(data))
    assert got == (diff is None, hashlib.sha256(other).hexdigest(),
                   hashlib.sha256(data).hexdigest(), diff, n_in, len(data))
    assert out.read_bytes() == data
    # --no-sha256: the same answer without the digests
    assert cmd_roundtrip.roundtrip(str(path), sha256=False) == \
        (diff is None, None, None, diff, n_in, len(data))


def test_decode_verify_reads_every_payload_byte(tmp_path, capsys):
    import zlib
    from qmigstream.cli import main
    data = every_kind_stream(run=100)
    path = tmp_path / "s.mig"
    path.write_bytes(data)
    assert main(["decode", "--verify", "--crc", str(path)]) == 0
    out = capsys.readouterr().out
    recs = list(read_records(data, page_runs=True))
    payload = b"".join(bytes(r.data) for r in read_records(data)
                       if getattr(r, "data", None) is not None)
    assert f"verified: {len(data):,} bytes in {len(recs):,} records" in out
    assert f"payload:  {len(payload):,} bytes read, CRC-32 0x{zlib.crc32(payload):08x}" in out
    assert main(["decode", "--verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"payload:  {len(payload):,} bytes read\n" in out and "CRC" not in out
    zeros = sum(r.count for r in recs if isinstance(r, RamZeroRun))
    assert f"({zeros:,} ZERO records)" in out


def test_file_source_windows_equal_the_joined_windows(tmp_path):
    """A file Source re-reads the window's unread tail with the next chunk instead of
    joining; the records are the same whatever the chunk size."""
    data = every_kind_stream(run=200)
    path = tmp_path / "s.mig"
    path.write_bytes(data)
    ref = [key(r) for r in read_records(data, fast=False, compact=False)]
    for chunk in (9, 100, 4099, 65536 + 3, 1 << 20):
        with open(path, "rb", buffering=0) as f:
            got = StreamReader(Source(f, chunk=chunk), compact=False).records()
            assert [key(r) for r in got] == ref
        with open(path, "rb", buffering=0) as f:
            assert encode_records(StreamReader(Source(f, chunk=chunk)).records()) == data


def test_file_source_keeps_the_bytes_it_read_when_the_file_changes(tmp_path):
    data = bytes(range(256)) * 100
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb", buffering=0) as f:
        src = Source(f, chunk=1000)
        assert src.read(900) == data[:900]
        with open(path, "r+b") as w:          # rewrite bytes already buffered
            w.seek(900)
            w.write(b"\xff" * 100)
        assert src.read(200) == data[900:1100]
        assert src.read(5000) == data[1100:6100]


# --- runs of PAGE records (page_runs=True) ------------------------------------------

def page_heavy_stream(ps=4096, n=700):
    """Long runs of PAGE|CONTINUE records broken in every way a run can end."""
    b = _ram_stream_start(ps, [("pc.ram", 4 * n * ps), ("pc.rom", 8 * ps)])
    page = lambda blk, i: b.ram_page_record(blk, i * ps, bytes([i % 251 + 1]) * ps)  # noqa: E731
    zero = lambda blk, i: b.ram_page_record(blk, i * ps, zero=True)  # noqa: E731
    recs = [page("pc.ram", i) for i in range(n)]                     # more than a window
    recs.append(zero("pc.ram", n))                                   # ended by a ZERO
    recs += [page("pc.ram", i) for i in range(3 * n, 2 * n, -1)]     # addresses going down
    recs.append(page("pc.rom", 0))                                   # block change (named)
    recs += [page("pc.rom", i) for i in range(1, 8)]                 # run to the block end
    recs.append(RamPage("pc.ram", 5 * ps, bytes(ps), RamFlag.PAGE))  # named, no CONTINUE
    recs.append(RamPage("pc.ram", 6 * ps, bytes(ps), RamFlag.PAGE | RamFlag.CONTINUE))
    recs.append(RamMultifdFlush())
    recs += [page("pc.ram", i) for i in range(40)]
    recs.append(RamEos())
    b.section(T.SECTION_PART, "ram", recs)
    b.section(T.SECTION_PART, "ram", [page("pc.ram", i) for i in range(3)] + [RamEos()])
    b.section(T.SECTION_END, "ram", [RamEos()])
    b.eof()
    return b.encode()


def flat_runs(recs):
    from qmigstream.codec.ram_records import RamPageRun
    for r in recs:
        if isinstance(r, RamPageRun):
            yield from r.expand()
        else:
            yield r


@pytest.mark.parametrize("ps", [1024, 4096, 65536])
def test_page_runs_are_the_page_records(ps):
    from qmigstream.codec.ram_records import RamPageRun
    for data in (page_heavy_stream(ps, n=300 if ps == 65536 else 700), every_kind_stream(ps)):
        ref = [key(r) for r in read_records(data, compact=False)]
        for chunk in (4099, 65536 + 3, 1 << 20):
            got = list(StreamReader(Source(io.BytesIO(data), chunk=chunk),
                                    compact=False, page_runs=True).records())
            assert [key(r) for r in flat_runs(got)] == ref
            assert encode_records(got) == data
            for r in got:
                assert r.size == len(r.encode())
                assert b"".join(bytes(p) for p in record_chunks(r)) == r.encode()
        runs = [r for r in read_records(data, page_runs=True) if isinstance(r, RamPageRun)]
        for r in runs:
            assert [bytes(p) for p in r.pages()] == [bytes(r.page(i)) for i in range(r.count)]
            assert [p.data for p in r.expand()] == [bytes(p) for p in r.pages()]
    runs = [r for r in read_records(page_heavy_stream(ps, n=300)) if isinstance(r, RamPageRun)]
    assert runs == []                                # only when asked for
    runs = [r for r in read_records(page_heavy_stream(ps, n=300), page_runs=True)
            if isinstance(r, RamPageRun)]
    assert sum(r.count for r in runs) > 500 and any(r.count > 50 for r in runs)


def test_summary_counts_page_runs_as_their_records():
    data = page_heavy_stream()
    a, b = StreamSummary(), StreamSummary()
    for r in read_records(data, page_runs=True):
        a.feed(r)
    for r in read_records(data, fast=False, compact=False):
        b.feed(r)
    assert a.to_json() == b.to_json()
    assert a.to_json()["ram"]["pages"]["normal"] > 1000


def naive_page_run(buf, pos, end, ps, block_len):
    n = 0
    pc = int(RamFlag.PAGE | RamFlag.CONTINUE)
    while pos + (n + 1) * (ps + 8) <= end and n < 512:
        w = struct.unpack_from(">Q", buf, pos + n * (ps + 8))[0]
        if w & (ps - 1) != pc or w - pc >= block_len:
            break
        n += 1
    return n


def test_page_run_scan_equals_the_record_loop():
    import random
    from qmigstream.codec.sections.ram import _page_run
    rnd = random.Random(7)
    pc = int(RamFlag.PAGE | RamFlag.CONTINUE)
    for ps in (512, 1024, 4096, 8192, 1 << 16):
        for trial in range(60):
            n = rnd.randrange(1, 40)
            block_len = ps * rnd.randrange(1, 64)
            parts = []
            for i in range(n):
                w = rnd.randrange(0, block_len // ps + 2) * ps | pc
                r = rnd.random()
                if r < 0.05:
                    w ^= 1 << rnd.randrange(0, ps.bit_length() - 1)   # one flag bit changed
                elif r < 0.08:
                    w = block_len + pc                              # just past the block
                parts.append(struct.pack(">Q", w) + bytes([i]) * ps)
            buf = b"\0" * 3 + b"".join(parts) + bytes(rnd.randrange(0, ps))
            w0 = struct.unpack_from(">Q", buf, 3)[0]
            if w0 & (ps - 1) != pc or w0 - pc >= block_len:
                continue                                # the caller checks the first record
            want = naive_page_run(buf, 3, len(buf), ps, block_len)
            k, words = _page_run(buf, 3, len(buf), ps, block_len)
            if want == 1:
                assert k == 1
            else:
                assert k == want and len(words) == k


def test_start_up_leaves_constructs_debugger_modules_unloaded():
    """construct's pdb/inspect/pickle/hashlib load only when something uses them."""
    import subprocess
    import sys
    code = ("import sys, qmigstream.codec.reader, qmigstream.summary\n"
            "assert not {'bdb', 'cmd', '_hashlib', '_pickle'} & set(sys.modules), sys.modules\n"
            "import inspect, hashlib, pdb\n"
            "from hashlib import sha256\n"
            "assert str(inspect.signature(len)) == '(obj, /)'\n"
            "assert sha256(b'').hexdigest().startswith('e3b0c442')\n"
            "assert hashlib.md5(b'').hexdigest().startswith('d41d8cd9')\n"
            "assert pdb.Pdb.__name__ == 'Pdb'\n"
            "assert type(sys.modules['inspect']).__name__ == 'module'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_file_header_fast_form_equals_the_schema():
    import os
    from qmigstream.codec.reader import _FILE_HEADER
    from qmigstream.wire import header as H
    for raw in [b"QEVM\x00\x00\x00\x03", b"QEVM\x00\x00\x00\x02"] + [os.urandom(8) for _ in range(50)]:
        c = H.FileHeader.parse(raw)
        assert _FILE_HEADER.unpack(raw) == (c.magic, c.version)
        assert H.FileHeader.build(dict(magic=c.magic, version=c.version)) == raw


def test_schemas_are_built_on_first_use(tmp_path):
    """A stream whose records need no construct schema is read without importing
    construct (start-up time); the schemas are there as soon as one is asked for."""
    import subprocess
    import sys
    data = page_heavy_stream(n=50)
    path = tmp_path / "s.mig"
    path.write_bytes(data)
    code = ("import sys\n"
            "from qmigstream.summary import summarize\n"
            "from qmigstream.codec.reader import read_records\n"
            f"s = summarize({str(path)!r})\n"
            f"n = sum(1 for _ in read_records({str(path)!r}, page_runs=True))\n"
            "assert 'construct' not in sys.modules, 'construct was imported'\n"
            "from qmigstream.wire import header as H, ram as W, vfio as V, commands as C\n"
            "assert H.FileHeader.sizeof() == 8 and 'construct' in sys.modules\n"
            "assert W.MappedRamHeader.sizeof() == 28 and len(V._DISPLAY_HEADER) == 31\n"
            "assert set(C.PAYLOAD) == set(C.FIXED_LENGTH)\n"
            "try:\n    H.NoSuchSchema\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('missing name did not raise')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_record_encoders_fast_forms_equal_the_schemas():
    """The struct forms the encoders use (file header, section headers and footer,
    configuration name, MEM_SIZE entries, VFIO data chunk header) build what the
    construct schemas build, and a stream writer needs no construct for them."""
    from qmigstream.codec import ram_records as RR
    from qmigstream.codec.records import Configuration, FileHeader, SectionFooter, SectionHeader
    from qmigstream.wire import header as H
    from qmigstream.wire import ram as WR
    from qmigstream.wire import vfio as WV
    from qmigstream.wire.header import SectionType as T
    for magic, version in ((0x5145564D, 3), (0, 0), (0xFFFFFFFF, 0xFFFFFFFF)):
        assert FileHeader(magic, version).encode() == H.FileHeader.build(
            dict(magic=magic, version=version))
    for sid, idstr, inst, ver in ((2, "ram", 0, 4), (0xFFFFFFFF, "x" * 255, 7, 0xFFFFFFFF),
                                  (1, "0000:00:10.0/vfio", 0, 1), (9, "é", 1, 2)):
        for t in (T.SECTION_START, T.SECTION_FULL):
            assert SectionHeader(t, sid, idstr, inst, ver).encode() == bytes([t]) + \
                H.FullSectionHeader.build(dict(section_id=sid, idstr=idstr,
                                               instance_id=inst, version_id=ver))
        for t in (T.SECTION_PART, T.SECTION_END):
            assert SectionHeader(t, sid).encode() == bytes([t]) + \
                H.ShortSectionHeader.build(dict(section_id=sid))
        assert SectionFooter(sid).encode() == H.SectionFooter.build(dict(section_id=sid))
    for machine in (b"pc-i440fx-7.2", b"", b"pc-q35-11.1"):
        assert Configuration(machine).encode() == bytes([T.CONFIGURATION]) + \
            H.ConfigurationName.build(dict(name=list(machine)))
    for name, used, ps, mr in (("pc.ram", 1 << 30, None, None), ("x" * 255, 2**64 - 1, 4096, 0),
                               ("mem", 32 << 20, None, 0x100000), ("rom", 4096, 2 << 20, None)):
        b = RR.RamBlockInfo(name, used, page_size=ps, mr_addr=mr)
        d = dict(name=name, used_length=used, **({"page_size": ps} if ps is not None else {}),
                 **({"mr_addr": mr} if mr is not None else {}))
        assert RR._block_entry_bytes(b) == WR.mem_size_block(ps is not None, mr is not None,
                                                              False).build(d)
    for n in (0, 1, 1 << 20, 2**64 - 1):
        assert WV.data_chunk_header(n) == WV.DataChunkHeader.build(dict(size=n))
