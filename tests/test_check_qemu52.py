"""``qmigstream check --profile qemu-5.2``: the profile's data, the committed 5.2
captures, what 5.2 refuses of newer streams, and (when the 5.2 chroot exists) a slice
of tools/differential against the real QEMU 5.2."""

from __future__ import annotations

import lzma
import time

import pytest

from conftest import (CAPTURES, assert_loads_with_profile, differential_for, release_names,
                      unpack_release)
from conftest import fatal_message as _fatal
from qmigstream.check import check, profile, profile_for_stream
from qmigstream.cli import main

NAMES_52 = release_names("5.2")


def _unpack(d, name):
    p = d / f"{name}.mig"
    p.write_bytes(lzma.open(CAPTURES / f"{name}.mig.xz").read())
    return p


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """name -> path of each committed 5.2 capture, decompressed."""
    return unpack_release(tmp_path_factory.mktemp("cap52"), "5.2")


def test_profile_data():
    p, old = profile("qemu-5.2"), profile("qemu-7.2")
    assert p.name == "qemu-5.2" and p.release == "5.2"
    assert p.machines == {"pc": "pc-i440fx-5.2", "q35": "pc-q35-5.2"}
    assert p.commands == old.commands and 11 not in p.commands
    assert p.iterative == old.iterative and "block" in p.iterative
    # query-migrate-capabilities of 5.2.0: 7.2's list without the three 6.0-7.2 added
    assert set(old.capabilities) - set(p.capabilities) == {
        "background-snapshot", "zero-copy-send", "postcopy-preempt"}
    assert set(p.capabilities) <= set(old.capabilities)
    assert p.compress and not (p.multifd_flush or p.zero_fill_fatal or p.hook_ignored)
    assert p.wording == () and not p.header_words_111
    assert p.vmsd_versions["PIIX3"][0]["file"] == "-dump-vmstate"
    assert "not in the 5.2 dump" in p.vmsd_versions["cpu"][0]["file"]


@pytest.mark.parametrize("name", NAMES_52)
def test_committed_5_2_captures_load(streams, name):
    assert_loads_with_profile(streams[name], "qemu-5.2")


def test_the_cli_asks_for_5_2_explicitly(streams, capsys):
    """A 5.2 machine type keeps the 7.2 default (a 7.2 QEMU writes such streams too
    and loads them); --profile qemu-5.2 asks 5.2."""
    path = str(streams["pc-5.2-paused"])
    assert profile_for_stream(path) == (None, "pc-i440fx-5.2")
    assert main(["check", path]) == 0
    assert "QEMU 7.2 would load this stream" in capsys.readouterr().out
    assert main(["check", path, "--profile", "qemu-5.2"]) == 0
    assert "QEMU 5.2 would load this stream" in capsys.readouterr().out


def test_newer_streams_are_refused(tmp_path):
    new = str(_unpack(tmp_path, "pc-10.0-paused"))
    # its machine type is none of 5.2's (the configuration comes before the command)
    assert _fatal(check(new, profile_name="qemu-5.2")).startswith(
        "Machine type received is 'pc-i440fx-10.0' and local is the destination's: no x86 "
        "machine type of QEMU 5.2 starts so")
    assert _fatal(check(new, profile_name="qemu-5.2", expect_machine="pc-i440fx-10.0")) == \
        "MIG_CMD 0xb unknown (len 0x0)"
    old = str(_unpack(tmp_path, "pc-7.2-paused"))
    rep = check(old, profile_name="qemu-5.2", expect_machine="pc")
    assert "pc-i440fx-7.2" in _fatal(rep) and "pc-i440fx-5.2" in _fatal(rep)




@pytest.mark.qemu
def test_check_agrees_with_qemu_5_2(monkeypatch):
    """The mutation cases of pc-5.2-paused and pc-5.2-compress loaded into QEMU 5.2."""
    d = differential_for("5.2", monkeypatch)
    t0 = time.monotonic()
    rows = d.run_all(jobs=4, names=["pc-5.2-paused", "pc-5.2-compress"])
    assert time.monotonic() - t0 < 120
    assert not [(r["case"], r["qemu"], r["check"]) for r in rows if not r["agree"]]
    got = {r["case"]: r["qemu_loads"] for r in rows if r["capture"] == "pc-5.2-paused"}
    assert len(got) > 40 and got["original"] and got["ram-zero-fill"]
    assert not got["ram-hook"]
    for r in rows:
        if r["qemu_loads"] or r["case"] == "bad-magic":
            continue
        lines = [l.replace("qemu-system-x86_64: ", "") for l in r["qemu_lines"]]
        assert any(l in r["check"] for l in lines), (r["case"], lines, r["check"])
