"""Other QEMU releases as the judge of ``migrate --template``: Debian's QEMU 5.2,
10.0 and 11.1 (chroots made by ``tools/debian-qemu``) load what the pipeline
makes from their own committed captures, with the capture's own machine
arguments, and then hold exactly the pipeline's RAM (``pmemsave``), as
tests/test_pipeline.py checks for Debian's own 7.2.

Each release's tests are skipped unless its chroot exists under
``$QMIGSTREAM_CHROOTS`` (default ``/var/cache/qmigstream/chroots``); the tests
find the wrappers themselves (no ``eval "$(tools/debian-qemu R)"`` needed) and
run ``tools/debian-qemu R`` once per release, which only bind-mounts /tmp and
friends into an existing chroot and checks its version."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess

import pytest

from conftest import ROOT, capture_names, chroot_missing
from test_captures import meta_of
from test_qemu_live import machine_args_from
from qmigstream import vmdesc
from qmigstream.codec.reader import read_records
from qmigstream.codec.records import Command, Configuration, VmDescription
from qmigstream.pipeline import profiles as P
from qmigstream.pipeline.guest import load_stream_ram
from qmigstream.pipeline.migrate import MigrateConfig, migrate

#: release -> (the profile that writes its streams, Debian suite of its chroot)
RELEASES = {"5.2": ("qemu-5.2", "bullseye"), "10.0": ("qemu-10.0", "trixie"),
            "11.1": ("qemu-11.1", "sid")}

#: the templates of each release: its paused pc and q35 captures and its -devices capture
TEMPLATES = [(rel, name) for rel in RELEASES
             for name in (f"pc-{rel}-paused", f"q35-{rel}-paused", f"pc-{rel}-devices")
             if name in capture_names()]
#: a stream made by a newer release's profile from an older release's machine
CROSS = [("10.0", "pc-5.2-paused"), ("11.1", "pc-5.2-paused"), ("11.1", "pc-10.0-paused")]

VARIANTS = {
    # the machine as captured: one pass over RAM, nothing dirtied
    "still": dict(iterations=1, dirty_rate=0, xbzrle=False, seed=11),
    # as the 7.2 test: a running workload, three pre-copy rounds with XBZRLE
    "xbzrle": dict(iterations=3, dirty_rate=40000, xbzrle=True, bandwidth=32 << 20, seed=11),
}


@functools.lru_cache(maxsize=None)
def _release_qemu(release):
    """(path of the release's qemu-system-x86_64 wrapper, None) or (None, why not)."""
    why = chroot_missing(release)
    if why:
        return None, why
    try:        # the chroot exists, so this only mounts /tmp etc. and checks the version
        r = subprocess.run([str(ROOT / "tools" / "debian-qemu"), release],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"tools/debian-qemu {release}: {e}"
    if r.returncode:
        return None, f"tools/debian-qemu {release} failed: {r.stderr.strip()[-300:]}"
    words = dict(w.split("=", 1) for w in shlex.split(r.stdout.replace("export ", ""))
                 if "=" in w)
    qemu = words.get("QEMU")
    if not qemu or not os.access(qemu, os.X_OK):
        return None, f"tools/debian-qemu {release} named no runnable QEMU: {r.stdout!r}"
    return qemu, None


def release_qemu(release) -> str:
    """The release's QEMU, or skip the test saying why there is none."""
    qemu, why = _release_qemu(release)
    if qemu is None:
        pytest.skip(why)
    return qemu


def machine_of(path) -> str:
    for rec in read_records(str(path)):
        if isinstance(rec, Configuration):
            return rec.machine.decode("latin-1")
    raise AssertionError(f"{path}: no configuration record")


def _load_and_compare(qemu, template, name, profile, variant, tmp_path, machine=None):
    """migrate from ``template`` (capture ``name``) as ``profile``; load into ``qemu``
    with the capture's machine arguments (``-machine`` set to ``machine`` if given);
    QEMU's memory must be the pipeline's."""
    from qmigstream.qemu.runner import load_incoming
    meta = meta_of(name)
    out = tmp_path / "out.mig"
    res = migrate(out, MigrateConfig(profile=profile, template=str(template), devices=[],
                                     **VARIANTS[variant]))
    if variant == "xbzrle":
        assert res.pages["xbzrle"] > 0
    args = machine_args_from(meta, tmp_path, name)
    if machine is not None:
        args[args.index("-machine") + 1] = machine
    dumps = [(m["addr"], m["size"], tmp_path / f"mem-{m['addr']:x}") for m in meta["memory"]]
    r = load_incoming(args, str(out), 20, binary=qemu,
                      pmemsave=[(a, s, str(f)) for a, s, f in dumps])
    assert r.loaded, r.stderr
    pc = load_stream_ram(out).block("pc.ram")
    assert pc.digest() == res.ram["pc.ram"]
    for addr, size, f in dumps:
        assert f.read_bytes() == bytes(pc.mem[addr:addr + size]), f"memory at {addr:#x} differs"


@pytest.mark.qemu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("release,name", TEMPLATES, ids=[n for _, n in TEMPLATES])
def test_release_loads_template_output_with_the_pipelines_memory(release, name, variant,
                                                                 capture, tmp_path):
    qemu = release_qemu(release)
    template, _ = capture(name)
    _load_and_compare(qemu, template, name, RELEASES[release][0], variant, tmp_path)


@pytest.mark.qemu
@pytest.mark.parametrize("release,name", CROSS, ids=[f"{n}-into-{r}" for r, n in CROSS])
def test_newer_release_loads_an_older_machine(release, name, capture, tmp_path):
    """The stream the newer release would write for an older machine type (the
    older capture's devices, the newer profile's stream and trailer style) loads
    into the newer QEMU started with that machine type."""
    qemu = release_qemu(release)
    template, _ = capture(name)
    _load_and_compare(qemu, template, name, RELEASES[release][0], "xbzrle", tmp_path,
                      machine=machine_of(template))


# -- the pieces that need no QEMU ------------------------------------------------------

def _trailer(path) -> bytes:
    found = [r for r in read_records(str(path)) if isinstance(r, VmDescription)]
    return found[-1].json_bytes


def _commands(path) -> list:
    return [r.name for r in read_records(str(path)) if isinstance(r, Command)]


@pytest.mark.parametrize("release,name", TEMPLATES, ids=[n for _, n in TEMPLATES])
def test_release_profile_writes_its_captures_layout(release, name, capture, tmp_path):
    """With its release's profile a template's output has the capture's commands
    (10.0+: SWITCHOVER_START), machine and trailer, byte for byte (QJSON for 5.2;
    8.2+ the configuration described; 11.1 without "index")."""
    template, _ = capture(name)
    out = tmp_path / "out.mig"
    migrate(out, MigrateConfig(profile=RELEASES[release][0], template=str(template),
                               devices=[], **VARIANTS["still"]))
    assert _commands(out) == _commands(template)
    assert machine_of(out) == machine_of(template)
    assert _trailer(out) == _trailer(template)


def test_11_1_profile_describes_arrays_without_index(capture, tmp_path):
    """QEMU 11.1 leaves "index" out of the per-element entries of an array that
    10.0 writes with "index": i (compare the committed captures).  An older
    template made with the qemu-11.1 profile gets 11.1's form, and each device
    entry the two releases describe alike comes out as 11.1's bytes."""
    old, _ = capture("pc-10.0-paused")
    new, _ = capture("pc-11.1-paused")
    assert b'"index"' in _trailer(old) and b'"index"' not in _trailer(new)
    assert P.get("qemu-11.1").vmdesc_array_index is False
    assert P.get("qemu-10.0").vmdesc_array_index is True
    out = tmp_path / "out.mig"
    migrate(out, MigrateConfig(profile="qemu-11.1", template=str(old), devices=[],
                               **VARIANTS["still"]))
    got = vmdesc.parse(_trailer(out))
    want = vmdesc.parse(_trailer(new))
    assert b'"index"' not in _trailer(out)
    alike = 0
    for entry in got.devices:
        other = want.device(entry["name"], entry["instance_id"])
        if entry["name"] in ("0000:00:01.1/ide", "fdc"):      # arrays of structs in both
            assert vmdesc.dump(entry, vmdesc.JSONWRITER) == vmdesc.dump(other, vmdesc.JSONWRITER)
        if other is not None and entry == other:
            alike += 1
    assert alike >= 25
    # with the 10.0 profile the same template keeps its "index" members
    migrate(out, MigrateConfig(profile="qemu-10.0", template=str(old), devices=[],
                               **VARIANTS["still"]))
    assert _trailer(out) == _trailer(old)


def test_without_array_index_touches_only_field_entries():
    field = vmdesc.JsonObject([("name", "s"), ("index", 0), ("type", "struct"),
                               ("struct", vmdesc.JsonObject([
                                   ("vmsd_name", "x"), ("version", 1),
                                   ("fields", [vmdesc.JsonObject([("name", "a"), ("index", 3),
                                                                  ("type", "uint8"),
                                                                  ("size", 1)])])])),
                               ("size", 1)])
    # a member called "index" outside a field entry stays; repeated keys stay
    entry = vmdesc.JsonObject([("name", "dev"), ("instance_id", 0), ("index", 7),
                               ("fields", [field, field]),
                               ("subsections", [vmdesc.JsonObject([
                                   ("vmsd_name", "dev/sub"), ("version", 1),
                                   ("fields", [field])])]),
                               ("q", vmdesc.JsonObject([("k", 1), ("k", 2)]))])
    out = vmdesc.dump(vmdesc.without_array_index(entry), vmdesc.JSONWRITER).decode()
    assert out.count('"index"') == 1 and '"index": 7' in out
    assert out.count('"k": ') == 2
    assert out == vmdesc.dump(entry, vmdesc.JSONWRITER).decode().replace(
        '"index": 0, ', "").replace('"index": 3, ', "")
    assert re.search(r'"name": "s", "type": "struct"', out)
