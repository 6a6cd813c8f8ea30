"""VFIO schemas: marker values, chunk framing, the config record, multifd packets."""

from __future__ import annotations

import struct

import pytest

from qmigstream.errors import LimitExceeded, StreamError, Truncated
from qmigstream.vfio import multifd as MF
from qmigstream.vfio.pci import decode_config_state
from qmigstream.wire import vfio as W
from qmigstream.wire.vfio import Marker, PciConfigState


def test_marker_values_as_in_hw_vfio_migration_c():
    assert [int(m) for m in Marker] == [0xFFFFFFFFEF100001, 0xFFFFFFFFEF100002,
                                        0xFFFFFFFFEF100003, 0xFFFFFFFFEF100004,
                                        0xFFFFFFFFEF100005, 0xFFFFFFFFEF100006]
    assert W.END_OF_STATE_BYTES == bytes.fromhex("ffffffffef100001")
    assert W.CONFIG_STATE_BYTES == bytes.fromhex("ffffffffef100002")
    assert W.MARKER_PREFIX_BYTES == bytes.fromhex("ffffffffef10")


def test_data_chunk_header():
    assert W.DataChunkHeader.build(dict(size=0x1234)) == \
        bytes.fromhex("ffffffffef100004") + bytes.fromhex("0000000000001234")
    assert W.DataChunkHeader.parse(bytes.fromhex("ffffffffef1000040000000000100000")).size \
        == 1 << 20
    with pytest.raises(Exception):
        W.DataChunkHeader.parse(bytes.fromhex("ffffffffef1000010000000000000000"))


def pci_config(vendor=0x15B3, device=0x101E, express=False, msix=0, msi=False, bars=True):
    """A type-0 config space with a capability chain MSI(0x50) -> MSI-X(0x70) -> EXP(0x80)."""
    size = 4096 if express else 256
    c = bytearray(size)
    struct.pack_into("<HHHH", c, 0, vendor, device, 0x0406, 0x0010)
    c[8] = 0x02                                   # revision
    c[9:12] = bytes([0x00, 0x00, 0x02])           # class 0x020000 (ethernet)
    c[0x0E] = 0x00
    if bars:
        struct.pack_into("<I", c, 0x10, 0xFE00000C)   # BAR0: 64-bit prefetchable mem
        struct.pack_into("<I", c, 0x14, 0x00000001)   # BAR1: high half
        struct.pack_into("<I", c, 0x18, 0x0000C001)   # BAR2: I/O at 0xc000
        struct.pack_into("<I", c, 0x1C, 0xFD000000)   # BAR3: 32-bit mem
    struct.pack_into("<HH", c, 0x2C, 0x15B3, 0x0042)
    c[0x3C], c[0x3D] = 11, 1
    chain = []
    if msi:
        chain.append(0x50)
    if msix:
        chain.append(0x70)
    if express:
        chain.append(0x80)
    c[0x34] = chain[0] if chain else 0
    for i, off in enumerate(chain):
        nxt = chain[i + 1] if i + 1 < len(chain) else 0
        if off == 0x50:
            c[off:off + 2] = bytes([0x05, nxt])
            struct.pack_into("<H", c, off + 2, 0x0181)     # enabled, 64-bit, per-vector mask
            struct.pack_into("<IIH", c, off + 4, 0xFEE00000, 0x1, 0x4021)
            struct.pack_into("<II", c, off + 0x10, 0x2, 0x1)
        elif off == 0x70:
            c[off:off + 2] = bytes([0x11, nxt])
            struct.pack_into("<HII", c, off + 2, 0x8000 | (msix - 1), 0x00002000 | 3,
                             0x00003000 | 3)
        elif off == 0x80:
            c[off:off + 2] = bytes([0x10, nxt])
    if express:
        struct.pack_into("<I", c, 0x100, 0x0001 | (1 << 16) | (0x140 << 20))   # AER -> 0x140
        struct.pack_into("<I", c, 0x140, 0x0003 | (1 << 16) | (0 << 20))       # DSN, end
    if not chain:
        struct.pack_into("<H", c, 6, 0)
    return bytes(c)


