"""``qmigstream analyze`` against analyze-migration.py on every committed capture.

Each capture is compared with the script of its own QEMU release (5.2, 7.2, 10.0;
11.1 captures with the 10.0 script, the newest Debian ships the source of for
these: 10.2.2's is byte for byte the same).  The scripts are reference tools
fetched at run time by tools/fetch-analyze-migration (.ci/run does it); they are
never part of qmigstream.  Where the script reads a capture, our JSON text must be
identical; where it fails, ours must still describe the stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, capture_names
from qmigstream.analyze import analyze_state, dumps, safe_relpath
from qmigstream.cli import main

SCRIPT = ROOT / "tools" / "ref" / "analyze-migration-7.2.py"
#: capture release -> the release of the script it is compared with
SCRIPT_RELEASE = {"5.2": "5.2", "7.2": "7.2", "10.0": "10.0", "11.1": "10.0"}

needs_script = pytest.mark.skipif(not SCRIPT.exists() and not os.environ.get("CI"),
                                  reason="run tools/fetch-analyze-migration first")


def script_of(meta):
    """The reference script for a capture (its metadata's ``release``; 7.2 before
    captures recorded one)."""
    release = SCRIPT_RELEASE[meta.get("release", "7.2")]
    path = ROOT / "tools" / "ref" / f"analyze-migration-{release}.py"
    if not path.exists() and not os.environ.get("CI"):
        pytest.skip(f"run tools/fetch-analyze-migration {release} first")
    return path


def _script(args, cwd=None, script=SCRIPT):
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


def _ours(args, capsys):
    rc = main(["analyze", *args])
    out = capsys.readouterr().out
    return rc, out


def _fixed(script, tmp_path):
    """The script with its Python 3 crash in -m fixed (``ord()`` of an int) and nothing
    else (5.2 to 10.x all have it)."""
    text = script.read_text()
    assert text.count("ord(c)") == 1
    p = tmp_path / f"fixed-{script.name}"
    p.write_text(text.replace("ord(c)", "c"))
    return p


@needs_script
@pytest.mark.parametrize("name", capture_names())
@pytest.mark.parametrize("dump", ["state", "desc"])
def test_same_json_as_the_script(name, dump, capture, capsys):
    path, meta = capture(name)
    rc, ref, err = _script(["-f", str(path), "-d", dump], script=script_of(meta))
    ours_rc, ours = _ours(["-f", str(path), "-d", dump], capsys)
    if rc == 0:
        assert ours_rc == 0
        assert ours == ref
        return
    # The script failed: check we did better, within what the stream holds.
    assert "Traceback" in err
    if dump == "desc":
        if _has_trailer(path):
            assert ours_rc == 0 and json.loads(ours)["devices"]
        else:
            assert ours_rc == 2     # nothing to print; a one-line error (see below)
        return
    assert ours_rc == 0
    state = json.loads(ours)
    ram = [k for k in state if k.startswith("ram (")]
    assert ram and state[ram[0]]["section sizes"]


@needs_script
@pytest.mark.parametrize("name,generation", [
    ("pc-7.2-devices", "10.0"), ("pc-5.2-devices", "10.0"), ("pc-i440fx-2.2-devices-vmdesc", "10.0"),
    ("pc-5.2-devices", "7.2"), ("pc-11.1-devices", "10.0")])
def test_either_script_generation_on_any_release(name, generation, capture, capsys):
    """``--script G`` prints what the script of generation G prints, whoever wrote the
    stream.  (The 7.2 script reads no 10.0+ stream: it stops at the SWITCHOVER_START
    command; it would keep only the last of 11.1's repeated names.)"""
    if name not in capture_names():
        pytest.skip(f"{name} not committed")
    path, _ = capture(name)
    rc, ref, err = _script(["-f", str(path)], script=script_of({"release": generation}))
    assert rc == 0, err
    ours_rc, ours = _ours(["-f", str(path), "--script", generation], capsys)
    assert ours_rc == 0
    assert ours == ref


def test_the_generation_follows_the_stream():
    from qmigstream.analyze import script_for
    assert script_for(b"pc-i440fx-11.1", False) == "10.0"
    assert script_for(b"pc-q35-10.0", False) == "10.0"
    assert script_for(b"pc-i440fx-9.2", True) == "10.0"
    assert script_for(b"pc-i440fx-9.2", False) == "7.2"
    assert script_for(None, False) == "7.2"


def _has_trailer(path) -> bool:
    from qmigstream.codec.reader import read_records
    return any(r.kind == "vmdescription" for r in read_records(str(path)))


@needs_script
@pytest.mark.parametrize("name", ["pc-7.2-loader", "pc-7.2-paused", "pc-5.2-paused",
                                  "pc-10.0-paused", "pc-11.1-paused"])
def test_memory_dump_matches_the_fixed_script(name, capture, capsys, tmp_path):
    if name not in capture_names():
        pytest.skip(f"{name} not committed")
    path, meta = capture(name)
    script = script_of(meta)
    rc, err_out, err = _script(["-f", str(path), "-m"], script=script)
    assert rc != 0 and "ord()" in err          # the unpatched script's known crash
    rc, ref, err = _script(["-f", str(path), "-m"], script=_fixed(script, tmp_path))
    assert rc == 0, err
    ours_rc, ours = _ours(["-f", str(path), "-m"], capsys)
    assert ours_rc == 0
    assert ours == ref
    state = json.loads(ours)
    mem = next(v for k, v in state.items() if k.startswith("ram ("))["memory"]
    assert any(not v.startswith("Filled") for v in mem.values())


@needs_script
@pytest.mark.parametrize("name", ["pc-7.2-loader", "pc-11.1-paused"])
def test_extract_writes_what_the_script_writes(name, capture, tmp_path, capsys):
    """(The 5.2 script's -x stops at its first write: it opens desc.json in binary
    mode and writes text, the Python 3 bug 7.2's stable series fixed.)"""
    if name not in capture_names():
        pytest.skip(f"{name} not committed")
    path, meta = capture(name)
    a, b = tmp_path / "script", tmp_path / "ours"
    a.mkdir()
    b.mkdir()
    rc, out, err = _script(["-f", str(path), "-x"], cwd=a, script=script_of(meta))
    assert rc == 0, err
    assert main(["analyze", "-f", str(path), "-x", "--output-dir", str(b)]) == 0
    ours_out = capsys.readouterr().out
    assert ours_out.splitlines() == out.splitlines()
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_state_is_the_same_through_the_cli_and_the_library(capture, capsys):
    path, _ = capture(capture_names()[0])
    rc, out = _ours(["-f", str(path)], capsys)
    assert rc == 0
    assert out == dumps(analyze_state(str(path))) + "\n"


@pytest.mark.parametrize("name,expected", [
    ("pc.ram", "pc.ram"),
    ("/rom@etc/acpi/tables", "rom@etc/acpi/tables"),
    ("../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd"),
    ("a/./b//c", "a/b/c"),
    ("x\x00y\\z", "x_y_z"),
    ("", "_"),
])
def test_block_names_never_choose_a_path_outside(name, expected):
    assert safe_relpath(name) == expected


def test_no_trailer_desc_is_a_one_line_error(tmp_path, capsys):
    from qmigstream.codec.build import StreamBuilder
    b = StreamBuilder(footers=False)
    b.header()
    b.eof()
    p = tmp_path / "s.mig"
    p.write_bytes(b.encode())
    assert main(["analyze", "-f", str(p), "-d", "desc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no VMDESCRIPTION trailer" in err[0]


@pytest.mark.parametrize("name", ["pc-10.0-mapped-ram", "pc-11.1-mapped-ram"])
def test_mapped_ram_memory_lists_every_page(name, capture, capsys):
    """-m on a mapped-ram file lists every page of every block in block and page order,
    as the script does once it reads mapped-ram (11.x): the bytes of the pages the
    bitmap marks, ``Filled with 0x00`` for the others (the 10.0 script fails)."""
    if name not in capture_names():
        pytest.skip(f"{name} not committed")
    path, meta = capture(name)
    assert main(["analyze", "-f", str(path), "-m"]) == 0
    state = json.loads(capsys.readouterr().out)
    ram = next(v for k, v in state.items() if k.startswith("ram ("))
    sizes = {b: int(v, 16) for b, v in ram["section sizes"].items()}
    keys = list(ram["memory"])
    assert keys == ["%s (0x%016x)" % (b, a) for b, n in sizes.items() for a in range(0, n, 4096)]
    filled = [v for v in ram["memory"].values() if v != "Filled with 0x00"]
    assert len(filled) == meta["query_migrate"]["ram"]["normal"]
    assert all(len(v) == 4096 * 3 - 1 for v in filled)
