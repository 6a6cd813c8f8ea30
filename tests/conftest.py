"""Shared test fixtures: the committed real captures, decompressed once per session."""

from __future__ import annotations

import json
import lzma
import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "fixtures" / "captures"


def capture_names():
    return sorted(p.name[:-len(".mig.xz")] for p in CAPTURES.glob("*.mig.xz"))


@pytest.fixture(scope="session")
def capture_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("captures")
    for name in capture_names():
        with lzma.open(CAPTURES / f"{name}.mig.xz") as src, open(d / f"{name}.mig", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return d


@pytest.fixture
def capture(capture_dir):
    """capture(name) -> (path, metadata dict or {})."""
    def get(name):
        meta_path = CAPTURES / f"{name}.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return capture_dir / f"{name}.mig", meta
    return get


def have_qemu() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


requires_qemu = pytest.mark.skipif(not have_qemu() and not os.environ.get("CI"),
                                   reason="qemu-system-x86_64 not installed")


def unpack_channels(meta, directory) -> list:
    """A capture's committed multifd channel recordings, decompressed into ``directory``
    (paths in channel order)."""
    out = []
    for ch in meta["channels"]:
        dst = pathlib.Path(directory) / ch["file"][:-len(".xz")]
        with lzma.open(CAPTURES / ch["file"]) as src, open(dst, "wb") as d:
            shutil.copyfileobj(src, d)
        out.append(str(dst))
    return out


# -- other QEMU releases (tools/debian-qemu chroots) ------------------------------------

#: where tools/debian-qemu keeps its chroots, and the Debian suite of each release
CHROOTS = pathlib.Path(os.environ.get("QMIGSTREAM_CHROOTS", "/var/cache/qmigstream/chroots"))
RELEASE_SUITES = {"5.2": "bullseye", "10.0": "trixie", "11.1": "sid"}


def release_names(release) -> list:
    """The committed captures of one QEMU release (``pc-11.1-paused``, ...)."""
    return sorted(p.name[:-len(".mig.xz")] for p in CAPTURES.glob(f"*-{release}-*.mig.xz"))


def unpack_release(directory, release) -> dict:
    """name -> path of each committed capture of ``release``, decompressed."""
    out = {}
    for name in release_names(release):
        p = pathlib.Path(directory) / f"{name}.mig"
        with lzma.open(CAPTURES / f"{name}.mig.xz") as src, open(p, "wb") as dst:
            shutil.copyfileobj(src, dst)
        out[name] = p
    return out


def chroot_missing(release):
    """Why the QEMU ``release`` chroot cannot be used (None when it can)."""
    wrapper = CHROOTS / f"bin-{release}" / "qemu-system-x86_64"
    if not (CHROOTS / RELEASE_SUITES[release] / "usr" / "bin" / "qemu-system-x86_64").exists() \
            or not os.access(wrapper, os.X_OK):
        return (f"no QEMU {release} chroot under {CHROOTS} (made once, as root, by "
                f"tools/debian-qemu {release})")
    return None


def load_tool(name):
    """A script of tools/ (no .py suffix needed) as a module."""
    import importlib.machinery
    import importlib.util
    modname = "tool_" + name.replace("-", "_").replace(".", "_")
    loader = importlib.machinery.SourceFileLoader(modname, str(ROOT / "tools" / name))
    spec = importlib.util.spec_from_loader(modname, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def differential_for(release, monkeypatch):
    """tools/differential pointed at QEMU ``release`` (skips when its chroot is absent);
    ``$QEMU`` goes back to what it was at teardown."""
    why = chroot_missing(release)
    if why:
        pytest.skip(why)
    d = load_tool("differential")
    monkeypatch.setenv("QEMU", os.environ.get("QEMU", ""))
    try:
        d.use_release(release)
    except Exception as e:          # noqa: BLE001 - the chroot could not be used
        pytest.skip(f"tools/debian-qemu {release}: {e}")
    return d


def fatal_message(rep):
    """The message of a check report's fatal problem, or None."""
    return rep.fatal.message if rep.fatal else None


def assert_loads_with_profile(path, profile_name):
    """``check`` with the release's profile finds the capture loads, alone and
    against itself as the reference."""
    from qmigstream.check import check
    for kw in ({}, {"reference": str(path)}):
        rep = check(str(path), profile_name=profile_name, **kw)
        assert rep.loads, fatal_message(rep)


def assert_cli_picks_profile(path, release, machine, capsys):
    """``qmigstream check`` on a stream of ``machine`` picks the ``release`` profile by
    itself and says so; with the 7.2 profile it refuses the stream at its machine
    type, which no QEMU 7.2 has (the configuration comes before the 10.0+ command)."""
    from qmigstream.check import profile_for_stream
    from qmigstream.cli import main
    assert profile_for_stream(str(path)) == (f"qemu-{release}", machine)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"profile qemu-{release} (the stream's machine type is {machine}" in out
    assert f"QEMU {release} would load this stream" in out
    assert main(["check", "--profile", "qemu-7.2", str(path)]) == 1
    assert f"Machine type received is '{machine}' and local is the destination's: no x86 " \
        f"machine type of QEMU 7.2 starts so" in capsys.readouterr().out
