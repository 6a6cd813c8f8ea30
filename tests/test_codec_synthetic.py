"""The codec on streams built record by record: exact offsets, exact errors."""

from __future__ import annotations

import io
import struct

import pytest

from qmigstream.codec.build import StreamBuilder
from qmigstream.codec.ram_records import (RamEos, RamMemSize, RamPage, RamXbzrle, RamZero,
                                          RamZeroRun, RamMultifdFlush, RamHook, RamCompressed)
from qmigstream.codec.reader import StreamReader, read_records
from qmigstream.codec.records import (Command, OpaquePayload, SectionFooter, TrailingBytes,
                                      VmDescription)
from qmigstream.codec.writer import StreamWriter, encode_records
from qmigstream.errors import (BadMagic, LimitExceeded, StreamError, Truncated,
                               UnsupportedVersion)
from qmigstream.wire.commands import MigCmd
from qmigstream.wire.header import SectionType as T
from qmigstream.wire.ram import RamFlag

PS = 4096


def basic(footers=True, config=True, pages=(), desc=None, device_payload=b"\x01\x02\x03\x04"):
    """A small stream: header, config, RAM START/PART/END, one device, EOF, trailer."""
    b = StreamBuilder(footers=footers)
    b.header()
    if config:
        b.configuration("pc-i440fx-7.2")
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 16 * PS), ("pc.rom", 2 * PS)]),
              version_id=4, section_id=2)
    recs = []
    for blk, idx, kind in pages:
        if kind == "zero":
            recs.append(b.ram_page_record(blk, idx * PS, zero=True))
        else:
            recs.append(b.ram_page_record(blk, idx * PS, bytes([idx + 1]) * PS))
    recs.append(RamEos())
    b.section(T.SECTION_PART, "ram", recs, section_id=2)
    b.section(T.SECTION_END, "ram", [RamEos()], section_id=2)
    b.section(T.SECTION_FULL, "timer", [OpaquePayload(device_payload)], version_id=2, section_id=0)
    b.eof()
    if desc is not None:
        b.vmdescription(desc)
    return b


def decode(data, **kw):
    return list(read_records(data, **kw))


def test_header_config_and_sections_offsets():
    b = basic(pages=[("pc.ram", 0, "page"), ("pc.ram", 1, "zero"), ("pc.rom", 0, "zero")])
    data = b.encode()
    recs = decode(data)
    assert [(r.kind, r.offset) for r in recs] == [(r.kind, r.offset) for r in b.records]
    assert encode_records(recs) == data
    cfg = recs[1]
    assert cfg.machine == b"pc-i440fx-7.2"
    assert cfg.offset == 8 and data[8] == 0x07
    start = recs[2]
    assert (start.type_name, start.section_id, start.idstr, start.version_id) == ("START", 2, "ram", 4)
    # ram START header: 1 + 4 + 1 + 3 + 4 + 4 = 17 bytes after the config record
    memsize = recs[3]
    assert isinstance(memsize, RamMemSize) and memsize.offset == start.offset + 17
    assert [b.name for b in memsize.blocks] == ["pc.ram", "pc.rom"]
    assert memsize.total == 18 * PS
    page = next(r for r in recs if isinstance(r, RamPage))
    assert page.block == "pc.ram" and not page.continued and page.data == b"\x01" * PS
    zeros = [r for r in recs if isinstance(r, RamZero)]
    assert [(z.block, z.addr, z.continued) for z in zeros] == [("pc.ram", PS, True), ("pc.rom", 0, False)]


def test_continue_carries_across_sections():
    b = StreamBuilder()
    b.header()
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 4 * PS)]), version_id=4)
    b.section(T.SECTION_PART, "ram", [b.ram_page_record("pc.ram", 0, b"a" * PS), RamEos()])
    # The first page of the next section continues the block of the previous one.
    second = b.ram_page_record("pc.ram", PS, b"b" * PS)
    assert second.flags & RamFlag.CONTINUE
    b.section(T.SECTION_END, "ram", [second, RamEos()])
    b.eof()
    data = b.encode()
    recs = decode(data)
    pages = [r for r in recs if isinstance(r, RamPage)]
    assert [(p.block, p.addr, p.continued) for p in pages] == [("pc.ram", 0, False), ("pc.ram", PS, True)]
    assert encode_records(recs) == data


