"""``qmigstream diff``: built streams for each area, committed captures, fresh QEMU runs."""

from __future__ import annotations

import json
import struct

import pytest

from qmigstream import diff as D
from qmigstream.cli import main
from qmigstream.codec.build import StreamBuilder
from qmigstream.codec.ram_records import RamEos
from qmigstream.codec.reader import read_records
from qmigstream.codec.records import OpaquePayload
from qmigstream.codec.sections.device import DeviceState
from qmigstream.wire.header import SectionType as T

from conftest import requires_qemu
from test_guestmem import PS, _records, page

DEV = {"name": "0000:00:02.0/e1000", "instance_id": 0, "vmsd_name": "e1000", "version": 2,
       "fields": [{"name": "rxbuf_size", "type": "uint32", "size": 4},
                  {"name": "mac_reg", "type": "uint32", "size": 4, "array_len": 16},
                  {"name": "eeprom", "type": "buffer", "size": 8},
                  {"name": "unused", "type": "unused_buffer", "size": 2},
                  {"name": "unused", "type": "unused_buffer", "size": 2}],
       "subsections": [{"vmsd_name": "e1000/full_mac_state", "version": 1,
                        "fields": [{"name": "tx_tcp", "type": "uint8", "size": 1}]}]}
DEV_SIZE = 4 + 64 + 8 + 2 + 2 + (1 + 1 + len("e1000/full_mac_state") + 4) + 1


def dev_payload(rxbuf=2048, mac=tuple(range(16)), eeprom=b"EEPROM!!", tcp=1):
    sub = b"\x05" + bytes([len("e1000/full_mac_state")]) + b"e1000/full_mac_state" + \
        struct.pack(">I", 1)
    return (struct.pack(">I", rxbuf) + struct.pack(">16I", *mac) + eeprom + bytes(4) + sub +
            bytes([tcp]))


def build(*, machine="pc-i440fx-7.2", caps=None, dev=None, opaque=b"\x01\x02\x03\x04",
          pages=(), blocks=(("pc.ram", 16 * PS), ("pc.bios", 2 * PS)), extra_section=False,
          ram_version=4, swap=False, trailer=True):
    b = StreamBuilder()
    b.header()
    b.configuration(machine, capabilities=caps)
    b.section(T.SECTION_START, "ram", b.ram_setup_records(list(blocks)), version_id=ram_version,
              section_id=0)
    b.section(T.SECTION_PART, "ram", _records(b, list(pages)) + [RamEos()], section_id=0)
    b.section(T.SECTION_END, "ram", [RamEos()], section_id=0)
    devs = [("timer", OpaquePayload(opaque), 2, 1),
            (DEV["name"], OpaquePayload(dev if dev is not None else dev_payload()), 2, 2)]
    if swap:
        devs.reverse()
    for idstr, payload, ver, sid in devs:
        b.section(T.SECTION_FULL, idstr, [payload], version_id=ver, section_id=sid)
    if extra_section:
        b.section(T.SECTION_FULL, "port92", [OpaquePayload(b"\x00")], section_id=3)
    b.eof()
    if trailer:
        b.vmdescription(json.dumps({"page_size": PS, "devices": [DEV]}).encode())
    return b


def write(tmp_path, b, name):
    p = tmp_path / name
    p.write_bytes(b.encode())
    return str(p)


def pair(tmp_path, a_kw=None, b_kw=None, **opts):
    a = write(tmp_path, build(**(a_kw or {})), "a.mig")
    b = write(tmp_path, build(**(b_kw or {})), "b.mig")
    return D.diff(a, b, **opts)


def test_built_device_is_decoded_through_the_description(tmp_path):
    p = write(tmp_path, build(), "a.mig")
    recs = [r for r in read_records(p) if isinstance(r, DeviceState)]
    assert [r.section for r in recs] == [DEV["name"]]
    assert recs[0].size == DEV_SIZE


