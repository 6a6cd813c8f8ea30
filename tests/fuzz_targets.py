"""Fuzz targets: one function per entry point, and the checks around each run.

A target takes the input bytes, runs one public entry point of qmigstream on
them and asserts what must hold for *any* input:

* only the project's typed errors escape (:class:`QmigstreamError`);
* whatever decodes re-encodes to the input bytes;
* the run ends within a wall-clock budget (no hang);
* no allocation is driven by a length field beyond what the input holds
  (``tracemalloc`` peak below ``64 MiB + 8 x input size``);
* deep nesting (PACKAGED commands, vmstate structs/subsections) is refused
  with a typed error, never a ``RecursionError``.

:func:`run_one` applies the budget and the memory check and returns a
:class:`Failure` (or None); ``tests/test_fuzz.py`` and ``tools/fuzz/run`` both
use it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import tempfile
import traceback
import tracemalloc

from qmigstream.errors import QmigstreamError

MEM_BASE = 64 << 20
MEM_FACTOR = 8
#: Cap on the vmstate bytes the qcow2 target pulls out of one snapshot.
QCOW2_VMSTATE_CAP = 4 << 20


class Hang(BaseException):
    """The wall-clock budget of one run ran out (BaseException: nothing swallows it)."""


class Failure:
    def __init__(self, kind, target, data, detail, exc=None):
        self.kind, self.target, self.data, self.detail, self.exc = kind, target, data, detail, exc

    def signature(self):
        """Where it happened: exception type and innermost qmigstream frame."""
        if self.exc is None:
            return f"{self.kind}:{self.target}"
        tb = traceback.extract_tb(self.exc.__traceback__)
        frames = [f for f in tb if "/qmigstream/" in f.filename] or tb
        f = frames[-1] if frames else None
        where = f"{os.path.basename(f.filename)}:{f.lineno}" if f else "?"
        return f"{self.kind}:{self.target}:{type(self.exc).__name__}:{where}"

    def __repr__(self):
        return f"Failure({self.signature()}, {len(self.data)} bytes: {self.detail})"


class _Pipe(io.RawIOBase):
    """A non-seekable reader over bytes, like a pipe (the spool path)."""

    def __init__(self, data):
        self._b = io.BytesIO(data)

    def readable(self):
        return True

    def seekable(self):
        return False

    def readinto(self, b):
        chunk = self._b.read(min(len(b), 4096))
        b[:len(chunk)] = chunk
        return len(chunk)


# -- targets --------------------------------------------------------------------

def t_decode(data: bytes):
    """read_records (bytes, file, pipe; fast and schema paths) + re-encode."""
    from qmigstream.codec.reader import read_records
    from qmigstream.codec.writer import encode_records
    mode = len(data) % 6
    if mode == 0:
        src, opts = data, {}
    elif mode == 1:
        src, opts = io.BytesIO(data), {"fast": False, "compact": False}
    elif mode == 2:
        src, opts = io.BufferedReader(_Pipe(data)), {}
    elif mode == 3:
        src, opts = data, {"vmstate": False}
    elif mode == 4:
        src, opts = io.BufferedReader(_Pipe(data)), {"no_lookahead": True, "fast": False}
    else:
        src, opts = data, {"mapped_ram": True}
    if mode in (0, 3):
        _page_runs_agree(data, opts)
    recs = list(read_records(src, **opts))
    out = encode_records(recs)
    assert out == data, f"re-encode differs at {_first_diff(out, data)} " \
                        f"({len(out)} vs {len(data)} bytes)"
    for r in recs:
        r.fields()


def _page_runs_agree(data, opts):
    """page_runs=True gives the same records once runs are expanded, or the same error."""
    from qmigstream.codec.ram_records import RamPageRun
    from qmigstream.codec.reader import read_records
    from qmigstream.errors import QmigstreamError

    def decode(**extra):
        out = []
        try:
            for r in read_records(data, **opts, **extra):
                out.extend(r.expand() if isinstance(r, RamPageRun) else (r,))
        except QmigstreamError as e:
            out.append((type(e).__name__, e.offset))
        return [x if isinstance(x, tuple) else (type(x).__name__, x.offset, x.encode())
                for x in out]
    assert decode(page_runs=True) == decode(), "page runs differ from page records"


def t_vmstate(data: bytes):
    """vmdesc.parse of a trailer + vmstate.decode of a payload through its first entry.

    Input: ``be32 n``, ``n`` bytes of VMDESCRIPTION JSON, the payload."""
    from qmigstream import vmdesc, vmstate
    from qmigstream.vmstate.decode import payload_size
    if len(data) < 4:
        return
    n = struct.unpack(">I", data[:4])[0]
    js, payload = data[4:4 + n], data[4 + n:]
    desc = vmdesc.parse(js)
    for entry in desc.obj.get("devices", [])[:2]:
        try:
            tree = vmstate.decode(entry, payload, 1000)
        except QmigstreamError:
            continue
        assert vmstate.encode(tree) == bytes(payload), "vmstate re-encode differs"
        assert payload_size(entry) == len(payload)
        json.dumps(vmstate.to_json(tree))
        from qmigstream.analyze import vmsd_dict
        from qmigstream.diff import flatten
        vmsd_dict(tree)
        flatten(tree, "x")


def t_vfio(data: bytes):
    from qmigstream.vfio.scan import scan
    devices, hints = scan(data)
    for dev in devices.values():
        json.dumps(dev.to_json(), default=str)
        dev.data_bytes
        for _ in dev.data_pieces():
            pass


def t_check(data: bytes):
    from qmigstream import check as C
    fn = getattr(C, "check", None) or getattr(C, "check_stream", None)
    if fn is None:
        return
    res = fn(data)
    if hasattr(res, "to_json"):
        json.dumps(res.to_json(), default=str)


def have_check() -> bool:
    try:
        from qmigstream import check as C
    except ImportError:
        return False
    return callable(getattr(C, "check", None) or getattr(C, "check_stream", None))


def _replay_outcome(res):
    j = res.to_json()
    err = j.get("error") or {}
    return (j.get("ok"), err.get("reason"), err.get("offset"),
            json.dumps(j.get("ram"), sort_keys=True),
            json.dumps(j.get("devices"), sort_keys=True, default=str))


def t_replay(data: bytes):
    """replay of the bytes, of a file holding them mapped and read in windows:
    the same outcome (ok, error and its offset, RAM and device digests)."""
    import tempfile
    from qmigstream.pipeline.replay import replay
    res = replay(data)
    json.dumps(res.to_json(), default=str)
    want = _replay_outcome(res)
    fd, path = tempfile.mkstemp(suffix=".mig")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        for kw in ({}, {"map_file": False}):
            got = _replay_outcome(replay(path, **kw))
            assert got == want, f"replay {kw or 'mapped'} differs from replay of the bytes"
    finally:
        os.unlink(path)


def t_analyze(data: bytes):
    from qmigstream.analyze import analyze_desc, analyze_state, dumps
    if len(data) % 2:
        dumps(analyze_state(data))
    else:
        try:
            dumps(analyze_desc(data))
        finally:
            dumps(analyze_state(data, dump_memory=True))


def t_ram(data: bytes):
    from qmigstream import guestmem
    d = tempfile.mkdtemp(prefix="qmigstream-fuzz-")
    try:
        guestmem.extract(data, d, physical=(None, "pc", "q35")[len(data) % 3],
                         hash=bool(len(data) % 2))
    finally:
        shutil.rmtree(d, ignore_errors=True)


_DIFF_OTHER = None


def t_diff(data: bytes):
    """diff against itself (no differences when it decodes) and against a real capture."""
    from qmigstream.diff import diff
    global _DIFF_OTHER
    if _DIFF_OTHER is None:
        import strategies
        seeds = strategies.fixture_seeds()
        _DIFF_OTHER = seeds[sorted(seeds)[0]]
    d = tempfile.mkdtemp(prefix="qmigstream-fuzz-")
    try:
        res = diff(io.BytesIO(data), io.BytesIO(data), workdir=d, ignore_ram=len(data) % 2 == 1)
        assert not res.differences, f"a stream differs from itself: {res.differences[:3]}"
        diff(io.BytesIO(data), io.BytesIO(_DIFF_OTHER), workdir=d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


_MULTIFD_STREAM = None
_VFIO_10X = None


class _TenX:
    """A draw source that makes strategies.vfio_stream write one 10.x device."""

    def int(self, lo, hi):
        return lo

    def bool(self):
        return False

    def bytes(self, lo, hi):
        return b"\x5a" * max(lo, 1)

    def choice(self, seq):
        return "10.x" if "10.x" in seq else seq[0]


def t_multifd(data: bytes):
    """A recorded multifd channel: parse_channel (+ reassemble) and ram extract with it."""
    from qmigstream import guestmem
    from qmigstream.vfio.multifd import parse_channel, reassemble
    global _MULTIFD_STREAM
    init = len(data) % 2 == 0
    try:
        recs = parse_channel(data, init=init)
        reassemble([("ch0", recs)])
        # the VFIO view of a 10.x stream with this channel beside it
        from qmigstream.vfio.scan import scan
        global _VFIO_10X
        if _VFIO_10X is None:
            import strategies
            _VFIO_10X = strategies.vfio_stream(_TenX())
        devices, _ = scan(_VFIO_10X, multifd=[("ch0", recs)])
        for dev in devices.values():
            json.dumps(dev.to_json(), default=str)
    except QmigstreamError:
        pass
    if _MULTIFD_STREAM is None:
        import strategies
        _MULTIFD_STREAM = strategies.fixture_seeds()["pc-7.2-multifd.0"]
    d = tempfile.mkdtemp(prefix="qmigstream-fuzz-")
    try:
        ch = os.path.join(d, "ch0")
        with open(ch, "wb") as f:
            f.write(data)
        guestmem.extract(_MULTIFD_STREAM, os.path.join(d, "out"), channels=[ch], hash=False)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def t_qcow2(data: bytes):
    from qmigstream.codec.reader import read_records
    from qmigstream.qcow2 import Qcow2Image
    img = Qcow2Image(io.BytesIO(data))
    for snap in img.snapshots[:4]:
        snap.to_json()
        got = []
        n = 0
        for piece in img.iter_vmstate(snap):
            got.append(piece)
            n += len(piece)
            if n >= QCOW2_VMSTATE_CAP:
                break
        vm = b"".join(got)
        for _ in read_records(vm):
            pass


def t_cli(data: bytes, every: bool = False):
    """The command line on the input as a file: text and JSON output into a strict UTF-8
    stdout; the exit code must be 0, 1 or 2 and nothing may escape.  A quarter of
    the commands per input (by its length), or ``every`` one."""
    import contextlib
    from qmigstream.cli import main
    d = tempfile.mkdtemp(prefix="qmigstream-fuzz-")
    path = os.path.join(d, "in.mig")
    with open(path, "wb") as f:
        f.write(data)
    cmds = [["decode", path], ["decode", "--json", path], ["info", path],
            ["diff", path, path, "--ignore-ram"], ["check", path], ["vfio", path],
            ["roundtrip", path], ["analyze", "-f", path], ["replay", path],
            ["report", path, "-o", os.path.join(d, "r.html")], ["info", "--json", path],
            ["ram", "extract", path, "-o", os.path.join(d, "ram")]]
    try:
        for argv in (cmds if every else cmds[len(data) % 4::4]):
            out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
            err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(argv)
                out.flush()
                err.flush()
            assert rc in (0, 1, 2), f"exit code {rc} for {argv[0]}"
    finally:
        shutil.rmtree(d, ignore_errors=True)


TARGETS = {
    "decode": t_decode,
    "vmstate": t_vmstate,
    "vfio": t_vfio,
    "check": t_check,
    "replay": t_replay,
    "analyze": t_analyze,
    "ram": t_ram,
    "diff": t_diff,
    "qcow2": t_qcow2,
    "multifd": t_multifd,
    "cli": t_cli,
    "cli-all": lambda data: t_cli(data, every=True),
}


def warm_up():
    """Import what the targets import and load the seeds they use, so that the first
    run's time budget is not spent on imports."""
    import strategies  # noqa: F401
    from qmigstream import analyze, diff, guestmem, qcow2, vmdesc, vmstate  # noqa: F401
    from qmigstream.codec import reader, writer  # noqa: F401
    from qmigstream.pipeline import replay  # noqa: F401
    from qmigstream.vfio import multifd, scan  # noqa: F401
    have_check()
    strategies.fixture_seeds()