def test_continue_without_previous_block_is_an_error():
    b = StreamBuilder()
    b.header()
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 4 * PS)]), version_id=4)
    b.eof()
    data = bytearray(b.encode())
    # Replace the final EOF with a PART section holding a CONTINUE page.
    part = bytes([T.SECTION_PART]) + struct.pack(">I", 0) + struct.pack(">QB", RamFlag.ZERO | RamFlag.CONTINUE, 0)
    at = len(data) - 1
    data[at:] = part + struct.pack(">Q", RamFlag.EOS) + b"\x7e" + struct.pack(">I", 0) + b"\x00"
    with pytest.raises(StreamError) as e:
        decode(bytes(data), fast=False)
    assert e.value.offset == at + 5 and "CONTINUE" in str(e.value)
    with pytest.raises(StreamError) as e2:
        decode(bytes(data))
    assert e2.value.offset == at + 5


@pytest.mark.parametrize("fast", [True, False])
def test_zero_runs_compact_and_expand(fast):
    b = StreamBuilder()
    b.header()
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 64 * PS)]), version_id=4)
    recs = [b.ram_page_record("pc.ram", i * PS, zero=True) for i in range(40)]
    recs.append(b.ram_page_record("pc.ram", 41 * PS, b"x" * PS))
    recs += [b.ram_page_record("pc.ram", i * PS, zero=True) for i in range(42, 64)]
    b.section(T.SECTION_PART, "ram", recs + [RamEos()])
    b.eof()
    data = b.encode()
    compact = decode(data, fast=fast)
    expanded = decode(data, fast=fast, compact=False)
    assert encode_records(compact) == data == encode_records(expanded)
    runs = [r for r in compact if isinstance(r, RamZeroRun)]
    if fast:
        assert [(r.addr, r.count) for r in runs] == [(PS, 39), (42 * PS, 22)]
        flat = []
        for r in compact:
            flat.extend(r.expand() if isinstance(r, RamZeroRun) else [r])
        assert [(type(r), r.offset) for r in flat] == [(type(r), r.offset) for r in expanded]
    zeros = [r for r in expanded if isinstance(r, RamZero)]
    assert len(zeros) == 62
    assert zeros[1].offset == zeros[0].offset + 8 + 1 + 6 + 1   # word, name, fill


def test_fast_and_schema_paths_agree_with_small_buffers():
    b = basic(pages=[("pc.ram", i, "page" if i % 3 == 0 else "zero") for i in range(16)]
              + [("pc.rom", 1, "page")])
    data = b.encode()
    ref = decode(data, fast=False, compact=False)
    from qmigstream.codec.source import Source
    for chunk in (7, 100, 4099, 1 << 20):
        got = list(StreamReader(Source(io.BytesIO(data), chunk=chunk), compact=False).records())
        assert [(r.kind, r.offset, r.encode()) for r in got] == \
            [(r.kind, r.offset, r.encode()) for r in ref]


def test_xbzrle_and_compressed_and_bare_records():
    import zlib
    b = StreamBuilder()
    b.header()
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 4 * PS)], multifd_flush=True),
              version_id=4)
    delta = bytes([0x10, 0x02, 0xAA, 0xBB])
    comp = zlib.compress(b"q" * PS)
    recs = [b.ram_page_record("pc.ram", 0, b"z" * PS),
            b.ram_page_record("pc.ram", PS, xbzrle=delta),
            RamCompressed("pc.ram", 2 * PS, comp, RamFlag.COMPRESS_PAGE | RamFlag.CONTINUE),
            RamMultifdFlush(), RamHook(), RamEos()]
    b.section(T.SECTION_PART, "ram", recs)
    b.eof()
    data = b.encode()
    out = decode(data)
    kinds = [r.kind for r in out if r.kind.startswith("ram_")]
    assert kinds == ["ram_mem_size", "ram_multifd_flush", "ram_eos", "ram_page", "ram_xbzrle",
                     "ram_compressed", "ram_multifd_flush", "ram_hook", "ram_eos"]
    x = next(r for r in out if isinstance(r, RamXbzrle))
    assert x.data == delta and x.continued
    c = next(r for r in out if isinstance(r, RamCompressed))
    assert zlib.decompress(c.data) == b"q" * PS
    assert encode_records(out) == data