def test_equal_streams(tmp_path):
    r = pair(tmp_path, {"pages": [("pc.ram", 1, "page", page(1))]},
             {"pages": [("pc.ram", 1, "page", page(1))]})
    assert r.equal and r.differences == []
    assert r.compared["devices_decoded"] == 1 and r.compared["devices_opaque"] == 1
    assert r.compared["fields"] == 1 + 16 + 1 + 2 + 1
    assert r.compared["ram_blocks"] == 2 and r.compared["ram_pages"] == 18
    assert r.to_json()["equal"] is True
    assert r.format_text().splitlines()[-1].startswith("equal: no differences (")


def test_one_field_changed_is_reported_exactly(tmp_path):
    mac = list(range(16))
    mac[12] = 0xDEADBEEF
    a = build()
    p_a = write(tmp_path, a, "a.mig")
    r = D.diff(p_a, write(tmp_path, build(dev=dev_payload(mac=mac)), "b.mig"))
    assert len(r.differences) == 1
    d = r.differences[0]
    payload_off = next(x.offset for x in read_records(p_a) if isinstance(x, DeviceState))
    assert (d.area, d.path, d.kind, d.a, d.b) == ("device", "0000:00:02.0/e1000/mac_reg[12]",
                                                "changed", 12, 0xDEADBEEF)
    assert d.offset_a == d.offset_b == payload_off + 4 + 12 * 4
    assert d.text() == ("0000:00:02.0/e1000/mac_reg[12]: 0xc -> 0xdeadbeef  "
                        f"(A @0x{d.offset_a:x}, B @0x{d.offset_b:x})")


def test_buffer_and_subsection_fields(tmp_path):
    r = pair(tmp_path, b_kw={"dev": dev_payload(eeprom=b"EEPROM?!", tcp=0)})
    got = {d.path: d for d in r.differences}
    assert sorted(got) == ["0000:00:02.0/e1000/e1000/full_mac_state/tx_tcp",
                           "0000:00:02.0/e1000/eeprom"]
    assert got["0000:00:02.0/e1000/eeprom"].detail == {"type": "buffer", "first_difference": 6}
    assert got["0000:00:02.0/e1000/eeprom"].to_json()["a"] == b"EEPROM!!".hex()
    assert (got["0000:00:02.0/e1000/e1000/full_mac_state/tx_tcp"].a,
            got["0000:00:02.0/e1000/e1000/full_mac_state/tx_tcp"].b) == (1, 0)


def test_opaque_section_compared_by_bytes(tmp_path):
    a = build()
    p_a = write(tmp_path, a, "a.mig")
    r = D.diff(p_a, write(tmp_path, build(opaque=b"\x01\x02\x09\x04"), "b.mig"))
    assert len(r.differences) == 1
    d = r.differences[0]
    timer = next(x for x in read_records(p_a) if isinstance(x, OpaquePayload)
                 and x.section == "timer")
    assert (d.area, d.path, d.kind) == ("device", "timer", "bytes")
    assert d.detail["first_difference"] == 2
    assert d.offset_a == timer.offset + 2
    assert "not described" in d.detail["why"]


def test_stream_without_trailer_is_decoded_through_the_other_description(tmp_path):
    mac = list(range(16))
    mac[1] = 7
    r = pair(tmp_path, b_kw={"trailer": False, "dev": dev_payload(mac=mac)})
    assert [(d.path, d.a, d.b) for d in r.differences] == [("0000:00:02.0/e1000/mac_reg[1]", 1, 7)]
    assert r.notes == ["1 device section B decoded through the other stream's description "
                       "(the stream has no VMDESCRIPTION trailer): 0000:00:02.0/e1000",
                       "1 equal device section compared as bytes only (not described in "
                       "the VMDESCRIPTION trailer): timer"]


def test_configuration_and_sections(tmp_path):
    r = pair(tmp_path, {"caps": ["xbzrle", "events"]},
             {"machine": "pc-i440fx-8.0", "caps": ["events", "compress"], "extra_section": True,
              "ram_version": 5})
    got = [(d.area, d.path, d.kind, d.a, d.b) for d in r.differences]
    assert ("configuration", "machine", "changed", "pc-i440fx-7.2", "pc-i440fx-8.0") in got
    assert ("configuration", "capabilities/xbzrle", "only_in_a", None, None) in got
    assert ("configuration", "capabilities/compress", "only_in_b", None, None) in got
    assert ("sections", "ram/version_id", "changed", 4, 5) in got
    assert ("sections", "port92", "only_in_b", None, "v1 FULL") in got
    assert len(got) == 5


