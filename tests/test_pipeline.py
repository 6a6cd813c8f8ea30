"""The migration pipeline: every profile's output decodes, round-trips and replays with verified equality."""

from __future__ import annotations

import hashlib
import sys
import json

import numpy as np
import pytest

from conftest import capture_names, requires_qemu
from qmigstream.codec.reader import read_records
from qmigstream.codec.sections.vfio import VfioDataChunk, VfioMarker
from qmigstream.codec.writer import encode_records
from qmigstream.cli import main
from qmigstream.pipeline import profiles as P
from qmigstream.pipeline.migrate import DeviceSpec, MigrateConfig, migrate
from qmigstream.pipeline.replay import Destination, replay
from qmigstream.vfio.scan import scan
from qmigstream.wire.vfio import Marker


def small(profile, **kw):
    base = dict(profile=profile, ram_size=8 << 20, iterations=3, dirty_rate=20000,
                bandwidth=64 << 20, xbzrle=True, seed=3,
                devices=[DeviceSpec("sized:96K", seed=1, dma_rate=3000),
                         DeviceSpec("mtty", seed=2)], stream_sha256=True)
    base.update(kw)
    return MigrateConfig(**base)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    out = {}
    for name in P.PROFILES:
        path = d / f"{name}.mig"
        res = migrate(path, small(name))
        out[name] = (path, res)
    return out


@pytest.mark.parametrize("name", list(P.PROFILES))
def test_profile_output_round_trips_and_replays_verified(name, outputs):
    path, res = outputs[name]
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == res.sha256
    assert len(data) == res.size
    recs = list(read_records(str(path)))
    assert encode_records(recs) == data
    rr = replay(str(path), expect=res.to_json())
    assert rr.ok, rr.error
    assert rr.verified, rr.mismatches
    assert rr.ram == res.ram
    assert [d["state_after"] for d in rr.devices] == [d["state_digest"] for d in res.devices]
    assert all(d["state_before"] != d["state_after"] for d in rr.devices)


@pytest.mark.parametrize("name", list(P.PROFILES))
def test_profile_writes_its_release_layout(name, outputs):
    path, res = outputs[name]
    prof = P.get(name)
    devices, hints = scan(str(path))
    assert len(devices) == 2
    for dev in devices.values():
        assert prof.vfio_family in dev.family.candidates, dev.family.reason
        kinds = [s["type"] for s in dev.sections]
        if prof.vfio_family == "5.2":
            assert "FULL" not in kinds
        else:
            assert kinds[-1] == "FULL"
        if prof.vfio_family == "8.0":
            assert "PART" not in kinds
    assert hints["switchover_start"] == (prof.switchover_start and
                                         prof.sends_switchover_start(prof.machine))
    assert hints["vmdesc_configuration"] == prof.vmdesc_configuration
    trailer = [r for r in read_records(str(path)) if r.kind == "vmdescription"][0]
    text = trailer.json_bytes
    assert text.startswith(b"{ " if prof.json_style == "qjson" else b'{"')


def test_same_configuration_same_bytes(tmp_path):
    a, b, c = tmp_path / "a.mig", tmp_path / "b.mig", tmp_path / "c.mig"
    ra = migrate(a, small("qemu-8.2", switchover_ack=True))
    rb = migrate(b, small("qemu-8.2", switchover_ack=True))
    rc = migrate(c, small("qemu-8.2", switchover_ack=True, seed=4))
    assert a.read_bytes() == b.read_bytes() and ra.sha256 == rb.sha256
    assert ra.sha256 != rc.sha256 and ra.ram == rb.ram and ra.ram != rc.ram
    rd = migrate(tmp_path / "d.mig", small("qemu-8.2", switchover_ack=True,
                                           stream_sha256=False))
    assert rd.sha256 is None and rd.ram == ra.ram


def test_switchover_ack_marks_initial_data_sent_once(tmp_path):
    p = tmp_path / "s.mig"
    migrate(p, small("qemu-9.2", switchover_ack=True))
    recs = list(read_records(str(p)))
    assert [r.kind for r in recs[:4]][2:] == ["command", "command"]      # return path
    assert recs[2].name == "OPEN_RETURN_PATH" and recs[3].args == {"value": 1}
    inits = [r for r in recs if isinstance(r, VfioMarker) and r.marker == Marker.DEV_INIT_DATA_SENT]
    assert len(inits) == 2           # one per device