def test_xbzrle_length_over_a_page_is_rejected_at_its_offset():
    b = StreamBuilder()
    b.header()
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 4 * PS)]), version_id=4)
    b.section(T.SECTION_PART, "ram", [b.ram_page_record("pc.ram", 0, xbzrle=b"\x00\x01\x05"), RamEos()])
    b.eof()
    data = bytearray(b.encode())
    rec = next(r for r in b.records if isinstance(r, RamXbzrle))
    len_at = rec.offset + 8 + 1 + 6 + 1
    data[len_at:len_at + 2] = struct.pack(">H", PS + 1)
    with pytest.raises(StreamError) as e:
        decode(bytes(data))
    assert e.value.offset == len_at and e.value.section == "ram"


def test_page_offset_beyond_block_and_unknown_block_and_flags():
    b = basic(pages=[("pc.rom", 1, "page")])
    data = bytearray(b.encode())
    page = next(r for r in b.records if isinstance(r, RamPage))
    bad = bytearray(data)
    bad[page.offset:page.offset + 8] = struct.pack(">Q", (2 * PS) | RamFlag.PAGE)
    with pytest.raises(StreamError, match="beyond the end of RAM block 'pc.rom'") as e:
        decode(bytes(bad))
    assert e.value.offset == page.offset
    bad = bytearray(data)
    bad[page.offset + 9:page.offset + 15] = b"pc.xxx"
    with pytest.raises(StreamError, match="unknown RAM block 'pc.xxx'") as e:
        decode(bytes(bad))
    assert e.value.offset == page.offset + 8
    bad = bytearray(data)
    bad[page.offset:page.offset + 8] = struct.pack(">Q", PS | RamFlag.PAGE | RamFlag.ZERO)
    with pytest.raises(StreamError, match="unknown combination") as e:
        decode(bytes(bad))
    assert e.value.offset == page.offset


def test_header_errors():
    data = basic().encode()
    with pytest.raises(BadMagic) as e:
        decode(b"QEVX" + data[4:])
    assert e.value.offset == 0
    with pytest.raises(UnsupportedVersion, match="obsolete") as e:
        decode(data[:4] + struct.pack(">I", 2) + data[8:])
    assert e.value.offset == 4
    with pytest.raises(UnsupportedVersion) as e:
        decode(data[:4] + struct.pack(">I", 4) + data[8:])
    assert e.value.found == 4
    with pytest.raises(Truncated):
        decode(b"QEV")
    with pytest.raises(Truncated, match="empty") as e:     # nothing at all: truncation
        decode(b"")
    assert e.value.offset == 0


def test_truncation_everywhere_is_reported_as_truncation():
    data = basic(pages=[("pc.ram", 0, "page"), ("pc.ram", 1, "zero")]).encode()
    for cut in range(1, len(data)):
        if cut in (len(data),):
            continue
        with pytest.raises(StreamError) as e:
            decode(data[:cut])
        if cut >= 4:
            assert isinstance(e.value, Truncated), (cut, e.value)
            assert e.value.offset is not None and e.value.offset <= cut


def test_footer_mismatch_and_missing_footer():
    b = basic()
    data = bytearray(b.encode())
    foot = next(r for r in b.records if isinstance(r, SectionFooter))
    bad = bytearray(data)
    bad[foot.offset + 1:foot.offset + 5] = struct.pack(">I", 99)
    with pytest.raises(StreamError, match="mismatched section id") as e:
        decode(bytes(bad))
    assert e.value.offset == foot.offset + 1 and e.value.expected == 2 and e.value.found == 99