def test_capabilities_subsection_in_one_stream_only(tmp_path):
    r = pair(tmp_path, b_kw={"caps": ["events"]})
    assert [(d.path, d.kind) for d in r.differences] == [("capabilities/events", "only_in_b")]


def test_section_order(tmp_path):
    r = pair(tmp_path, b_kw={"swap": True})
    kinds = [(d.path, d.kind) for d in r.differences]
    assert ("order", "order") in kinds
    order = next(d for d in r.differences if d.kind == "order")
    assert order.detail["a"] == "timer" and order.detail["b"] == DEV["name"]


def test_iterative_section_payloads_by_length_and_hash(tmp_path):
    def one(end_payload, name):
        b = StreamBuilder()
        b.header()
        b.configuration("pc-i440fx-7.2")
        b.section(T.SECTION_START, "foo", [OpaquePayload(b"abc")], section_id=4)
        b.section(T.SECTION_END, "foo", [OpaquePayload(end_payload)], section_id=4)
        b.eof()
        return write(tmp_path, b, name)
    a, same, other = one(b"def", "a.mig"), one(b"def", "s.mig"), one(b"deg", "b.mig")
    assert D.diff(a, same).equal
    r = D.diff(a, other)
    end = next(x for x in read_records(a) if isinstance(x, OpaquePayload) and x.data == b"def")
    assert [(d.area, d.path, d.kind, d.offset_a) for d in r.differences] == \
        [("device", "foo", "record", end.offset + 2)]
    assert r.differences[0].detail == {
        "record": 1, "records_a": 2, "records_b": 2, "section_type_a": "END",
        "section_type_b": "END", "length_a": 3, "length_b": 3, "first_difference": 2}
    assert r.differences[0].text() == (
        f"foo: payload record 1 (END, payload, 3 vs 3 bytes) differs at byte 2  "
        f"(A @0x{end.offset + 2:x}, B @0x{end.offset + 2:x})")


def test_vfio_sections_record_by_record(tmp_path):
    from qmigstream.vfio.builder import DeviceWriter
    from qmigstream.wire.vfio import PciConfigState

    def one(stop, cfg, name):
        b = StreamBuilder()
        b.header()
        b.configuration("pc-i440fx-8.2")
        w = DeviceWriter("8.1-9.x", "0000:00:05.0/vfio", config=PciConfigState(
            bytes([cfg]) + bytes(255)))
        b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 4 * PS)]),
                  version_id=4, section_id=0)
        b.section(*w.start(), section_id=1)
        b.section(*w.part(b"precopy"), section_id=1)
        b.section(T.SECTION_END, "ram", [RamEos()], section_id=0)
        b.section(*w.end([b"stop", stop]), section_id=1)
        b.section(*w.full(), section_id=1)
        b.eof()
        return write(tmp_path, b, name)
    a = one(b"copy", 1, "a.mig")
    assert D.diff(a, one(b"copy", 1, "same.mig")).equal
    r = D.diff(a, one(b"cop!", 1, "b.mig"))
    assert [(d.path, d.kind, d.a, d.detail["section_type_a"], d.detail["first_difference"])
            for d in r.differences] == [("0000:00:05.0/vfio", "record", "vfio_data", "END", 19)]
    r = D.diff(a, one(b"copy", 2, "c.mig"))
    assert [(d.a, d.detail["section_type_a"]) for d in r.differences] == \
        [("vfio_config", "FULL")]


def test_missing_configuration_reads_none(tmp_path):
    r = pair(tmp_path, b_kw={"machine": "pc-q35-7.2"})
    assert [d.text() for d in r.differences] == ["machine: pc-i440fx-7.2 -> pc-q35-7.2"]
    d = D.Difference("configuration", "machine", "changed", "pc-i440fx-7.2", None)
    assert d.text() == "machine: pc-i440fx-7.2 -> none"


