"""The committed real QEMU captures (fixtures/captures, made by tools/capture.py):
Debian's 7.2, and 5.2, 10.0 and 11.1 through tools/debian-qemu.

Each capture must round-trip byte for byte; the RAM fast path must agree with
the schema path record by record; the page counts the decoder finds must
agree with what QEMU itself reported in ``query-migrate``; and the guest RAM
rebuilt from the stream's pages must hash to QEMU's ``pmemsave`` dumps.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import struct
import zlib

import pytest

from conftest import CAPTURES, capture_names, load_tool
from qmigstream import xbzrle
from qmigstream.codec import ram_records as R
from qmigstream.codec.reader import StreamReader, read_records
from qmigstream.codec.records import (Command, Configuration, SectionFooter, SectionHeader,
                                      VmDescription)
from qmigstream.codec.writer import StreamWriter
from qmigstream.qemu.runner import BASE_ARGS
from qmigstream.summary import StreamSummary, summarize

PAGE = 4096
EXPECTED = {
    "pc-7.2-paused", "q35-7.2-paused", "pc-7.2-loader", "pc-i440fx-2.2-paused",
    "pc-7.2-noconfig", "pc-7.2-devices", "pc-7.2-running-xbzrle", "pc-7.2-compress",
    "pc-7.2-ignore-shared-uuid", "pc-7.2-postcopy-advised", "pc-7.2-multifd", "pc-7.2-savevm",
    "pc-i440fx-2.2-devices", "pc-i440fx-2.2-devices-vmdesc", "pc-7.2-block",
    "pc-7.2-dirty-bitmaps", "q35-7.2-devices", "pc-7.2-postcopy",
}
#: captures of the other releases (a subset of their scenarios: what differs)
OTHER_RELEASES = {
    "5.2": {"pc-5.2-paused", "q35-5.2-paused", "pc-5.2-devices", "pc-5.2-running-xbzrle",
            "pc-5.2-compress", "pc-5.2-ignore-shared-uuid", "pc-5.2-postcopy-advised",
            "pc-5.2-multifd", "pc-5.2-savevm", "pc-5.2-block", "pc-5.2-dirty-bitmaps"},
    "10.0": {"pc-10.0-paused", "pc-10.0-devices", "pc-10.0-running-xbzrle",
             "pc-10.0-ignore-shared-uuid", "pc-10.0-multifd", "pc-10.0-mapped-ram",
             "pc-10.0-dirty-bitmaps"},
    "11.1": {"pc-11.1-paused", "q35-11.1-paused", "pc-11.1-devices", "pc-11.1-running-xbzrle",
             "pc-11.1-ignore-shared-uuid", "pc-11.1-postcopy-advised", "pc-11.1-postcopy", "pc-11.1-multifd",
             "pc-11.1-multifd-zlib",
             "pc-11.1-mapped-ram", "pc-11.1-savevm", "pc-11.1-dirty-bitmaps"},
}
#: query-version of each release's QEMU (Debian packages)
QEMU_VERSIONS = {"5.2": (5, 2, 0), "7.2": (7, 2, 22), "10.0": (10, 0, 13), "11.1": (11, 1, 3)}
NAMES = capture_names()


capture_tool = load_tool("capture.py")


def meta_of(name):
    return json.loads((CAPTURES / f"{name}.json").read_text())


def xz_bytes(fname):
    return lzma.open(CAPTURES / fname).read()


# -- inventory ---------------------------------------------------------------------
def test_every_scenario_is_committed():
    assert set(NAMES) == EXPECTED.union(*OTHER_RELEASES.values())
    # every 7.2 scenario is committed but zlib multifd (11.1's capture covers it;
    # 7.2's channels decode the same way, tools/capture.py makes it)
    assert set(capture_tool.scenarios_for("7.2")) - EXPECTED == {"pc-7.2-multifd-zlib"}
    for release, names in OTHER_RELEASES.items():
        assert names <= set(capture_tool.scenarios_for(release)), release


def test_scenarios_follow_the_release():
    assert "pc-11.1-mapped-ram" in capture_tool.scenarios_for("11.1")
    assert "pc-7.2-mapped-ram" not in capture_tool.scenarios_for("7.2")
    assert "pc-11.1-compress" not in capture_tool.scenarios_for("11.1")
    assert "pc-11.1-noconfig" not in capture_tool.scenarios_for("11.1")
    assert "pc-i440fx-2.2-paused" not in capture_tool.scenarios_for("10.0")


def test_fixtures_stay_small():
    total = sum(p.stat().st_size for p in CAPTURES.iterdir())
    assert total < 8_000_000
    # no committed file is an uncompressed stream or image
    assert all(p.suffix in (".xz", ".json") for p in CAPTURES.iterdir())


@pytest.mark.parametrize("name", NAMES)
def test_metadata_describes_the_stream(name, capture):
    path, meta = capture(name)
    data = path.read_bytes()
    assert meta["name"] == name
    assert meta["stream"]["size"] == len(data)
    assert meta["stream"]["sha256"] == hashlib.sha256(data).hexdigest()
    release = meta.get("release", "7.2")
    assert release in name or name.startswith("pc-i440fx-2.2")
    major, minor, micro = QEMU_VERSIONS[release]
    assert meta["qemu_version"]["qemu"] == {"major": major, "minor": minor, "micro": micro}
    assert meta["qemu_argv"][0].endswith("qemu-system-x86_64")
    assert meta["qemu_argv"][1:9] == BASE_ARGS
    assert "-qmp" in meta["qemu_argv"]
    made_by = f"python3 tools/capture.py {name} --out fixtures/captures"
    if release != "7.2":
        made_by = f'eval "$(tools/debian-qemu {release})" && ' + made_by
    assert meta["made_by"] == made_by
    if meta["reproducible"]:
        assert meta["reproducible_checked"] is True
    else:
        assert meta["not_reproducible_because"]
    if not name.endswith("-savevm"):
        assert meta["query_migrate"]["status"] == "completed"


# -- round trip ---------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_byte_for_byte(name, capture):
    path, meta = capture(name)
    out = io.BytesIO()
    w = StreamWriter(out)
    n = 0
    for rec in read_records(str(path)):
        w.write(rec)
        n += 1
    # the cached decode (used by the tests below) is the same stream
    assert b"".join(r.encode() for r in _records(path)) == out.getvalue()
    assert out.getvalue() == path.read_bytes()
    assert n > 50


_DECODED = {}


def _decode(path, **opts):
    """(reader, records) of one capture, decoded once per option set."""
    key = (str(path), tuple(sorted(opts.items())))
    if key not in _DECODED:
        reader = StreamReader(str(path), **opts)
        _DECODED[key] = (reader, list(reader.records()))
    return _DECODED[key]


def _records(path, **opts):
    return _decode(path, **opts)[1]


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_equals_schema_path(name, capture):
    path, _ = capture(name)
    fast = _records(path, fast=True, compact=False)
    slow = _records(path, fast=False, compact=False)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert (type(a), a.offset, a.kind) == (type(b), b.offset, b.kind)
        assert a.encode() == b.encode()
        assert a.fields() == b.fields()
    compact = _records(path)
    # compact mode only merges ZERO records into runs: the pages are the same
    assert _pages(compact) == _pages(slow)
    # every record's size (computed from its fields) is the length of its encoding
    for r in slow:
        assert r.size == len(r.encode()), r
        if isinstance(r, Configuration):
            assert [x.size for x in r.subsections] == [len(x.encode()) for x in r.subsections]
    # page_runs merges runs of PAGE records: expanded, they are the records
    runs = _records(path, compact=False, page_runs=True)
    flat = [x for r in runs for x in (r.expand() if isinstance(r, R.RamPageRun) else (r,))]
    assert [(type(r), r.offset, r.fields(), r.encode()) for r in flat] == \
        [(type(r), r.offset, r.fields(), r.encode()) for r in slow]
    assert b"".join(r.encode() for r in runs) == b"".join(r.encode() for r in slow)


def _pages(records):
    out = []
    for r in records:
        if isinstance(r, R.RamZeroRun):
            out += [("ram_zero", r.block, r.addr + i * r.page_size) for i in range(r.count)]
        elif isinstance(r, (R.RamZero, R.RamPage, R.RamXbzrle, R.RamCompressed)):
            out.append((r.kind, r.block, r.addr))
    return out


# -- page counts against QEMU's own figures ----------------------------------------------
def _summary(path):
    reader, recs = _decode(path)
    s = StreamSummary()
    for r in recs:
        s.feed(r, reader)
    return s.finish(reader).to_json()


def test_summary_of_cached_records_is_info_json(capture, capsys):
    """The counts below are those of ``qmigstream info --json``."""
    from qmigstream.cli import main as cli_main
    path, _ = capture("pc-7.2-running-xbzrle")
    assert _summary(path) == summarize(str(path)).to_json()
    assert cli_main(["info", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == _summary(path)


def _record_bytes(path, cls):
    return [r for r in _records(path) if isinstance(r, cls)]


SIMPLE = ["pc-7.2-paused", "q35-7.2-paused", "pc-7.2-loader", "pc-i440fx-2.2-paused",
          "pc-7.2-noconfig", "pc-7.2-devices", "pc-7.2-postcopy-advised", "pc-7.2-savevm",
          "pc-i440fx-2.2-devices", "pc-i440fx-2.2-devices-vmdesc", "pc-7.2-block",
          "pc-7.2-dirty-bitmaps"]


@pytest.mark.parametrize("name", [n for n in SIMPLE if n != "pc-7.2-savevm"])
def test_page_counts_paused(name, capture):
    """A paused guest sends every page once: zero pages are ``duplicate``, the rest
    ``normal``, together ``total`` / page size."""
    path, meta = capture(name)
    ram = meta["query_migrate"]["ram"]
    pages = _summary(path)["ram"]["pages"]
    assert pages["zero"] == ram["duplicate"]
    assert pages["normal"] == ram["normal"]
    assert ram["normal-bytes"] == PAGE * ram["normal"]
    assert pages["xbzrle"] == pages["compressed"] == 0
    assert pages["zero"] + pages["normal"] == ram["total"] // PAGE
    # one sync at setup, one at completion; dirty-bitmaps and block may iterate longer
    assert ram["dirty-sync-count"] == 2 or name in ("pc-7.2-dirty-bitmaps", "pc-7.2-block")


def test_page_counts_savevm(capture):
    """savevm reports no query-migrate; its vmstate has every page once, like a
    paused migration of the same machine."""
    path, meta = capture("pc-7.2-savevm")
    pages = _summary(path)["ram"]["pages"]
    paused = _summary(capture("pc-7.2-paused")[0])["ram"]["pages"]
    assert pages == paused
    assert meta["qcow2"]["vm_state_size"] == path.stat().st_size


def test_page_counts_xbzrle(capture):
    """``xbzrle-cache.pages`` counts XBZRLE records and ``xbzrle-cache.bytes`` their
    size minus the 8-byte page header (ram.c save_xbzrle_page: ``bytes_xbzrle - 8``);
    every XBZRLE record continues the previous block, so its header is exactly 8."""
    path, meta = capture("pc-7.2-running-xbzrle")
    q = meta["query_migrate"]
    s = _summary(path)
    pages = s["ram"]["pages"]
    xrecs = _record_bytes(path, R.RamXbzrle)
    assert len(xrecs) == pages["xbzrle"] == q["xbzrle-cache"]["pages"] > 100
    assert all(r.continued for r in xrecs)
    assert sum(r.size - 8 for r in xrecs) == q["xbzrle-cache"]["bytes"]
    assert pages["normal"] == q["ram"]["normal"]
    assert pages["zero"] == q["ram"]["duplicate"]
    assert q["ram"]["normal-bytes"] == PAGE * q["ram"]["normal"]
    # a running guest iterates: many PART sections, one per dirty sync after setup
    assert s["ram"]["sections"]["START"] == s["ram"]["sections"]["END"] == 1
    assert s["ram"]["sections"]["PART"] > 5
    assert q["ram"]["dirty-sync-count"] > 8


def test_page_counts_compress(capture):
    """With compression, 7.2's flush_compressed_data() counts every compress thread on
    each flush, busy or not (update_compress_thread_counts): an idle thread adds one
    phantom page to ``compression.pages`` (and -8 to ``compressed-size``) or, when its
    last page was zero, one phantom ``duplicate``.  So the stream's counts are at most
    QEMU's, the excess is a multiple of the thread count, and ``compressed-size`` is
    the records' size minus 8 each, minus 8 per phantom page."""
    path, meta = capture("pc-7.2-compress")
    q = meta["query_migrate"]
    threads = next(c["arguments"]["compress-threads"] for c in meta["qmp_commands"]
                   if c["execute"] == "migrate-set-parameters")
    pages = _summary(path)["ram"]["pages"]
    comp = q["compression"]
    crecs = _record_bytes(path, R.RamCompressed)
    assert len(crecs) == pages["compressed"] >= 100
    assert all(r.continued for r in crecs)
    phantom_pages = comp["pages"] - pages["compressed"]
    phantom_zero = q["ram"]["duplicate"] - pages["zero"]
    assert phantom_pages >= 0 and phantom_zero >= 0
    assert (phantom_pages + phantom_zero) % threads == 0
    assert comp["compressed-size"] == sum(r.size - 8 for r in crecs) - 8 * phantom_pages
    assert pages["normal"] == q["ram"]["normal"]
    assert pages["zero"] + pages["normal"] + pages["compressed"] == q["ram"]["total"] // PAGE
    for r in crecs:
        assert len(zlib.decompress(bytes(r.data))) == PAGE