def test_v1_dirty_pages_found_through_a_one_bit_bitmap_buffer(tmp_path):
    """DMA writes during pre-copy are found by the copied_pfns dialogue (1 pfn per read)
    and resent; the destination's RAM equals the source's only if they were."""
    p = tmp_path / "v1.mig"
    cfg = small("qemu-7.2", v1_bitmap_bits=1, dirty_rate=0, xbzrle=False,
                devices=[DeviceSpec("sized:16K", seed=9, dma_rate=20000)])
    res = migrate(p, cfg)
    rr = replay(str(p), expect=res.to_json())
    assert rr.ok and rr.verified, rr.mismatches
    # pages the device wrote were sent again after the first pass
    recs = list(read_records(str(p)))
    later = [r for r in recs if r.kind in ("ram_page", "ram_xbzrle") and r.offset >
             next(x.offset for x in recs if x.kind == "section" and x.type_name == "PART") and
             0x100000 <= r.addr < 0x100000 + 256 * 4096]
    assert later


def test_exact_chunk_boundaries(tmp_path):
    """A v2 read buffer of 1 MiB: a state of 1 MiB - 28 gives one 1 MiB blob chunk, + 1 two."""
    sizes = {}
    for extra in (0, 1):
        p = tmp_path / f"c{extra}.mig"
        state = (1 << 20) - 64 - 28 + extra          # registers + blob overhead
        migrate(p, small("qemu-8.0", devices=[DeviceSpec(f"sized:{state}", seed=1)]))
        sizes[extra] = [r.data_size for r in read_records(str(p)) if isinstance(r, VfioDataChunk)]
    assert sizes[0] == [1 << 20]
    assert sizes[1] == [1 << 20, 1]


def test_zero_length_device_state(tmp_path):
    p = tmp_path / "z.mig"
    res = migrate(p, small("qemu-10.0", devices=[DeviceSpec("sized:0", seed=1)]))
    rr = replay(str(p), expect=res.to_json())
    assert rr.ok and rr.verified


# -- failure atomicity ------------------------------------------------------------

def _dests(res):
    return {d["idstr"]: Destination(d["idstr"], d["interface"], d["profile"],
                                    features=d["features"], v1_layout=d["v1_layout"])
            for d in res.devices}


