"""Every command on mutated real streams: exit 0/1/2 as documented, a one-line error
on stderr for exit 2, never a traceback (in-process through ``qmigstream.cli.main``,
and once per command through a subprocess)."""

from __future__ import annotations

import contextlib
import io
import os
import json
import subprocess
import sys

import pytest

from qmigstream.cli import build_parser, main
from qmigstream.mutate import Index, mutations

#: Commands that read no stream; they are not run on mutated input.
NO_STREAM_INPUT = {"demo", "fsm", "profiles"}

#: A handful of mutations covering the ways a stream breaks (names of qmigstream.mutate).
CASES = ("original", "bad-magic", "version-4", "machine-name", "section-type", "footer-id",
         "ram-block-length-sum", "ram-flag-unknown", "ram-offset-beyond", "equal-field",
         "cut-header", "cut-ram", "cut-device", "cut-before-eof", "cut-trailer",
         "trailer-damaged", "garbage-appended", "eof-garbage")


def invocations(f, ref, work, gold):
    """command -> argv running it on stream ``f`` (scratch outputs under ``work``)."""
    return {
        "analyze": ["analyze", "-f", f, "-d", "state"],
        "check": ["check", f, "--reference", ref],
        "decode": ["decode", "--json", f],
        "diff": ["diff", ref, f],
        "golden": ["golden", "compare", gold, f],
        "info": ["info", f],
        "migrate": ["migrate", "--template", f, "-o", os.path.join(work, "out.mig")],
        "ram": ["ram", "extract", f, "-o", os.path.join(work, "ram")],
        "replay": ["replay", f],
        "report": ["report", f, "-o", os.path.join(work, "r.html")],
        "roundtrip": ["roundtrip", f],
        "savevm": ["savevm", f, "-o", os.path.join(work, "vm.mig")],
        "vfio": ["vfio", f],
    }


def commands():
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(sub.choices)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, capture_dir):
    d = tmp_path_factory.mktemp("hygiene")
    ref = capture_dir / "pc-7.2-paused.mig"
    data = ref.read_bytes()
    table = {m.name: m for m in mutations("pc-7.2-paused", data, Index(data))}
    paths = {}
    for name in CASES:
        paths[name] = d / f"{name}.mig"
        paths[name].write_bytes(table[name].data)
    paths["empty"] = d / "empty.mig"
    paths["empty"].write_bytes(b"")
    gold = d / "gold"
    assert main(["golden", "generate", "--profiles", "qemu-7.2", "--scenarios", "paused",
                 str(gold)]) == 0
    return paths, str(ref), str(gold), d


def test_every_command_is_covered():
    assert commands() == set(invocations("F", "R", "W", "G")) | NO_STREAM_INPUT


def _run_in_process(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:          # argparse usage errors
            rc = e.code
    return rc, err.getvalue()


@pytest.mark.parametrize("command", sorted(set(invocations("F", "R", "W", "G"))))
def test_command_on_mutated_streams(command, inputs, tmp_path):
    paths, ref, gold, _ = inputs
    seen = {}
    for case, path in paths.items():
        work = tmp_path / case
        work.mkdir()
        argv = invocations(str(path), ref, str(work), gold)[command]
        rc, err = _run_in_process(argv)
        assert rc in (0, 1, 2), (case, rc, err)
        assert "Traceback" not in err, (case, err)
        if rc == 2:
            assert err.count("\n") == 1 and err.startswith(f"qmigstream {command}: error: "), \
                (case, err)
        seen[case] = rc
    # a stream that is not one is refused as input by every command reading streams
    assert seen["empty"] == 2 and seen["bad-magic"] == 2
    if command == "check":
        assert seen["original"] == 0 and seen["cut-ram"] == 1 and seen["garbage-appended"] == 0


@pytest.mark.parametrize("command", sorted(set(invocations("F", "R", "W", "G"))))
def test_command_in_a_subprocess(command, inputs, tmp_path):
    paths, ref, gold, _ = inputs
    argv = invocations(str(paths["cut-device"]), ref, str(tmp_path), gold)[command]
    r = subprocess.run([sys.executable, "-m", "qmigstream", *argv], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode in (0, 1, 2), r.stderr
    assert "Traceback" not in r.stderr
    if r.returncode == 2:
        assert r.stderr.count("\n") == 1, r.stderr


def test_fast_exit_commands_flush_their_output_and_keep_their_exit_code(tmp_path):
    """migrate and replay end the process without the interpreter's teardown: what
    they print reaches a pipe whole, their files are complete, exit codes hold."""
    out = tmp_path / "s.mig"
    r = subprocess.run([sys.executable, "-m", "qmigstream", "migrate", "-o", str(out),
                        "--profile", "qemu-8.2", "--ram-size", "8M", "--device", "sized:64K",
                        "--iterations", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote ") and "manifest:" in r.stdout
    manifest = json.loads((tmp_path / "s.mig.json").read_text())
    assert manifest["size"] == out.stat().st_size
    r = subprocess.run([sys.executable, "-m", "qmigstream", "replay", str(out), "--expect",
                        str(tmp_path / "s.mig.json"), "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"] is True
    r = subprocess.run([sys.executable, "-m", "qmigstream", "replay", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error" in r.stderr
