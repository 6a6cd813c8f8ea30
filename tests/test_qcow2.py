"""qmigstream.qcow2: a savevm snapshot's vmstate cut out of a qcow2 image.

On the committed real image (fixtures/captures/pc-7.2-savevm.qcow2.xz, made by
HMP ``savevm``) and on small images built here byte by byte to reach every
kind of cluster and every bounds check.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import lzma
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from conftest import CAPTURES, requires_qemu
from qmigstream.cli import main as cli_main
from qmigstream.codec.reader import read_records
from qmigstream.errors import BadMagic, LimitExceeded, StreamError, Truncated, UnsupportedVersion
from qmigstream.qcow2 import HOLE_PIECE, Qcow2Image

META = json.loads((CAPTURES / "pc-7.2-savevm.json").read_text())


@pytest.fixture(scope="module")
def real_image(tmp_path_factory):
    p = tmp_path_factory.mktemp("qcow2") / "disk.qcow2"
    with lzma.open(CAPTURES / "pc-7.2-savevm.qcow2.xz") as src, open(p, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return p


def test_real_image_header_and_snapshot(real_image):
    assert hashlib.sha256(real_image.read_bytes()).hexdigest() == META["qcow2"]["image_sha256"]
    with Qcow2Image(str(real_image)) as img:
        assert (img.version, img.cluster_size, img.size) == (3, 65536, 1 << 20)
        assert len(img.snapshots) == 1
        s = img.snapshot("snap1")
        assert (s.id_str, s.name) == ("1", "snap1")
        assert img.snapshot("1") is s and img.snapshot() is s
        assert s.vm_state_size == META["qcow2"]["vm_state_size"] == META["stream"]["size"]
        assert s.disk_size == 1 << 20
        # 1 MiB disk, 64 KiB clusters: one L1 entry covers 512 MiB, the vmstate starts there
        assert img.vmstate_offset(s) == 0x20000000 == META["qcow2"]["vmstate_offset"]


def test_real_image_vmstate_is_the_stream(real_image, capture):
    path, meta = capture("pc-7.2-savevm")
    with Qcow2Image(str(real_image)) as img:
        data = img.read_vmstate(img.snapshot("snap1"))
    assert data == path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == meta["stream"]["sha256"]
    assert data[:8] == b"QEVM\x00\x00\x00\x03"
    assert sum(r.size for r in read_records(data)) == len(data)


def test_cli_savevm(real_image, tmp_path, capsys, capture):
    out = tmp_path / "vm.mig"
    assert cli_main(["savevm", str(real_image), "--snapshot", "snap1", "-o", str(out)]) == 0
    assert out.read_bytes() == capture("pc-7.2-savevm")[0].read_bytes()
    assert cli_main(["savevm", str(real_image), "--list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["snapshots"][0]["name"] == "snap1"
    assert listing["snapshots"][0]["vm_state_size"] == META["stream"]["size"]
    assert listing["snapshots"][0]["vmstate_offset"] == 0x20000000
    assert cli_main(["savevm", str(real_image), "--snapshot", "nope", "-o", str(out)]) == 2
    assert "no snapshot named 'nope'" in capsys.readouterr().err


@pytest.mark.qemu
@requires_qemu
def test_real_image_against_qemu_io(real_image, tmp_path, capture):
    """Revert a copy to the snapshot with qemu-img and read the vmstate area back
    through qemu-io's ``read -b -v``: the same bytes as the cut."""
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("capture_tool", ROOT / "tools" / "capture.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(real_image, copy)
    subprocess.run(["qemu-img", "snapshot", "-a", "snap1", str(copy)], check=True)
    want = capture("pc-7.2-savevm")[0].read_bytes()
    got = tool.qemu_io_read_vmstate(str(copy), len(want), chunk=1 << 20)
    assert got == want


# -- built images ---------------------------------------------------------------------
CB = 9                      # 512-byte clusters: L2 holds 64 entries, one L1 entry maps 32 KiB
CS = 1 << CB


def build_image(*, virtual_size=20000, vm_tail=100, version=3, incompat=0, magic=b"QFI\xfb",
                cluster_bits=CB, nb_snapshots=1, snap_table=CS, l1_offset=2 * CS,
                compression_type=None):
    """A qcow2 image with one snapshot whose vmstate spans 4 clusters:
    allocated data, unallocated, zero-flagged, zlib-compressed; the last one
    partly used (``vm_tail`` bytes short)."""
    data = bytes(range(256)) * 2                                   # cluster 0: allocated
    comp_plain = b"qmigstream-compressed " * 23 + b"!" * (CS - 22 * 23)
    comp_plain = comp_plain[:CS]
    co = zlib.compressobj(6, zlib.DEFLATED, -12)
    comp = co.compress(comp_plain) + co.flush()
    assert len(comp) < CS
    vm_size = 4 * CS - vm_tail
    img = bytearray(6 * CS)
    hdr_len = 104 if compression_type is None else 112
    struct.pack_into(">4sIQIIQIIQQIIQ", img, 0, magic, version, 0, 0, cluster_bits,
                     virtual_size, 0, 1, 5 * CS, 0, 0, nb_snapshots, snap_table)
    if version == 3:
        struct.pack_into(">QQQII", img, 72, incompat, 0, 0, 4, hdr_len)
        if compression_type is not None:
            img[104] = compression_type
    # snapshot table (cluster 1): entry with 16 bytes of extra data
    name, sid = b"snapA", b"7"
    struct.pack_into(">QIHHIIQII", img, CS, l1_offset, 2, len(sid), len(name), 1, 2, 3,
                     0xDEAD, 16)
    struct.pack_into(">QQ", img, CS + 40, vm_size, virtual_size)
    img[CS + 56:CS + 56 + len(sid) + len(name)] = sid + name
    # snapshot L1 (cluster 2): entry 0 (the disk) empty, entry 1 -> L2 at cluster 3
    struct.pack_into(">QQ", img, 2 * CS, 0, (1 << 63) | 3 * CS)
    # L2 (cluster 3): vmstate clusters 0..3
    x = 62 - (CB - 8)
    l2 = [(1 << 63) | 4 * CS,            # allocated at cluster 4
          0,                             # unallocated
          1,                             # zero flag
          (1 << 62) | (5 * CS)]          # compressed at cluster 5, 0 extra sectors
    assert (5 * CS) < (1 << x)
    struct.pack_into(">4Q", img, 3 * CS, *l2)
    img[4 * CS:5 * CS] = data
    img[5 * CS:5 * CS + len(comp)] = comp
    want = data + bytes(CS) + bytes(CS) + comp_plain
    return bytes(img), want[:vm_size]


def open_built(tmp_path, raw):
    p = tmp_path / "t.qcow2"
    p.write_bytes(raw)
    return Qcow2Image(str(p))


def test_built_image_all_cluster_kinds(tmp_path):
    raw, want = build_image()
    with open_built(tmp_path, raw) as img:
        s = img.snapshot("snapA")
        assert (s.id_str, s.date_sec, s.date_nsec, s.vm_clock_nsec) == ("7", 1, 2, 3)
        assert s.vm_state_size == len(want) == 4 * CS - 100      # the 64-bit field wins
        assert img.vmstate_offset(s) == 32768                   # 20000 rounded up to 32 KiB
        assert img.read_vmstate(s) == want
        # the unallocated and the zero cluster are one hole
        assert [(d is None, n) for d, n in img.vmstate_extents(s)] == [
            (False, CS), (True, 2 * CS), (False, CS - 100)]
        pieces = list(img.iter_vmstate(s))
        assert [len(p) for p in pieces] == [CS, 2 * CS, CS - 100]
        assert b"".join(pieces) == want
        # written where holes cannot stay holes: as zeros
        buf = io.BytesIO()
        assert img.copy_vmstate(s, buf) == len(want) and buf.getvalue() == want


def test_built_image_v2(tmp_path):
    raw, want = build_image(version=2)
    # v2: no extra-data requirement; the entry still has 16 bytes of it
    with open_built(tmp_path, raw) as img:
        assert img.read_vmstate(img.snapshot()) == want


@pytest.mark.parametrize("mutate, exc, offset, text", [
    (dict(magic=b"QFI\xfa"), BadMagic, 0, "not a qcow2 image"),
    (dict(version=4), UnsupportedVersion, 4, "unsupported qcow2 version"),
    (dict(cluster_bits=22), LimitExceeded, 20, "cluster_bits out of range"),
    (dict(incompat=1 << 5), UnsupportedVersion, 72, "unknown qcow2 incompatible features"),
    (dict(incompat=4), UnsupportedVersion, 72, "external data file"),
    (dict(nb_snapshots=70000), LimitExceeded, 60, "too many snapshots"),
    (dict(snap_table=100), StreamError, 64, "snapshot table not cluster aligned"),
    (dict(snap_table=64 * CS), Truncated, 64 * CS, "snapshot table entry 0 lies outside"),
    (dict(nb_snapshots=2), StreamError, CS + 64 + 36, "without the disk size extra data"),
])
def test_built_image_header_errors(tmp_path, mutate, exc, offset, text):
    raw, _ = build_image(**mutate)
    with pytest.raises(exc) as ei:
        open_built(tmp_path, raw)
    assert ei.value.offset == offset
    assert text in str(ei.value)


def test_bad_l1_and_l2_offsets(tmp_path):
    raw, _ = build_image(l1_offset=100 * CS)
    with open_built(tmp_path, raw) as img:
        with pytest.raises(Truncated) as ei:
            img.read_vmstate(img.snapshot())
        assert ei.value.offset == 100 * CS and "snapshot L1 table" in str(ei.value)
    raw, _ = build_image()
    bad = bytearray(raw)
    struct.pack_into(">Q", bad, 2 * CS + 8, 50 * CS)                 # L2 beyond the file
    with open_built(tmp_path, bytes(bad)) as img:
        with pytest.raises(Truncated) as ei:
            img.read_vmstate(img.snapshot())
        assert ei.value.offset == 50 * CS and "L2 table" in str(ei.value)
    bad = bytearray(raw)
    struct.pack_into(">Q", bad, 3 * CS, 40 * CS)                     # data beyond the file
    with open_built(tmp_path, bytes(bad)) as img:
        with pytest.raises(Truncated) as ei:
            img.read_vmstate(img.snapshot())
        assert ei.value.offset == 40 * CS and "data cluster" in str(ei.value)
    bad = bytearray(raw)
    struct.pack_into(">I", bad, CS + 8, 1)                           # L1 too short for vmstate
    with open_built(tmp_path, bytes(bad)) as img:
        with pytest.raises(StreamError, match="beyond the snapshot's L1 table"):
            img.read_vmstate(img.snapshot())
    bad = bytearray(raw)
    bad[5 * CS:5 * CS + 16] = b"\xff" * 16                           # damaged deflate data
    with open_built(tmp_path, bytes(bad)) as img:
        with pytest.raises(StreamError, match="compressed cluster"):
            img.read_vmstate(img.snapshot())


def hostile_image():
    """A 512 KiB image whose snapshot declares ~4 TiB of vmstate: 64 KiB clusters
    (one L1 entry maps 512 MiB), 8192 L1 entries; the first and the last
    vmstate cluster hold data, the 8189 L1 entries between share one L2 table
    of unallocated entries."""
    cb, cs = 16, 1 << 16
    span = cs << (cb - 3)
    size = (8192 * span) - span                    # from L1 entry 1 to the end of entry 8191
    img = bytearray(8 * cs)
    struct.pack_into(">4sIQIIQIIQQIIQ", img, 0, b"QFI\xfb", 3, 0, 0, cb, 1 << 20, 0, 1,
                     2 * cs, 0, 0, 1, cs)
    struct.pack_into(">QQQII", img, 72, 0, 0, 0, 4, 104)
    struct.pack_into(">QIHHIIQII", img, cs, 2 * cs, 8192, 1, 4, 0, 0, 0, 0, 16)
    struct.pack_into(">QQ", img, cs + 40, size, 1 << 20)
    img[cs + 56:cs + 61] = b"1huge"
    l1 = [0] + [(1 << 63) | 5 * cs] * 8191
    l1[1], l1[8191] = (1 << 63) | 3 * cs, (1 << 63) | 6 * cs
    struct.pack_into(">8192Q", img, 2 * cs, *l1)
    struct.pack_into(">Q", img, 3 * cs, (1 << 63) | 4 * cs)        # first vmstate cluster
    struct.pack_into(">Q", img, 6 * cs + 8 * 8191, (1 << 63) | 7 * cs)   # the last one
    head, tail = (b"QEVM" + bytes(range(1, 256)) * 258)[:cs], b"tail" * (cs // 4)
    img[4 * cs:5 * cs] = head
    img[7 * cs:8 * cs] = tail
    return bytes(img), size, head, tail


def test_huge_declared_vmstate_is_holes_not_work(tmp_path, monkeypatch):
    raw, size, head, tail = hostile_image()
    cs = len(head)
    assert size > 4_000_000_000_000 and len(raw) == 8 * cs
    with open_built(tmp_path, raw) as img:
        snap = img.snapshot("huge")
        assert snap.vm_state_size == size
        reads = []
        real_read = img._read
        monkeypatch.setattr(img, "_read", lambda off, n, what: (reads.append(what),
                                                               real_read(off, n, what))[1])
        ext = list(img.vmstate_extents(snap))
        assert [(d is None, n) for d, n in ext] == [(False, cs), (True, size - 2 * cs),
                                                    (False, cs)]
        assert ext[0][0] == head and ext[2][0] == tail
        # the L1 table, three L2 tables (the shared one once), two data clusters
        assert sorted(reads) == sorted(["snapshot L1 table"] + ["L2 table"] * 3 +
                                       ["data cluster"] * 2)
        monkeypatch.undo()
        # a regular file: the hole stays a hole, the file has the declared length
        out = tmp_path / "vm.mig"
        with open(out, "wb") as f:
            assert img.copy_vmstate(snap, f) == size
        st = os.stat(out)
        assert st.st_size == size and st.st_blocks * 512 < 1 << 20
        with open(out, "rb") as f:
            assert f.read(cs) == head
            f.seek(size - cs)
            assert f.read() == tail
            f.seek(size // 2)
            assert f.read(16) == bytes(16)
        out.unlink()
        # where it would have to be zeros: refused before the hole, not written
        buf = io.BytesIO()
        with pytest.raises(LimitExceeded, match="holes are too large"):
            img.copy_vmstate(snap, buf)
        assert buf.getvalue() == head
        with pytest.raises(LimitExceeded, match="mostly holes"):
            img.read_vmstate(snap)
        # lazily, pieces of the hole come from one shared buffer
        it = img.iter_vmstate(snap)
        assert next(it) == head
        first, second = next(it), next(it)
        assert len(first) == HOLE_PIECE and first is second and not any(first)


def test_cli_savevm_huge_declared_vmstate(tmp_path, capsys):
    raw, size, head, tail = hostile_image()
    p = tmp_path / "huge.qcow2"
    p.write_bytes(raw)
    out = tmp_path / "vm.mig"
    assert cli_main(["savevm", str(p), "-o", str(out)]) == 0
    assert f"huge: {size} bytes of vmstate" in capsys.readouterr().err
    assert os.path.getsize(out) == size and os.stat(out).st_blocks * 512 < 1 << 20
    out.unlink()
    # to a pipe the hole would be terabytes of zeros: an input error, exit 2
    r = subprocess.run([sys.executable, "-m", "qmigstream", "savevm", str(p)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 2 and r.stdout == head
    assert b"holes are too large" in r.stderr


def test_zstd_and_unknown_snapshot(tmp_path):
    raw, _ = build_image(incompat=8, compression_type=1)
    with open_built(tmp_path, raw) as img:
        with pytest.raises(UnsupportedVersion, match="zlib"):
            img.read_vmstate(img.snapshot())
        with pytest.raises(StreamError, match="no snapshot named 'x'"):
            img.snapshot("x")


def test_truncated_and_empty(tmp_path):
    raw, _ = build_image()
    with pytest.raises(Truncated) as ei:
        open_built(tmp_path, raw[:50])
    assert ei.value.offset == 0
    with pytest.raises(Truncated):
        open_built(tmp_path, b"QF")
    raw0, _ = build_image(nb_snapshots=0)
    with open_built(tmp_path, raw0) as img:
        assert img.snapshots == []
        with pytest.raises(StreamError, match="no snapshots"):
            img.snapshot()


@pytest.mark.qemu
@requires_qemu
@pytest.mark.parametrize("options, vm_offset", [
    ("", 0x20000000),                                    # 64 KiB clusters, v3
    ("compat=0.10", 0x20000000),                         # qcow2 v2
    ("cluster_size=512", 0x200000),                      # one L2 table maps 32 KiB
    ("cluster_size=4096", 0x200000),                     # 2 MiB disk = one L1 entry
    ("extended_l2=on,cluster_size=16384", 0x1000000),    # 16-byte L2 entries, subclusters
])
def test_two_snapshots_each_against_qemu_io(tmp_path, options, vm_offset):
    """A fresh image with two savevm snapshots (the guest runs between them, so the
    vmstates differ): each cut equals what qemu-io reads back after reverting a
    copy to that snapshot, and each is a whole stream."""
    import importlib.util
    from conftest import ROOT
    from qmigstream.qemu import Qemu
    spec = importlib.util.spec_from_file_location("capture_tool", ROOT / "tools" / "capture.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    img = tmp_path / "two.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2"] +
                   (["-o", options] if options else []) + [str(img), "2M"], check=True)
    with Qemu(["-machine", "pc", "-m", "32", "-drive", f"file={img},format=qcow2,if=ide"]) as q:
        assert q.hmp("savevm first").strip() == ""
        q.execute("cont")
        q.hmp("savevm second")
        q.execute("stop")
    with Qcow2Image(str(img)) as im:
        assert [s.name for s in im.snapshots] == ["first", "second"]
        cuts = {s.name: im.read_vmstate(s) for s in im.snapshots}
        assert all(im.vmstate_offset(s) == vm_offset for s in im.snapshots)
        assert im.version == (2 if options == "compat=0.10" else 3)
        assert im.extended_l2 == ("extended_l2" in options)
    assert cuts["first"] != cuts["second"]
    for name, data in cuts.items():
        copy = tmp_path / f"{name}.qcow2"
        shutil.copyfile(img, copy)
        subprocess.run(["qemu-img", "snapshot", "-a", name, str(copy)], check=True)
        assert tool.qemu_io_read_vmstate(str(copy), len(data), chunk=1 << 20) == data
        assert sum(r.size for r in read_records(data)) == len(data)