def test_ram_pages_blocks_and_lengths(tmp_path):
    a_pages = [("pc.ram", i, "page", page(i)) for i in (1, 2, 3, 9)]
    b_pages = [("pc.ram", 1, "page", page(1)), ("pc.ram", 2, "page", page(99)),
               ("pc.ram", 3, "page", page(98)), ("pc.ram", 9, "page", page(9)),
               ("pc.ram", 12, "fill", 7)]
    r = pair(tmp_path, {"pages": a_pages},
             {"pages": b_pages, "blocks": (("pc.ram", 16 * PS), ("pc.bios", 4 * PS),
                                           ("/rom@etc/acpi/tables", PS))})
    got = {d.path: d for d in r.differences}
    assert sorted(got) == ["/rom@etc/acpi/tables", "pc.bios/used_length", "pc.ram"]
    assert got["pc.ram"].detail == {"pages": 3, "page_size": PS,
                                    "ranges": [(2 * PS, 4 * PS), (12 * PS, 13 * PS)]}
    assert got["pc.ram"].text() == "pc.ram: 3 pages differ (12 KiB): 0x2000-0x4000, 0xc000-0xd000"
    assert (got["pc.bios/used_length"].a, got["pc.bios/used_length"].b) == (2 * PS, 4 * PS)
    assert got["/rom@etc/acpi/tables"].kind == "only_in_b"
    r = pair(tmp_path, {"pages": a_pages}, {"pages": b_pages}, ignore_ram=True)
    assert r.equal and r.compared["ram_blocks"] is None


def test_page_differences_over_large_sparse_blocks(tmp_path):
    """Compare chunk by chunk: a difference in the last page of a 64 MiB block,
    and an equal data page far from it, no whole block held."""
    n = (64 << 20) // PS
    same = [("pc.ram", 5000, "page", page(5))]
    r = pair(tmp_path, {"pages": same, "blocks": (("pc.ram", n * PS),)},
             {"pages": same + [("pc.ram", n - 1, "page", page(6))],
              "blocks": (("pc.ram", n * PS),)})
    assert [(d.path, d.detail["ranges"]) for d in r.differences] == \
        [("pc.ram", [((n - 1) * PS, n * PS)])]


def test_ignore_patterns(tmp_path):
    mac = list(range(16))
    mac[3] = 0
    r = pair(tmp_path, b_kw={"dev": dev_payload(mac=mac), "opaque": b"\x00" * 4},
             ignore=["*/mac_reg[[]*", "timer"])
    assert r.equal