def test_no_footers_and_no_configuration():
    b = basic(footers=False, config=False, pages=[("pc.ram", 2, "page")])
    data = b.encode()
    recs = decode(data)
    assert not any(isinstance(r, SectionFooter) for r in recs)
    dev = next(r for r in recs if isinstance(r, OpaquePayload))
    assert dev.data == b"\x01\x02\x03\x04" and dev.how == "next-header"
    assert encode_records(recs) == data


def test_device_payload_bounded_by_description_and_by_footer():
    desc = (b'{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, '
            b'"vmsd_name": "timer", "version": 2, "fields": [{"name": "a", "type": "int64", '
            b'"size": 8}, {"name": "b", "type": "uint8", "size": 1}]}]}')
    # The payload contains the footer pattern of its own section: only the
    # description finds the true end.
    tricky = b"\x7e\x00\x00\x00\x00\x00\x00\x00\x01"
    b = basic(desc=desc, device_payload=tricky)
    data = b.encode()
    recs = decode(data)
    dev = next(r for r in recs if isinstance(r, OpaquePayload))
    assert dev.data == tricky and dev.how == "description"
    assert isinstance(recs[-1], VmDescription) and recs[-1].obj["page_size"] == 4096
    assert encode_records(recs) == data
    # From a pipe (not seekable) the trailer is found by spooling.
    r, w = __import__("os").pipe()
    import threading
    t = threading.Thread(target=lambda: (__import__("os").write(w, data), __import__("os").close(w)))
    t.start()
    with open(r, "rb", buffering=0) as f:
        piped = list(read_records(f))
    t.join()
    assert [(x.kind, x.offset) for x in piped] == [(x.kind, x.offset) for x in recs]
    # Without the trailer, the footer scan is used.
    plain = basic(device_payload=b"\x00\x01\x02").encode()
    dev = next(r for r in decode(plain) if isinstance(r, OpaquePayload))
    assert dev.how == "footer" and dev.data == b"\x00\x01\x02"


@pytest.mark.parametrize("pad", [0, 60_000, 70_000, 300_000, 2_000_000])
def test_description_ahead_is_found_whatever_its_size(tmp_path, pad):
    """The reader reads the stream's end piece by piece (64 KiB, then 16x more)
    to find the trailer before the device sections; a large JSON is found too."""
    desc = (b'{"page_size": 4096, "pad": "' + b"x" * pad + b'", "devices": [{"name": "timer", '
            b'"instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": [{"name": "a", '
            b'"type": "int64", "size": 8}, {"name": "b", "type": "uint8", "size": 1}]}]}')
    tricky = b"\x7e\x00\x00\x00\x00\x00\x00\x00\x01"
    # Device data full of NUL bytes before the trailer, and big RAM before that.
    data = basic(desc=desc, device_payload=tricky).encode()
    path = tmp_path / "s.mig"
    path.write_bytes(data)
    recs = list(read_records(str(path)))
    dev = next(r for r in recs if isinstance(r, OpaquePayload))
    assert dev.data == tricky and dev.how == "description"
    assert encode_records(recs) == data


def test_trailing_bytes_and_damaged_trailer_round_trip():
    data = basic(desc=b'{"page_size": 4096, "devices": []}').encode()
    recs = decode(data + b"garbage")
    assert isinstance(recs[-1], TrailingBytes) and recs[-1].data == b"garbage"
    assert recs[-1].offset == len(data)
    assert encode_records(recs) == data + b"garbage"
    damaged = bytearray(data)
    damaged[-3] = ord("X")       # JSON no longer parses; bytes still round-trip
    recs = decode(bytes(damaged))
    assert encode_records(recs) == bytes(damaged)