def test_config_state_256_without_msix_layout():
    cfg = pci_config()
    st = PciConfigState.make(cfg, irq_state=(1, 0, 0, 0))
    body = st.encode()
    assert len(body) == 4 + 256 + 16 == len(st)
    assert body[:4] == b"\x00\x00\x00\x02"            # PCIDevice.version_id = 2
    assert body[4:260] == cfg
    assert body[260:276] == bytes.fromhex("00000001" "00000000" "00000000" "00000000")
    rec = W.CONFIG_STATE_BYTES + body + W.END_OF_STATE_BYTES
    back, n = W.parse_config_state(rec, 8)
    assert n == 276 and back == st and back.msix_table is None and back.display is None


def test_config_state_256_with_msix_and_4096_with_msix():
    for express, size in ((False, 256), (True, 4096)):
        cfg = pci_config(express=express, msix=5)
        table = bytes(range(80))
        pba = b"\x11"
        st = PciConfigState(cfg, (0, 0, 0, 1), table, pba)
        body = st.encode()
        assert len(body) == 4 + size + 16 + 80 + 1
        assert body[4 + size + 16:] == table + pba
        back, n = W.parse_config_state(b"XXXXXXXX" + body + W.END_OF_STATE_BYTES, 8)
        assert n == len(body) and back.config == cfg and back.msix_entries == 5
        assert back.msix_pba == pba and back.irq_state == (0, 0, 0, 1)


def test_config_state_make_sizes_msix_from_capability():
    st = PciConfigState.make(pci_config(msix=17))
    assert st.msix_entries == 17 and len(st.msix_table) == 17 * 16 and len(st.msix_pba) == 3


def test_config_state_with_display_subsection():
    disp = W.RamfbCfg.build(dict(addr=0x7F000000, fourcc=0x34325258, flags=0, width=1024,
                                 height=768, stride=4096))
    assert len(disp) == 28
    st = PciConfigState.make(pci_config(), display=disp)
    body = st.encode()
    hdr = b"\x05\x19VFIOPCIDevice/VFIODisplay\x00\x00\x00\x01"
    assert body[276:276 + len(hdr)] == hdr and body[276 + len(hdr):] == disp
    back, n = W.parse_config_state(b"\0" * 8 + body + W.END_OF_STATE_BYTES, 8)
    assert n == len(body) and back.display == disp
    d = decode_config_state(back)
    assert d["display"]["ramfb"] == {"addr": "0x7f000000", "fourcc": "0x34325258", "flags": 0,
                                     "width": 1024, "height": 768, "stride": 4096}


def test_config_state_errors_name_offsets():
    body = PciConfigState.make(pci_config()).encode()
    with pytest.raises(StreamError) as e:
        W.parse_config_state(b"\0" * 8 + body + b"\0" * 8, 8, base=1000)
    assert e.value.offset == 1008 + 276 and not isinstance(e.value, Truncated)
    assert e.value.found == bytes(8)
    with pytest.raises(Truncated) as e:
        W.parse_config_state(b"\0" * 8 + body[:100], 8, base=1000)
    assert e.value.offset == 1008 and e.value.available == 100


def test_capability_walk_has_a_loop_guard():
    c = bytearray(pci_config(msix=2))
    c[0x71] = 0x70                                    # MSI-X points at itself
    assert W.capabilities(bytes(c)) == [(0x70, 0x11)]
    c[0x71] = 0x40
    c[0x40:0x42] = bytes([0x09, 0x70])                # 0x70 -> 0x40 -> 0x70 ...
    assert W.capabilities(bytes(c)) == [(0x70, 0x11), (0x40, 0x09)]