def test_cli_exit_codes_and_json(tmp_path, capsys):
    a = write(tmp_path, build(), "a.mig")
    b = write(tmp_path, build(dev=dev_payload(rxbuf=4096)), "b.mig")
    assert main(["diff", a, a]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("equal: no differences")
    assert main(["diff", a, b, "--json"]) == 1
    j = json.loads(capsys.readouterr().out)
    assert j["equal"] is False and j["counts"] == {"device": 1}
    assert j["differences"] == [{"area": "device", "path": "0000:00:02.0/e1000/rxbuf_size",
                                 "kind": "changed", "a": 2048, "b": 4096,
                                 "offset_a": j["differences"][0]["offset_a"],
                                 "offset_b": j["differences"][0]["offset_b"],
                                 "detail": {"type": "uint32"}}]
    assert main(["diff", a, b]) == 1
    text = capsys.readouterr().out
    assert "device state:\n  0000:00:02.0/e1000/rxbuf_size: 0x800 -> 0x1000" in text
    cut = tmp_path / "cut.mig"
    cut.write_bytes(open(a, "rb").read()[:100])
    assert main(["diff", a, str(cut)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("qmigstream diff: error: at offset")


# -- committed captures ---------------------------------------------------------------------

def test_capture_against_itself_is_equal(capture):
    path, _ = capture("pc-7.2-devices")
    r = D.diff(str(path), str(path))
    assert r.equal
    assert r.compared["devices_decoded"] > 20 and r.compared["fields"] > 1000


def test_capture_with_one_patched_field(capture, tmp_path):
    """Patch the low byte of cpu/env.regs[3] at its decoded offset: exactly that field."""
    path, _ = capture("pc-7.2-paused")
    cpu = next(r for r in read_records(str(path)) if isinstance(r, DeviceState)
               and r.section == "cpu")
    f = cpu.tree.field("env.regs")
    off = f.element_offset(3) + 7
    data = bytearray(path.read_bytes())
    data[off] ^= 0x01
    patched = tmp_path / "patched.mig"
    patched.write_bytes(data)
    r = D.diff(str(path), str(patched))
    assert [(d.area, d.path, d.kind, d.a ^ d.b, d.offset_a) for d in r.differences] == \
        [("device", "cpu/env.regs[3]", "changed", 1, f.element_offset(3))]


def test_paused_and_loader_captures_differ_in_the_loaded_pages(capture, tmp_path):
    from qmigstream import guestmem
    import numpy as np
    pa, _ = capture("pc-7.2-paused")
    pb, meta = capture("pc-7.2-loader")
    r = D.diff(str(pa), str(pb))
    assert [d.path for d in r.differences] == ["pc.ram"]
    out = tmp_path / "b"
    guestmem.extract(str(pb), str(out))
    ram = np.fromfile(out / "pc.ram.img", dtype=np.uint8).reshape(-1, PS)
    nz = np.flatnonzero(ram.any(axis=1))
    base = meta["loader"]["addr"] // PS
    assert set(nz.tolist()) <= set(range(base, base + meta["loader"]["pages"]))
    pages = {p for s, e in r.differences[0].detail["ranges"] for p in range(s // PS, e // PS)}
    assert pages == set(nz.tolist())


# -- fresh QEMU runs ---------------------------------------------------------------------------

@requires_qemu
@pytest.mark.qemu
def test_two_runs_differ_exactly_in_the_changed_pages(tmp_path):
    from _qemu_capture import capture, seeded_blob
    blob = bytearray(seeded_blob(tmp_path / "blob", 64 * PS, 21))
    changed = [0, 5, 6, 7, 40, 63]
    other = bytearray(blob)
    for k in changed:
        other[k * PS + 100] ^= 0xFF
    addr = 0x300000
    pa, _, _ = capture(tmp_path, "a", 32, [(addr, bytes(blob))])
    pb, _, _ = capture(tmp_path, "b", 32, [(addr, bytes(other))])
    r = D.diff(pa, pb)
    assert [(d.area, d.path, d.kind) for d in r.differences] == [("ram", "pc.ram", "pages")]
    assert r.differences[0].detail["ranges"] == [
        (addr, addr + PS), (addr + 5 * PS, addr + 8 * PS), (addr + 40 * PS, addr + 41 * PS),
        (addr + 63 * PS, addr + 64 * PS)]
    assert r.differences[0].detail["pages"] == len(changed)
    assert D.diff(pa, pa).equal
    rc = main(["diff", pa, pb, "--ignore-ram"])
    assert rc == 0


def test_multifd_channels_in_diff(capture, tmp_path, capsys):
    from conftest import unpack_channels
    mf, meta = capture("pc-7.2-multifd")
    loader, _ = capture("pc-7.2-loader")
    chans = unpack_channels(meta, tmp_path)
    # Without its channels the multifd stream lacks the loaded pages.
    r = D.diff(str(loader), str(mf))
    pages = [d for d in r.differences if d.area == "ram"]
    assert pages and pages[0].path == "pc.ram"
    with_ch = D.diff(str(loader), str(mf), channels_b=chans)
    assert [d for d in with_ch.differences if d.area == "ram"] == []
    assert main(["diff", str(loader), str(mf), "--json"] +
                [x for c in chans for x in ("--multifd-b", c)]) == 0
    j = json.loads(capsys.readouterr().out)
    # 7.2 sends no capability in the configuration for multifd: nothing differs.
    assert j["equal"] and j["compared"]["ram_blocks"] == 6 and with_ch.equal


def test_until_iteration_compares_memory_at_that_point(tmp_path):
    from test_guestmem import stream as ram_stream
    a = ram_stream([("pc.ram", 4 * PS)], [[("pc.ram", 0, "page", page(1))],
                                          [("pc.ram", 1, "page", page(2))]])
    b = ram_stream([("pc.ram", 4 * PS)], [[("pc.ram", 0, "page", page(1))],
                                          [("pc.ram", 1, "page", page(3))]])
    pa, pb = write(tmp_path, a, "a.mig"), write(tmp_path, b, "b.mig")
    assert D.diff(pa, pb, until_iteration=1).equal
    r = D.diff(pa, pb, until_iteration=2)
    assert [(d.path, d.detail["ranges"]) for d in r.differences] == [("pc.ram", [(PS, 2 * PS)])]
    assert main(["diff", pa, pb, "--until-iteration", "1"]) == 0


def test_one_array_whatever_the_description_shape():
    """array_len, index, repeated entries without either (QEMU 11's arrays of
    structs) and NULL-pointer segments all flatten to one numbered array."""
    from qmigstream.vmstate.decode import decode
    entry = {
        "name": "d", "instance_id": 0, "vmsd_name": "d", "version": 1, "fields": [
            {"name": "a", "array_len": 2, "type": "uint8", "size": 1},
            {"name": "b", "index": 0, "type": "uint8", "size": 1},
            {"name": "b", "index": 1, "type": "uint8", "size": 1},
            {"name": "c", "type": "uint8", "size": 1},
            {"name": "c", "type": "uint8", "size": 1},
            {"name": "p", "array_len": 2, "type": "uint8", "size": 1},
            {"name": "p", "type": "nullptr", "size": 1},
            {"name": "p", "type": "uint8", "size": 1},
            {"name": "s", "type": "uint8", "size": 1}]}
    tree = decode(entry, bytes([1, 2, 3, 4, 5, 6, 7, 8, 0x30, 9, 10]))
    flat = {k: v[0] for k, v in D.flatten(tree, "d").items()}
    assert flat == {"d/a[0]": 1, "d/a[1]": 2, "d/b[0]": 3, "d/b[1]": 4, "d/c[0]": 5,
                    "d/c[1]": 6, "d/p[0]": 7, "d/p[1]": 8, "d/p[2]": flat["d/p[2]"],
                    "d/p[3]": 9, "d/s": 10}


def test_releases_compare_by_element(capture):
    """10.0 writes ide's bmdma as one array_len entry, 11.1 as two entries of the
    same name: the diff sees the same fields, and only what really changed."""
    from conftest import capture_names
    if not {"pc-10.0-paused", "pc-11.1-paused"} <= set(capture_names()):
        pytest.skip("10.0/11.1 captures not committed")
    a, _ = capture("pc-10.0-paused")
    b, _ = capture("pc-11.1-paused")
    r = D.diff(str(a), str(b))
    paths = [d.path for d in r.differences if d.area == "device"]
    assert paths and not any("/ide/" in p for p in paths)
    assert all("cpuhp" in p for p in paths)          # 11.1's new piix4_pm subsection
    conf = [d for d in r.differences if d.area == "configuration"]
    assert [(d.a, d.b) for d in conf] == [("pc-i440fx-10.0", "pc-i440fx-11.1")]


@pytest.mark.parametrize("release", ["7.2", "11.1"])
def test_postcopy_stream_equals_the_paused_one(release, capture):
    """The postcopy capture has no trailer: its device sections (inside PACKAGED) are
    decoded through the paused capture's description, and device state and final RAM
    are those of the paused capture of the same machine; only the commands differ."""
    from conftest import capture_names
    a_name, b_name = f"pc-{release}-paused", f"pc-{release}-postcopy"
    if not {a_name, b_name} <= set(capture_names()):
        pytest.skip("captures not committed")
    a, _ = capture(a_name)
    b, _ = capture(b_name)
    r = D.diff(str(a), str(b))
    assert [(d.area, d.path) for d in r.differences] == [("sections", "commands")]
    assert r.compared["devices_decoded"] >= 25 and r.compared["devices_opaque"] == 0
    assert any("decoded through the other stream's description" in n for n in r.notes)
