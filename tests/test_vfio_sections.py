"""VFIO sections in whole streams, one per release family: offsets, fields, round trip."""

from __future__ import annotations

import io
import json
import struct

import pytest

from qmigstream.codec.build import StreamBuilder
from qmigstream.codec.ram_records import RamEos
from qmigstream.codec.reader import read_records
from qmigstream.codec.records import (OpaquePayload, SectionFooter, SectionHeader,
                                      VmDescription)
from qmigstream.codec.sections.vfio import VfioConfig, VfioDataChunk, VfioMarker
from qmigstream.codec.writer import encode_records
from qmigstream.errors import StreamError, Truncated
from qmigstream.vfio import multifd as MF
from qmigstream.vfio.builder import plan, split_reads, part_records, end_records
from qmigstream.vfio.family import infer_family
from qmigstream.vfio.scan import scan
from qmigstream.wire import vfio as W
from qmigstream.wire.commands import MigCmd
from qmigstream.wire.header import SectionType as T
from qmigstream.wire.vfio import Marker, PciConfigState

PS = 4096
MIB = 1 << 20
DEV = "0000:00:05.0/vfio"
DEV2 = "0000:00:06.0/vfio"
TIMER = b"\x00\x00\x00\x00\x00\x00\x12\x34"


def config_space(vendor=0x10DE, device=0x2236, msix=0, express=False):
    c = bytearray(4096 if express else 256)
    struct.pack_into("<HHHH", c, 0, vendor, device, 0x0006, 0x0010 if msix or express else 0)
    c[0x0B] = 0x03
    chain = ([0x60] if msix else []) + ([0x70] if express else [])
    c[0x34] = chain[0] if chain else 0
    for i, off in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else 0
        c[off], c[off + 1] = (0x11 if off == 0x60 else 0x10), nxt
        if off == 0x60:
            struct.pack_into("<HII", c, off + 2, msix - 1, 0x0, 0x800)
    return bytes(c)


def state(**kw):
    return PciConfigState.make(config_space(**kw))


def tags(records):
    out = []
    for r in records:
        if isinstance(r, VfioMarker):
            out.append(r.name)
        elif isinstance(r, VfioDataChunk):
            out.append(f"DATA{r.data_size}")
        elif isinstance(r, VfioConfig):
            out.append("CONFIG")
    return out


def build_stream(fam, devices, *, iterations=0, switchover_start=False, qjson=False,
                 footers=True, **plan_kw):
    """QEMU's order: RAM START, VFIO START; rounds of RAM PART + VFIO PART;
    [SWITCHOVER_START]; RAM END, VFIO END; FULL timer, FULL VFIO; EOF; trailer.

    ``devices``: [(idstr, section_id, precopy, stop_copy, config_state)].
    """
    b = StreamBuilder(footers=footers)
    b.header()
    b.configuration("pc-i440fx-7.2")
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 16 * PS)]),
              version_id=4, section_id=2)
    plans = []
    for idstr, sid, pre, stop, st in devices:
        p = plan(fam, idstr, precopy=pre, stop_copy=stop, config=st, **plan_kw)
        plans.append((p, sid))
        b.section(T.SECTION_START, idstr, p.start, section_id=sid)
    rounds = max([len(p.parts) for p, _ in plans] + [iterations])
    for i in range(rounds):
        b.section(T.SECTION_PART, "ram",
                  [b.ram_page_record("pc.ram", (i % 16) * PS, bytes([i % 251 + 1]) * PS), RamEos()],
                  section_id=2)
        for p, sid in plans:
            if i < len(p.parts):
                b.section(T.SECTION_PART, p.idstr, p.parts[i], section_id=sid)
    if switchover_start:
        b.command(MigCmd.SWITCHOVER_START)
    b.section(T.SECTION_END, "ram", [RamEos()], section_id=2)
    for p, sid in plans:
        b.section(T.SECTION_END, p.idstr, p.end, section_id=sid)
    b.section(T.SECTION_FULL, "timer", [OpaquePayload(TIMER)], version_id=2, section_id=0)
    entries = [{"name": "timer", "instance_id": 0, "size": 8,
                "fields": [{"name": "data", "size": 8, "type": "buffer"}]}]
    for p, sid in plans:
        if p.full is not None:
            b.section(T.SECTION_FULL, p.idstr, p.full, section_id=sid)
            entries.append(p.vmdesc_entry())
    b.eof()
    if qjson:
        desc = "{ \"page_size\" : 4096, \"devices\" : [ " + ", ".join(
            "{ " + ", ".join(f"\"{k}\" : {json.dumps(v)}" for k, v in e.items()) + " }"
            for e in entries) + " ] }"
        b.vmdescription(desc.encode())
    else:
        b.vmdescription(json.dumps({"page_size": 4096, "devices": entries}).encode())
    return b, plans