ALL_COMMANDS = [
    (MigCmd.OPEN_RETURN_PATH, {}),
    (MigCmd.PING, {"value": 1}),
    (MigCmd.POSTCOPY_ADVISE, {"host_page_summary": 4096, "target_page_size": 4096}),
    (MigCmd.POSTCOPY_ADVISE, {}),
    (MigCmd.POSTCOPY_RAM_DISCARD, {"version": 0, "block": "pc.ram", "terminator": 0,
                                   "ranges": [{"start": 0, "length": 4096},
                                              {"start": 8192, "length": 12288}]}),
    (MigCmd.ENABLE_COLO, {}),
    (MigCmd.POSTCOPY_RESUME, {}),
    (MigCmd.RECV_BITMAP, {"block": "pc.ram"}),
    (MigCmd.SWITCHOVER_START, {}),
    (MigCmd.POSTCOPY_LISTEN, {}),
    (MigCmd.POSTCOPY_RUN, {}),
]


def test_every_command_round_trips():
    b = StreamBuilder()
    b.header()
    for cmd, args in ALL_COMMANDS:
        b.command(cmd, **args)
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", PS)]), version_id=4)
    b.eof()
    data = b.encode()
    recs = decode(data)
    cmds = [r for r in recs if isinstance(r, Command)]
    assert [(c.cmd, c.args) for c in cmds] == [(c, a) for c, a in ALL_COMMANDS]
    assert encode_records(recs) == data
    ping = cmds[1]
    assert data[ping.offset:ping.offset + 9] == bytes([8, 0, 2, 0, 4, 0, 0, 0, 1])


def test_packaged_nests_a_stream():
    inner = StreamBuilder()
    inner.command(MigCmd.POSTCOPY_LISTEN)
    inner.section(T.SECTION_FULL, "timer", [OpaquePayload(b"\x00" * 8)], version_id=2, section_id=0)
    inner.command(MigCmd.PING, value=3)
    inner.command(MigCmd.POSTCOPY_RUN)
    blob = inner.encode()
    b = StreamBuilder()
    b.header()
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", PS)]), version_id=4, section_id=2)
    b.command(MigCmd.PACKAGED, length=len(blob))
    for r in inner.records:
        r.depth = 1
        b.add(r)
    b.command(MigCmd.PING, value=4)
    b.section(T.SECTION_END, "ram", [RamEos()], section_id=2)
    b.eof()
    data = b.encode()
    recs = decode(data, description={"page_size": 4096, "devices": [
        {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
         "fields": [{"name": "t", "type": "int64", "size": 8}]}]})
    kinds = [(r.kind, r.depth) for r in recs]
    i = kinds.index(("command", 0), 5)
    assert kinds[i + 1:i + 8] == [("command", 1), ("section", 1), ("device_state", 1), ("footer", 1),
                                  ("command", 1), ("command", 1), ("packaged_end", 1)]
    assert encode_records(recs) == data
    # PACKAGED claiming more than the input holds: truncation, not a huge read.
    pk = next(r for r in recs if isinstance(r, Command) and r.cmd == MigCmd.PACKAGED)
    bad = bytearray(data)
    bad[pk.offset + 5:pk.offset + 9] = struct.pack(">I", 0xFFFFFFF0)
    with pytest.raises(Truncated):
        decode(bytes(bad))


def test_packaged_nesting_depth_is_bounded():
    blob = b""
    for _ in range(20):
        blob = bytes([T.COMMAND]) + struct.pack(">HHI", MigCmd.PACKAGED, 4, len(blob)) + blob
    data = struct.pack(">II", 0x5145564D, 3) + blob + b"\x00"
    with pytest.raises(LimitExceeded):
        decode(data)


@pytest.mark.parametrize("cmd,payload", [
    (MigCmd.PING, b"\x00\x00\x01"),
    (MigCmd.OPEN_RETURN_PATH, b"\x00"),
    (MigCmd.RECV_BITMAP, b"\x05ab"),
    (MigCmd.POSTCOPY_RAM_DISCARD, b"\x00\x01a\x00" + b"\x00" * 15),
    (MigCmd.POSTCOPY_ADVISE, b"\x00" * 8),
])
def test_bad_command_lengths(cmd, payload):
    data = struct.pack(">II", 0x5145564D, 3) + bytes([T.COMMAND]) + \
        struct.pack(">HH", cmd, len(payload)) + payload + b"\x00"
    with pytest.raises(StreamError) as e:
        decode(data)
    assert e.value.offset in (8 + 3, 8 + 5)


