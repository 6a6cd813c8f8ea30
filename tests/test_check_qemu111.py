"""``qmigstream check --profile qemu-11.1``: the profile's data, the committed 11.1
captures, the commands and RAM flags 11.1 treats differently from 7.2, and (when the
11.1 chroot exists) a slice of tools/differential against the real QEMU 11.1."""

from __future__ import annotations

import struct
import time

import pytest

from conftest import (assert_cli_picks_profile, assert_loads_with_profile, differential_for,
                      release_names, unpack_release)
from conftest import fatal_message as _fatal
from qmigstream.check import PROFILES, check, profile, profile_for_stream
from qmigstream.mutate import Index, mutations

NAMES_111 = release_names("11.1")


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """name -> path of each committed 11.1 capture, decompressed."""
    return unpack_release(tmp_path_factory.mktemp("cap111"), "11.1")


# -- the profile's data -------------------------------------------------------------

def test_profile_data():
    assert PROFILES == ("qemu-5.2", "qemu-7.2", "qemu-10.0", "qemu-11.1")
    p = profile("qemu-11.1")
    assert p.release == "11.1"
    assert p.machines == {"pc": "pc-i440fx-11.1", "q35": "pc-q35-11.1"}
    assert p.commands[11] == ("SWITCHOVER_START", 0)
    assert {k: v for k, v in p.commands.items() if k != 11} == profile("qemu-7.2").commands
    assert "block" not in p.iterative and p.iterative["ram"] == 4
    for cap in ("mapped-ram", "switchover-ack", "dirty-limit", "x-ignore-shared"):
        assert cap in p.capabilities
    for gone in ("compress", "block", "zero-blocks"):
        assert gone not in p.capabilities and gone in profile("qemu-7.2").capabilities
    assert p.multifd_flush and not p.compress and p.zero_fill_fatal and p.hook_ignored
    # the -dump-vmstate table, and 7.2's rows for what the dump does not list
    assert p.minimum_version("PIIX3", 3) == 2
    assert p.field_versions("PIIX3", 3) == {"pci_irq_levels_vmstate": 3}
    assert p.minimum_version("cpu", 12) == 11
    assert "7.2" in p.vmsd_versions["cpu"][0]["file"]
    assert p.vmsd_versions["PIIX3"][0]["file"] == "-dump-vmstate"
    q = profile("qemu-7.2")
    assert not (q.multifd_flush or q.zero_fill_fatal or q.hook_ignored) and q.compress
    with pytest.raises(Exception, match="known: qemu-5.2, qemu-7.2, qemu-10.0, qemu-11.1"):
        profile("qemu-9.0")


# -- the committed 11.1 captures --------------------------------------------------------

@pytest.mark.parametrize("name", NAMES_111)
def test_committed_11_1_captures_load(streams, name):
    path = streams[name]
    assert_loads_with_profile(path, "qemu-11.1")
    # 7.2 refuses every one but the savevm snapshot (no SWITCHOVER_START there)
    old = check(str(path), profile_name="qemu-7.2")
    if name != "pc-11.1-savevm":
        assert not old.loads
        assert any(s in old.fatal.message for s in
                   ("no x86 machine type of QEMU 7.2 starts so",     # the machine type
                    "unknown capability mapped-ram"))                # (read before it)
        # told the destination's machine type, what follows
        machine = profile_for_stream(str(path))[1]
        told = check(str(path), profile_name="qemu-7.2", expect_machine=machine)
        assert not told.loads and any(s in told.fatal.message for s in
                                      ("MIG_CMD 0xb unknown", "unknown capability mapped-ram",
                                       "Unknown combination of migration flags: 0x200"))


def test_the_cli_follows_the_stream(streams, capsys):
    assert_cli_picks_profile(streams["pc-11.1-paused"], "11.1", "pc-i440fx-11.1", capsys)
    assert profile_for_stream(str(streams["q35-11.1-paused"])) == ("qemu-11.1", "pc-q35-11.1")


def test_other_machines_keep_the_7_2_default(tmp_path):
    p = tmp_path / "s.mig"
    p.write_bytes(b"QEVM\0\0\0\x03\x07" + struct.pack(">I", 13) + b"pc-i440fx-7.2")
    assert profile_for_stream(str(p)) == (None, "pc-i440fx-7.2")
    p.write_bytes(b"QEVM\0\0\0\x03\x02")
    assert profile_for_stream(str(p)) == (None, None)
    assert profile_for_stream("-") == (None, None)


# -- what 11.1 does differently -------------------------------------------------------

@pytest.fixture(scope="module")
def cases(streams):
    data = streams["pc-11.1-paused"].read_bytes()
    return {m.name: m.data for m in mutations("pc-11.1-paused", data, Index(data))}


def _check(tmp_path, data, prof="qemu-11.1", ref=None):
    p = tmp_path / "m.mig"
    p.write_bytes(data)
    return check(str(p), profile_name=prof, reference=ref)