# -- one run with its checks ---------------------------------------------------------

def _alarm(signum, frame):
    raise Hang()


def run_one(name: str, data: bytes, *, budget: float = 10.0, trace_memory: bool = True):
    """Run target ``name`` on ``data``; a :class:`Failure` or None."""
    fn = TARGETS[name]
    old = signal.signal(signal.SIGALRM, _alarm)
    if trace_memory:
        tracemalloc.start()
        tracemalloc.reset_peak()
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        fn(data)
    except Hang as e:
        return Failure("hang", name, data, f"more than {budget} s", e)
    except QmigstreamError:
        pass
    except RecursionError as e:
        return Failure("recursion", name, data, "RecursionError", e)
    except AssertionError as e:
        return Failure("property", name, data, str(e), e)
    except MemoryError as e:
        return Failure("memory", name, data, "MemoryError", e)
    except Exception as e:          # noqa: BLE001  anything else is a bug
        return Failure("exception", name, data, f"{type(e).__name__}: {e}", e)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = None
        if trace_memory:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    if peak is not None and peak > MEM_BASE + MEM_FACTOR * len(data):
        return Failure("memory", name, data, f"tracemalloc peak {peak} bytes for "
                       f"{len(data)} bytes of input")
    return None


def vmstate_input(json_bytes: bytes, payload: bytes) -> bytes:
    """The input format of :func:`t_vmstate`."""
    return struct.pack(">I", len(json_bytes)) + json_bytes + payload


def _first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))
