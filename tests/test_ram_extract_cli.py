"""``qmigstream ram extract``: output files, manifest, text and JSON, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from qmigstream.cli import main

from test_guestmem import HOSTILE, page, stream, write, PS
from conftest import requires_qemu


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_extract_json_manifest_and_files(tmp_path, capsys):
    p = write(tmp_path, stream([("pc.ram", 8 * PS), ("/rom@etc/acpi/tables", 2 * PS)],
                               [[("pc.ram", 2, "page", page(1)),
                                 ("/rom@etc/acpi/tables", 1, "page", page(2))]]))
    out = tmp_path / "out"
    rc, text, err = run(capsys, "ram", "extract", p, "-o", str(out), "--json")
    assert rc == 0 and err == ""
    m = json.loads(text)
    assert m == json.loads((out / "manifest.json").read_text())
    assert [(b["name"], b["file"], b["used_length"]) for b in m["blocks"]] == [
        ("pc.ram", "pc.ram.img", 8 * PS),
        ("/rom@etc/acpi/tables", "rom@etc_acpi_tables.img", 2 * PS)]
    ram = (out / "pc.ram.img").read_bytes()
    assert ram == bytes(2 * PS) + page(1) + bytes(5 * PS)
    assert m["blocks"][0]["sha256"] == hashlib.sha256(ram).hexdigest()
    assert m["blocks"][0]["pages"]["page"] == 1
    assert m["machine_type"] == "pc-i440fx-7.2" and m["page_size"] == PS


def test_extract_text_output(tmp_path, capsys):
    p = write(tmp_path, stream([("pc.ram", 8 * PS)], [[("pc.ram", 0, "page", page(1)),
                                                       ("pc.ram", 1, "zero", None)]]))
    rc, text, _ = run(capsys, "ram", "extract", p, "-o", str(tmp_path / "o"))
    assert rc == 0
    lines = text.splitlines()
    assert lines[0].startswith("1 RAM blocks written to ")
    assert "setup, 1 PART, END" in lines[0]
    assert lines[2].split() == ["pc.ram", "pc.ram.img", "0x8000", "1", "page", "1,", "zero", "1"]


def test_hostile_names_via_cli(tmp_path, capsys):
    p = write(tmp_path, stream([(n, PS) for n in HOSTILE],
                               [[(n, 0, "page", page(i)) for i, n in enumerate(HOSTILE)]]))
    out = tmp_path / "o"
    rc, text, _ = run(capsys, "ram", "extract", p, "-o", str(out), "--json")
    assert rc == 0
    m = json.loads(text)
    assert sorted(os.listdir(out)) == sorted([b["file"] for b in m["blocks"]] + ["manifest.json"])
    assert sorted(os.listdir(tmp_path)) == ["o", "s.mig"]


def test_until_iteration(tmp_path, capsys):
    p = write(tmp_path, stream([("pc.ram", 4 * PS)], [[("pc.ram", 0, "page", page(1))],
                                                      [("pc.ram", 0, "page", page(2))]]))
    for n, want in ((0, bytes(PS)), (1, page(1)), (2, page(2)), (3, page(2))):
        out = tmp_path / f"o{n}"
        rc, text, _ = run(capsys, "ram", "extract", p, "-o", str(out), "--until-iteration",
                          str(n), "--json")
        assert rc == 0
        assert (out / "pc.ram.img").read_bytes()[:PS] == want
        assert json.loads(text)["until_iteration"] == n


def test_physical_option(tmp_path, capsys):
    p = write(tmp_path, stream([("pc.ram", 16 * PS)], [[("pc.ram", 3, "page", page(3))]],
                               machine="pc-q35-7.2"))
    out = tmp_path / "o"
    rc, text, _ = run(capsys, "ram", "extract", p, "-o", str(out), "--physical", "q35")
    assert rc == 0
    assert "physical.img (q35, 0x10000 bytes): ram-below-4g 0x0-0x10000 <- pc.ram+0x0" in text
    assert (out / "physical.img").read_bytes() == (out / "pc.ram.img").read_bytes()


@pytest.mark.parametrize("arg, below", [("2G", 2 << 30), ("0x80000000", 2 << 30),
                                        ("3584M", 3 << 30), ("3221225472", 3 << 30),
                                        ("4G", 3 << 30)])
def test_max_ram_below_4g(tmp_path, capsys, arg, below):
    """pc, 4 GiB: lowmem = max-ram-below-4g, cut to 3 GiB (gigabyte_align)."""
    size = 4 << 30
    p = write(tmp_path, stream([("pc.ram", size)], [[("pc.ram", 0, "page", page(1))]]))
    rc, text, _ = run(capsys, "ram", "extract", p, "-o", str(tmp_path / "o"), "--physical",
                      "pc", "--max-ram-below-4g", arg, "--json", "--no-sha256")
    assert rc == 0
    m = json.loads(text)["physical"]["map"]
    assert m[0]["length"] == below
    assert m[1] == {"region": "ram-above-4g", "gpa": 4 << 30, "block_offset": below,
                    "length": size - below}


def test_stdin(tmp_path):
    data = stream([("pc.ram", 4 * PS)], [[("pc.ram", 1, "page", page(9))]]).encode()
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "qmigstream", "ram", "extract", "-", "-o", str(out)],
                       input=data, capture_output=True)
    assert r.returncode == 0, r.stderr
    assert (out / "pc.ram.img").read_bytes() == bytes(PS) + page(9) + bytes(2 * PS)


def test_bad_input_exit_2_one_line(tmp_path, capsys):
    data = stream([("pc.ram", 4 * PS)], [[("pc.ram", 1, "page", page(9))]]).encode()
    p = tmp_path / "cut.mig"
    p.write_bytes(data[:200])
    rc, _, err = run(capsys, "ram", "extract", str(p), "-o", str(tmp_path / "o"))
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("qmigstream ram: error: at offset ")
    rc, _, err = run(capsys, "ram", "extract", "/nonexistent.mig", "-o", str(tmp_path / "o"))
    assert rc == 2 and "No such file" in err
    rc, _, err = run(capsys, "ram", "extract", str(p), "-o", str(tmp_path / "o"), "--physical",
                     "pc")
    assert rc == 2
    for bad in (["--until-iteration", "-1"], ["--max-ram-below-4g", "lots"]):
        with pytest.raises(SystemExit) as e:
            main(["ram", "extract", str(p), "-o", str(tmp_path / "o"), *bad])
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["diff", str(p), str(p), "--until-iteration", "-2"])
    assert e.value.code == 2


def test_physical_without_pc_ram_is_exit_2(tmp_path, capsys):
    p = write(tmp_path, stream([("mem", 4 * PS)], [[]]))
    rc, _, err = run(capsys, "ram", "extract", p, "-o", str(tmp_path / "o"), "--physical", "pc")
    assert rc == 2 and "no RAM block 'pc.ram'" in err


def test_committed_capture_via_cli(capture, tmp_path, capsys):
    path, meta = capture("pc-7.2-loader")
    out = tmp_path / "o"
    rc, text, _ = run(capsys, "ram", "extract", str(path), "-o", str(out), "--physical", "pc",
                      "--json")
    assert rc == 0
    m = json.loads(text)
    img = (out / "physical.img").read_bytes()
    for mem in meta["memory"]:
        assert hashlib.sha256(img[mem["addr"]:mem["addr"] + mem["size"]]).hexdigest() == \
            mem["sha256"]
    assert m["physical"]["sha256"] == hashlib.sha256(img).hexdigest()
    assert {b["name"] for b in m["blocks"]} >= {"pc.ram", "pc.bios", "pc.rom"}


def test_multifd_option(capture, tmp_path, capsys):
    from conftest import unpack_channels
    path, meta = capture("pc-7.2-multifd")
    args = []
    for ch in unpack_channels(meta, tmp_path):
        args += ["--multifd", ch]
    out = tmp_path / "o"
    rc, text, _ = run(capsys, "ram", "extract", str(path), "-o", str(out), *args)
    assert rc == 0
    assert "multifd 48" in text
    ram = (out / "pc.ram.img").read_bytes()
    for mem in meta["memory"]:
        assert hashlib.sha256(ram[mem["addr"]:mem["addr"] + mem["size"]]).hexdigest() == \
            mem["sha256"]
    rc, _, err = run(capsys, "ram", "extract", str(path), "-o", str(out), "--multifd", str(path))
    assert rc == 2 and "not a multifd channel" in err


@requires_qemu
@pytest.mark.qemu
def test_cli_on_a_fresh_capture(tmp_path, capsys):
    from _qemu_capture import capture, seeded_blob
    blob = seeded_blob(tmp_path / "b", 1 << 20, 11)
    path, low, high = capture(tmp_path, "cli", 32, [(0x400000, blob)])
    out = tmp_path / "o"
    rc, text, _ = run(capsys, "ram", "extract", path, "-o", str(out), "--json")
    assert rc == 0
    ram = (out / "pc.ram.img").read_bytes()
    assert ram[:0xA0000] == low and ram[0x100000:] == high
    assert ram[0x400000:0x500000] == blob
