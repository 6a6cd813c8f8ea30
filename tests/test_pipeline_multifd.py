"""10.x multifd device-state transfer in the pipeline: migrate writes the main channel and
the channel files as QEMU 10.x does, replay loads them atomically and verifies them."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from qmigstream.cli import main
from qmigstream.codec.reader import read_records
from qmigstream.codec.records import SectionHeader
from qmigstream.codec.sections.vfio import VfioConfig, VfioDataChunk, VfioMarker
from qmigstream.codec.writer import encode_records
from qmigstream.errors import QmigstreamError
from qmigstream.pipeline.guest import GuestRam
from qmigstream.pipeline.migrate import DeviceSpec, MigrateConfig, migrate
from qmigstream.pipeline.ramsave import RamSaver
from qmigstream.pipeline.replay import Destination, replay
from qmigstream.vfio import multifd as MF
from qmigstream.wire.vfio import Marker

CASES = [("qemu-10.0", None, "10.x"), ("qemu-10.1", None, "10.x"),
         ("qemu-10.1", True, "10.1+")]
IDS = ["10.0", "10.1", "10.1-load-config-after-iter"]


def cfg_for(profile, lcai, **kw):
    base = dict(profile=profile, ram_size=8 << 20, iterations=3, dirty_rate=20000,
                bandwidth=64 << 20, seed=5, multifd_channels=2, load_config_after_iter=lcai,
                devices=[DeviceSpec("sized:1200K", seed=1, dma_rate=3000, features="p2p"),
                         DeviceSpec("mtty", seed=2)], stream_sha256=True)
    base.update(kw)
    return MigrateConfig(**base)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("multifd")
    out = {}
    for (profile, lcai, fam), name in zip(CASES, IDS):
        path = d / f"{name}.mig"
        res = migrate(path, cfg_for(profile, lcai))
        out[name] = (path, res, fam)
    return out


def channels_of(res):
    return [c["file"] for c in res.channels]


def ram_records_by_section(path):
    """[(section type, [RAM record kinds])] of the ram sections, in stream order."""
    out, cur = [], None
    for rec in read_records(str(path)):
        if isinstance(rec, SectionHeader):
            cur = [rec.type_name, []]
            out.append(cur)
        elif cur is not None and rec.kind.startswith("ram_"):
            cur[1].append(rec.kind)
    return [(t, k) for t, k in out if k]


@pytest.mark.parametrize("name", IDS)
def test_main_stream_round_trips_and_carries_no_pages(name, outputs):
    path, res, fam = outputs[name]
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == res.sha256
    recs = list(read_records(str(path)))
    assert encode_records(recs) == data
    kinds = {r.kind for r in recs}
    # zero-page-detection=multifd: neither normal nor zero pages stay on the main channel
    assert not kinds & {"ram_page", "ram_zero", "ram_zero_run", "ram_xbzrle"}
    secs = ram_records_by_section(path)
    assert secs[0] == ("START", ["ram_mem_size", "ram_multifd_flush", "ram_eos"])
    assert [t for t, _ in secs] == ["START", "PART", "PART", "PART", "END"]
    for t, k in secs[1:]:
        # every pass ends with the scan wrapping past the last block: a flush, then EOS
        assert k[-2:] == ["ram_multifd_flush", "ram_eos"] and set(k) <= {
            "ram_multifd_flush", "ram_eos"}
    # the first pass starts at the first block, later ones where the previous stopped
    # (the end of pc.ram), so they wrap once before their pages and once after
    assert secs[1][1] == ["ram_multifd_flush", "ram_eos"]
    assert all(k == ["ram_multifd_flush", "ram_multifd_flush", "ram_eos"] for _, k in secs[2:])
    # SWITCHOVER_START is there (multifd transfer needs send-switchover-start)
    assert any(r.kind == "command" and r.name == "SWITCHOVER_START" for r in recs)


@pytest.mark.parametrize("name", IDS)
def test_vfio_sections_on_the_main_channel(name, outputs):
    path, res, fam = outputs[name]
    recs = list(read_records(str(path)))
    sections, cur = {}, None
    for r in recs:
        if isinstance(r, SectionHeader):
            cur = sections.setdefault(r.section_id, []) if r.section_id >= 3 else None
            if cur is not None:
                cur.append((r.type_name, []))
        elif cur is not None and isinstance(r, (VfioMarker, VfioDataChunk, VfioConfig)):
            cur[-1][1].append(r)
    assert len(sections) == 2
    full_marker = Marker.DEV_CONFIG_LOAD_READY if fam == "10.1+" else Marker.END_OF_STATE
    for secs in sections.values():
        end = [p for t, p in secs if t == "END"][0]
        full = [p for t, p in secs if t == "FULL"][0]
        assert [type(x) for x in end] == [VfioMarker] and end[0].marker == Marker.END_OF_STATE
        assert [type(x) for x in full] == [VfioMarker] and full[0].marker == full_marker
        assert not any(isinstance(x, VfioConfig) for _, p in secs for x in p)
    assert all(d["family"] == fam for d in res.devices)


@pytest.mark.parametrize("name", IDS)
def test_channels_round_trip_and_follow_the_sender(name, outputs):
    path, res, fam = outputs[name]
    flushes = sum(1 for r in read_records(str(path)) if r.kind == "ram_multifd_flush")
    nums, syncs_at = [], [[] for _ in res.channels]
    dev_packets = {}
    for i, ch in enumerate(res.channels):
        raw = open(ch["file"], "rb").read()
        assert ch["size"] == len(raw) and ch["sha256"] == hashlib.sha256(raw).hexdigest()
        recs = MF.parse_channel(raw, name=ch["file"])
        assert recs[0].kind == "multifd_init" and recs[0].channel_id == i
        assert recs[0].uuid == bytes(16)
        assert MF.build_channel(recs[1:], recs[0].channel_id, recs[0].uuid) == raw
        ram = [r for r in recs[1:] if r.kind == "multifd_ram"]
        assert ram[0].is_sync                       # setup's flush comes before any page
        assert sum(r.is_sync for r in ram) == flushes
        for r in ram:
            alloc, normal, nps, num, zero = r.fields()
            nums.append(num)
            if r.is_sync:
                assert (alloc, normal, zero, nps, r.ramblock) == (0, 0, 0, 0, "")
                assert r.size == 320 + 8 * 128
                syncs_at[i].append(num)
            else:
                assert alloc == 128 and 0 < normal + zero <= 128 and r.ramblock == "pc.ram"
                assert nps == normal * 4096 and r.size == 320 + 8 * 128 + nps
                offs_n, offs_z = r.offsets()
                # normal pages hold data, zero pages are zero (multifd zero-page detection)
                assert all(any(bytes(r.page(k))) for k in range(normal))
        for p in recs[1:]:
            if p.kind == "multifd_device_state":
                assert p.flags == 0x40 and p.vfio_version == 0
                dev_packets.setdefault(p.idstr, []).append(p)
    # one packet_num counter over every channel, RAM and SYNC packets alike
    assert sorted(nums) == list(range(len(nums)))
    # SYNC packets of one sync point are consecutive numbers, channel 0 first
    assert all(b - a == 1 for a, b in zip(*syncs_at))
    # device state: data idx 0.., then the config packet with the next idx
    for d in res.devices:
        pk = sorted(dev_packets[d["idstr"]], key=lambda p: p.idx)
        assert [p.idx for p in pk] == list(range(len(pk)))
        assert [p.is_config for p in pk] == [False] * (len(pk) - 1) + [True]
        assert bytes(pk[-1].data)[:8] == (0xFFFFFFFFEF100002).to_bytes(8, "big")
    big = res.devices[0]
    assert len(dev_packets[big["idstr"]]) == 3     # no PRE_COPY: a 1 MiB read, the rest, config


def _pages_per_channel_epoch(res):
    """{page offset: [(epoch, channel)]} for every normal or zero page on the channels."""
    seen = {}
    for i, ch in enumerate(res.channels):
        recs = MF.parse_channel(open(ch["file"], "rb").read())
        epoch = 0
        for r in recs[1:]:
            if r.kind != "multifd_ram":
                continue
            if r.is_sync:
                epoch += 1
                continue
            n, z = r.offsets()
            for off in n + z:
                seen.setdefault(off, []).append((epoch, i))
    return seen


@pytest.mark.parametrize("name", IDS)
def test_replay_verifies_devices_and_ram(name, outputs, capsys):
    path, res, fam = outputs[name]
    rr = replay(str(path), expect=res.to_json(), channels=channels_of(res))
    assert rr.ok, rr.error
    assert rr.verified, rr.mismatches
    assert rr.ram == res.ram
    assert [d["state_after"] for d in rr.devices] == [d["state_digest"] for d in res.devices]
    assert all(d["config_loaded"] for d in rr.devices)
    assert sum(c["pages"] for c in rr.channels) == rr.pages == \
        res.pages["normal"] + res.pages["zero"]
    # the order matters: some page went out in two rounds, the later copy on a lower
    # channel -- reading the channels one after the other would keep the older copy
    seen = _pages_per_channel_epoch(res)
    assert any(sorted(v)[-1][1] < sorted(v)[-2][1] for v in seen.values() if len(v) > 1)
    # the CLI finds the channels from the manifest
    man = str(path) + ".json"
    from qmigstream.pipeline.migrate import write_manifest
    write_manifest(res, man)
    assert json.load(open(man))["channels"][1]["file"] == channels_of(res)[1]
    assert main(["replay", str(path), "--expect", man]) == 0
    out = capsys.readouterr().out
    assert "verified: source and destination are equal" in out
    assert "device-state packets" in out


def test_reading_channels_one_after_the_other_would_not_match(outputs):
    """The sync points are what make the RAM right: applying channel 0 whole, then
    channel 1, gives different memory."""
    path, res, fam = outputs["10.0"]
    ram = GuestRam([("pc.ram", 8 << 20)])
    for ch in res.channels:
        for r in MF.parse_channel(open(ch["file"], "rb").read())[1:]:
            if r.kind == "multifd_ram" and not r.is_sync:
                n, z = r.offsets()
                for k, off in enumerate(n):
                    ram.main.write(off, r.page(k))
                for off in z:
                    ram.main.write(off, bytes(4096))
    assert ram.main.digest(res.ram_digest) != res.ram["pc.ram"]


@pytest.mark.parametrize("name", IDS)
def test_vfio_cli_reports_family_and_all_data(name, outputs, capsys, tmp_path):
    path, res, fam = outputs[name]
    ex = tmp_path / "x"
    assert main(["vfio", str(path), "--multifd", *channels_of(res), "--json",
                 "--extract", str(ex)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["hints"]["multifd_packets"] is True
    by = {x["idstr"]: x for x in d["devices"]}
    for src in res.devices:
        dev = by[src["idstr"]]
        assert dev["family"] == fam, dev["family_reason"]
        assert dev["data_bytes"] == src["data_bytes"]
        assert dev["config"]["phase"] == "multifd"
        assert len(dev["multifd"]["packets"]) >= 2
        files = {e["kind"]: e for e in d["extracted"] if e["idstr"] == src["idstr"]}
        assert files["data"]["size"] == src["data_bytes"]
        cfg = open(files["config"]["path"], "rb").read()
        assert cfg[12:12 + 256] == bytes.fromhex(src["config"])[:256]
    # text output names the family
    assert main(["vfio", str(path), "--multifd", *channels_of(res)]) == 0
    assert f"family:     {fam}" in capsys.readouterr().out


def test_same_configuration_same_bytes(tmp_path):
    a, b = tmp_path / "a.mig", tmp_path / "b.mig"
    ra = migrate(a, cfg_for("qemu-10.1", True))
    rb = migrate(b, cfg_for("qemu-10.1", True))
    assert a.read_bytes() == b.read_bytes()
    assert [c["sha256"] for c in ra.channels] == [c["sha256"] for c in rb.channels]
    rc = migrate(tmp_path / "c.mig", cfg_for("qemu-10.1", True, multifd_channels=3))
    assert len(rc.channels) == 3 and os.path.exists(str(tmp_path / "c.mig") + ".ch2")


@pytest.mark.parametrize("kw,msg", [
    (dict(profile="qemu-9.2"), "no multifd device-state transfer"),
    (dict(profile="qemu-10.0", load_config_after_iter=True), "10.1+"),
    (dict(xbzrle=True), "not compatible with xbzrle"),
    (dict(multifd_channels=0, load_config_after_iter=True), "give multifd channels"),
    (dict(multifd_channels=256), "1..255"),
])
def test_refused_where_the_release_cannot(kw, msg, tmp_path):
    cfg = cfg_for(kw.pop("profile", "qemu-10.1"), kw.pop("load_config_after_iter", None), **kw)
    with pytest.raises(QmigstreamError, match=msg):
        migrate(tmp_path / "r.mig", cfg)
    assert not os.path.exists(tmp_path / "r.mig")


def test_cli_refuses_with_a_clear_error(tmp_path, capsys):
    assert main(["migrate", "-o", str(tmp_path / "o.mig"), "--profile", "8.2",
                 "--multifd-channels", "2"]) == 2
    assert "qemu-8.2: this release has no multifd device-state transfer" in \
        capsys.readouterr().err


def test_cli_migrate_and_replay_with_channel_options(tmp_path, capsys):
    out = tmp_path / "o.mig"
    assert main(["migrate", "-o", str(out), "--profile", "10.1", "--ram-size", "4M",
                 "--device", "mtty", "--iterations", "1", "--multifd-channels", "2",
                 "--load-config-after-iter", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [c["file"] for c in info["channels"]] == [f"{out}.ch0", f"{out}.ch1"]
    assert info["devices"][0]["family"] == "10.1+"
    assert main(["replay", str(out), "--channel", f"{out}.ch0", "--channel",
                 f"{out}.ch1"]) == 0
    assert "loaded" in capsys.readouterr().out
    # without the channels the device's state is missing: not loaded
    assert main(["replay", str(out)]) == 1
    assert "travel on multifd channels, and none were given" in capsys.readouterr().out


# -- failures leave every device as it was ------------------------------------------

def _dests(res):
    return {d["idstr"]: Destination(d["idstr"], d["interface"], d["profile"],
                                    features=d["features"], v1_layout=d["v1_layout"])
            for d in res.devices}


def _replay_broken(res, path, chans):
    dests = _dests(res)
    before = {k: d.device.state_digest() for k, d in dests.items()}
    rr = replay(str(path), destinations=dests, channels=chans)
    assert not rr.ok
    assert {k: d.device.state_digest() for k, d in dests.items()} == before
    assert all(not d.begun for d in dests.values())
    return rr


@pytest.mark.parametrize("name", IDS)
def test_channel_cut_short(name, outputs, tmp_path):
    path, res, fam = outputs[name]
    chans = channels_of(res)
    raw = open(chans[1], "rb").read()
    recs = MF.parse_channel(raw)
    # inside a packet: the channel does not parse
    cut = tmp_path / "cut1"
    assert recs[3].kind == "multifd_ram"
    cut.write_bytes(raw[:recs[3].offset + 1000])
    rr = _replay_broken(res, path, [chans[0], str(cut)])
    assert rr.error["offset"] == recs[3].offset and rr.error["section"] == str(cut)
    assert "runs past the end of the channel" in rr.error["message"]
    # at a packet boundary before the last SYNC: the load stops at that sync point,
    # after the devices took their pre-copy data
    last_sync = [r for r in recs if r.kind == "multifd_ram" and r.is_sync][-1]
    cut2 = tmp_path / "cut2"
    cut2.write_bytes(raw[:last_sync.offset])
    rr = _replay_broken(res, path, [chans[0], str(cut2)])
    assert rr.error["offset"] == last_sync.offset and rr.error["section"] == str(cut2)
    assert "ends before the sync point" in rr.error["message"]


@pytest.mark.parametrize("name", IDS)
def test_duplicate_idx(name, outputs, tmp_path):
    path, res, fam = outputs[name]
    chans = channels_of(res)
    for i, c in enumerate(chans):
        raw = open(c, "rb").read()
        recs = MF.parse_channel(raw)
        dev = [r for r in recs if r.kind == "multifd_device_state"]
        if dev:
            break
    p = dev[0]
    dup = raw[:p.offset + p.size] + raw[p.offset:p.offset + p.size] + raw[p.offset + p.size:]
    bad = tmp_path / "dup"
    bad.write_bytes(dup)
    chans = list(chans)
    chans[i] = str(bad)
    rr = _replay_broken(res, path, chans)
    assert "already filled" in rr.error["message"]
    assert rr.error["offset"] == p.offset + p.size + 276 + 4      # the second copy's idx
    assert rr.error["section"] == str(bad)


def test_a_device_rejecting_its_multifd_data(outputs, tmp_path):
    path, res, fam = outputs["10.0"]
    chans = channels_of(res)
    for i, c in enumerate(chans):
        raw = bytearray(open(c, "rb").read())
        dev = [r for r in MF.parse_channel(bytes(raw)) if r.kind == "multifd_device_state"
               and r.idstr == res.devices[0]["idstr"] and r.idx == 0]
        if dev:
            break
    raw[dev[0].data_offset + 40] ^= 0xFF               # inside the blob's payload
    bad = tmp_path / "bad"
    bad.write_bytes(raw)
    chans = list(chans)
    chans[i] = str(bad)
    rr = _replay_broken(res, path, chans)
    assert rr.error["errno"] is not None and rr.error["device"] == res.devices[0]["idstr"]
    # the device checks its blob when the last buffer arrives: the error names that
    # buffer's channel file and the offset of its data
    where = {(c, r.data_offset) for c in chans
             for r in MF.parse_channel(open(c, "rb").read())
             if r.kind == "multifd_device_state" and r.idstr == res.devices[0]["idstr"]
             and not r.is_config}
    assert (rr.error["file"], rr.error["offset"]) in where
    assert "rejected state buffer" in rr.error["message"]


# -- the scan that places MULTIFD_FLUSH ------------------------------------------------

def test_scan_pass_follows_find_dirty_block():
    ram = GuestRam([("a", 16 * 4096), ("b", 8 * 4096), ("c", 8 * 4096)])
    s = RamSaver(ram)            # every page dirty
    s.setup()

    def run():
        return [("wrap",) if e[0] == "wrap" else (e[1].name, e[2].tolist())
                for e in s.scan_pass()]

    assert run() == [("a", list(range(16))), ("b", list(range(8))), ("c", list(range(8))),
                     ("wrap",)]
    assert s.scan_pos == (2, 8)
    for i in (3, 5):
        ram.block("a").mark_dirty(i)
    ram.block("b").mark_dirty(1)
    # from the end of "c": wrap at once, then the dirty pages, then the final wrap
    assert run() == [("wrap",), ("a", [3, 5]), ("b", [1]), ("wrap",)]
    assert s.scan_pos == (1, 8)
    ram.block("a").dirty[0] = 1
    ram.block("c").mark_dirty(7)
    # from the end of "b": "c" comes before the wrap, "a" after it
    assert run() == [("c", [7]), ("wrap",), ("a", [0]), ("wrap",)]
    assert run() == [("wrap",)]                 # nothing dirty: one wrap, all clean
    assert not ram.any_dirty()
    assert ram.block("a").dirty == bytearray(16)


def test_a_template_machine_below_10_0_is_refused(capture, tmp_path):
    """A 7.2 capture's machine type keeps x-migration-multifd-transfer off (hw_compat_9_2)."""
    from conftest import capture_names
    if "pc-7.2-paused" not in capture_names():
        pytest.skip("pc-7.2-paused not committed")
    tpl, _ = capture("pc-7.2-paused")
    cfg = MigrateConfig(profile="qemu-10.0", template=str(tpl), multifd_channels=2,
                        devices=[DeviceSpec("mtty")], iterations=1)
    with pytest.raises(QmigstreamError, match=r"machine type pc-i440fx-7\.2 turns VFIO multifd"):
        migrate(tmp_path / "t.mig", cfg)