def vfio_view(recs):
    """(kind, offset, size, fields) of every VFIO payload record."""
    return [(r.kind, r.offset, r.size, r.fields()) for r in recs
            if isinstance(r, (VfioMarker, VfioDataChunk, VfioConfig))]


def sections_of(recs, idstr):
    """[(type, [payload tags])] for one idstr."""
    out, cur, names = [], None, {}
    for r in recs:
        if isinstance(r, SectionHeader):
            if r.full:
                names[r.section_id] = r.idstr
            if names.get(r.section_id) == idstr:
                cur = (r.type_name, [])
                out.append(cur)
            else:
                cur = None
        elif isinstance(r, SectionFooter):
            cur = None
        elif cur is not None:
            cur[1].append(r)
    return [(t, tags(rs)) for t, rs in out]


def check_stream(b):
    data = b.encode()
    recs = list(read_records(data))
    assert [(r.offset, r.size) for r in recs] == [(r.offset, r.size) for r in b.records]
    assert vfio_view(recs) == vfio_view(b.records)
    assert encode_records(recs) == data
    # the VFIO FULL entry of the trailer states the FULL payload's size
    return data, recs


# Hand-computed layout of every stream below: header 8, configuration 18 (26),
# RAM START 48 + footer 5 (79); the first VFIO START header (31 bytes) at 79.
RAM_END = 79


def test_5_2_config_in_end_then_data():
    st = state(msix=4)
    b, _ = build_stream("5.2", [(DEV, 40, [b"p" * 100, None], [b"s" * 50], st)],
                        zero_terminator=True, qjson=True)
    data, recs = check_stream(b)
    assert sections_of(recs, DEV) == [
        ("START", ["DEV_SETUP_STATE", "END_OF_STATE"]),
        ("PART", ["DATA100", "END_OF_STATE"]),
        ("PART", ["DATA0", "END_OF_STATE"]),
        ("END", ["CONFIG", "DATA50", "DATA0", "END_OF_STATE"])]
    start = next(r for r in recs if isinstance(r, SectionHeader) and r.section_id == 40)
    assert start.offset == RAM_END and start.size == 31
    setup = recs[recs.index(start) + 1]
    assert (setup.offset, data[setup.offset:setup.offset + 8]) == (110, W.CONFIG_STATE_BYTES[:7]
                                                                   + b"\x03")
    cfg = next(r for r in recs if isinstance(r, VfioConfig))
    assert cfg.size == 8 + 4 + 256 + 16 + 4 * 16 + 1 + 8
    assert data[cfg.offset:cfg.offset + 8] == W.CONFIG_STATE_BYTES
    assert data[cfg.offset + cfg.size - 8:cfg.offset + cfg.size] == W.END_OF_STATE_BYTES
    chunk = next(r for r in recs if isinstance(r, VfioDataChunk) and r.data_size == 50)
    assert chunk.offset == cfg.offset + cfg.size and chunk.data_offset == chunk.offset + 16
    assert bytes(chunk.data) == b"s" * 50
    devs, _ = scan(data)
    d = devs[(DEV, 0)]
    assert d.family.family == "5.2" and d.data_bytes == 150
    assert [(c["phase"], c.get("iteration"), c["size"]) for c in d.to_json()["chunks"]] == \
        [("precopy", 1, 100), ("precopy", 2, 0), ("complete", None, 50), ("complete", None, 0)]