def test_page_counts_ignore_shared(capture):
    """x-ignore-shared: the shared block ("mem", the memfd backend) is announced in
    MEM_SIZE (whose total counts it: ram_bytes_total_with_ignored) but none of its
    pages is sent, and query-migrate's ``total`` leaves it out."""
    path, meta = capture("pc-7.2-ignore-shared-uuid")
    ram = meta["query_migrate"]["ram"]
    s = _summary(path)
    blocks = {b["name"]: b for b in s["ram"]["blocks"]}
    assert blocks["mem"]["used_length"] == 32 << 20
    assert "mem" not in s["ram"]["pages_per_block"]
    assert s["ram"]["pages"]["zero"] == ram["duplicate"]
    assert s["ram"]["pages"]["normal"] == ram["normal"]
    assert s["ram"]["pages"]["zero"] + s["ram"]["pages"]["normal"] == ram["total"] // PAGE
    mem_size = next(r for r in _records(path) if isinstance(r, R.RamMemSize))
    assert mem_size.total == ram["total"] + blocks["mem"]["used_length"]


def parse_multifd_channel(data):
    """MultiFDInit_t then MultiFDPacket_t packets (7.2 migration/multifd.h): returns
    (channel id, [(flags, normal_pages, packet_num, ramblock, offsets, payload)])."""
    magic, version = struct.unpack_from(">II", data, 0)
    assert (magic, version) == (0x11223344, 1)
    cid = data[24]
    off, packets = 64, []
    while off < len(data):
        magic, version, flags, alloc, normal, nxt, num = struct.unpack_from(">IIIIIIQ", data, off)
        assert (magic, version) == (0x11223344, 1)
        # next_packet_size is only refreshed when a packet has pages: SYNC packets
        # (no pages) repeat the previous value (7.2 multifd_send_thread/nocomp_send_prepare)
        assert nxt == normal * PAGE or (normal == 0 and flags & 1)
        block = data[off + 64:off + 320].split(b"\0")[0].decode()
        offsets = struct.unpack_from(f">{normal}Q", data, off + 320)
        start = off + 320 + 8 * alloc
        packets.append((flags, normal, num, block, offsets, data[start:start + normal * PAGE]))
        off = start + normal * PAGE
    assert off == len(data)
    return cid, packets