def test_a_sync_point_the_main_channel_never_reaches(outputs, tmp_path):
    """One SYNC packet more than MULTIFD_FLUSH records: QEMU's receiving thread would wait
    at it for good; the replay refuses, naming the packet."""
    path, res, fam = outputs["10.0"]
    chans = channels_of(res)
    raw = open(chans[0], "rb").read()
    extra = tmp_path / "extra"
    extra.write_bytes(raw + MF.ram_packet_header(999, flags=1))
    rr = _replay_broken(res, path, [str(extra), chans[1]])
    assert rr.error["offset"] == len(raw) and rr.error["section"] == str(extra)
    assert "no MULTIFD_FLUSH on the main channel waits for" in rr.error["message"]


def test_device_state_for_a_device_the_destination_lacks(outputs, tmp_path):
    path, res, fam = outputs["10.0"]
    chans = channels_of(res)
    raw = open(chans[1], "rb").read()
    stray = MF.DeviceStatePacket("0000:00:1f.0/vfio", 0, MF.vfio_payload(0, b"x"))
    bad = tmp_path / "stray"
    bad.write_bytes(raw + stray.encode())
    rr = _replay_broken(res, path, [chans[0], str(bad)])
    assert rr.error["offset"] == len(raw) + 12 and "no destination device" in \
        rr.error["message"]