def test_6_0_to_7_2_config_as_full():
    st = state()
    b, plans = build_stream("6.0-7.2", [(DEV, 40, [b"p" * 300, None], [b"s" * 70], st)])
    data, recs = check_stream(b)
    assert sections_of(recs, DEV) == [
        ("START", ["DEV_SETUP_STATE", "END_OF_STATE"]),
        ("PART", ["DATA300", "END_OF_STATE"]),
        ("PART", ["DATA0", "END_OF_STATE"]),
        ("END", ["DATA70", "END_OF_STATE"]),
        ("FULL", ["CONFIG"])]
    desc = next(r for r in recs if isinstance(r, VmDescription)).obj
    entry = desc["devices"][1]
    assert entry == {"name": DEV, "instance_id": 0, "size": 8 + 276 + 8,
                     "fields": [{"name": "data", "size": 292, "type": "buffer"}]}
    full = [r for r in recs if isinstance(r, SectionHeader) and r.type_name == "FULL"][-1]
    cfg = recs[recs.index(full) + 1]
    assert isinstance(cfg, VfioConfig) and cfg.offset == full.offset + 1 + 4 + 1 + 17 + 8
    assert cfg.fields() == {"marker": "DEV_CONFIG_STATE", "body_length": 276, "version_id": 2,
                            "config_size": 256, "vendor_id": "0x10de", "device_id": "0x2236",
                            "irq_state": [0, 0, 0, 0], "msix_entries": 0}
    assert isinstance(recs[recs.index(cfg) + 1], SectionFooter)
    devs, _ = scan(data)
    assert devs[(DEV, 0)].family.family == "6.0-7.2"


def test_8_0_no_part_sections():
    st = state(express=True, msix=8)
    chunks = split_reads(b"\xAB" * (MIB + 1))
    assert [len(c) for c in chunks] == [MIB, 1]
    b, _ = build_stream("8.0", [(DEV, 40, [], chunks, st)], iterations=2)
    data, recs = check_stream(b)
    assert sections_of(recs, DEV) == [
        ("START", ["DEV_SETUP_STATE", "END_OF_STATE"]),
        ("END", [f"DATA{MIB}", "DATA1", "END_OF_STATE"]),
        ("FULL", ["CONFIG"])]
    cfg = next(r for r in recs if isinstance(r, VfioConfig))
    assert cfg.size == 8 + 4 + 4096 + 16 + 8 * 16 + 1 + 8
    devs, _ = scan(data)
    m = devs[(DEV, 0)].family
    assert m.family == "8.0" and m.candidates == ["8.0", "8.1-9.x", "6.0-7.2"]
    assert devs[(DEV, 0)].data_bytes == MIB + 1


def test_8_1_to_9_x_precopy_and_init_data_sent():
    st = state(msix=2)
    b, _ = build_stream("8.1-9.x", [(DEV, 40, [b"a" * MIB, b"b" * 10, None], [b"c" * 20], st)],
                        switchover_ack=True, init_data_sent_at=1)
    data, recs = check_stream(b)
    assert sections_of(recs, DEV) == [
        ("START", ["DEV_SETUP_STATE", "END_OF_STATE"]),
        ("PART", [f"DATA{MIB}", "END_OF_STATE"]),
        ("PART", ["DATA10", "DEV_INIT_DATA_SENT"]),
        ("PART", ["END_OF_STATE"]),
        ("END", ["DATA20", "END_OF_STATE"]),
        ("FULL", ["CONFIG"])]
    devs, _ = scan(data)
    d = devs[(DEV, 0)]
    assert d.family.family == "8.1-9.x" and "DEV_INIT_DATA_SENT" in d.family.reason
    assert d.data_bytes == MIB + 30
    assert b"".join(d.data_pieces()) == b"a" * MIB + b"b" * 10 + b"c" * 20
    # keep_data=False: where the data is, not the data
    lean = scan(data, keep_data=False)[0][(DEV, 0)]
    assert [c["size"] for c in lean.chunks] == [MIB, 10, 20]
    assert not any(isinstance(r, VfioDataChunk) for s in lean.sections for r in s["records"])
    assert lean.to_json()["sections"] == d.to_json()["sections"]
    with pytest.raises(ValueError, match="keep_data=False"):
        list(lean.data_pieces())
    big = d.chunks[0]
    # first VFIO PART: after RAM START, VFIO START (31+16+5), RAM PART (5 + 8+1+6+4096 + 8 + 5)
    assert big["offset"] == RAM_END + 52 + 5 + 4111 + 8 + 5 + 5
    assert big["size"] == MIB and big["data_offset"] == big["offset"] + 16