def _channels(meta):
    return [xz_bytes(c["file"]) for c in meta["channels"]]


def test_multifd_channels_and_counts(capture):
    """multifd (7.2): the main stream carries the zero pages only, the channels every
    normal page; ``multifd-bytes`` counts the channels without their 64-byte
    MultiFDInit_t."""
    path, meta = capture("pc-7.2-multifd")
    q = meta["query_migrate"]["ram"]
    pages = _summary(path)["ram"]["pages"]
    assert pages["normal"] == pages["xbzrle"] == pages["compressed"] == 0
    assert pages["zero"] == q["duplicate"]
    chans = _channels(meta)
    assert [hashlib.sha256(c).hexdigest() for c in chans] == \
        [c["sha256"] for c in meta["channels"]]
    parsed = [parse_multifd_channel(c) for c in chans]
    assert [cid for cid, _ in parsed] == [0, 1]
    normal = sum(p[1] for _, pk in parsed for p in pk)
    assert normal == q["normal"]
    assert pages["zero"] + normal == q["total"] // PAGE
    assert q["multifd-bytes"] == sum(len(c) - 64 for c in chans)
    # packet numbers are unique across channels and start with one SYNC packet each
    nums = sorted(p[2] for _, pk in parsed for p in pk)
    assert nums == list(range(len(nums)))
    assert all(pk[0][0] & 1 and pk[0][1] == 0 for _, pk in parsed)


