"""Against the real QEMU: fresh captures through qmigstream.qemu, and QEMU's own
loader as the judge of what qmigstream reads and writes."""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import subprocess

import pytest

from conftest import requires_qemu
from test_captures import capture_tool, meta_of, xz_bytes
from qmigstream.codec.reader import read_records
from qmigstream.codec.writer import StreamWriter
from qmigstream.qemu import (QMPError, Qemu, load_incoming, load_incoming_channels,
                             migrate_to_file)
from qmigstream.qemu.runner import BASE_ARGS, UnixSink, trailer_complete


def live(fn):
    """Runs QEMU."""
    return pytest.mark.qemu(requires_qemu(fn))

PC = ["-machine", "pc", "-m", "32"]
LOW, HIGH = (0, 0xA0000), (0x100000, (32 << 20) - 0x100000)


def dumps(tmp_path, tag):
    return [(LOW[0], LOW[1], str(tmp_path / f"{tag}.low")),
            (HIGH[0], HIGH[1], str(tmp_path / f"{tag}.high"))]


def reencode(src, dst):
    with open(dst, "wb") as out:
        w = StreamWriter(out)
        for rec in read_records(str(src)):
            w.write(rec)
        w.close()


@live
def test_fresh_capture_roundtrips_and_loads(tmp_path, capture):
    mig = tmp_path / "fresh.mig"
    r = migrate_to_file(PC, str(mig), pmemsave=dumps(tmp_path, "src"))
    assert r.query_migrate["status"] == "completed"
    assert r.argv[1:9] == BASE_ARGS
    data = mig.read_bytes()
    assert (r.size, r.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    # byte round trip of the fresh capture
    out = io.BytesIO()
    w = StreamWriter(out)
    for rec in read_records(data):
        w.write(rec)
    assert out.getvalue() == data
    # the pinned clock makes it the same bytes as the committed capture
    committed = meta_of("pc-7.2-paused")
    if r.version == committed["qemu_version"]:
        assert r.sha256 == committed["stream"]["sha256"]
        assert [m["sha256"] for m in r.memory] == [m["sha256"] for m in committed["memory"]]
    # QEMU loads the re-encoded stream, and its memory is the source's
    again = tmp_path / "again.mig"
    reencode(mig, again)
    res = load_incoming(PC, str(again), 60, pmemsave=dumps(tmp_path, "dst"))
    assert res.loaded, res.stderr
    assert (res.status, res.returncode) == ("completed", None)
    assert [m["sha256"] for m in res.memory] == [m["sha256"] for m in r.memory]


@live
def test_loader_refuses_wrong_machine_and_truncation(tmp_path, capture):
    path, _ = capture("pc-7.2-paused")
    res = load_incoming(["-machine", "q35", "-m", "32"], str(path), 60)
    assert not res.loaded
    assert (res.status, res.returncode) == ("exited", 1)
    assert "Machine type received is 'pc-i440fx-7.2' and local is 'pc-q35-7.2'" in res.stderr
    cut = tmp_path / "cut.mig"
    cut.write_bytes(path.read_bytes()[:200000])
    res = load_incoming(PC, str(cut), 60)
    assert not res.loaded and res.returncode == 1
    assert "load of migration failed" in res.stderr


def _empty_qcow2(work):
    p = work / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M"], check=True)
    return p.read_bytes()


def machine_args_from(meta, work, name):
    """The capture's own machine arguments, with its scratch files recreated in ``work``."""
    argv = list(meta["qemu_argv"][1 + len(BASE_ARGS):])
    i = argv.index("-qmp")
    del argv[i:i + 2]
    scratch = f"/tmp/qmigstream-capture/{name}/"
    files = {"loader.bin": lambda: capture_tool.loader_pattern(meta["loader"]["seed"],
                                                                meta["loader"]["pages"]),
             "text.bin": lambda: capture_tool.compressible_pattern(meta["loader"]["pages"]),
             "mbr.img": lambda: capture_tool.mbr_dirty_loop(meta["guest_program"]["pages"]),
             "disk.raw": lambda: bytes(1 << 20),
             "d2.raw": lambda: bytes(1 << 20), "d3.raw": lambda: bytes(1 << 20),
             "disk.qcow2": lambda: _empty_qcow2(work)}
    out = []
    for a in argv:
        for fname in re.findall(re.escape(scratch) + r"([\w.]+)", a):
            (work / fname).write_bytes(files[fname]())
        out.append(a.replace(scratch, f"{work}/"))
    return out


LOADABLE = {
    "pc-7.2-paused": {}, "q35-7.2-paused": {}, "pc-i440fx-2.2-paused": {},
    "pc-7.2-noconfig": {}, "pc-7.2-loader": {}, "pc-7.2-devices": {},
    "pc-7.2-running-xbzrle": {"xbzrle": True},
    "pc-7.2-compress": {"compress": True},
    "pc-7.2-postcopy-advised": {"postcopy-ram": True},
    "pc-i440fx-2.2-devices": {}, "pc-i440fx-2.2-devices-vmdesc": {},
    "pc-7.2-block": {}, "pc-7.2-dirty-bitmaps": {"dirty-bitmaps": True},
    "pc-7.2-savevm": {}, "q35-7.2-devices": {},
    "pc-7.2-postcopy": {"postcopy-ram": True},
    "pc-7.2-ignore-shared-uuid": {"x-ignore-shared": True, "validate-uuid": True},
}


@live
@pytest.mark.parametrize("name", sorted(LOADABLE))
def test_committed_capture_loads_into_qemu(name, tmp_path, capture):
    """QEMU 7.2 loads each committed capture (re-encoded by qmigstream) and then holds
    exactly the memory the source had."""
    path, meta = capture(name)
    args = machine_args_from(meta, tmp_path, name)
    again = tmp_path / "again.mig"
    reencode(path, again)
    assert again.read_bytes() == path.read_bytes()
    dumps_ = [(m["addr"], m["size"], str(tmp_path / f"mem-{m['addr']:x}"))
              for m in meta["memory"]]
    res = load_incoming(args, str(again), 90, capabilities=LOADABLE[name], pmemsave=dumps_)
    assert res.loaded, res.stderr
    assert [m["sha256"] for m in res.memory] == [m["sha256"] for m in meta["memory"]]
    if name == "pc-7.2-block":
        # block migration wrote the source's disk into the (zeroed) destination disk
        assert (tmp_path / "disk.raw").read_bytes() == capture_tool.disk_pattern()


@live
def test_multifd_capture_loads_with_its_channels(tmp_path, capture):
    """The recorded main stream and both channel recordings, replayed into a QEMU
    waiting on a unix socket with multifd on, load and give the source's memory."""
    path, meta = capture("pc-7.2-multifd")
    args = machine_args_from(meta, tmp_path, "pc-7.2-multifd")
    chans = []
    for i, c in enumerate(meta["channels"]):
        p = tmp_path / f"ch{i}"
        p.write_bytes(xz_bytes(c["file"]))
        chans.append(str(p))
    dumps_ = [(m["addr"], m["size"], str(tmp_path / f"mem-{m['addr']:x}"))
              for m in meta["memory"]]
    res = load_incoming_channels(args, [str(path)] + chans, 90,
                                 capabilities={"multifd": True},
                                 parameters={"multifd-channels": len(chans)}, pmemsave=dumps_)
    assert res.loaded, res.stderr
    assert [m["sha256"] for m in res.memory] == [m["sha256"] for m in meta["memory"]]
    # without the channels the main stream alone cannot complete
    res = load_incoming_channels(args, [str(path)], 5, capabilities={"multifd": True},
                                 parameters={"multifd-channels": len(chans)})
    assert not res.loaded and res.status == "timeout"


@live
def test_qmp_errors_are_typed_and_qemu_is_reaped():
    with Qemu(PC) as q:
        pid = q.proc.pid
        assert q.execute("query-status")["status"] == "prelaunch"
        with pytest.raises(QMPError) as ei:
            q.execute("no-such-command")
        assert ei.value.error_class == "CommandNotFound"
        with pytest.raises(QMPError) as ei:
            q.set_parameters({"downtime-limit": -1})
        assert ei.value.error_class == "GenericError"
        scratch = q.dir
    assert q.returncode == 0                   # quit through QMP
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(scratch)


# -- the pieces that need no QEMU ------------------------------------------------------
def test_trailer_complete(capture):
    path, _ = capture("pc-7.2-paused")
    data = path.read_bytes()
    assert trailer_complete(data)
    assert not trailer_complete(data[:-1])
    assert not trailer_complete(data[:-100])
    bare, _ = capture("pc-i440fx-2.2-paused")
    assert not trailer_complete(bare.read_bytes())


def test_unix_sink_answers_shut_after_the_trailer(tmp_path, capture):
    """The return-path sink records what it gets and answers MIG_RP_MSG_SHUT(0)
    (be16 type 1, be16 length 4, be32 0) only once the whole trailer is there."""
    data = capture("pc-7.2-paused")[0].read_bytes()
    sock_path = str(tmp_path / "s.sock")
    with UnixSink(sock_path, return_path=True) as sink:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(sock_path)
        c.settimeout(0.5)
        c.sendall(data[:-10])
        with pytest.raises(socket.timeout):
            c.recv(16)
        assert not sink.shut_sent
        c.sendall(data[-10:])
        c.settimeout(10)
        assert c.recv(16) == bytes.fromhex("0001000400000000")
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(sock_path)
        second.sendall(b"\x11\x22\x33\x44rest")
        second.close()
        c.close()
        sink.wait_idle(10, connections=2)
        assert [bytes(s) for s in sink.streams] == [data, b"\x11\x22\x33\x44rest"]
    assert not os.path.exists(sock_path)


def test_qemu_io_dump_parser():
    dump = ("00000000:  51 45 56 4d 00 00 00 03 07 00 00 00 0d 70 63 2d  QEVM.........pc-\n"
            "00000010:  69 34 34 30                                      i440\n"
            "read 20/20 bytes at offset 0\n")
    assert capture_tool.parse_qemu_io_dump(dump, 0, 20) == \
        bytes.fromhex("5145564d00000003070000000d70632d69343430")
    with pytest.raises(Exception, match="qemu-io gave 20 bytes, not 32"):
        capture_tool.parse_qemu_io_dump(dump, 0, 32)