def test_10_x_end_only_and_multifd_packets():
    st = state(msix=3)
    stop = [b"x" * 1000, b"y" * MIB]
    b, plans = build_stream("10.x", [(DEV, 40, [b"p" * 64], stop, st)], switchover_start=True)
    data, recs = check_stream(b)
    assert sections_of(recs, DEV) == [
        ("START", ["DEV_SETUP_STATE", "END_OF_STATE"]),
        ("PART", ["DATA64", "END_OF_STATE"]),
        ("END", ["END_OF_STATE"]),
        ("FULL", ["END_OF_STATE"])]
    entry = json.loads(next(r for r in recs if isinstance(r, VmDescription)).json_bytes)
    assert entry["devices"][1]["size"] == 8
    pk = plans[0][0].packets
    assert [(p.idx, p.is_config, len(p.data)) for p in pk] == \
        [(0, False, 1000), (1, False, MIB), (2, True, 8 + 4 + 256 + 16 + 48 + 1 + 8)]
    ch0 = MF.parse_channel(MF.build_channel([pk[1]], 0))
    ch1 = MF.parse_channel(MF.build_channel([pk[2], pk[0]], 1))
    devs, hints = scan(data, multifd=[("ch0", ch0), ("ch1", ch1)])
    d = devs[(DEV, 0)]
    assert hints["switchover_start"] and hints["multifd_packets"]
    assert d.family.family == "10.x" and d.data_bytes == 64 + 1000 + MIB
    assert b"".join(d.data_pieces()) == b"p" * 64 + b"x" * 1000 + b"y" * MIB
    assert d.config_record().state == st
    j = d.to_json()
    assert j["config"]["phase"] == "multifd" and j["config"]["vendor_id"] == "0x10de"
    assert [(p["channel"], p["idx"], p["offset"]) for p in j["multifd"]["packets"]] == \
        [("ch1", 0, 64 + 276 + 12 + len(pk[2].data)), ("ch0", 1, 64), ("ch1", 2, 64)]


def test_10_1_config_load_ready():
    b, _ = build_stream("10.1+", [(DEV, 40, [], [b"z" * 5], state())], switchover_start=True)
    data, recs = check_stream(b)
    assert sections_of(recs, DEV)[-2:] == [("END", ["END_OF_STATE"]),
                                           ("FULL", ["DEV_CONFIG_LOAD_READY"])]
    devs, _ = scan(data)
    assert devs[(DEV, 0)].family.family == "10.1+"


def test_two_devices_and_zero_length_data():
    b, _ = build_stream("6.0-7.2", [(DEV, 40, [None], [], state()),
                                    (DEV2, 41, [b"q" * MIB, b"r" * (MIB + 1)], [b""],
                                     state(express=True))])
    data, recs = check_stream(b)
    assert sections_of(recs, DEV) == [
        ("START", ["DEV_SETUP_STATE", "END_OF_STATE"]), ("PART", ["DATA0", "END_OF_STATE"]),
        ("END", ["END_OF_STATE"]), ("FULL", ["CONFIG"])]
    assert sections_of(recs, DEV2)[1:3] == [("PART", [f"DATA{MIB}", "END_OF_STATE"]),
                                            ("PART", [f"DATA{MIB + 1}", "END_OF_STATE"])]
    devs, _ = scan(data)
    assert list(devs) == [(DEV, 0), (DEV2, 0)]
    assert devs[(DEV, 0)].data_bytes == 0 and devs[(DEV2, 0)].data_bytes == 2 * MIB + 1
    assert devs[(DEV2, 0)].family.family == "6.0-7.2"
    assert devs[(DEV2, 0)].config_record().state.express


def test_builder_refuses_what_a_family_cannot_write():
    with pytest.raises(ValueError, match="exceeds one read"):
        end_records("8.1-9.x", [b"x" * (MIB + 1)])
    with pytest.raises(ValueError, match="no PART"):
        part_records("8.0", b"x")
    with pytest.raises(ValueError, match="INIT_DATA_SENT"):
        part_records("6.0-7.2", b"x", init_data_sent=True)
    with pytest.raises(ValueError, match="empty data chunk"):
        end_records("8.1-9.x", [b""])
    with pytest.raises(ValueError, match="unknown VFIO release family"):
        part_records("7.5", b"x")


def test_pipe_input_reads_large_chunks_piecewise():
    b, _ = build_stream("6.0-7.2", [(DEV, 40, [b"k" * (3 * MIB + 5)], [], state())])
    data = b.encode()

    class Pipe(io.RawIOBase):
        def __init__(self, d):
            self.b = io.BytesIO(d)

        def readable(self):
            return True

        def readinto(self, m):
            chunk = self.b.read(min(len(m), 65536))
            m[:len(chunk)] = chunk
            return len(chunk)

    recs = list(read_records(io.BufferedReader(Pipe(data)), no_lookahead=True))
    chunk = next(r for r in recs if isinstance(r, VfioDataChunk))
    assert chunk.data_size == 3 * MIB + 5 and bytes(chunk.data) == b"k" * (3 * MIB + 5)
    assert encode_records(recs) == data