# -- structure of particular captures ---------------------------------------------------
def test_old_machine_has_no_configuration_footers_or_trailer(capture):
    path, _ = capture("pc-i440fx-2.2-paused")
    reader = StreamReader(str(path))
    recs = list(reader.records())
    assert not any(isinstance(r, (Configuration, SectionFooter, VmDescription)) for r in recs)
    assert reader.footers is False
    assert recs[-1].kind == "eof" or type(recs[-1]).__name__ == "EndOfStream"
    assert recs[-1].offset == path.stat().st_size - 1


def test_sections_bounded_without_description_end_where_the_description_says(capture):
    """pc-i440fx-2.2 suppresses the trailer; with suppress-vmdesc=off the same machine
    writes the same bytes plus a trailer.  Without it every device section is bounded
    by looking for the next header; the records must be the ones the description gives."""
    bare, _ = capture("pc-i440fx-2.2-devices")
    full, _ = capture("pc-i440fx-2.2-devices-vmdesc")
    a, b = bare.read_bytes(), full.read_bytes()
    assert b[:len(a)] == a and b[len(a)] == 0x06
    ra, rb = _records(bare), _records(full)
    assert isinstance(rb[-1], VmDescription) and rb[-1].offset == len(a)
    assert len(ra) == len(rb) - 1
    for x, y in zip(ra, rb):
        # an opaque payload on one side is a decoded device state on the other
        same_kind = x.kind == y.kind or {x.kind, y.kind} == {"payload", "device_state"}
        assert same_kind and (x.offset, x.size) == (y.offset, y.size)
    heads = [r for r in ra if isinstance(r, SectionHeader) and r.full]
    assert len(heads) == len(rb[-1].obj["devices"]) + 1 == 59      # + ram
    bounded = {h for s in _summary(bare)["sections"] for h in s.get("bounded_by", [])}
    assert "description" not in bounded and bounded


