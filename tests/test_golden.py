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
