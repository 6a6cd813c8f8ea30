"""``qmigstream vfio``: text and JSON output, --extract, --multifd; VFIO sections spliced
into a real QEMU 7.2 capture."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from qmigstream.cli import main
from qmigstream.cli.cmd_vfio import safe_name
from qmigstream.codec.reader import read_records
from qmigstream.codec.records import EndOfStream, SectionFooter, SectionHeader, VmDescription
from qmigstream.codec.sections.vfio import VfioConfig, VfioDataChunk, VfioMarker
from qmigstream.codec.writer import encode_records
from qmigstream.vfio import multifd as MF
from qmigstream.vfio.builder import plan
from qmigstream.wire.header import SectionType as T

from test_vfio_sections import DEV, DEV2, MIB, build_stream, state

CAPTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "captures")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output(tmp_path, capsys):
    b, _ = build_stream("8.1-9.x", [(DEV, 40, [b"a" * 100, None], [b"b" * 30, b"c" * 7],
                                     state(msix=4))], switchover_ack=True)
    path = tmp_path / "s.mig"
    path.write_bytes(b.encode())
    code, out, err = run_cli(capsys, "vfio", str(path), "--json")
    assert code == 0 and err == ""
    d = json.loads(out)
    dev, = d["devices"]
    assert dev["idstr"] == DEV and dev["family"] == "8.1-9.x" and dev["data_bytes"] == 137
    chunks = [(c["phase"], c["size"], c["offset"]) for c in dev["chunks"]]
    offs = [r.offset for r in b.records if isinstance(r, VfioDataChunk)]
    assert chunks == [("precopy", 100, offs[0]), ("complete", 30, offs[1]),
                      ("complete", 7, offs[2])]
    assert dev["config"]["vendor_id"] == "0x10de" and dev["config"]["device_id"] == "0x2236"
    assert dev["config"]["msix"]["table_size"] == 4
    cfg = next(r for r in b.records if isinstance(r, VfioConfig))
    assert dev["config"]["record_offset"] == cfg.offset and dev["config"]["phase"] == "config"
    assert [s["type"] for s in dev["sections"]] == ["START", "PART", "PART", "END", "FULL"]


def test_text_output(tmp_path, capsys):
    b, _ = build_stream("5.2", [(DEV, 40, [b"a" * 10], [b"b" * 3], state())])
    path = tmp_path / "s.mig"
    path.write_bytes(b.encode())
    code, out, _ = run_cli(capsys, "vfio", str(path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"device {DEV}  (section id 40)"
    assert lines[1] == "  family:     5.2"
    assert lines[3] == "  data:       13 bytes in 2 chunk(s)"
    assert "CONFIG 276B DATA 3@" in out and "vendor 0x10de device 0x2236" in out


def test_extract_names_stay_inside_dir(tmp_path, capsys):
    evil = "../../../../tmp/escape/vfio"
    b, _ = build_stream("6.0-7.2", [(DEV, 40, [b"1" * 5], [b"2" * 6], state()),
                                    (evil, 41, [b"3" * 7], [], state(express=True))])
    path = tmp_path / "s.mig"
    path.write_bytes(b.encode())
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, "vfio", str(path), "--extract", str(out_dir), "--json")
    assert code == 0
    files = sorted(os.listdir(out_dir))
    assert files == sorted([f"{safe_name(DEV)}.config", f"{safe_name(DEV)}.data",
                            f"{safe_name(evil)}.config", f"{safe_name(evil)}.data"])
    assert safe_name(evil) == "tmp_escape_vfio" and safe_name(DEV) == "0000_00_05.0_vfio"
    assert (out_dir / "0000_00_05.0_vfio.data").read_bytes() == b"1" * 5 + b"2" * 6
    cfg = next(r for r in b.records if isinstance(r, VfioConfig))
    assert (out_dir / "0000_00_05.0_vfio.config").read_bytes() == cfg.encode()
    assert len((out_dir / "tmp_escape_vfio.config").read_bytes()) == 8 + 4 + 4096 + 16 + 8
    assert not os.path.exists("/tmp/escape")
    for e in json.loads(out)["extracted"]:
        assert os.path.dirname(e["path"]) == os.path.realpath(out_dir)


def test_multifd_channels(tmp_path, capsys):
    b, plans = build_stream("10.x", [(DEV, 40, [], [b"m" * 10, b"n" * 20], state())],
                            switchover_start=True)
    path = tmp_path / "s.mig"
    path.write_bytes(b.encode())
    pk = plans[0][0].packets
    (tmp_path / "ch0").write_bytes(MF.build_channel([pk[1], pk[2]], 0))
    (tmp_path / "ch1").write_bytes(MF.build_channel([pk[0]], 1))
    code, out, _ = run_cli(capsys, "vfio", str(path), "--json", "--multifd",
                           str(tmp_path / "ch0"), str(tmp_path / "ch1"))
    assert code == 0
    dev, = json.loads(out)["devices"]
    assert dev["family"] == "10.x" and dev["data_bytes"] == 30
    assert dev["config"]["phase"] == "multifd" and dev["config"]["vendor_id"] == "0x10de"
    assert [(p["idx"], p["config"]) for p in dev["multifd"]["packets"]] == \
        [(0, False), (1, False), (2, True)]
    out_dir = tmp_path / "x"
    code, _, _ = run_cli(capsys, "vfio", str(path), "--extract", str(out_dir), "--multifd",
                         str(tmp_path / "ch0"), str(tmp_path / "ch1"))
    assert (out_dir / "0000_00_05.0_vfio.data").read_bytes() == b"m" * 10 + b"n" * 20


def test_bad_stream_exit_2(tmp_path, capsys):
    b, _ = build_stream("6.0-7.2", [(DEV, 40, [b"a" * 10], [], state())])
    data = bytearray(b.encode())
    chunk = next(r for r in b.records if isinstance(r, VfioDataChunk))
    data[chunk.offset + 7] = 0x09                      # DEV_DATA_STATE -> unknown 0x...09
    path = tmp_path / "bad.mig"
    path.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "vfio", str(path))
    assert code == 2 and out == ""
    assert err.strip() == (f"qmigstream vfio: error: at offset {chunk.offset} "
                           f"(0x{chunk.offset:x}) in section {DEV}: unknown VFIO marker "
                           "(expected '0xffffffffef100001..0xffffffffef100006', found "
                           "'0xffffffffef100009')")


# --- a real capture with VFIO sections spliced in -----------------------------------

def _qmp_capture(out_path, tmp_path):
    sock = str(tmp_path / "qmp.sock")
    proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc", "-m", "32", "-nodefaults",
                             "-display", "none", "-S", "-accel", "tcg",
                             "-rtc", "base=2020-01-01T00:00:00,clock=vm",
                             "-qmp", f"unix:{sock},server=on,wait=off"])
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        f = s.makefile("rw")
        f.readline()

        def cmd(name, **args):
            f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
            f.flush()
            while True:
                r = json.loads(f.readline())
                if "return" in r or "error" in r:
                    return r
        cmd("qmp_capabilities")
        assert "return" in cmd("migrate", uri=f"exec:cat > {out_path}")
        for _ in range(600):
            st = cmd("query-migrate")["return"].get("status")
            if st in ("completed", "failed"):
                break
            time.sleep(0.05)
        assert st == "completed"
        cmd("quit")
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def real_capture(tmp_path):
    """A real QEMU 7.2 stream: the committed pc-7.2-paused capture, else one made here."""
    xz = os.path.join(CAPTURES, "pc-7.2-paused.mig.xz")
    path = tmp_path / "real.mig"
    if os.path.exists(xz):
        import lzma
        with lzma.open(xz) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return path
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("no committed capture and no qemu-system-x86_64")
    _qmp_capture(path, tmp_path)
    return path


def splice(records, fam, devices):
    """Insert each device's START/PART/END/FULL after RAM's START/PART/END and before EOF,
    and add the FULL entries to the trailer.  Returns the new record list."""
    sids = {r.section_id for r in records if isinstance(r, SectionHeader)}
    plans = []
    for i, (idstr, pre, stop, st) in enumerate(devices):
        plans.append((plan(fam, idstr, precopy=pre, stop_copy=stop, config=st),
                      max(sids) + 1 + i))
    ram_sid = next(r.section_id for r in records
                   if isinstance(r, SectionHeader) and r.full and r.idstr == "ram")
    out = []
    ram_type = None
    entries = []
    for r in records:
        if isinstance(r, EndOfStream) and r.depth == 0:
            for p, sid in plans:
                out += [SectionHeader(T.SECTION_FULL, sid, p.idstr, 0, 1)] + list(p.full) + \
                    [SectionFooter(sid)]
                entries.append(p.vmdesc_entry())
        if isinstance(r, VmDescription):
            obj = r.obj
            obj["devices"] += entries
            r = VmDescription(json.dumps(obj).encode())
        out.append(r)
        if isinstance(r, SectionHeader) and r.section_id == ram_sid:
            ram_type = r.type_name
        if isinstance(r, SectionFooter) and r.section_id == ram_sid:
            for p, sid in plans:
                if ram_type == "START":
                    add = [SectionHeader(T.SECTION_START, sid, p.idstr, 0, 1)] + p.start
                elif ram_type == "PART":
                    add = [SectionHeader(T.SECTION_PART, sid)] + (p.parts[0] if p.parts else [])
                else:
                    add = [SectionHeader(T.SECTION_END, sid)] + p.end
                if len(add) > 1:
                    out += add + [SectionFooter(sid)]
    return out


def test_splice_into_real_capture(real_capture, capsys):
    orig = real_capture.read_bytes()
    recs = list(read_records(orig))
    assert encode_records(recs) == orig
    devs = [(DEV, [b"P" * 4096], [b"S" * MIB, b"T" * 33], state(msix=2)),
            (DEV2, [None], [b""], state(express=True))]
    spliced = splice(recs, "6.0-7.2", devs)
    data = encode_records(spliced)
    back = list(read_records(data))
    assert encode_records(back) == data
    # every original record survives unchanged, in order (the trailer grew by two entries)
    kept = [r for r in back if not isinstance(r, (VfioMarker, VfioDataChunk, VfioConfig))
            and not (isinstance(r, (SectionHeader, SectionFooter)) and
                     r.section_id >= min(s.section_id for s in spliced
                                         if isinstance(s, SectionHeader) and
                                         s.idstr == DEV))]
    assert [r.encode() for r in kept if not isinstance(r, VmDescription)] == \
        [r.encode() for r in recs if not isinstance(r, VmDescription)]
    # VFIO records at the offsets the splice put them
    pos, want = 0, []
    for r in spliced:
        if isinstance(r, (VfioMarker, VfioDataChunk, VfioConfig)):
            want.append((r.kind, pos, r.size, r.fields() if not isinstance(r, VfioDataChunk)
                         else r.data_size))
        pos += len(r.encode()) if not hasattr(r, "data_size") else r.size
    got = [(r.kind, r.offset, r.size, r.fields() if not isinstance(r, VfioDataChunk)
            else r.data_size) for r in back
           if isinstance(r, (VfioMarker, VfioDataChunk, VfioConfig))]
    # START 2+2, PART 2+2, END 3 (two chunks, END) + 2 (DATA 0, END), FULL 1+1
    assert got == want and len(got) == 15
    path = real_capture.parent / "spliced.mig"
    path.write_bytes(data)
    code, out, _ = run_cli(capsys, "vfio", str(path), "--json")
    assert code == 0
    d = json.loads(out)
    # DEV's chunks all fit a v2 read and none is empty: the layout is also 8.1-9.x's;
    # DEV2's DATA 0 chunks are v1 only.
    assert [(x["idstr"], x["family"], x["family_candidates"], x["data_bytes"])
            for x in d["devices"]] == \
        [(DEV, "8.1-9.x", ["8.1-9.x", "6.0-7.2"], 4096 + MIB + 33),
         (DEV2, "6.0-7.2", ["6.0-7.2"], 0)]
    assert d["devices"][1]["config"]["config_size"] == 4096
    assert d["hints"]["vmdesc_configuration"] is False
    code, out, _ = run_cli(capsys, "roundtrip", str(path))
    assert code == 0 and out.startswith("identical")


def test_real_7_2_multifd_channels_parse_and_round_trip(tmp_path, capsys):
    """The committed 7.2 multifd capture: RAM packets skipped exactly (SYNC packets carry a
    stale next_packet_size and no pages), no device state, every byte accounted for."""
    import lzma
    names = [os.path.join(CAPTURES, f"pc-7.2-multifd.{c}.xz") for c in ("ch0", "ch1")]
    if not all(os.path.exists(n) for n in names + [os.path.join(CAPTURES,
                                                              "pc-7.2-multifd.mig.xz")]):
        pytest.skip("pc-7.2-multifd capture not committed")
    paths = []
    for n in names:
        raw = lzma.open(n).read()
        recs = MF.parse_channel(raw, name=n)
        assert recs[0].kind == "multifd_init" and recs[0].version == 1
        assert all(r.kind == "multifd_ram" for r in recs[1:])
        assert b"".join(r.encode() for r in recs) == raw
        assert sum(r.size for r in recs) == len(raw)
        for r in recs[1:]:
            j = r.to_json()
            body = r.size - 320 - 8 * 128
            assert body == 4096 * j["normal_pages"]
            if j["flags"] == "0x1":
                assert j["normal_pages"] == 0
        p = tmp_path / os.path.basename(n)[:-3]
        p.write_bytes(raw)
        paths.append(str(p))
    main_path = tmp_path / "main.mig"
    main_path.write_bytes(lzma.open(os.path.join(CAPTURES, "pc-7.2-multifd.mig.xz")).read())
    code, out, _ = run_cli(capsys, "vfio", str(main_path), "--multifd", *paths)
    assert code == 0 and out.strip() == "no VFIO devices in this stream"