def test_block_migration_carries_the_disk(capture):
    from qmigstream.codec.sections.block import BlockRecord
    path, meta = capture("pc-7.2-block")
    recs = [r for r in _records(path) if isinstance(r, BlockRecord)]
    blocks = [r for r in recs if r.device is not None]
    assert [(r.device, r.sector, len(r.data)) for r in blocks] == [("d0", 0, 1 << 20)]
    disk = capture_tool.disk_pattern()
    assert bytes(blocks[0].data) == disk
    assert hashlib.sha256(disk).hexdigest() == meta["disk"]["sha256"]
    flags = [r.fields()["flags"] for r in recs]
    # setup: EOS; iterations: PROGRESS, the block (in the first or a later one), EOS;
    # completion: PROGRESS, EOS
    assert flags[0] == "EOS" and flags[-2:] == ["PROGRESS", "EOS"]
    assert flags.count("DEVICE_BLOCK") == 1
    assert set(flags) == {"EOS", "PROGRESS", "DEVICE_BLOCK"}


def test_dirty_bitmaps_section(capture):
    """Two bitmaps on node d0 (64 KiB granularity), 128 KiB written at 64 KiB:
    bits 1 and 2 set in both; dirty-bitmaps makes 7.2 advise postcopy (no payload)."""
    from qmigstream.codec.sections.dirty_bitmap import DirtyBitmapRecord
    path, _ = capture("pc-7.2-dirty-bitmaps")
    recs = _records(path)
    cmds = [r.fields() for r in recs if isinstance(r, Command)]
    assert cmds == [{"command": "POSTCOPY_ADVISE", "cmd": 3}]
    dbm = [r.fields() for r in recs if isinstance(r, DirtyBitmapRecord)
           and r.fields()["flags"] != "EOS"]
    assert dbm == [
        {"flags": "BITMAP_NAME|DEVICE_NAME|START", "node": "d0", "bitmap": "bm1",
         "granularity": 65536, "start_flags": 1},
        {"flags": "BITMAP_NAME|START", "bitmap": "bm0", "granularity": 65536, "start_flags": 1},
        {"flags": "BITMAP_NAME|BITS", "bitmap": "bm1", "start_sector": 0, "nr_sectors": 2048,
         "buf_size": 32},
        {"flags": "BITMAP_NAME|BITS", "bitmap": "bm0", "start_sector": 0, "nr_sectors": 2048,
         "buf_size": 32},
        {"flags": "BITMAP_NAME|COMPLETE", "bitmap": "bm1"},
        {"flags": "BITMAP_NAME|COMPLETE", "bitmap": "bm0"},
    ]
    bufs = [bytes(r.buf) for r in recs if isinstance(r, DirtyBitmapRecord) and r.buf]
    assert bufs == [b"\x06" + bytes(31)] * 2


