"""Golden vector sets: deterministic generation, check, compare."""

from __future__ import annotations

import json
import os

import pytest

from qmigstream.cli import main
from qmigstream.pipeline import golden as G


@pytest.fixture(scope="module")
def vector_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    m = G.generate(str(d), ["qemu-5.2", "qemu-8.2"], None)
    return d, m


def test_every_scenario_that_applies_is_written(vector_set):
    d, m = vector_set
    names = {(v["profile"], v["scenario"]) for v in m["vectors"]}
    assert ("qemu-5.2", "v1-partial-bitmap") in names
    assert ("qemu-8.2", "switchover-ack") in names
    assert ("qemu-5.2", "switchover-ack") not in names
    assert {s["scenario"] for s in m["skipped"]} == {"switchover-ack", "v1-partial-bitmap",
                                                     "multifd-device-state"}
    for v in m["vectors"]:
        assert [f["file"].rsplit(".", 2)[-2:] for f in v["files"]][0][-1] == "mig"
        for f in v["files"]:
            path = os.path.join(d, f["file"])
            assert os.path.getsize(path) == f["size"]
            assert len(f["sha256"]) == 64 and len(f["crc32"]) == 8
    assert m["regenerate"] == "qmigstream golden generate DIR --profiles qemu-5.2,qemu-8.2"


def test_regeneration_is_bit_identical(vector_set, tmp_path):
    d, m = vector_set
    m2 = G.generate(str(tmp_path), ["qemu-5.2", "qemu-8.2"], None)
    assert json.dumps(m, sort_keys=True) == json.dumps(m2, sort_keys=True)
    for v in m["vectors"]:
        for f in v["files"]:
            a = open(os.path.join(d, f["file"]), "rb").read()
            b = open(os.path.join(tmp_path, f["file"]), "rb").read()
            assert a == b, f["file"]


def test_chunk_boundary_vectors(vector_set):
    d, m = vector_set
    from qmigstream.codec.reader import read_records
    from qmigstream.codec.sections.vfio import VfioDataChunk
    sizes = {}
    for sc in ("data-1m", "data-1m-plus-1"):
        p = os.path.join(d, "qemu-8.2", f"{sc}.mig")
        sizes[sc] = [r.data_size for r in read_records(p) if isinstance(r, VfioDataChunk)]
    assert sizes["data-1m"] == [1 << 20]
    assert sizes["data-1m-plus-1"] == [1 << 20, 1]


def test_check_passes_then_finds_a_changed_byte(vector_set, tmp_path, capsys):
    d, m = vector_set
    assert main(["golden", "check", str(d)]) == 0
    assert "all good" in capsys.readouterr().out
    # a copy with one byte changed in one stream
    import shutil
    c = tmp_path / "copy"
    shutil.copytree(d, c)
    target = c / "qemu-8.2" / "paused.mig"
    data = bytearray(target.read_bytes())
    data[100] ^= 1
    target.write_bytes(data)
    assert main(["golden", "check", str(c), "--no-regenerate"]) == 1
    out = capsys.readouterr().out
    assert "qemu-8.2/paused.mig: sha256" in out


def test_compare_equal_and_different(vector_set, tmp_path, capsys):
    d, m = vector_set
    same = os.path.join(d, "qemu-8.2", "two-devices.mig")
    assert main(["golden", "compare", str(d), same]) == 0
    assert "matches the vector" in capsys.readouterr().out
    # the same scenario written as another release: the layout difference is named
    other = tmp_path / "o.mig"
    from qmigstream.pipeline.migrate import migrate
    migrate(other, G.config_for(G.P.get("qemu-8.0"), G.scenario("two-devices")))
    assert main(["golden", "compare", str(d), str(other), "--vector",
                 "qemu-8.2/two-devices"]) == 1
    out = capsys.readouterr().out
    assert "layout family 8.1-9.x in the vector, 8.0 in the stream" in out
    assert "machine: pc-i440fx-8.2 -> pc-i440fx-8.0" in out


def test_check_names_a_set_of_older_content(vector_set, tmp_path, capsys):
    """A set made before a content change (blob version, device state generator, RAM
    digests) cannot regenerate the same bytes: check says why."""
    d, m = vector_set
    assert m["content"] == G.CONTENT
    import shutil
    c = tmp_path / "old"
    shutil.copytree(d, c)
    old = dict(m, content={"device_blob": 1})
    (c / "manifest.json").write_text(json.dumps(old))
    res = G.check(str(c))
    assert not res.ok and "the set was made with content {'device_blob': 1}" in res.problems[0]
    assert G.check(str(c), regenerate=False).ok