def test_switchover_start_with_a_length_is_refused(tmp_path, cases, streams):
    ref = str(streams["pc-11.1-paused"])
    rep = _check(tmp_path, cases["switchover-start-length"], ref=ref)
    assert _fatal(rep) == "SWITCHOVER_START received with bad length - expecting 0, got 4"
    rep = _check(tmp_path, cases["switchover-start-unknown"], ref=ref)
    assert _fatal(rep) == "MIG_CMD 0xc unknown (len 0x0)"
    assert _check(tmp_path, cases["switchover-start-removed"], ref=ref).loads


def test_compress_page_is_refused_as_11_1_refuses_it(tmp_path, cases, streams):
    ref = str(streams["pc-11.1-paused"])
    rep = _check(tmp_path, cases["ram-compress-page"], ref=ref)
    # QEMU 11.1: "Unknown combination of migration flags: 0x120"
    assert rep.fatal.message.startswith("Unknown combination of migration flags: 0x120")
    # 7.2 without the compress capability refuses it too, with its own message
    rep = _check(tmp_path, cases["ram-compress-page"], "qemu-7.2")
    assert not rep.loads


def test_ram_flags_of_11_1(tmp_path, cases, streams):
    ref = str(streams["pc-11.1-paused"])
    assert _check(tmp_path, cases["ram-multifd-flush"], ref=ref).loads
    assert not _check(tmp_path, cases["ram-multifd-flush"], "qemu-7.2").loads
    rep = _check(tmp_path, cases["ram-zero-fill"], ref=ref)
    assert _fatal(rep) == "Found a zero page with value 90"
    # HOOK (0x80) is a no-op outside RDMA in 11.1: the ZERO record's fill byte that
    # follows is then read as the next word
    rep = _check(tmp_path, cases["ram-hook"], ref=ref)
    assert _fatal(rep) == "Unknown combination of migration flags: 0x20"


def test_mapped_ram_headers(tmp_path, streams):
    """mapped-ram: each block-list entry's header, and the page area the stream skips."""
    from qmigstream.mutate import capture_mutations
    path = streams["pc-11.1-mapped-ram"]
    data = path.read_bytes()
    got = {m.name: m.data for m in capture_mutations("pc-11.1-mapped-ram", data, Index(data))}
    ref = str(path)
    rep = _check(tmp_path, got["mapped-ram-version"], ref=ref)
    assert _fatal(rep) == ("Migration mapped-ram capability version not supported "
                           "(expected <= 1, got 2)")
    rep = _check(tmp_path, got["mapped-ram-page-size"], ref=ref)
    assert _fatal(rep) == ("Migration mapped-ram header has invalid page_size 8192 "
                           "(expected 4096)")
    rep = _check(tmp_path, got["mapped-ram-cut-pages"], ref=ref)
    assert _fatal(rep).startswith('Unknown ramblock "", cannot accept migration')
    rep = _check(tmp_path, got["mapped-ram-block-name"], ref=ref)
    assert _fatal(rep) == 'Unknown ramblock "pc.rax", cannot accept migration'


# -- against the real QEMU 11.1 -------------------------------------------------------





@pytest.mark.qemu
def test_check_agrees_with_qemu_11_1(monkeypatch):
    """The mutation cases of pc-11.1-paused and pc-11.1-mapped-ram loaded into QEMU 11.1
    (about 10 s)."""
    d = differential_for("11.1", monkeypatch)
    t0 = time.monotonic()
    rows = d.run_all(jobs=4, names=["pc-11.1-paused", "pc-11.1-mapped-ram"])
    assert time.monotonic() - t0 < 120
    bad = [(r["case"], r["qemu"], r["check"]) for r in rows if not r["agree"]]
    assert not bad
    got = {r["case"]: r["qemu_loads"] for r in rows if r["capture"] == "pc-11.1-paused"}
    assert len(got) > 50
    assert got["original"] and got["switchover-start-removed"] and got["ram-multifd-flush"]
    assert not got["switchover-start-length"] and not got["ram-compress-page"]
    assert not got["ram-zero-fill"]
    mr = {r["case"]: r["qemu_loads"] for r in rows if r["capture"] == "pc-11.1-mapped-ram"}
    assert mr["original"] and not mr["mapped-ram-version"] and not mr["mapped-ram-cut-pages"]
    # where QEMU fails, check names the cause QEMU gives for mapped-ram
    for r in rows:
        if r["case"] in ("mapped-ram-version", "mapped-ram-page-size",
                         "switchover-start-length", "ram-compress-page", "ram-zero-fill"):
            lines = [l.replace("qemu-system-x86_64: ", "") for l in r["qemu_lines"]]
            assert any(l.split(": ")[-1] in r["check"] for l in lines), (r["case"], lines)