def test_decode_config_fields_and_offsets():
    cfg = pci_config(express=True, msix=3, msi=True)
    table = struct.pack("<IIII", 0xFEE01000, 0, 0x4041, 0) + \
        struct.pack("<IIII", 0xFEE02000, 0x1, 0x4042, 1) + bytes(16)
    st = PciConfigState(cfg, (0, 0, 0, 0), table, b"\x04")
    d = decode_config_state(st, offset=500)
    assert d["vendor_id"] == "0x15b3" and d["device_id"] == "0x101e"
    assert d["command"] == "0x0406" and d["status"] == "0x0010" and d["revision"] == 2
    assert d["class_code"] == "0x020000" and d["header_type"] == "0x00"
    assert d["subsystem_vendor_id"] == "0x15b3" and d["subsystem_id"] == "0x0042"
    assert (d["interrupt_line"], d["interrupt_pin"]) == (11, 1)
    assert d["config_size"] == 4096 and d["express"] is True
    # body at 508, config space at 512
    f = {x["name"]: x for x in d["fields"]}
    assert f["vendor_id"]["offset"] == 512 and f["device_id"]["offset"] == 514
    assert f["subsystem_id"]["offset"] == 512 + 0x2E
    bars = d["bars"]
    assert [(b["index"], b["type"]) for b in bars] == [(0, "mem64"), (2, "io"), (3, "mem32"),
                                                      (4, "mem32"), (5, "mem32")]
    assert bars[0]["address"] == "0x1fe000000" and bars[0]["prefetchable"] is True
    assert bars[1]["address"] == "0xc000" and bars[2]["address"] == "0xfd000000"
    assert [(c["name"], c["config_offset"], c["offset"]) for c in d["capabilities"]] == \
        [("MSI", 0x50, 512 + 0x50), ("MSIX", 0x70, 512 + 0x70), ("EXP", 0x80, 512 + 0x80)]
    assert d["msi"] == {"config_offset": 0x50, "offset": 512 + 0x50, "control": "0x0181",
                        "enabled": True, "multiple_message_capable": 1,
                        "multiple_message_enable": 1, "64bit": True,
                        "per_vector_masking": True, "address": "0x1fee00000",
                        "data": "0x4021", "mask": "0x00000002", "pending": "0x00000001"}
    m = d["msix"]
    assert (m["table_size"], m["enabled"], m["table_bir"], m["table_offset"],
            m["pba_bir"], m["pba_offset"]) == (3, True, 3, "0x2000", 3, "0x3000")
    assert [(x["name"], x["config_offset"], x["version"]) for x in
            d["extended_capabilities"]] == [("AER", 0x100, 1), ("DSN", 0x140, 1)]
    t = d["msix_table"]
    assert d["msix_table_offset"] == 512 + 4096 + 16 and d["msix_pba_offset"] == 512 + 4096 + 64
    assert (t[0]["address"], t[0]["data"], t[0]["masked"], t[0]["offset"]) == \
        ("0xfee01000", "0x00004041", False, 512 + 4096 + 16)
    assert (t[1]["address"], t[1]["masked"]) == ("0x1fee02000", True)
    assert d["msix_pending"] == [2]


# --- multifd ----------------------------------------------------------------------

def test_device_state_packet_layout():
    p = MF.DeviceStatePacket("0000:00:05.0/vfio", 0, MF.vfio_payload(7, b"abc"))
    raw = p.encode()
    assert len(raw) == 276 + 12 + 3 == p.size
    assert raw[:12] == bytes.fromhex("11223344" "00000001" "00000040")
    assert raw[12:12 + 17] == b"0000:00:05.0/vfio" and raw[12 + 17:268] == bytes(256 - 17)
    assert raw[268:276] == bytes.fromhex("00000000" "0000000f")
    assert raw[276:] == bytes.fromhex("00000000" "00000007" "00000000") + b"abc"
    cfgp = MF.DeviceStatePacket("x/vfio", 3, MF.vfio_payload(8, b"", config=True))
    assert cfgp.encode()[276 + 8:276 + 12] == b"\x00\x00\x00\x01" and cfgp.is_config