def test_not_a_vector_set_is_exit_2(tmp_path, capsys):
    assert main(["golden", "check", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_multifd_vector_lists_and_checks_its_channels(tmp_path, capsys):
    d = tmp_path / "mf"
    m = G.generate(str(d), ["qemu-9.2", "qemu-10.0"], ["multifd-device-state"])
    assert m["skipped"] == [{"profile": "qemu-9.2", "scenario": "multifd-device-state",
                             "why": "needs multifd"}]
    (v,) = m["vectors"]
    names = [f["file"] for f in v["files"]]
    assert names == [f"qemu-10.0/multifd-device-state{e}" for e in
                     (".mig", ".decode.json", ".state.json", ".mig.ch0", ".mig.ch1")]
    for f in v["files"]:
        assert os.path.getsize(os.path.join(d, f["file"])) == f["size"]
    assert v["settings"]["multifd_channels"] == 2
    state = json.load(open(os.path.join(d, "qemu-10.0", "multifd-device-state.state.json")))
    assert [c["file"] for c in state["channels"]] == ["multifd-device-state.mig.ch0",
                                                      "multifd-device-state.mig.ch1"]
    assert all(x["verified"] for x in state["destination_after"])
    # 1 MiB + rest + config of the sized device, data + config of the mtty
    assert sum(c["packets"]["device_state"] for c in state["channels"]) == 5
    assert main(["golden", "check", str(d)]) == 0
    assert "1 vectors checked: all good" in capsys.readouterr().out
    ch = d / "qemu-10.0" / "multifd-device-state.mig.ch1"
    data = bytearray(ch.read_bytes())
    data[70] ^= 1                                     # the first packet's header
    ch.write_bytes(data)
    assert main(["golden", "check", str(d), "--no-regenerate"]) == 1
    out = capsys.readouterr().out
    assert "qemu-10.0/multifd-device-state.mig.ch1: sha256" in out
    assert "multifd-device-state.mig.ch1: does not parse as a multifd channel" in out


def _flip_in_channel(path, dest, kind):
    """A copy of a channel file with one byte changed in the first RAM page or
    device data it carries."""
    from qmigstream.vfio import multifd as MF
    raw = bytearray(open(path, "rb").read())
    for r in MF.parse_channel(bytes(raw))[1:]:
        if kind == "ram" and isinstance(r, MF.RamPacket) and r.offsets()[0]:
            raw[r.offset + r.pages_offset + 10] ^= 0xFF
            break
        if kind == "device" and isinstance(r, MF.DeviceStatePacket) and not r.is_config:
            raw[r.data_offset + 100] ^= 0xFF
            break
    else:
        raise AssertionError(f"no {kind} packet in {path}")
    dest.write_bytes(raw)
    return str(dest)


def test_compare_takes_the_streams_multifd_channels(tmp_path, capsys):
    d = tmp_path / "mf"
    G.generate(str(d), ["qemu-10.0"], ["multifd-device-state"])
    main_ = str(d / "qemu-10.0" / "multifd-device-state.mig")
    ch0, ch1 = main_ + ".ch0", main_ + ".ch1"
    # without the stream's channels only the main streams are compared, and it says so
    assert main(["golden", "compare", str(d), main_]) == 0
    out = capsys.readouterr().out
    assert "only the main streams were compared" in out and "(main stream only)" in out
    # the same channels: as arguments, in another order (which channel carried a packet
    # does not count), with --multifd, or as the directory holding them
    for extra in ([ch0, ch1], [ch1, ch0], ["--multifd", ch0, ch1], [str(d / "qemu-10.0")]):
        assert main(["golden", "compare", str(d), main_, *extra]) == 0, extra
        out = capsys.readouterr().out
        assert "multifd channels: 2 in the vector, 2 given" in out
        assert "equal: the stream matches the vector\n" in out
    # a RAM page changed on a channel
    bad = _flip_in_channel(ch1, tmp_path / "ram.ch1", "ram")
    assert main(["golden", "compare", str(d), main_, ch0, bad]) == 1
    out = capsys.readouterr().out
    assert "RAM block pc.ram on the channels: 1 page(s) differ, 0 only in the vector, " \
           "0 only in the stream" in out
    # device data changed in a device-state packet
    bad = _flip_in_channel(ch1, tmp_path / "dev.ch1", "device")
    assert main(["golden", "compare", str(d), main_, ch0, bad, "--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    assert r["channels"] == {"vector": 2, "stream": 2} and r["multifd"] == []
    assert len(r["vfio"]) == 1 and "multifd device data differs" in r["vfio"][0]
    # a channel missing: the counts differ and the device state does not reassemble
    r = G.compare(str(d), main_, channels=[ch0])
    assert not r["equal"]
    assert "channels: 2 in the vector, 1 in the stream" in r["multifd"]
    assert any(x.startswith("device-state packets: 5 in the vector") for x in r["multifd"])
    assert "does not reassemble" in r["vfio"][0]
    # a directory without channel files is an input error
    (tmp_path / "empty").mkdir()
    assert main(["golden", "compare", str(d), main_, str(tmp_path / "empty")]) == 2
    assert "no multifd channel files" in capsys.readouterr().err