@pytest.mark.parametrize("name", ["qemu-7.2", "qemu-8.2"])
def test_cut_stream_leaves_every_device_as_it_was(name, outputs, tmp_path):
    path, res = outputs[name]
    data = path.read_bytes()
    recs = list(read_records(str(path)))
    chunks = [r for r in recs if isinstance(r, VfioDataChunk)]
    eof = next(r for r in recs if r.kind == "eof")
    cuts = [chunks[1].offset + 20, chunks[-1].offset + 17, len(data) // 2, eof.offset]
    for cut in cuts:
        p = tmp_path / f"cut{cut}.mig"
        p.write_bytes(data[:cut])
        dests = _dests(res)
        before = {k: d.device.state_digest() for k, d in dests.items()}
        rr = replay(str(p), destinations=dests)
        assert not rr.ok
        assert rr.error["offset"] is not None
        assert {k: d.device.state_digest() for k, d in dests.items()} == before
        assert all(not d.begun for d in dests.values())


def test_a_cut_trailer_still_loads_as_in_qemu(outputs, tmp_path):
    """QEMU reads the VMDESCRIPTION after EOF only to drain it: a short one is no error."""
    path, res = outputs["qemu-7.2"]
    p = tmp_path / "t.mig"
    p.write_bytes(path.read_bytes()[:-1])
    rr = replay(str(p), expect=res.to_json())
    assert rr.ok and rr.verified


def test_corrupt_device_data_is_rejected_at_its_chunk(outputs, tmp_path):
    path, res = outputs["qemu-8.2"]
    data = bytearray(path.read_bytes())
    chunk = [r for r in read_records(str(path)) if isinstance(r, VfioDataChunk)][0]
    data[chunk.data_offset + 40] ^= 0xFF           # inside the first blob's payload
    p = tmp_path / "bad.mig"
    p.write_bytes(data)
    dests = _dests(res)
    before = {k: d.device.state_digest() for k, d in dests.items()}
    rr = replay(str(p), destinations=dests)
    assert not rr.ok
    assert rr.error["errno"] is not None
    assert rr.error["offset"] >= chunk.offset
    assert {k: d.device.state_digest() for k, d in dests.items()} == before


def test_a_device_failing_its_commit_undoes_the_ones_before(outputs):
    path, res = outputs["qemu-8.2"]
    dests = _dests(res)
    before = {k: d.device.state_digest() for k, d in dests.items()}
    last = list(dests.values())[-1]
    last.io.dev.inject_fault(5, arc=("RESUMING", "STOP"))
    rr = replay(str(path), destinations=dests)
    assert not rr.ok and rr.error["device"] == last.idstr
    first = list(dests.values())[0]
    assert first.device.state_digest() == before[first.idstr]
    assert first.io.dev.state.name == "RUNNING"


def test_cli_migrate_then_replay(tmp_path, capsys):
    out = tmp_path / "o.mig"
    assert main(["migrate", "-o", str(out), "--profile", "9.2", "--ram-size", "8M",
                 "--device", "mtty", "--device", "sized:32K,dma=500", "--iterations", "2",
                 "--dirty-rate", "5000", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["profile"] == "qemu-9.2" and len(info["devices"]) == 2
    assert main(["replay", str(out), "--expect", info["manifest"]]) == 0
    text = capsys.readouterr().out
    assert "verified: source and destination are equal" in text
    data = out.read_bytes()
    (tmp_path / "t.mig").write_bytes(data[:len(data) // 2])
    assert main(["replay", str(tmp_path / "t.mig"), "--expect", info["manifest"]]) in (1, 2)
    assert "NOT loaded" in capsys.readouterr().out


# -- real QEMU loads the template outputs ----------------------------------------------

@requires_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("name,args", [
    ("pc-7.2-paused", ["-machine", "pc", "-m", "32"]),
    ("q35-7.2-paused", ["-machine", "q35", "-m", "32"]),
])
def test_qemu_loads_template_output_with_the_pipelines_memory(name, args, capture, tmp_path):
    from qmigstream.pipeline.guest import load_stream_ram
    from qmigstream.qemu.runner import load_incoming
    if name not in capture_names():
        pytest.skip(f"{name} not committed")
    tpl, meta = capture(name)
    args = meta["qemu_argv"][meta["qemu_argv"].index("-machine"):]
    args = args[:args.index("-qmp")] if "-qmp" in args else args
    out = tmp_path / "out.mig"
    res = migrate(out, MigrateConfig(profile="qemu-7.2", template=str(tpl), devices=[],
                                     iterations=3, dirty_rate=40000, xbzrle=True,
                                     bandwidth=32 << 20, seed=11))
    assert res.pages["xbzrle"] > 0
    m0, m1 = tmp_path / "m0", tmp_path / "m1"
    ram_size = 32 << 20
    r = load_incoming(args, str(out), pmemsave=[(0, 0xA0000, str(m0)),
                                               (0x100000, ram_size - 0x100000, str(m1))])
    assert r.loaded, r.stderr
    ram = load_stream_ram(out)
    pc = ram.block("pc.ram")
    assert pc.digest() == res.ram["pc.ram"]
    assert m0.read_bytes() == pc.mem[:0xA0000]
    assert m1.read_bytes() == pc.mem[0x100000:ram_size]


@pytest.mark.parametrize("xbzrle_on", [True, False])
def test_fast_ram_pass_equals_the_record_path(xbzrle_on):
    """RamSaver.pass_bytes (the fast path) writes exactly what pass_records' records encode:
    with XBZRLE (runs of pages in the first pass, page by page after), without (runs of
    pages in every pass: unwritten runs as ZERO runs, data pages as RAM views)."""
    from qmigstream.pipeline.guest import CpuWorkload, GuestRam, fill_initial
    from qmigstream.pipeline.ramsave import RamSaver

    def make():
        ram = GuestRam([("pc.ram", 6 << 20), ("rom", 64 << 10), ("one", 4096),
                        ("runs", 1 << 20)])
        fill_initial(ram, seed=5, fraction=0.3, uniform=0.1)
        ram.block("rom").write(4096, b"\x01" * 100)
        ram.block("rom").write(3 * 4096, bytes(4096))  # written, yet zero
        # long runs of consecutive data pages (copied run by run), one page zero
        ram.block("runs").write(10 * 4096, bytes(range(256)) * 16 * 150)
        ram.block("runs").write(190 * 4096, b"\x05" * 4096 * 60)
        ram.block("runs").write(70 * 4096, bytes(4096))
        return ram, RamSaver(ram, xbzrle_on=xbzrle_on, cache_size=1 << 20)

    (ra, sa), (rb, sb) = make(), make()
    wa, wb = (CpuWorkload(r, seed=2, rate=1, store_size=48) for r in (ra, rb))
    for rnd in range(4):
        sa.sync()
        sb.sync()
        slow = b"".join(r.encode() for r in sa.pass_records(last_stage=rnd == 3))
        fast = b"".join(bytes(p) for piece in sb.pass_bytes(last_stage=rnd == 3)
                        for p in piece)
        assert fast == slow, rnd
        assert sa.counts == sb.counts
        wa.run_stores(3000)
        wb.run_stores(3000)
        ra.main.write(0x200000, bytes(8192))           # pages that turn zero
        rb.main.write(0x200000, bytes(8192))
        if rnd == 1:
            for r in (ra, rb):
                r.block("one").write(0, b"\x07")     # the only page of a block
    assert sa.counts["zero"] > 0 and sa.counts["normal"] > 0
    assert sa.counts["xbzrle"] > 0 if xbzrle_on else sa.counts["xbzrle"] == 0


def test_nonzero_pages_and_the_written_marks():
    """Pages never written are zero without being read; written ones are checked."""
    from qmigstream.pipeline.guest import GuestRam
    ram = GuestRam([("pc.ram", 64 * 4096)])
    blk = ram.main
    blk.write(5 * 4096 + 4000, b"\x01")              # last word of page 5
    blk.write(7 * 4096, bytes(4096))                   # written, zero
    blk.mem[9 * 4096] = 3                              # a direct store, marked below
    assert blk.nonzero_pages().tolist() == [5]
    blk.mark_written(9)
    assert blk.nonzero_pages().tolist() == [5, 9]
    blk.store_pages(np.array([20, 22]), np.full((2, 4096), 9, np.uint8))
    assert blk.nonzero_pages().tolist() == [5, 9, 20, 22]
    assert blk.nonzero(np.arange(4, 24)) == [i in (5, 9, 20, 22) for i in range(4, 24)]
    assert blk.nonzero([3, 9, 22, 40]) == [False, True, True, False]
    assert list(blk.nonzero_runs()) == [(5, 1), (9, 1), (20, 1), (22, 1)]
    assert list(blk.nonzero_runs(6, 21)) == [(9, 1), (20, 1)]
    assert ram.resident_pages() == 4


def test_ram_digests_see_one_byte():
    """Both RAM digests change with any one byte, and pages-crc32 with which page is
    non-zero (the same bytes one page on are different memory)."""
    from qmigstream.pipeline.guest import RAM_DIGESTS, GuestRam
    for scheme in RAM_DIGESTS:
        a, b, c = (GuestRam([("pc.ram", 32 * 4096)]) for _ in range(3))
        for r in (a, b):
            r.main.write(3 * 4096, bytes(range(256)) * 16)
        c.main.write(4 * 4096, bytes(range(256)) * 16)
        assert a.main.digest(scheme) == b.main.digest(scheme)
        assert a.main.digest(scheme) != c.main.digest(scheme)
        for pos in (3 * 4096, 3 * 4096 + 4095, 31 * 4096 + 17):
            b.main.mem[pos] ^= 0x01
            b.main.mark_written(pos // 4096)
            assert a.main.digest(scheme) != b.main.digest(scheme), (scheme, pos)
            b.main.mem[pos] ^= 0x01
            b.main.mark_written(pos // 4096)          # a direct store is marked
            assert a.main.digest(scheme) == b.main.digest(scheme)
    with pytest.raises(Exception):
        a.main.digest("md5")


def _page_record(path):
    from qmigstream.codec import ram_records as R
    return [r for r in read_records(str(path)) if isinstance(r, R.RamPage)][-1]


@pytest.mark.parametrize("ram_digest", ["pages-crc32", "sha256"])
def test_replay_expect_catches_one_differing_ram_byte(tmp_path, ram_digest):
    p = tmp_path / "a.mig"
    res = migrate(p, small("qemu-8.2", ram_digest=ram_digest, xbzrle=False, dirty_rate=0))
    assert res.ram_digest == ram_digest
    man = res.to_json()
    rr = replay(str(p), expect=man)
    assert rr.ok and rr.verified and rr.ram_digest == ram_digest
    rec = _page_record(p)
    data = bytearray(p.read_bytes())
    data[rec.offset + len(rec.encode()) - 1] ^= 0x20     # the page's last byte
    bad = tmp_path / "b.mig"
    bad.write_bytes(data)
    rr = replay(str(bad), expect=man)
    assert rr.ok and rr.verified is False
    assert len(rr.mismatches) == 1 and "RAM block pc.ram" in rr.mismatches[0]
    # the CLI: exit 1, "verification FAILED"
    mpath = tmp_path / "m.json"
    mpath.write_text(json.dumps(man))
    assert main(["replay", str(bad), "--expect", str(mpath)]) == 1


def test_replay_expect_catches_a_zero_page_turned_non_zero(tmp_path):
    from qmigstream.codec import ram_records as R
    p = tmp_path / "a.mig"
    res = migrate(p, small("qemu-8.2", xbzrle=False, dirty_rate=0))
    run = [r for r in read_records(str(p)) if isinstance(r, R.RamZeroRun)][-1]
    data = bytearray(p.read_bytes())
    at = run.offset + run.size - 1                       # the run's last fill byte
    assert run.size == 9 * run.count and data[at] == 0
    data[at] = 1                                         # fill 0 -> fill 1
    bad = tmp_path / "b.mig"
    bad.write_bytes(data)
    rr = replay(str(bad), expect=res.to_json())
    assert rr.ok and rr.verified is False and "RAM block pc.ram" in rr.mismatches[0]


def test_replay_expect_catches_one_differing_device_byte(tmp_path):
    """A device image byte changed (the blob's CRC fixed up so the device takes it)."""
    import struct
    import zlib
    p = tmp_path / "a.mig"
    res = migrate(p, small("qemu-8.2", devices=[DeviceSpec("sized:8K", seed=1)]))
    chunk = [r for r in read_records(str(p)) if isinstance(r, VfioDataChunk)][0]
    data = bytearray(p.read_bytes())
    blob = data[chunk.data_offset:chunk.data_offset + chunk.data_size]
    n = struct.unpack_from("<Q", blob, 16)[0]
    assert len(blob) == 24 + n + 4                        # the whole FULL blob
    blob[24 + 100] ^= 0x01
    struct.pack_into("<I", blob, 24 + n, zlib.crc32(bytes(blob[:24 + n])))
    data[chunk.data_offset:chunk.data_offset + chunk.data_size] = blob
    bad = tmp_path / "b.mig"
    bad.write_bytes(data)
    rr = replay(str(bad), expect=res.to_json())
    assert rr.ok and rr.verified is False
    assert rr.mismatches == [f"{res.devices[0]['idstr']}: device state differs from the source's"]


def test_a_manifest_without_ram_digest_is_sha256(tmp_path):
    """Manifests written before pages-crc32 carry whole-block sha256 digests."""
    p = tmp_path / "a.mig"
    res = migrate(p, small("qemu-8.2", ram_digest="sha256"))
    man = res.to_json()
    del man["ram_digest"]
    rr = replay(str(p), expect=man)
    assert rr.ok and rr.verified and rr.ram_digest == "sha256"
    man["ram_digest"] = "pages-crc32"                  # a manifest that lies about them
    rr = replay(str(p), expect=man)
    assert rr.verified is False


def test_v1_round_stops_at_the_first_device_that_sent_data(tmp_path):
    """7.2's qemu_savevm_state_iterate: a v1 device that sent data is "not done", so the
    next device gets no PART that round; a device with nothing pending writes DATA 0."""
    p = tmp_path / "two.mig"
    migrate(p, small("qemu-7.2", iterations=6, dirty_rate=0,
                     devices=[DeviceSpec("sized:128K", seed=1), DeviceSpec("mtty", seed=2)]))
    devices, _ = scan(str(p))
    big, small_dev = devices.values()
    parts = lambda d: [s for s in d.sections if s["type"] == "PART"]  # noqa: E731
    sizes = [[r.data_size for r in s["records"] if r.kind == "vfio_data"] for s in parts(big)]
    # the 128K device sends one 64 KiB window per round until it runs dry (then DATA 0)
    assert len(sizes) == 6 and all(len(x) == 1 for x in sizes)
    dry = [i for i, x in enumerate(sizes) if x == [0]]
    assert dry and all(x[0] > 0 for x in sizes[:dry[0]])
    # the second device's PARTs only come in rounds where the first one was done
    assert len(parts(small_dev)) == 6 - dry[0]


# -- fault injection on the v2 data file ------------------------------------------

def test_short_reads_on_the_source_data_file_still_give_a_loadable_stream(tmp_path, monkeypatch):
    """read() may return less than asked: every read becomes its own DATA chunk.
    (The source reads with read_view, read() without the copy.)"""
    from qmigstream.device.device_v2 import MigrationFile
    real_read = MigrationFile.read_view
    monkeypatch.setattr(MigrationFile, "read_view",
                        lambda self, n=1 << 20: real_read(self, min(n, 777)))
    p = tmp_path / "short.mig"
    res = migrate(p, small("qemu-8.2", devices=[DeviceSpec("sized:8K", seed=1, dma_rate=500)]))
    sizes = [r.data_size for r in read_records(str(p)) if isinstance(r, VfioDataChunk)]
    assert sizes and max(sizes) <= 777 and len(sizes) > 10
    monkeypatch.undo()
    rr = replay(str(p), expect=res.to_json())
    assert rr.ok and rr.verified


def test_short_writes_on_the_destination_data_file_are_resumed(outputs, monkeypatch):
    """write() may accept part of a chunk: the rest is written again (qemu_file_get_to_fd)."""
    from qmigstream.device.device_v2 import MigrationFile
    calls = []
    real_write = MigrationFile.write

    def short_write(self, data):
        calls.append(len(data))
        return real_write(self, bytes(data)[:1000])

    monkeypatch.setattr(MigrationFile, "write", short_write)
    path, res = outputs["qemu-8.2"]
    rr = replay(str(path), expect=res.to_json())
    assert rr.ok and rr.verified
    assert max(calls) > 1000                    # chunks larger than a write took
    assert sum(1 for c in calls if c > 1000) >= 1


def test_a_data_file_that_stops_taking_bytes_leaves_devices_as_they_were(outputs, monkeypatch):
    from qmigstream.device.device_v2 import MigrationFile
    real_write = MigrationFile.write
    seen = []

    def failing_write(self, data):
        seen.append(len(data))
        if len(seen) == 3:
            return 0                             # no progress: QEMU's load fails
        return real_write(self, data)

    monkeypatch.setattr(MigrationFile, "write", failing_write)
    path, res = outputs["qemu-8.2"]
    dests = _dests(res)
    before = {k: d.device.state_digest() for k, d in dests.items()}
    rr = replay(str(path), destinations=dests)
    assert not rr.ok
    assert rr.error["errno"] == 5 and rr.error["offset"] is not None
    assert {k: d.device.state_digest() for k, d in dests.items()} == before
    assert all(d.io.dev.state.name == "RUNNING" for d in dests.values())


def test_a_failing_write_in_the_ram_pass_is_raised(tmp_path, monkeypatch):
    """A write of the RAM pass that fails comes out of migrate, no thread left behind."""
    import errno
    import threading
    from qmigstream.pipeline import migrate as M
    real = M.writev_all
    written = []

    def write(fd, pieces, totals=None):
        if sum(len(p) for p in pieces) > 100000:       # a batch of pages
            written.append(1)
            if len(written) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, pieces, totals)
    monkeypatch.setattr(M, "writev_all", write)
    before = threading.active_count()
    switch = sys.getswitchinterval()
    with pytest.raises(OSError) as ei:
        migrate(tmp_path / "a.mig", small("qemu-8.2", xbzrle=False, ram_size=64 << 20))
    assert ei.value.errno == errno.ENOSPC and len(written) == 2
    assert threading.active_count() == before
    assert sys.getswitchinterval() == switch


def test_pieces_are_written_before_ram_or_devices_change(tmp_path, monkeypatch):
    """The writer thread lags far behind (every write slowed down) while the CPU
    workload and the devices' DMA change RAM and device state between rounds:
    what the stream holds is still what each page and chunk held when it was
    sent, so replay verifies equal to the source; afterwards no thread is left
    and the GIL switch interval is back to what it was."""
    import threading
    import time
    from qmigstream.pipeline import migrate as M
    real = M.writev_all

    def slow(fd, pieces, totals=None):
        time.sleep(0.002)
        return real(fd, pieces, totals)
    monkeypatch.setattr(M, "writev_all", slow)
    before = threading.active_count()
    switch = sys.getswitchinterval()
    cfg = small("qemu-8.2", ram_size=16 << 20, dirty_rate=400000, iterations=4)
    res = migrate(tmp_path / "a.mig", cfg)
    assert threading.active_count() == before and sys.getswitchinterval() == switch
    monkeypatch.setattr(M, "writev_all", real)
    res2 = migrate(tmp_path / "b.mig", cfg)
    assert (tmp_path / "a.mig").read_bytes() == (tmp_path / "b.mig").read_bytes()
    assert res.pages["xbzrle"] > 0 and res.rounds == 4
    rr = replay(str(tmp_path / "a.mig"), expect=json.loads(json.dumps(res.to_json())))
    assert rr.ok and rr.verified, rr.mismatches
    assert res.ram == res2.ram


def test_loader_applies_a_run_of_pages_at_once():
    """RamLoader.pages_run: what a reader handing over runs of PAGE records needs."""
    from qmigstream.errors import StreamError
    from qmigstream.pipeline.guest import GuestRam, RamLoader
    ram = GuestRam([("pc.ram", 512 * 4096)])
    loader = RamLoader(ram)
    idx = np.arange(100, 300)
    data = (np.arange(200, dtype=np.uint8)[:, None] + np.zeros((1, 4096), np.uint8))
    loader.pages_run("pc.ram", idx, data)
    assert loader.pages == 200
    assert ram.main.nonzero_pages().tolist() == list(range(101, 300))   # page 100: zeros
    assert bytes(ram.main.page(150)) == bytes([50]) * 4096
    with pytest.raises(StreamError):
        loader.pages_run("pc.ram", np.array([511, 512]), np.zeros((2, 4096), np.uint8))


def test_replay_digests_ram_early_and_only_if_it_stayed_final(outputs, monkeypatch):
    """The RAM digests start once the RAM END section is over; a RAM record applied
    after that makes them start again at the end."""
    from qmigstream.codec import ram_records as R
    from qmigstream.pipeline import replay as RP
    from qmigstream.pipeline.guest import GuestRam, RamLoader
    made = []
    real = RP._EarlyDigest

    class Spy(real):
        def __init__(self, *a):
            super().__init__(*a)
            made.append(self)
    monkeypatch.setattr(RP, "_EarlyDigest", Spy)
    path, res = outputs["qemu-8.2"]
    rr = replay(str(path), expect=res.to_json())
    assert rr.ok and rr.verified and len(made) == 1 and made[0].result() == rr.ram
    # a record applied after the start: the early digests are not used
    ram = GuestRam([("pc.ram", 64 * 4096)])
    loader = RamLoader(ram)
    job = real(ram, "pages-crc32", loader)
    loader.feed(R.RamPage("pc.ram", 4096, b"\x01" * 4096, 0x28))
    assert job.result() is None
    job = real(ram, "pages-crc32", loader)
    assert job.result() == ram.digests("pages-crc32")


def test_stream_sha256_read_back_or_as_written(tmp_path):
    """The stream's sha256: read back on a thread from a regular file, hashed as it is
    written otherwise (a pipe); the same either way."""
    import os
    import threading
    p = tmp_path / "a.mig"
    res = migrate(p, small("qemu-8.2", ram_size=32 << 20, xbzrle=False))
    assert res.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    res2 = migrate(fifo, small("qemu-8.2", ram_size=32 << 20, xbzrle=False))
    reader.join()
    assert res2.sha256 == res.sha256 == hashlib.sha256(got[0]).hexdigest()


def test_ram_loader_applies_page_runs_as_their_page_records():
    """RamLoader given the reader's RamPageRun records (ascending, descending and
    repeated addresses) holds the same memory as given the PAGE records one by one."""
    from qmigstream.codec.build import StreamBuilder
    from qmigstream.codec.ram_records import RamEos, RamPageRun
    from qmigstream.pipeline.guest import GuestRam, RamLoader
    from qmigstream.wire.header import SectionType as T
    ps = 4096
    b = StreamBuilder(page_size=ps)
    b.header()
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 64 * ps)]), version_id=4)
    order = list(range(10, 30)) + list(range(50, 40, -1)) + [3, 3, 4, 3] + list(range(20))
    recs = [b.ram_page_record("pc.ram", i * ps, bytes([k % 251 + 1]) * ps)
            for k, i in enumerate(order)]
    b.section(T.SECTION_PART, "ram", recs + [RamEos()])
    b.eof()
    data = b.encode()
    mems = []
    for runs in (False, True):
        ram = GuestRam([("pc.ram", 64 * ps)], ps)
        loader = RamLoader(ram)
        got = list(read_records(data, page_runs=runs))
        assert any(isinstance(r, RamPageRun) for r in got) == runs
        for r in got:
            loader.feed(r)
        assert loader.pages == len(order)
        mems.append(bytes(ram.block("pc.ram").mem[:64 * ps]))
    assert mems[0] == mems[1]
    last = max(k for k, i in enumerate(order) if i == 3)      # the last write wins
    assert mems[0][3 * ps:4 * ps] == bytes([last % 251 + 1]) * ps


def test_pages_crc32_kept_by_region_is_the_digest_made_afresh():
    """The pages-crc32 parts kept per 64 MiB region are made again exactly for the
    regions written since: after writes here and there the digest equals one made
    from scratch on a copy of the same memory."""
    from qmigstream.pipeline.guest import GuestRam
    size = 200 << 20                                  # four regions, the last partial
    a = GuestRam([("pc.ram", size)])
    a.main.write(1 << 20, b"\x11" * 4096)
    a.main.write(70 << 20, b"\x22" * 8192)
    first = a.main.digest()
    assert a.main.digest() == first                   # nothing written: parts reused
    a.main.write(70 << 20, b"\x33")                   # region 1 again
    a.main.write(190 << 20, b"\x44" * 100)            # region 2, for the first time
    b = GuestRam([("pc.ram", size)])
    for off, n in ((1 << 20, 4096), (70 << 20, 8192), (190 << 20, 100)):
        b.main.write(off, bytes(a.main.mem[off:off + n]))
    assert a.main.digest() == b.main.digest() != first


def test_replay_digests_regions_ahead_and_again_when_rewritten(tmp_path):
    """A 256 MiB guest over several rounds with a CPU dirtying pages all over it: the
    regions the load went past are digested on a thread, those written again in a
    later round made again; the replay still verifies equal."""
    out = tmp_path / "big.mig"
    res = migrate(out, MigrateConfig(profile="qemu-8.2", ram_size=256 << 20, iterations=3,
                                     dirty_rate=200000, bandwidth=1 << 30, seed=9,
                                     devices=[DeviceSpec("sized:64K", seed=1)]))
    assert res.rounds == 3
    rr = replay(str(out), expect=res.to_json())
    assert rr.ok and rr.verified, rr.mismatches
    assert rr.ram == res.ram
