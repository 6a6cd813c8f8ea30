"""Inputs the fuzzers found, each with the fix it needed (tests/fuzz_regressions/index.json).

Every file is a minimal input; ``target``/``targets`` the fuzz targets that failed on it
(tests/fuzz_targets.py), ``was`` what happened, ``fix`` where it was fixed.
``expect``: ``decodes`` (a valid stream that must decode and re-encode to the
same bytes), ``typed-error`` (bad input that must be refused with a
QmigstreamError) or ``handled`` (the target's own checks are the test).  Every input must also pass its target's checks.
"""

from __future__ import annotations

import io
import json
import lzma
import time
import pathlib

import pytest

import fuzz_targets as FT
from qmigstream.codec.reader import read_records
from qmigstream.codec.writer import encode_records
from qmigstream.errors import QmigstreamError

HERE = pathlib.Path(__file__).resolve().parent / "fuzz_regressions"
INDEX = json.loads((HERE / "index.json").read_text())


def test_every_file_is_listed():
    files = {p.name for p in HERE.iterdir() if p.name != "index.json"}
    assert files == set(INDEX)


@pytest.mark.parametrize("name", sorted(INDEX))
def test_regression(name):
    meta = INDEX[name]
    data = (HERE / name).read_bytes()
    if name.endswith(".xz"):        # large inputs that are mostly zeros
        data = lzma.decompress(data)
    targets = meta.get("targets") or [meta["target"]]
    for target in targets:
        f = FT.run_one(target, data)
        assert f is None, repr(f)
    if meta["expect"] == "decodes":
        assert encode_records(list(read_records(data))) == data
        assert encode_records(list(read_records(io.BytesIO(data), fast=False))) == data
    elif meta["expect"] == "typed-error":
        with pytest.raises(QmigstreamError):
            for target in targets:
                FT.TARGETS[target](data)
    elif meta["expect"] != "handled":
        raise AssertionError(f"unknown expectation {meta['expect']!r}")
    if "pipe_seconds" in meta:
        # read as a pipe (the window grows chunk by chunk): within the stated time
        t0 = time.monotonic()
        try:
            for _ in read_records(io.BufferedReader(FT._Pipe(data))):
                pass
        except QmigstreamError:
            pass
        assert time.monotonic() - t0 < meta["pipe_seconds"]