def test_infer_family_ambiguous_cases_report_candidates():
    recs_part = [VfioDataChunk(b"x" * 10), VfioMarker(Marker.END_OF_STATE)]
    full = [VfioConfig(state())]
    m = infer_family([("START", []), ("PART", recs_part), ("END", [VfioMarker(Marker.END_OF_STATE)]),
                      ("FULL", full)])
    assert m.family == "8.1-9.x" and m.candidates == ["8.1-9.x", "6.0-7.2"]
    m = infer_family([("PART", recs_part), ("FULL", full)], {"switchover_start": True})
    assert m.family == "8.1-9.x" and m.candidates == ["8.1-9.x"]
    assert infer_family([("START", [])]).family is None


# --- errors with exact offsets ------------------------------------------------------

def _one_part(payload: bytes, tail=b""):
    """Stream with a VFIO START and one PART whose payload is ``payload``."""
    b = StreamBuilder()
    b.header()
    b.configuration("pc-i440fx-7.2")
    b.section(T.SECTION_START, DEV, [VfioMarker(Marker.DEV_SETUP_STATE),
                                     VfioMarker(Marker.END_OF_STATE)], section_id=40)
    data = b.encode()
    part_at = len(data)
    data += b"\x02" + struct.pack(">I", 40) + payload + tail
    return data, part_at + 5


def test_unknown_marker():
    data, at = _one_part(bytes.fromhex("ffffffffef100007") + W.END_OF_STATE_BYTES,
                         b"\x7e\x00\x00\x00\x28\x00")
    with pytest.raises(StreamError) as e:
        list(read_records(data))
    assert e.value.offset == at == 31 + 26 + 16 + 5 + 5 and e.value.section == DEV
    assert e.value.found == "0xffffffffef100007"
    assert "unknown VFIO marker" in str(e.value)


def test_truncated_chunk():
    payload = W.DataChunkHeader.build(dict(size=100)) + b"d" * 40
    data, at = _one_part(payload)
    with pytest.raises(Truncated) as e:
        list(read_records(data))
    assert e.value.offset == at + 8 and e.value.needed == 100 and e.value.available == 40


def test_oversized_length_is_refused_before_reading():
    payload = W.DataChunkHeader.build(dict(size=(1 << 62))) + b"d" * 16
    data, at = _one_part(payload)
    with pytest.raises(Truncated) as e:
        list(read_records(data))
    assert e.value.offset == at + 8 and e.value.needed == 1 << 62 and e.value.available == 16


def test_setup_without_end_and_setup_out_of_order():
    data, at = _one_part(bytes.fromhex("ffffffffef100003") + bytes.fromhex("ffffffffef100004"))
    with pytest.raises(StreamError) as e:
        list(read_records(data))
    assert e.value.offset == at + 8 and "not followed by END_OF_STATE" in str(e.value)
    data, at = _one_part(W.DataChunkHeader.build(dict(size=0)) +
                         bytes.fromhex("ffffffffef100003") + W.END_OF_STATE_BYTES)
    with pytest.raises(StreamError) as e:
        list(read_records(data))
    assert e.value.offset == at + 16 and "after other VFIO records" in str(e.value)


def test_config_record_without_its_end_marker():
    body = state().encode()
    data, at = _one_part(W.CONFIG_STATE_BYTES + body + b"\x01" * 8 + b"\x00" * 5000)
    with pytest.raises(StreamError) as e:
        list(read_records(data))
    assert e.value.offset == at + 8 + 276 and not isinstance(e.value, Truncated)
    assert e.value.found == b"\x01" * 8


def test_streams_without_footers():
    for fam in ("5.2", "6.0-7.2", "10.1+"):
        b, _ = build_stream(fam, [(DEV, 40, [b"a" * 9, None], [b"b" * 4], state(msix=2))],
                            footers=False)
        data, recs = check_stream(b)
        assert not any(isinstance(r, SectionFooter) for r in recs)
        devs, _ = scan(data)
        assert devs[(DEV, 0)].family.family == fam


def test_config_state_make_with_a_given_table():
    st = PciConfigState.make(config_space(msix=3), msix_table=bytes(range(48)))
    assert st.msix_entries == 3 and st.msix_pba == b"\x00"
    back, n = W.parse_config_state(W.CONFIG_STATE_BYTES + st.encode() + W.END_OF_STATE_BYTES, 8)
    assert n == 4 + 256 + 16 + 48 + 1 and back == st and back.msix_table == bytes(range(48))