def test_noconfig_keeps_footers_and_trailer(capture):
    path, _ = capture("pc-7.2-noconfig")
    recs = _records(path)
    assert not any(isinstance(r, Configuration) for r in recs)
    headers = [r for r in recs if isinstance(r, SectionHeader)]
    footers = [r for r in recs if isinstance(r, SectionFooter)]
    assert len(headers) == len(footers) > 20
    assert isinstance(recs[-1], VmDescription)
    assert recs[1].offset == 8 and isinstance(recs[1], SectionHeader)


def test_postcopy_advised_commands(capture):
    path, _ = capture("pc-7.2-postcopy-advised")
    cmds = [(r.offset, r.fields()) for r in _records(path) if isinstance(r, Command)]
    assert cmds == [
        (26, {"command": "OPEN_RETURN_PATH", "cmd": 1}),
        (31, {"command": "PING", "cmd": 2, "args": {"value": 1}}),
        (40, {"command": "POSTCOPY_ADVISE", "cmd": 3,
              "args": {"host_page_summary": 4096, "target_page_size": 4096}}),
    ]


def test_ignore_shared_configuration_and_mem_size(capture):
    path, _ = capture("pc-7.2-ignore-shared-uuid")
    recs = _records(path)
    conf = next(r for r in recs if isinstance(r, Configuration))
    f = conf.fields()
    assert f["machine"] == "pc-i440fx-7.2"
    assert [(s["name"], s["offset"]) for s in f["subsections"]] == \
        [("configuration/capabilities", 26), ("configuration/uuid", 78)]
    assert f["subsections"][0]["capabilities"] == ["x-ignore-shared"]
    assert f["subsections"][1]["uuid"] == capture_tool.UUID
    mem = next(r for r in recs if isinstance(r, R.RamMemSize))
    assert [(b.name, b.mr_addr) for b in mem.blocks] == [
        ("mem", 0), ("/rom@etc/acpi/tables", 0), ("pc.bios", 0xFFFC0000),
        ("pc.rom", 0xC0000), ("/rom@etc/table-loader", 0), ("/rom@etc/acpi/rsdp", 0)]


