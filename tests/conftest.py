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