def test_channel_round_trip_and_ram_packets_skipped():
    # the offset array has MULTIFD_PACKET_SIZE / 4096 = 128 entries whatever pages_alloc is
    ram = struct.pack(">IIIIIIQII", 0x11223344, 1, 0, 128, 1, 4096, 5, 0, 0) + bytes(24) + \
        b"pc.ram".ljust(256, b"\0") + struct.pack(">Q", 0x1000) + bytes(8 * 127) + b"P" * 4096
    assert len(ram) == 320 + 8 * 128 + 4096
    assert ram == MF.ram_packet_header(5, ramblock="pc.ram", normal=[0x1000]) + b"P" * 4096
    sync = MF.ram_packet_header(6, flags=1)           # 9.0+: a SYNC packet has pages_alloc 0
    assert len(sync) == 320 + 8 * 128 and sync[12:16] == bytes(4)
    pk = MF.device_packets("0000:00:05.0/vfio", 0, [b"A" * 10, b"B" * 20], b"CFG")
    chan = MF.ChannelInit(2, b"U" * 16).encode() + pk[0].encode() + ram + pk[2].encode()
    recs = MF.parse_channel(chan)
    assert [r.kind for r in recs] == ["multifd_init", "multifd_device_state", "multifd_ram",
                                      "multifd_device_state"]
    assert recs[0].channel_id == 2 and recs[0].uuid == b"U" * 16
    assert [r.offset for r in recs] == [0, 64, 64 + 298, 64 + 298 + len(ram)]
    assert recs[1].idx == 0 and bytes(recs[1].data) == b"A" * 10
    assert recs[1].data_offset == 64 + 276 + 12
    assert recs[2].to_json()["ramblock"] == "pc.ram" and recs[2].to_json()["normal_pages"] == 1
    assert recs[3].idx == 2 and recs[3].is_config
    assert b"".join(r.encode() for r in recs) == chan
    two = MF.parse_channel(chan[:64] + sync + ram)
    assert [r.kind for r in two[1:]] == ["multifd_ram", "multifd_ram"] and two[1].is_sync
    assert two[2].offsets() == ((0x1000,), ()) and bytes(two[2].page(0)) == b"P" * 4096


def test_reassemble_orders_by_idx_across_channels():
    pk = MF.device_packets("d/vfio", 0, [b"0" * 3, b"1" * 4, b"2" * 5], b"CONFIG")
    ch_a = MF.parse_channel(MF.build_channel([pk[2], pk[0]], 0))
    ch_b = MF.parse_channel(MF.build_channel([pk[3], pk[1]], 1))
    devs = MF.reassemble([("a", ch_a), ("b", ch_b)])
    t = devs[("d/vfio", 0)]
    assert t.data == b"000" + b"1111" + b"22222" and t.config_bytes == b"CONFIG"
    assert t.config_idx == 3


def test_reassemble_errors():
    pk = MF.device_packets("d/vfio", 0, [b"x", b"y"], b"C")
    dup = MF.parse_channel(MF.build_channel([pk[0], pk[1], pk[1], pk[2]]))
    with pytest.raises(StreamError) as e:
        MF.reassemble([("c0", dup)])
    assert "already filled" in str(e.value) and e.value.offset == 64 + 2 * 289 + 276 + 4
    bad = MF.DeviceStatePacket("d/vfio", 0, MF.vfio_payload(0xFFFFFFFF, b""))
    with pytest.raises(StreamError, match="index is invalid"):
        MF.reassemble([("c0", MF.parse_channel(MF.build_channel([bad])))])
    ver = MF.DeviceStatePacket("d/vfio", 0, struct.pack(">III", 1, 0, 0))
    with pytest.raises(StreamError, match="unknown version") as e:
        MF.reassemble([("c0", MF.parse_channel(MF.build_channel([ver])))])
    assert e.value.offset == 64 + 276 and e.value.found == 1
    with pytest.raises(StreamError, match="state buffer 1 missing"):
        MF.reassemble([("c0", MF.parse_channel(MF.build_channel([pk[0], pk[2]])))])
    with pytest.raises(StreamError, match="no config packet"):
        MF.reassemble([("c0", MF.parse_channel(MF.build_channel([pk[0], pk[1]])))])


def test_parse_channel_errors():
    good = MF.build_channel(MF.device_packets("d/vfio", 0, [b"x" * 100], b"C"))
    with pytest.raises(Truncated) as e:
        MF.parse_channel(good[:64 + 276 + 50])
    assert e.value.offset == 64 + 272 and e.value.needed == 112 and e.value.available == 50
    with pytest.raises(StreamError) as e:
        MF.parse_channel(b"\0" * 64)
    assert e.value.offset == 0 and e.value.found == 0
    bad = bytearray(good)
    bad[64:68] = b"\0\0\0\0"
    with pytest.raises(StreamError, match="bad multifd packet magic") as e:
        MF.parse_channel(bytes(bad))
    assert e.value.offset == 64
    ram = struct.pack(">IIIIII", 0x11223344, 1, 0, 0xFFFFFFF, 0, 0) + bytes(320 - 24)
    with pytest.raises(LimitExceeded):
        MF.parse_channel(ram, init=False)