def test_devices_sections(capture):
    path, _ = capture("pc-7.2-devices")
    idstrs = {s["idstr"] for s in _summary(path)["sections"]}
    for want in ("0000:00:03.0/e1000", "0000:00:04.0/rtl8139", "0000:00:05.0/virtio-net",
                 "0000:00:06.0/virtio-blk", "0000:00:07.0/virtio-console",
                 "0000:00:0a.0/virtio-iommu", "0000:00:0c.0/xhci", "0000:00:0c.0/1/usb-ptr",
                 "0000:00:0b.0/uhci", "serial", "0000:00:02.0/vga"):
        assert want in idstrs


def test_loader_pages_are_the_loaded_blob(capture):
    """The 64 pages put at 2 MiB by -device loader come back page for page: zero
    pages as ZERO records, every other page (random or one repeated byte) as PAGE."""
    path, meta = capture("pc-7.2-loader")
    ld = meta["loader"]
    blob = capture_tool.loader_pattern(ld["seed"], ld["pages"])
    assert hashlib.sha256(blob).hexdigest() == ld["sha256"]
    seen = {}
    for r in _records(path, compact=False):
        if isinstance(r, (R.RamZero, R.RamPage)) and r.block == "pc.ram" and \
                ld["addr"] <= r.addr < ld["addr"] + ld["pages"] * PAGE:
            seen[r.addr] = r
    assert len(seen) == ld["pages"]
    for i in range(ld["pages"]):
        r = seen[ld["addr"] + i * PAGE]
        want = blob[i * PAGE:(i + 1) * PAGE]
        if i % 4 == 0:
            assert isinstance(r, R.RamZero) and r.fill == 0
        else:
            assert isinstance(r, R.RamPage) and bytes(r.data) == want


# -- guest RAM rebuilt from the stream vs QEMU's pmemsave ------------------------------------
def rebuild_block(records, block, size, channels=()):
    """Apply every page record of ``block`` in order (XBZRLE against the page so far)."""
    mem = bytearray(size)
    for r in records:
        if getattr(r, "block", None) != block:
            continue
        if isinstance(r, R.RamZeroRun):
            mem[r.addr:r.addr + r.count * r.page_size] = bytes(r.count * r.page_size)
        elif isinstance(r, R.RamZero):
            mem[r.addr:r.addr + PAGE] = bytes([r.fill]) * PAGE
        elif isinstance(r, R.RamPage):
            mem[r.addr:r.addr + PAGE] = r.data
        elif isinstance(r, R.RamCompressed):
            mem[r.addr:r.addr + PAGE] = zlib.decompress(bytes(r.data))
        elif isinstance(r, R.RamXbzrle):
            old = bytes(mem[r.addr:r.addr + PAGE])
            mem[r.addr:r.addr + PAGE] = xbzrle.decode(bytes(r.data), old)
    for data in channels:
        for _, _, _, blk, offsets, payload in parse_multifd_channel(data)[1]:
            if blk == block:
                for k, o in enumerate(offsets):
                    mem[o:o + PAGE] = payload[k * PAGE:(k + 1) * PAGE]
    return mem


