"""``qmigstream check --profile qemu-10.0``: the profile's data, the committed 10.0
captures, where 10.0 differs from 11.1 (its words, zero-blocks, the mapped-ram page
size), and (when the 10.0 chroot exists) a slice of tools/differential against the
real QEMU 10.0."""

from __future__ import annotations

import time

import pytest

from conftest import (assert_cli_picks_profile, assert_loads_with_profile, differential_for,
                      release_names, unpack_release)
from conftest import fatal_message as _fatal
from qmigstream.check import check, profile, profile_for_stream
from qmigstream.mutate import Index, capture_mutations, mutations

NAMES_100 = release_names("10.0")


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """name -> path of each committed 10.0 capture, decompressed."""
    return unpack_release(tmp_path_factory.mktemp("cap100"), "10.0")


def _check(tmp_path, data, prof="qemu-10.0", ref=None):
    p = tmp_path / "m.mig"
    p.write_bytes(data)
    return check(str(p), profile_name=prof, reference=ref)


# -- the profile's data -------------------------------------------------------------

def test_profile_data():
    p, new = profile("qemu-10.0"), profile("qemu-11.1")
    assert p.name == "qemu-10.0" and p.release == "10.0"
    assert p.machines == {"pc": "pc-i440fx-10.0", "q35": "pc-q35-10.0"}
    assert p.commands == new.commands and p.commands[11] == ("SWITCHOVER_START", 0)
    assert p.iterative == new.iterative and "block" not in p.iterative
    # query-migrate-capabilities of 10.0.13: 11.1's list plus zero-blocks
    assert set(p.capabilities) - set(new.capabilities) == {"zero-blocks"}
    assert set(new.capabilities) <= set(p.capabilities)
    assert "compress" not in p.capabilities and "block" not in p.capabilities
    assert p.multifd_flush and not p.compress and p.zero_fill_fatal and p.hook_ignored
    assert not p.mapped_ram_page_size and new.mapped_ram_page_size
    assert p.wording == () and not p.header_words_111
    # 10.0's own -dump-vmstate table, 7.2's rows for what it does not list
    assert p.vmsd_versions["PIIX3"][0]["file"] == "-dump-vmstate"
    assert p.minimum_version("PIIX3", 3) == 2
    assert p.minimum_version("cpu", 12) == 11
    assert "not in the 10.0 dump" in p.vmsd_versions["cpu"][0]["file"]


# -- the committed 10.0 captures --------------------------------------------------------

@pytest.mark.parametrize("name", NAMES_100)
def test_committed_10_0_captures_load(streams, name):
    path = str(streams[name])
    assert_loads_with_profile(path, "qemu-10.0")
    # 7.2 does not know SWITCHOVER_START (nor mapped-ram, MULTIFD_FLUSH)
    assert not check(path, profile_name="qemu-7.2").loads


def test_the_cli_follows_the_stream(streams, capsys):
    assert_cli_picks_profile(streams["pc-10.0-paused"], "10.0", "pc-i440fx-10.0", capsys)


def test_q35_10_0_picks_the_profile(tmp_path):
    import struct
    p = tmp_path / "s.mig"
    p.write_bytes(b"QEVM\0\0\0\x03\x07" + struct.pack(">I", 11) + b"pc-q35-10.0")
    assert profile_for_stream(str(p)) == ("qemu-10.0", "pc-q35-10.0")


# -- where 10.0 differs from 11.1 ----------------------------------------------------

@pytest.fixture(scope="module")
def cases(streams):
    data = streams["pc-10.0-paused"].read_bytes()
    return {m.name: m.data for m in mutations("pc-10.0-paused", data, Index(data))}


def test_10_0_words(tmp_path, cases, streams):
    ref = str(streams["pc-10.0-paused"])
    # QEMU 10.0 prints these as 7.2 did (11.1 rewords them)
    assert _fatal(_check(tmp_path, cases["version-2"], ref=ref)) == \
        "SaveVM v2 format is obsolete and don't work anymore"
    assert _fatal(_check(tmp_path, cases["section-type"], ref=ref)) == \
        "Unknown savevm section type 9"
    assert _fatal(_check(tmp_path, cases["version-2"], "qemu-11.1", ref=ref)) == \
        "SaveVM v2 format is obsolete and no longer supported"
    rep = _check(tmp_path, b"QEVM\0\0\0\x04", ref=ref)
    assert _fatal(rep).startswith("Unsupported migration stream version")
    assert "!= 3" not in _fatal(rep)


def test_commands_and_ram_flags_as_11_1(tmp_path, cases, streams):
    ref = str(streams["pc-10.0-paused"])
    assert _fatal(_check(tmp_path, cases["switchover-start-length"], ref=ref)) == \
        "SWITCHOVER_START received with bad length - expecting 0, got 4"
    assert _check(tmp_path, cases["switchover-start-removed"], ref=ref).loads
    assert _check(tmp_path, cases["ram-multifd-flush"], ref=ref).loads
    assert _fatal(_check(tmp_path, cases["ram-zero-fill"], ref=ref)) == \
        "Found a zero page with value 90"
    assert _fatal(_check(tmp_path, cases["ram-compress-page"], ref=ref)).startswith(
        "Unknown combination of migration flags: 0x120")


def test_mapped_ram_page_size_is_not_checked(tmp_path, streams):
    path = streams["pc-10.0-mapped-ram"]
    data = path.read_bytes()
    got = {m.name: m.data for m in capture_mutations("pc-10.0-mapped-ram", data, Index(data))}
    rep = _check(tmp_path, got["mapped-ram-page-size"], ref=str(path))
    assert rep.loads, _fatal(rep)
    assert any("does not check it" in p.message for p in rep.problems)
    rep = _check(tmp_path, got["mapped-ram-page-size"], "qemu-11.1", ref=str(path))
    assert "invalid page_size 8192" in _fatal(rep)
    assert "version not supported" in _fatal(
        _check(tmp_path, got["mapped-ram-version"], ref=str(path)))


# -- against the real QEMU 10.0 -------------------------------------------------------



@pytest.mark.qemu
def test_check_agrees_with_qemu_10_0(monkeypatch):
    """The mutation cases of pc-10.0-paused and pc-10.0-mapped-ram loaded into QEMU 10.0
    (about 10 s)."""
    d = differential_for("10.0", monkeypatch)
    t0 = time.monotonic()
    rows = d.run_all(jobs=4, names=["pc-10.0-paused", "pc-10.0-mapped-ram"])
    assert time.monotonic() - t0 < 120
    assert not [(r["case"], r["qemu"], r["check"]) for r in rows if not r["agree"]]
    got = {r["case"]: r["qemu_loads"] for r in rows if r["capture"] == "pc-10.0-paused"}
    assert len(got) > 50
    assert got["original"] and got["switchover-start-removed"] and got["ram-multifd-flush"]
    assert not got["switchover-start-length"] and not got["ram-zero-fill"]
    mr = {r["case"]: r["qemu_loads"] for r in rows if r["capture"] == "pc-10.0-mapped-ram"}
    assert mr["original"] and mr["mapped-ram-page-size"] and not mr["mapped-ram-version"]
    # where QEMU fails, check quotes one of its lines
    for r in rows:
        if r["qemu_loads"] or r["case"] == "bad-magic":
            continue
        lines = [l.replace("qemu-system-x86_64: ", "") for l in r["qemu_lines"]]
        assert any(l in r["check"] for l in lines), (r["case"], lines, r["check"])
