"""Guest memory replay: built streams for every record kind, iterations, file names,
the physical view; real QEMU 7.2 captures against the memory QEMU itself reports."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import zlib

import pytest

from qmigstream import analyze, guestmem, xbzrle
from qmigstream.check import check
from qmigstream.codec.build import StreamBuilder, mapped_ram_fill
from qmigstream.codec.ram_records import RamCompressed, RamEos, RamMultifdFlush, RamPageRun
from qmigstream.codec.reader import read_records
from qmigstream.errors import CompressedPageError, StreamError
from qmigstream.guestmem import GiB
from qmigstream.pipeline.guest import GuestRam, RamLoader
from qmigstream.wire.header import SectionType as T
from qmigstream.wire.ram import RamFlag

from conftest import capture_names, requires_qemu

PS = 4096


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PS)


def stream(blocks, iterations, *, machine="pc-i440fx-7.2", end=None, footers=True):
    """Header, config, RAM START with ``blocks``, one PART per entry of
    ``iterations`` (lists of (block, page index, kind, arg)), then END."""
    b = StreamBuilder(footers=footers)
    b.header()
    b.configuration(machine)
    b.section(T.SECTION_START, "ram", b.ram_setup_records(blocks), version_id=4)
    for it in iterations:
        b.section(T.SECTION_PART, "ram", _records(b, it) + [RamEos()])
    b.section(T.SECTION_END, "ram", _records(b, end or []) + [RamEos()])
    b.eof()
    return b


def _records(b, items):
    out = []
    for blk, idx, kind, arg in items:
        addr = idx * PS
        if kind == "page":
            out.append(b.ram_page_record(blk, addr, arg))
        elif kind == "zero":
            out.append(b.ram_page_record(blk, addr, zero=True))
        elif kind == "fill":
            r = b.ram_page_record(blk, addr, zero=True)
            r.fill = arg
            out.append(r)
        elif kind == "xbzrle":
            out.append(b.ram_page_record(blk, addr, xbzrle=arg))
        elif kind == "compress":
            cont = RamFlag.CONTINUE if b.last_block == blk else 0
            b.last_block = blk
            out.append(RamCompressed(blk, addr, arg, RamFlag.COMPRESS_PAGE | cont))
        elif kind == "flush":
            out.append(RamMultifdFlush())
    return out


def write(tmp_path, b, name="s.mig"):
    p = tmp_path / name
    p.write_bytes(b.encode())
    return str(p)


def block_bytes(out, manifest, name):
    f = next(x["file"] for x in manifest["blocks"] if x["name"] == name)
    return (out / f).read_bytes()


# -- every record kind -------------------------------------------------------------

def test_every_record_kind_lands_on_its_page(tmp_path):
    p0, p1, p2, p3 = page(0), page(1), page(2), page(3)
    new2 = bytearray(p2)
    new2[100:140] = b"\xaa" * 40
    new2[4000:4001] = b"\x01"
    delta = xbzrle.encode(p2, bytes(new2))
    comp = zlib.compress(p3)
    b = stream([("pc.ram", 16 * PS), ("pc.bios", 4 * PS)], [[
        ("pc.ram", 0, "page", p0),
        ("pc.ram", 1, "page", p1),
        ("pc.ram", 2, "page", p2),
        ("pc.ram", 5, "fill", 0x5A),
        ("pc.ram", 6, "compress", comp),
        ("pc.ram", 8, "zero", None),
        ("pc.ram", 9, "zero", None),
        ("pc.ram", 10, "zero", None),
        ("pc.bios", 3, "page", p3),
        ("pc.bios", 0, "flush", None),
    ]], end=[("pc.ram", 2, "xbzrle", delta), ("pc.ram", 1, "zero", None)])
    out = tmp_path / "out"
    m = guestmem.extract(write(tmp_path, b), str(out))
    ram = block_bytes(out, m, "pc.ram")
    want = bytearray(16 * PS)
    want[0:PS] = p0
    want[2 * PS:3 * PS] = new2            # XBZRLE applied to the page written before
    want[5 * PS:6 * PS] = b"\x5a" * PS    # ZERO with a non-zero fill: memset
    want[6 * PS:7 * PS] = p3              # COMPRESS_PAGE inflated
    assert ram == bytes(want)             # page 1 was zeroed again in END
    assert block_bytes(out, m, "pc.bios") == bytes(3 * PS) + p3
    blk = {x["name"]: x for x in m["blocks"]}
    assert blk["pc.ram"]["pages"] == {"page": 3, "zero": 5, "xbzrle": 1, "compressed": 1,
                                      "mapped_ram": 0, "multifd": 0}
    assert blk["pc.ram"]["data_pages"] == 4
    assert blk["pc.ram"]["sha256"] == hashlib.sha256(bytes(want)).hexdigest()
    assert blk["pc.bios"]["sha256"] == hashlib.sha256(bytes(3 * PS) + p3).hexdigest()
    assert m["iterations"] == {"setup": True, "parts": 1, "end": True, "last_applied": 2,
                               "stopped_early": False}
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(m))
    assert m["notes"] == ["the stream has MULTIFD_FLUSH records: with multifd the normal "
                          "pages travel on the channels (give them with --multifd)"]


def test_zero_runs_are_holes_and_zeroing_punches_data(tmp_path):
    """A long run of ZERO records (the reader's RamZeroRun) over pages that were
    data before: those read as zero again and the file stays sparse."""
    n = 4096                                       # 16 MiB block
    first = [("pc.ram", i, "page", page(i)) for i in range(0, 64)]
    zeros = [("pc.ram", i, "zero", None) for i in range(0, n)]
    b = stream([("pc.ram", n * PS)], [first, zeros])
    out = tmp_path / "out"
    m = guestmem.extract(write(tmp_path, b), str(out))
    f = out / m["blocks"][0]["file"]
    assert f.stat().st_size == n * PS
    assert f.read_bytes() == bytes(n * PS)
    assert f.stat().st_blocks * 512 < 64 * 1024    # holes, not written zeros
    assert m["blocks"][0]["pages"]["zero"] == n and m["blocks"][0]["data_pages"] == 0


def test_all_zero_page_records_stay_holes(tmp_path):
    b = stream([("pc.ram", 1024 * PS)], [[("pc.ram", i, "page", bytes(PS))
                                          for i in range(1024)]])
    out = tmp_path / "out"
    m = guestmem.extract(write(tmp_path, b), str(out))
    f = out / "pc.ram.img"
    assert f.read_bytes() == bytes(1024 * PS)
    assert f.stat().st_blocks == 0
    assert m["blocks"][0]["pages"]["page"] == 1024


# -- iterations -------------------------------------------------------------------------

def test_xbzrle_deltas_across_iterations_and_until_iteration(tmp_path):
    v = [page(10)]
    for k in range(1, 4):
        nxt = bytearray(v[-1])
        nxt[k * 300:k * 300 + 50] = bytes([k]) * 50
        v.append(bytes(nxt))
    iters = [
        [("pc.ram", 3, "page", v[0]), ("pc.ram", 4, "page", page(11))],          # 1
        [("pc.ram", 3, "xbzrle", xbzrle.encode(v[0], v[1]))],                   # 2
        [("pc.ram", 3, "xbzrle", xbzrle.encode(v[1], v[2])),
         ("pc.ram", 4, "zero", None)],                                         # 3
    ]
    end = [("pc.ram", 3, "xbzrle", xbzrle.encode(v[2], v[3]))]                  # 4 (END)
    path = write(tmp_path, stream([("pc.ram", 8 * PS)], iters, end=end))
    for n, (p3, p4) in enumerate([(bytes(PS), bytes(PS)), (v[0], page(11)), (v[1], page(11)),
                                  (v[2], bytes(PS)), (v[3], bytes(PS))]):
        out = tmp_path / f"it{n}"
        m = guestmem.extract(path, str(out), until_iteration=n)
        ram = (out / "pc.ram.img").read_bytes()
        assert ram[3 * PS:4 * PS] == p3, n
        assert ram[4 * PS:5 * PS] == p4, n
        assert m["iterations"]["last_applied"] == n
        assert m["iterations"]["stopped_early"] == (n < 4)
        assert m["blocks"][0]["sha256"] == hashlib.sha256(ram).hexdigest()
    m = guestmem.extract(path, str(tmp_path / "all"), until_iteration=99)
    assert m["iterations"]["parts"] == 3 and m["iterations"]["end"]
    assert (tmp_path / "all" / "pc.ram.img").read_bytes()[3 * PS:4 * PS] == v[3]


def test_bad_xbzrle_delta_is_a_stream_error_at_its_offset(tmp_path):
    b = stream([("pc.ram", 4 * PS)], [[("pc.ram", 0, "page", page(1))],
                                      [("pc.ram", 0, "xbzrle", b"\x00\x00\x00")]])
    path = write(tmp_path, b)
    rec = next(r for r in b.records if r.kind == "ram_xbzrle")
    with pytest.raises(StreamError, match="empty non-zero run") as e:
        guestmem.extract(path, str(tmp_path / "out"))
    # record word (8, CONTINUE), encoding byte, be16 length, then the delta:
    # the bad nzrun length is its second byte.
    assert e.value.offset == rec.offset + 8 + 3 + 1


# -- COMPRESS_PAGE -----------------------------------------------------------------------

def _zdict_stream(data: bytes) -> bytes:
    c = zlib.compressobj(zdict=b"a preset dictionary")
    return c.compress(data) + c.flush()


#: (zlib data, what QEMU 7.2's loader writes at the start of the page) for data it
#: accepts: one inflate(Z_NO_FLUSH) into the page returned Z_STREAM_END.
ACCEPTED = [
    pytest.param(zlib.compress(page(7)), page(7), id="one-page"),
    pytest.param(zlib.compress(b"\x01" * (PS - 1)), b"\x01" * (PS - 1), id="short-output"),
    pytest.param(zlib.compress(b""), b"", id="empty-output"),
    pytest.param(zlib.compress(b"\x02" * 100) + b"trailing garbage", b"\x02" * 100,
                 id="trailing-garbage"),
    pytest.param(zlib.compress(b"\x03" * PS) + zlib.compress(b"\x04" * PS), b"\x03" * PS,
                 id="second-stream-ignored"),
]

#: (zlib data, text in the error's ``found`` or None for a zlib error) QEMU refuses:
#: ``decompress data failed``.
REJECTED = [
    pytest.param(zlib.compress(b"\x01" * (PS + 1)), f"more than {PS} bytes", id="over-a-page"),
    pytest.param(zlib.compress(b"\x01" * PS)[:-6], "zlib stream unfinished", id="cut"),
    pytest.param(zlib.compress(b"\x01" * PS)[:-1], "zlib stream unfinished", id="cut-checksum"),
    pytest.param(b"\x00" * 10, None, id="bad-header"),
    pytest.param(zlib.compress(page(3))[:40] + b"\xff" * 8 + zlib.compress(page(3))[48:],
                 None, id="corrupt-data"),
    pytest.param(zlib.compress(b"\x01" * 100)[:-4] + b"\0\0\0\0", None, id="bad-adler32"),
    pytest.param(_zdict_stream(b"\x01" * 100), None, id="preset-dictionary"),
]


@pytest.mark.parametrize("payload, want", ACCEPTED)
def test_inflate_accepts_what_qemu_accepts(payload, want):
    assert RamCompressed("pc.ram", 0, payload, offset=77).inflate(PS) == want


@pytest.mark.parametrize("payload, found", REJECTED + [
    # (the reader already refuses a zero length record: QEMU reads it and fails here)
    pytest.param(b"", "0 bytes, zlib stream unfinished", id="empty-data")])
def test_inflate_rejects_what_qemu_rejects(payload, found):
    with pytest.raises(CompressedPageError) as e:
        RamCompressed("pc.ram", 0, payload, offset=77).inflate(PS)
    assert e.value.offset == 77 and e.value.section == "ram"
    if found:
        assert found in str(e.value.found)
    else:
        assert "does not inflate" in e.value.message


@pytest.mark.parametrize("payload, want", ACCEPTED)
def test_compressed_page_overwrites_the_start_of_the_page(tmp_path, payload, want):
    """The output goes to the start of the page; the rest keeps what the page held
    (here a PAGE record in the iteration before), as QEMU inflates into guest memory."""
    old = page(1)
    b = stream([("pc.ram", 4 * PS)], [[("pc.ram", 1, "page", old)],
                                      [("pc.ram", 1, "compress", payload)]])
    out = tmp_path / "out"
    m = guestmem.extract(write(tmp_path, b), str(out))
    expect = want + old[len(want):]
    assert block_bytes(out, m, "pc.ram")[PS:2 * PS] == expect
    # the other readers of COMPRESS_PAGE apply the same rule
    state = analyze.analyze_state(b.encode(), dump_memory=True)
    mem = next(v["memory"] for k, v in state.items() if k.startswith("ram "))
    assert mem[f"pc.ram (0x{PS:016x})"] == expect.hex(" ")
    ram = GuestRam([("pc.ram", 4 * PS)])
    loader = RamLoader(ram)
    for rec in b.records:
        loader.feed(rec)
    assert bytes(ram.block("pc.ram").mem[PS:2 * PS]) == expect
    assert check(b.encode(), capabilities=["compress"]).loads


@pytest.mark.parametrize("payload, found", REJECTED)
def test_compressed_page_qemu_refuses_is_an_error(tmp_path, payload, found):
    b = stream([("pc.ram", 4 * PS)], [[("pc.ram", 1, "compress", payload)]])
    rec = next(r for r in b.records if isinstance(r, RamCompressed))
    with pytest.raises(CompressedPageError) as e:
        guestmem.extract(write(tmp_path, b), str(tmp_path / "out"))
    assert e.value.offset == rec.offset and e.value.section == "ram"
    with pytest.raises(CompressedPageError) as e:
        analyze.analyze_state(b.encode(), dump_memory=True)
    assert e.value.offset == rec.offset
    loader = RamLoader(GuestRam([("pc.ram", 4 * PS)]))
    with pytest.raises(CompressedPageError) as e:
        for r in b.records:
            loader.feed(r)
    assert e.value.offset == rec.offset
    rep = check(b.encode(), capabilities=["compress"])
    assert not rep.loads
    # check reports where QEMU fails: after the be32 length, at the zlib data
    assert (rep.fatal.offset, rep.fatal.message) == (
        rec.offset + rec.size - len(payload), "decompress data failed")


# -- mapped-ram ---------------------------------------------------------------------------

def test_mapped_ram_pages_from_bitmap(tmp_path):
    b = StreamBuilder()
    b.header()
    b.configuration("pc-q35-9.0", capabilities=["mapped-ram"])
    recs = b.ram_setup_records([("pc.ram", 300 * PS), ("pc.bios", 2 * PS)], mapped_ram=True)
    for blk, i in [("pc.ram", 0), ("pc.ram", 1), ("pc.ram", 257), ("pc.ram", 299), ("pc.bios", 1)]:
        mapped_ram_fill(recs, blk, i, page(i + len(blk)))
    # Bytes in the page area whose bitmap bit is clear are not loaded.
    area = next(r for r in recs if r.kind == "mapped_ram_chunk" and r.block == "pc.ram"
                and r.area == "pages")
    junk = bytearray(area.data)
    junk[5 * PS:6 * PS] = b"\xee" * PS
    area.data = bytes(junk)
    b.section(T.SECTION_START, "ram", recs, version_id=4)
    b.section(T.SECTION_END, "ram", [RamEos()])
    b.eof()
    out = tmp_path / "out"
    m = guestmem.extract(write(tmp_path, b), str(out))
    want = bytearray(300 * PS)
    for i in (0, 1, 257, 299):
        want[i * PS:(i + 1) * PS] = page(i + 6)
    assert block_bytes(out, m, "pc.ram") == bytes(want)
    assert block_bytes(out, m, "pc.bios") == bytes(PS) + page(1 + 7)
    blk = {x["name"]: x for x in m["blocks"]}
    assert blk["pc.ram"]["pages"]["mapped_ram"] == 4
    assert blk["pc.bios"]["pages"]["mapped_ram"] == 1
    assert blk["pc.ram"]["sha256"] == hashlib.sha256(bytes(want)).hexdigest()


# -- file names ----------------------------------------------------------------------------

HOSTILE = ["../../x", "/rom@etc/acpi/tables", "..", ".", "/", "a/b", "a_b", "A_B",
           "manifest.json", "physical", "x\x00y\nz", "é", "-rf", "." * 40, "n" * 255,
           "pc.ram", "PC.RAM"]


def test_hostile_block_names_stay_inside_the_directory(tmp_path):
    blocks = [(n, PS) for n in HOSTILE]
    items = [(n, 0, "page", page(i)) for i, n in enumerate(HOSTILE)]
    out = tmp_path / "deep" / "out"
    m = guestmem.extract(write(tmp_path, stream(blocks, [items])), str(out))
    files = [x["file"] for x in m["blocks"]]
    assert [x["name"] for x in m["blocks"]] == HOSTILE
    assert len({f.lower() for f in files}) == len(files)
    assert sorted(os.listdir(out)) == sorted(files + ["manifest.json"])
    assert sorted(os.listdir(tmp_path)) == ["deep", "s.mig"]
    for f in files:
        assert "/" not in f and not f.startswith(".") and f.endswith(".img")
        assert all(c.isascii() and (c.isalnum() or c in "._+@-") for c in f)
        assert len(f) <= 96 + 4 + 4
    for i, x in enumerate(m["blocks"]):
        assert (out / x["file"]).read_bytes() == page(i)
    names = dict(zip(HOSTILE, files))
    assert names["../../x"] == "x.img"
    assert names["/rom@etc/acpi/tables"] == "rom@etc_acpi_tables.img"
    assert names[".."] == "block.img" and names["."] == "block-2.img"
    assert names["a/b"] == "a_b.img" and names["a_b"] == "a_b-2.img"
    assert names["A_B"] == "A_B-3.img"
    assert names["manifest.json"] == "manifest.json.img"
    assert names["physical"] == "physical-2.img"       # physical.img is reserved
    assert names["pc.ram"] == "pc.ram.img" and names["PC.RAM"] == "PC.RAM-2.img"


def test_existing_symlink_in_the_directory_is_replaced_not_followed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (out / "pc.ram.img").symlink_to(victim)
    guestmem.extract(write(tmp_path, stream([("pc.ram", PS)], [[("pc.ram", 0, "page", page(1))]])),
                     str(out))
    assert victim.read_bytes() == b"keep"
    assert not (out / "pc.ram.img").is_symlink()
    assert (out / "pc.ram.img").read_bytes() == page(1)


# -- physical view --------------------------------------------------------------------------

@pytest.mark.parametrize("machine, mtype, ram, limit, below", [
    # the examples in the comment above the split in hw/i386/pc_piix.c (7.2)
    ("pc", "pc-i440fx-1.7", 4 * GiB, None, 3584 << 20),
    ("pc", "pc-i440fx-7.2", 4 * GiB, None, 3072 << 20),
    ("pc", "pc-i440fx-7.2", 4 * GiB, 2 * GiB, 2048 << 20),
    ("pc", "pc-i440fx-7.2", 3968 << 20, 4 * GiB, 3968 << 20),
    ("pc", "pc-i440fx-7.2", 3 * GiB, None, 3 * GiB),
    ("pc", "pc-i440fx-7.2", 0xe0000000, None, 0xc0000000),
    ("pc", "pc-i440fx-7.2", 0xe0000000 - PS, None, 0xe0000000 - PS),
    ("pc", "pc-i440fx-2.0", 0xe0000000, None, 0xc0000000),
    ("pc", "pc-i440fx-1.4", 0xe0000000, None, 0xe0000000),
    # hw/i386/pc_q35.c (7.2)
    ("q35", "pc-q35-7.2", 2 * GiB, None, 2 * GiB),
    ("q35", "pc-q35-7.2", 0xb0000000 - PS, None, 0xb0000000 - PS),
    ("q35", "pc-q35-7.2", 0xb0000000, None, 0x80000000),
    ("q35", "pc-q35-7.2", 8 * GiB, None, 0x80000000),
    ("q35", "pc-q35-7.2", 2 * GiB, 1 * GiB, 1 * GiB),
])
def test_ram_split_follows_qemu(machine, mtype, ram, limit, below):
    lo, hi = guestmem.ram_split(machine, ram, machine_type=mtype, max_ram_below_4g=limit)
    assert (lo, hi) == (below, ram - below)


def test_physical_image_places_ram_above_4g(tmp_path):
    ram = 4 * GiB
    hi_page = 0xc0000000 // PS                      # first page mapped at 4 GiB
    items = [("pc.ram", 0, "page", page(1)), ("pc.ram", hi_page - 1, "page", page(2)),
             ("pc.ram", hi_page, "page", page(3)), ("pc.ram", ram // PS - 1, "page", page(4))]
    out = tmp_path / "out"
    m = guestmem.extract(write(tmp_path, stream([("pc.ram", ram)], [items])), str(out),
                         physical="pc")
    ph = m["physical"]
    assert ph["map"] == [
        {"region": "ram-below-4g", "gpa": 0, "block_offset": 0, "length": 0xc0000000},
        {"region": "ram-above-4g", "gpa": 4 * GiB, "block_offset": 0xc0000000,
         "length": GiB}]
    img = out / "physical.img"
    assert img.stat().st_size == 5 * GiB == ph["size"]
    assert img.stat().st_blocks * 512 < 1 << 20
    with open(img, "rb") as f:
        def at(a):
            f.seek(a)
            return f.read(PS)
        assert at(0) == page(1)
        assert at(0xc0000000 - PS) == page(2)
        assert at(0xc0000000) == bytes(PS)          # the PCI hole
        assert at(4 * GiB) == page(3)
        assert at(5 * GiB - PS) == page(4)


def test_physical_needs_pc_ram(tmp_path):
    path = write(tmp_path, stream([("mem", 4 * PS)], [[]]))
    with pytest.raises(guestmem.ExtractError, match="no RAM block 'pc.ram'"):
        guestmem.extract(path, str(tmp_path / "out"), physical="q35")


# -- real captures ----------------------------------------------------------------------------

#: Captures whose pc.ram is not all in the main stream, and why (by scenario).
NOT_IN_MAIN_STREAM = {
    "multifd": "normal pages travel on the multifd channels "
               "(test_multifd_channels_complete_the_memory)",
    "multifd-zlib": "normal pages travel on the multifd channels "
                    "(test_multifd_channels_complete_the_memory)",
    "ignore-shared-uuid": "shared RAM (block 'mem') is not sent with x-ignore-shared",
}


def _scenario(name):
    """The scenario part of a capture name: ``pc-11.1-multifd`` -> ``multifd``."""
    return name.split("-", 2)[2] if name[:3] in ("pc-", "q35") else name


@pytest.mark.parametrize("name", capture_names())
def test_committed_captures_match_pmemsave(capture, tmp_path, name):
    path, meta = capture(name)
    out = tmp_path / "out"
    m = guestmem.extract(str(path), str(out))
    blocks = {b["name"]: b for b in m["blocks"]}
    for b in m["blocks"]:
        data = (out / b["file"]).read_bytes()
        assert len(data) == b["used_length"]
        assert hashlib.sha256(data).hexdigest() == b["sha256"]
    if _scenario(name) == "ignore-shared-uuid":
        assert m["notes"][0].startswith("x-ignore-shared: blocks backed by shared memory")
    elif _scenario(name) in ("multifd", "multifd-zlib"):
        # 8.1+ streams say so (MULTIFD_FLUSH records); older ones cannot tell
        release = tuple(int(x) for x in meta.get("release", "7.2").split("."))
        if release >= (8, 1):
            assert "--multifd" in m["notes"][0]
    else:
        assert "notes" not in m
    if _scenario(name) in NOT_IN_MAIN_STREAM:
        pytest.skip(NOT_IN_MAIN_STREAM[_scenario(name)])
    assert meta["memory"], "capture metadata lists pmemsave hashes"
    with open(out / blocks["pc.ram"]["file"], "rb") as f:
        for mem in meta["memory"]:
            f.seek(mem["addr"])
            assert hashlib.sha256(f.read(mem["size"])).hexdigest() == mem["sha256"], mem


def test_running_xbzrle_capture_iterations(capture, tmp_path):
    """The running guest's capture: XBZRLE pages in many PART sections; the
    final memory matches pmemsave (above) and earlier iterations differ from it."""
    path, meta = capture("pc-7.2-running-xbzrle")
    m = guestmem.extract(str(path), str(tmp_path / "all"))
    ram = next(b for b in m["blocks"] if b["name"] == "pc.ram")
    assert ram["pages"]["xbzrle"] > 0 and m["iterations"]["parts"] > 1
    m1 = guestmem.extract(str(path), str(tmp_path / "one"), until_iteration=1)
    assert m1["iterations"]["last_applied"] == 1
    ram1 = next(b for b in m1["blocks"] if b["name"] == "pc.ram")
    assert ram1["pages"]["xbzrle"] == 0
    assert ram1["sha256"] != ram["sha256"]


@requires_qemu
@pytest.mark.qemu
def test_extraction_matches_qemu_pmemsave(tmp_path):
    from _qemu_capture import capture, seeded_blob
    blobs = [(0x1000, seeded_blob(tmp_path / "b0", 0x20000, 1)),         # below 640 KiB
             (0x9F000, seeded_blob(tmp_path / "b1", 0x1000, 2)),         # last page before VGA
             (0x300000, seeded_blob(tmp_path / "b2", 3 << 20, 3)),
             ((32 << 20) - 0x2000, seeded_blob(tmp_path / "b3", 0x2000, 4))]  # end of RAM
    path, low, high = capture(tmp_path, "seeded", 32, blobs)
    out = tmp_path / "out"
    m = guestmem.extract(path, str(out))
    ram = (out / "pc.ram.img").read_bytes()
    assert len(ram) == 32 << 20
    assert ram[:0xA0000] == low
    assert ram[0x100000:] == high
    for addr, data in blobs:
        assert ram[addr:addr + len(data)] == data
    blk = next(b for b in m["blocks"] if b["name"] == "pc.ram")
    assert blk["sha256"] == hashlib.sha256(ram).hexdigest()
    # seeded_blob leaves every 7th page zero: those come as ZERO records
    assert blk["pages"]["page"] == blk["data_pages"]
    assert blk["pages"]["page"] + blk["pages"]["zero"] == (32 << 20) // PS


@requires_qemu
@pytest.mark.qemu
def test_q35_physical_view_matches_pmemsave(tmp_path):
    from _qemu_capture import capture, seeded_blob
    blobs = [(0x2000, seeded_blob(tmp_path / "b0", 0x4000, 5)),
             (0x500000, seeded_blob(tmp_path / "b1", 0x10000, 6))]
    path, low, high = capture(tmp_path, "q35", 64, blobs, machine="q35")
    out = tmp_path / "out"
    m = guestmem.extract(path, str(out), physical="q35")
    assert m["physical"]["map"] == [{"region": "ram-below-4g", "gpa": 0, "block_offset": 0,
                                     "length": 64 << 20}]
    img = (out / "physical.img").read_bytes()
    assert img[:0xA0000] == low and img[0x100000:64 << 20] == high


@requires_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("machine,low_addr", [("pc", 0xBFFF0000), ("q35", 0x7FFF0000)])
def test_physical_view_above_4g_matches_pmemsave(machine, low_addr, tmp_path):
    """A 5 GiB guest: pc keeps 3 GiB below 4 GiB, q35 2 GiB; the rest of pc.ram sits
    from 4 GiB.  Data loaded just below the split and at 4.75 GiB lands where QEMU's
    own pmemsave (guest-physical addresses) finds it."""
    import random
    from qmigstream.qemu.runner import migrate_to_file
    rng = random.Random(machine)
    hi, lo = tmp_path / "hi.bin", tmp_path / "lo.bin"
    hi.write_bytes(rng.randbytes(16 * PS))
    lo.write_bytes(rng.randbytes(16 * PS))
    hi_addr = 0x130000000
    dumps = [(hi_addr, 16 * PS, str(tmp_path / "hi.mem")), (low_addr, 16 * PS, str(tmp_path / "lo.mem"))]
    path = str(tmp_path / "big.mig")
    r = migrate_to_file(["-machine", machine, "-m", "5G", "-smp", "2",
                         "-device", f"loader,file={hi},addr=0x{hi_addr:x},force-raw=on",
                         "-device", f"loader,file={lo},addr=0x{low_addr:x},force-raw=on"],
                        path, pmemsave=dumps)
    assert r.query_migrate["status"] == "completed"
    out = tmp_path / "out"
    m = guestmem.extract(path, str(out), physical=machine, hash=False)
    below = low_addr + 16 * PS
    assert [(x["region"], x["gpa"], x["length"]) for x in m["physical"]["map"]] == \
        [("ram-below-4g", 0, below), ("ram-above-4g", 1 << 32, (5 << 30) - below)]
    with open(out / "physical.img", "rb") as f:
        for addr, size, mem in dumps:
            f.seek(addr)
            assert f.read(size) == open(mem, "rb").read() == \
                (hi if addr == hi_addr else lo).read_bytes()


# -- bookkeeping -----------------------------------------------------------------------------

def test_page_marks_across_pieces():
    C = guestmem.PageMarks.CHUNK
    m = guestmem.PageMarks(3 * C)
    m.set(C - 2, 4)                               # spans pieces 0 and 1
    assert [m[i] for i in (C - 3, C - 2, C + 1, C + 2)] == [False, True, True, False]
    assert m.any(C - 10, 9) and not m.any(0, C - 2) and not m.any(2 * C, C)
    m.clear(C, 1)
    assert m.count() == 3 and not m[C]
    m.set(3 * C - 1, 10)                          # clipped at the end
    assert m.count() == 4
    m.resize(C)
    assert m.count() == 2 and m.pages == C


def test_huge_sparse_block_costs_only_what_is_written(tmp_path):
    """A 1 TiB block with a page at each end: no allocation for the rest."""
    size = 1 << 40
    last = size // PS - 1
    b = stream([("pc.ram", size)], [[("pc.ram", 0, "page", page(1)),
                                     ("pc.ram", last, "page", page(2))]])
    out = tmp_path / "out"
    m = guestmem.extract(write(tmp_path, b), str(out), hash=False)
    f = out / "pc.ram.img"
    assert f.stat().st_size == size and f.stat().st_blocks * 512 <= 64 * 1024
    with open(f, "rb") as fh:
        assert fh.read(PS) == page(1)
        fh.seek(size - PS)
        assert fh.read(PS) == page(2)
    assert m["blocks"][0]["data_pages"] == 2 and "sha256" not in m["blocks"][0]



# -- runs of PAGE records (the reader's page_runs) ---------------------------------------------

def _files(out):
    return {f: (out / f).read_bytes() for f in sorted(os.listdir(out)) if f.endswith(".img")}


def test_page_runs_give_what_page_records_give(tmp_path):
    """Long runs (more pages than one pwritev takes), an all-zero page inside a run
    and one that only starts with zeros, a page sent twice in one run, addresses going back, XBZRLE on a page a run wrote,
    zeroing after a run: the files equal replaying the same stream record by record."""
    n = 2600
    first = [("pc.ram", i, "page", page(i)) for i in range(n)]
    first[700] = ("pc.ram", 700, "page", bytes(PS))            # all zero: stays a hole
    first[900] = ("pc.ram", 900, "page", bytes(8) + page(900)[8:])   # zero at its start only
    first[1200] = ("pc.ram", 1199, "page", page(99999))        # page 1199 again, at once
    first[1500:1504] = [("pc.ram", k, "page", page(k + 7)) for k in (40, 41, 3000, 2)]
    old = page(5)
    new = _variant(old, 3)
    second = [("pc.ram", 5, "xbzrle", xbzrle.encode(old, new)),
              ("pc.ram", 10, "zero", None)] + \
             [("pc.ram", i, "page", page(i + 5000)) for i in range(2000, 2100)] + \
             [("pc.ram", 2050, "zero", None)]
    b = stream([("pc.ram", 4096 * PS), ("pc.bios", 8 * PS)],
               [first + [("pc.bios", i, "page", page(i + 77)) for i in range(8)], second])
    path = write(tmp_path, b)
    got = {}
    for runs in (True, False):
        out = tmp_path / f"out-{runs}"
        os.makedirs(out)
        mem, _ = guestmem.replay(path, str(out), page_runs=runs)
        got[runs] = ([blk.to_json() for blk in mem.blocks.values()], _files(out))
    assert got[True] == got[False]
    ram = got[True][1]["pc.ram.img"]
    assert ram[5 * PS:6 * PS] == new and ram[10 * PS:11 * PS] == bytes(PS)
    assert ram[700 * PS:701 * PS] == bytes(PS) and ram[1199 * PS:1200 * PS] == page(99999)
    assert ram[3000 * PS:3001 * PS] == page(3007) and ram[2050 * PS:2051 * PS] == bytes(PS)
    assert ram[900 * PS:901 * PS] == bytes(8) + page(900)[8:]
    runs = [r for r in read_records(path, page_runs=True) if isinstance(r, RamPageRun)]
    assert max(r.count for r in runs) > 1       # the stream really has runs


def test_page_runs_and_until_iteration(tmp_path):
    its = [[("pc.ram", i, "page", page(i + 100 * k)) for i in range(300)] for k in range(3)]
    b = stream([("pc.ram", 512 * PS)], its)
    path = write(tmp_path, b)
    for until in (0, 1, 2, 3):
        out = tmp_path / f"o{until}"
        m = guestmem.extract(path, str(out), until_iteration=until)
        want = bytes(512 * PS) if until == 0 else \
            b"".join(page(i + 100 * (until - 1)) for i in range(300)) + bytes(212 * PS)
        assert (out / "pc.ram.img").read_bytes() == want
        assert m["blocks"][0]["sha256"] == hashlib.sha256(want).hexdigest()



def test_a_big_old_file_is_replaced_and_removed(tmp_path):
    """An old block file of 64 MiB or more is unlinked by a thread: gone once extract returns."""
    b = stream([("pc.ram", 64 * PS)], [[("pc.ram", 1, "page", page(1))]])
    path = write(tmp_path, b)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "pc.ram.img", "wb") as f:
        for _ in range(64):
            f.write(b"\xee" * (1 << 20))
    os.link(out / "pc.ram.img", tmp_path / "other-name")        # another name keeps it
    m = guestmem.extract(path, str(out))
    assert sorted(os.listdir(out)) == ["manifest.json", "pc.ram.img"]
    assert (out / "pc.ram.img").read_bytes() == bytes(PS) + page(1) + bytes(62 * PS)
    assert m["blocks"][0]["data_pages"] == 1
    assert os.stat(tmp_path / "other-name").st_nlink == 1

def test_a_failed_write_is_raised_and_the_threads_stop(tmp_path, monkeypatch):
    b = stream([("pc.ram", 64 * PS)], [[("pc.ram", i, "page", page(i)) for i in range(64)]])
    path = write(tmp_path, b)

    def full(fd, bufs, offset):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(guestmem.os, "pwritev", full)
    import threading
    before = threading.active_count()
    with pytest.raises(OSError, match="No space left"):
        guestmem.extract(path, str(tmp_path / "out"))
    assert threading.active_count() == before


def test_short_writes_are_finished(tmp_path, monkeypatch):
    b = stream([("pc.ram", 64 * PS)], [[("pc.ram", i, "page", page(i)) for i in range(64)]])
    path = write(tmp_path, b)
    real = os.pwritev

    def short(fd, bufs, offset):                  # writes one page and a half at most
        return real(fd, [b"".join(bufs)[:PS + PS // 2]], offset)
    monkeypatch.setattr(guestmem.os, "pwritev", short)
    m = guestmem.extract(path, str(tmp_path / "out"))
    want = b"".join(page(i) for i in range(64))
    assert (tmp_path / "out" / "pc.ram.img").read_bytes() == want
    assert m["blocks"][0]["sha256"] == hashlib.sha256(want).hexdigest()

# -- multifd channels --------------------------------------------------------------------------

MULTIFD_CAPTURES = [n for n in capture_names() if n.endswith(("-multifd", "-multifd-zlib"))]


@pytest.fixture(params=MULTIFD_CAPTURES)
def multifd_capture(request, capture, tmp_path):
    from conftest import unpack_channels
    path, meta = capture(request.param)
    return path, meta, unpack_channels(meta, tmp_path)


def test_multifd_channels_complete_the_memory(multifd_capture, tmp_path):
    path, meta, chans = multifd_capture
    out = tmp_path / "out"
    m = guestmem.extract(str(path), str(out), channels=chans)
    ram = (out / "pc.ram.img").read_bytes()
    for mem in meta["memory"]:
        assert hashlib.sha256(ram[mem["addr"]:mem["addr"] + mem["size"]]).hexdigest() == \
            mem["sha256"]
    blk = {b["name"]: b for b in m["blocks"]}
    if meta.get("release", "7.2") in ("5.2", "7.2"):
        # the channels carry the normal pages; zero pages stay in the main stream
        assert blk["pc.ram"]["pages"]["multifd"] == meta["loader"]["pages"] - \
            sum(1 for k in range(meta["loader"]["pages"])
                if not any(ram[meta["loader"]["addr"] + k * PS:
                               meta["loader"]["addr"] + (k + 1) * PS]))
    else:
        # 9.0+ (zero-page-detection=multifd): zero pages travel on the channels too
        assert blk["pc.ram"]["pages"]["multifd"] == blk["pc.ram"]["used_length"] // PS
    assert blk["pc.ram"]["pages"]["page"] == 0
    # Epoch 0 (setup) carries no pages; the pages come with the first PART.
    m0 = guestmem.extract(str(path), str(tmp_path / "o0"), channels=chans, until_iteration=0)
    assert all(b["pages"]["multifd"] == 0 for b in m0["blocks"])
    m1 = guestmem.extract(str(path), str(tmp_path / "o1"), channels=chans, until_iteration=1)
    assert {b["name"]: b["sha256"] for b in m1["blocks"]} == \
        {b["name"]: b["sha256"] for b in m["blocks"]}


def test_multifd_channel_errors(capture, tmp_path):
    from conftest import unpack_channels
    path, meta = capture("pc-7.2-multifd")       # offsets below: 7.2's packet layout
    chans = unpack_channels(meta, tmp_path)
    data = bytearray(open(chans[0], "rb").read())
    bad = tmp_path / "bad.ch"
    bad.write_bytes(b"\x00" * 4 + bytes(data[4:]))
    with pytest.raises(StreamError, match="not a multifd channel") as e:
        guestmem.extract(str(path), str(tmp_path / "o"), channels=[str(bad)])
    assert e.value.offset == 0
    # the second packet (the first with pages) claims zstd compression
    off = 64 + 320 + 128 * 8
    comp = bytearray(data)
    comp[off + 11] |= 0x4
    bad.write_bytes(bytes(comp))
    with pytest.raises(StreamError, match="compression other than zlib") as e:
        guestmem.extract(str(path), str(tmp_path / "o"), channels=[str(bad)])
    assert e.value.offset == off + 8
    # ... or zlib, but its raw pages are no zlib stream
    comp[off + 11] = (comp[off + 11] & ~0x4) | 0x2
    bad.write_bytes(bytes(comp))
    with pytest.raises(StreamError, match="does not inflate") as e:
        guestmem.extract(str(path), str(tmp_path / "o"), channels=[str(bad)])
    assert e.value.offset == off + 320
    bad.write_bytes(bytes(data[:off + 320 + 128 * 8 + 100]))
    with pytest.raises(StreamError, match="channel ends inside packet pages"):
        guestmem.extract(str(path), str(tmp_path / "o"), channels=[str(bad)])


# -- property: the replay equals a page-by-page model ---------------------------------------

from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

NPAGES = 6
op = st.one_of(
    st.tuples(st.just("page"), st.integers(0, NPAGES - 1), st.integers(0, 5)),
    st.tuples(st.just("zeropage"), st.integers(0, NPAGES - 1), st.just(0)),
    st.tuples(st.just("zero"), st.integers(0, NPAGES - 1), st.just(0)),
    st.tuples(st.just("fill"), st.integers(0, NPAGES - 1), st.integers(1, 255)),
    st.tuples(st.just("xbzrle"), st.integers(0, NPAGES - 1), st.integers(0, 5)),
    st.tuples(st.just("compress"), st.integers(0, NPAGES - 1), st.integers(0, 5)),
)


def _variant(old: bytes, k: int) -> bytes:
    """``old`` with a few 8-byte pieces changed (the same for the same inputs)."""
    rnd = random.Random(k + 31 * sum(old[:16]))
    new = bytearray(old)
    for _ in range(1 + k):
        at = rnd.randrange(PS - 8)
        new[at:at + 8] = rnd.randbytes(8)
    return bytes(new)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(op, max_size=30), min_size=1, max_size=4), st.integers(0, 5))
# zeroing or XBZRLE on a page of the run of pages still being collected
@example([[("page", 3, 0), ("zero", 3, 0)]], 5)
@example([[("page", 2, 0), ("page", 3, 1), ("zero", 2, 0)], [("xbzrle", 3, 2)]], 5)
@example([[("page", 1, 0), ("page", 2, 0), ("xbzrle", 1, 4)]], 5)
@example([[("page", 1, 0), ("page", 2, 0)], [("zero", 1, 0), ("page", 1, 3)]], 1)
def test_replay_matches_a_page_model(tmp_path_factory, iterations, until):
    model = [[bytes(PS)] * NPAGES]          # model[k] = memory after iteration k
    items_per_iter = []
    cur = list(model[0])
    for ops in iterations:
        items = []
        for kind, idx, arg in ops:
            old = cur[idx]
            if kind == "page":
                new = page(idx * 10 + arg)
                items.append(("pc.ram", idx, "page", new))
            elif kind == "zeropage":
                new = bytes(PS)
                items.append(("pc.ram", idx, "page", new))
            elif kind == "zero":
                new = bytes(PS)
                items.append(("pc.ram", idx, "zero", None))
            elif kind == "fill":
                new = bytes([arg]) * PS
                items.append(("pc.ram", idx, "fill", arg))
            elif kind == "xbzrle":
                new = _variant(old, arg)
                delta = xbzrle.encode(old, new)
                if not delta:               # unchanged or too big: QEMU sends no XBZRLE
                    continue
                items.append(("pc.ram", idx, "xbzrle", delta))
            else:
                new = _variant(old, arg)
                items.append(("pc.ram", idx, "compress", zlib.compress(new)))
            cur[idx] = new
        items_per_iter.append(items)
        model.append(list(cur))
    # the last list of items goes into the END section
    b = stream([("pc.ram", NPAGES * PS)], items_per_iter[:-1], end=items_per_iter[-1])
    d = tmp_path_factory.mktemp("prop")
    path = write(d, b)
    m = guestmem.extract(path, str(d / "out"), until_iteration=until)
    want = b"".join(model[min(until, len(iterations))])
    got = (d / "out" / "pc.ram.img").read_bytes()
    assert got == want
    assert m["blocks"][0]["sha256"] == hashlib.sha256(want).hexdigest()
    assert m["blocks"][0]["data_pages"] == sum(1 for i in range(NPAGES)
                                               if want[i * PS:(i + 1) * PS] != bytes(PS))


def test_postcopy_discard_zeroes_the_ranges(tmp_path):
    from qmigstream.wire.commands import MigCmd
    b = StreamBuilder()
    b.header()
    b.configuration("pc-i440fx-7.2")
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 8 * PS)]), version_id=4)
    b.section(T.SECTION_PART, "ram", _records(b, [("pc.ram", i, "page", page(i))
                                                  for i in range(6)]) + [RamEos()])
    b.command(MigCmd.POSTCOPY_RAM_DISCARD, version=0, block="pc.ram", terminator=0,
              ranges=[{"start": PS, "length": 2 * PS}, {"start": 5 * PS, "length": PS}])
    b.section(T.SECTION_END, "ram", _records(b, [("pc.ram", 2, "page", page(22))]) + [RamEos()])
    b.eof()
    out = tmp_path / "out"
    m = guestmem.extract(write(tmp_path, b), str(out))
    assert (out / "pc.ram.img").read_bytes() == (page(0) + bytes(PS) + page(22) + page(3) +
                                                page(4) + bytes(3 * PS))
    assert m["blocks"][0]["data_pages"] == 4
    cmd = next(r for r in b.records if r.kind == "command")
    cmd.args["ranges"] = [{"start": 7 * PS, "length": 2 * PS}]
    with pytest.raises(StreamError, match="outside RAM block") as e:
        guestmem.extract(write(tmp_path, b, "bad.mig"), str(tmp_path / "o2"))
    assert e.value.offset == cmd.offset


@requires_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("name, extra", [
    ("pc-7.2-running-xbzrle", "disk"),
    ("pc-7.2-compress", "compress"),      # the destination must expect compressed pages
])
def test_destination_qemu_loads_the_same_memory(capture, tmp_path, name, extra):
    """QEMU's own loader (the destination) against the extraction: XBZRLE
    deltas over 113 iterations, COMPRESS_PAGE records."""
    from qmigstream.qemu.runner import load_incoming
    path, meta = capture(name)
    args = ["-machine", "pc", "-m", "32"]
    if extra == "disk":
        disk = tmp_path / "mbr.img"
        disk.write_bytes(bytes(1 << 20))
        args += ["-drive", f"file={disk},format=raw,if=ide"]
    low, high = tmp_path / "low", tmp_path / "high"
    caps = {"compress": True} if extra == "compress" else None
    res = load_incoming(args, str(path), capabilities=caps,
                        pmemsave=[(0, 0xA0000, str(low)),
                                  (0x100000, (32 << 20) - 0x100000, str(high))])
    assert res.loaded, res.stderr
    out = tmp_path / "out"
    guestmem.extract(str(path), str(out))
    ram = (out / "pc.ram.img").read_bytes()
    assert ram[:0xA0000] == low.read_bytes()
    assert ram[0x100000:] == high.read_bytes()


@requires_qemu
@pytest.mark.qemu
def test_destination_qemu_agrees_on_odd_compressed_pages(capture, tmp_path):
    """The capture's COMPRESS_PAGE records re-encoded as QEMU's loader allows but
    its compressor never writes (output short of a page, trailing garbage): QEMU
    loads them into the same memory as the extraction; corrupt data it refuses."""
    from qmigstream.codec.reader import read_records
    from qmigstream.codec.writer import encode_records
    from qmigstream.qemu.runner import load_incoming
    path, _ = capture("pc-7.2-compress")
    recs = list(read_records(str(path)))
    comp = [r for r in recs if isinstance(r, RamCompressed)]
    for k, r in enumerate(comp[:60]):
        data = zlib.decompress(bytes(r.data))
        if k % 3 == 0:      # the first half of the page only: the rest stays as it was
            r.data = zlib.compress(data[:PS // 2])
        elif k % 3 == 1:
            r.data = zlib.compress(data) + b"\x5a" * (k % 7 + 1)
    odd = tmp_path / "odd.mig"
    odd.write_bytes(encode_records(recs))
    args = ["-machine", "pc", "-m", "32"]
    low, high = tmp_path / "low", tmp_path / "high"
    res = load_incoming(args, str(odd), capabilities={"compress": True},
                        pmemsave=[(0, 0xA0000, str(low)),
                                  (0x100000, (32 << 20) - 0x100000, str(high))])
    assert res.loaded, res.stderr
    out = tmp_path / "out"
    guestmem.extract(str(odd), str(out))
    ram = (out / "pc.ram.img").read_bytes()
    assert ram[:0xA0000] == low.read_bytes()
    assert ram[0x100000:] == high.read_bytes()
    # a corrupt one: QEMU fails the load, so does the extraction
    comp[0].data = b"\x78\x9c" + b"\xff" * 20
    bad = tmp_path / "bad.mig"
    bad.write_bytes(encode_records(recs))
    assert not load_incoming(args, str(bad), capabilities={"compress": True}).loaded
    with pytest.raises(CompressedPageError):
        guestmem.extract(str(bad), str(tmp_path / "out2"))


@requires_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("compression", ["none", "zlib"])
def test_fresh_multifd_capture_with_channels(tmp_path, compression):
    """QEMU 7.2 migrating over multifd (2 channels, each recorded), with and
    without zlib: main stream plus channels give the memory pmemsave reports."""
    from _qemu_capture import seeded_blob
    from qmigstream.qemu.runner import Qemu, UnixSink
    blob = tmp_path / "blob"
    data = seeded_blob(blob, 2 << 20, 31)
    args = ["-machine", "pc", "-m", "32",
            "-device", f"loader,file={blob},addr=0x400000,force-raw=on"]
    low, high = tmp_path / "low", tmp_path / "high"
    with UnixSink(str(tmp_path / "mig.sock")) as sink, Qemu(args) as q:
        q.set_capabilities({"multifd": True})
        q.set_parameters({"multifd-channels": 2, "multifd-compression": compression})
        q.execute("migrate", uri=sink.uri)
        assert q.wait_migration(60)["status"] == "completed"
        q.pmemsave(0, 0xA0000, str(low))
        q.pmemsave(0x100000, (32 << 20) - 0x100000, str(high))
        q.quit()
        sink.wait_idle(10, connections=3)
        streams = [bytes(s) for s in sink.streams]
    main = tmp_path / "main.mig"
    main.write_bytes(next(s for s in streams if s[:4] == b"QEVM"))
    chans = []
    for i, s in enumerate(x for x in streams if x[:4] == b"\x11\x22\x33\x44"):
        chans.append(tmp_path / f"ch{i}")
        chans[-1].write_bytes(s)
    assert len(chans) == 2
    methods = set()
    for c in chans:                       # the packets carrying pages, by their flags
        raw, pos = c.read_bytes(), 64
        while pos < len(raw):
            _, _, flags, alloc, normal, nxt, _ = struct.unpack_from(">IIIIIIQ", raw, pos)
            pos += 320 + 8 * alloc
            if normal:
                methods.add(flags & 0xE)
                pos += nxt if flags & 0xE else normal * PS
    assert methods == {2 if compression == "zlib" else 0}
    out = tmp_path / "out"
    m = guestmem.extract(str(main), str(out), channels=[str(c) for c in chans])
    ram = (out / "pc.ram.img").read_bytes()
    assert ram[:0xA0000] == low.read_bytes() and ram[0x100000:] == high.read_bytes()
    assert ram[0x400000:0x600000] == data
    blk = next(b for b in m["blocks"] if b["name"] == "pc.ram")
    assert blk["pages"]["multifd"] >= (2 << 20) // PS * 6 // 7 and blk["pages"]["page"] == 0