WITH_RAM = [n for n in sorted(EXPECTED) if n != "pc-7.2-ignore-shared-uuid"]


@pytest.mark.parametrize("name", WITH_RAM)
def test_ram_matches_pmemsave(name, capture):
    path, meta = capture(name)
    recs = _records(path)
    mem_size = next(r for r in recs if isinstance(r, R.RamMemSize))
    size = next(b.used_length for b in mem_size.blocks if b.name == "pc.ram")
    chans = _channels(meta) if "channels" in meta else ()
    mem = rebuild_block(recs, "pc.ram", size, chans)
    dumps = {m["addr"]: m for m in meta["memory"]}
    assert set(dumps) == {0, 0x100000}
    assert dumps[0]["size"] == 0xA0000 and dumps[0x100000]["size"] == size - 0x100000
    for addr, m in dumps.items():
        part = bytes(mem[addr:addr + m["size"]])
        assert hashlib.sha256(part).hexdigest() == m["sha256"], f"{name} @0x{addr:x}"
        if m["file"]:
            assert xz_bytes(m["file"]) == part


def test_running_guest_memory_shows_the_loop(capture):
    """The dirtying MBR incremented one word per page: after migration every one of
    its pages holds a non-zero counter at 0x100 and nothing else."""
    path, meta = capture("pc-7.2-running-xbzrle")
    g = meta["guest_program"]
    mem = rebuild_block(_records(path), "pc.ram", 32 << 20)
    for i in range(g["pages"]):
        page = mem[g["first_page"] + i * PAGE:g["first_page"] + (i + 1) * PAGE]
        counter = struct.unpack_from("<H", page, 0x100)[0]
        assert counter != 0
        assert page[:0x100] == bytes(0x100) and page[0x102:] == bytes(PAGE - 0x102)
    assert mem[0x7C00:0x7E00] == capture_tool.mbr_dirty_loop(g["pages"])


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("-mapped-ram")])
def test_mapped_ram_counts(name, capture):
    """mapped-ram (9.0+ file:): the block list comes as separate entries, each with its
    MappedRamHeader; the pages the bitmaps mark are QEMU's ``normal`` pages, the rest
    of every block its ``duplicate`` (zero) pages, which are left as holes."""
    path, meta = capture(name)
    ram = meta["query_migrate"]["ram"]
    s = _summary(path)
    blocks = s["ram"]["blocks"]
    assert blocks and all("mapped_ram" in b for b in blocks)
    marked = s["ram"]["mapped_ram_pages"]
    assert set(marked) == {b["name"] for b in blocks}
    assert sum(marked.values()) == ram["normal"]
    assert sum(b["used_length"] for b in blocks) // PAGE == ram["total"] // PAGE
    assert sum(b["used_length"] for b in blocks) // PAGE - sum(marked.values()) == \
        ram["duplicate"]
    assert s["ram"]["pages"] == {"zero": 0, "normal": 0, "xbzrle": 0, "compressed": 0}


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("-postcopy")])
def test_postcopy_capture_layout(name, capture):
    """A migration switched to postcopy: the RAM discards, then PACKAGED holding
    LISTEN, the device sections and RUN, then postcopy RAM and EOF; no trailer."""
    path, meta = capture(name)
    recs = _records(path)
    top = [(r.name if isinstance(r, Command) else r.kind) for r in recs
           if r.depth == 0 and r.kind in ("command", "eof", "vmdescription")]
    assert top[-1] == "eof" and "vmdescription" not in top
    assert top.index("POSTCOPY_RAM_DISCARD") < top.index("PACKAGED")
    nested = [r for r in recs if r.depth == 1]
    names = [r.name for r in nested if isinstance(r, Command)]
    assert names[0] == "POSTCOPY_LISTEN" and names[-1] == "POSTCOPY_RUN"
    assert sum(1 for r in nested if isinstance(r, SectionHeader) and r.full) >= 25
    assert meta["query_migrate"]["status"] == "completed"