def test_unknown_command_and_section_type():
    hdr = struct.pack(">II", 0x5145564D, 3)
    with pytest.raises(StreamError, match="invalid command") as e:
        decode(hdr + bytes([T.COMMAND]) + struct.pack(">HH", 12, 0) + b"\x00")
    assert e.value.offset == 9 and e.value.found == 12
    with pytest.raises(StreamError, match="unknown section type") as e:
        decode(hdr + b"\x09")
    assert e.value.offset == 8 and e.value.found == 9
    with pytest.raises(StreamError, match="unknown section id") as e:
        decode(hdr + bytes([T.SECTION_PART]) + struct.pack(">I", 7))
    assert e.value.offset == 9


def test_configuration_subsections():
    b = StreamBuilder()
    b.header()
    b.configuration("pc-q35-9.0", capabilities=["x-ignore-shared", "mapped-ram"],
                    uuid=bytes(range(16)), target_page_bits=12)
    b.eof()
    data = b.encode()
    recs = decode(data, no_lookahead=True)
    cfg = recs[1]
    assert [s.name for s in cfg.subsections] == ["configuration/target-page-bits",
                                                 "configuration/capabilities", "configuration/uuid"]
    assert cfg.capabilities == ["x-ignore-shared", "mapped-ram"]
    assert cfg.subsections[2].value["uuid"] == bytes(range(16))
    assert encode_records(recs) == data
    bad = data.replace(b"configuration/uuid", b"configuration/uuix")
    with pytest.raises(StreamError, match="unknown configuration subsection"):
        decode(bad)


def test_mem_size_extras_ignore_shared_and_postcopy_page_size():
    from qmigstream.codec.ram_records import RamBlockInfo
    b = StreamBuilder()
    b.header()
    b.configuration("pc-i440fx-7.2", capabilities=["x-ignore-shared"])
    b.command(MigCmd.POSTCOPY_ADVISE, host_page_summary=4096 | 0x200000, target_page_size=4096)
    blocks = [RamBlockInfo("pc.ram", 64 * PS, page_size=0x200000, mr_addr=0),
              RamBlockInfo("pc.bios", 4 * PS, mr_addr=0xFFFC0000)]
    b.section(T.SECTION_START, "ram", b.ram_setup_records(blocks), version_id=4)
    b.eof()
    data = b.encode()
    recs = decode(data)
    ms = next(r for r in recs if isinstance(r, RamMemSize))
    assert [(x.name, x.page_size, x.mr_addr) for x in ms.blocks] == \
        [("pc.ram", 0x200000, 0), ("pc.bios", None, 0xFFFC0000)]
    assert encode_records(recs) == data


def test_mem_size_lengths_must_add_up():
    b = StreamBuilder()
    b.header()
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 4 * PS)]), version_id=4)
    b.eof()
    data = bytearray(b.encode())
    ms = next(r for r in b.records if isinstance(r, RamMemSize))
    data[ms.offset:ms.offset + 8] = struct.pack(">Q", 3 * PS | RamFlag.MEM_SIZE)
    with pytest.raises(StreamError, match="exceed MEM_SIZE") as e:
        decode(bytes(data))
    assert e.value.offset == ms.offset + 8


def test_writer_sets_offsets_and_matches_bytes(tmp_path):
    b = basic(pages=[("pc.ram", 1, "page")])
    data = b.encode()
    recs = decode(data)
    with open(tmp_path / "out.mig", "wb") as f:
        w = StreamWriter(f)
        w.write_all(recs)
        w.close()
    assert (tmp_path / "out.mig").read_bytes() == data
    assert [r.offset for r in recs] == [r.offset for r in decode(data)]
