"""``qmigstream check`` on built streams: each problem kind, its offset and its message."""

from __future__ import annotations

import json
import struct

import pytest

from qmigstream.check import check
from qmigstream.cli import main
from qmigstream.errors import BadMagic

PAGE = 4096
MACHINE = b"pc-i440fx-7.2"
DESC = {"page_size": PAGE, "devices": [
    {"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1, "fields": [
        {"name": "a", "type": "uint32", "size": 4},
        {"name": "n", "type": "uint8 equal", "size": 1},
        {"name": "v", "type": "int32 le", "size": 4}]},
    {"name": "0000:00:02.0/pcidev", "instance_id": 0, "vmsd_name": "pcidev", "version": 1,
     "fields": [{"name": "config", "type": "pci config", "size": 256},
                {"name": "irq_state", "type": "pci irq state", "size": 16}],
     "subsections": [{"vmsd_name": "pcidev/sub", "version": 1,
                      "fields": [{"name": "x", "type": "uint8", "size": 1}]}]}]}

#: a PCI config space: vendor 0x8086, device 0x1234, status CAP_LIST, one capability at 0x40
CONFIG = bytearray(256)
CONFIG[0:4] = b"\x86\x80\x34\x12"
CONFIG[6] = 0x10
CONFIG[0x34] = 0x40
CONFIG[0x40:0x42] = b"\x05\x00"


def be32(v):
    return struct.pack(">I", v)


def be64(v):
    return struct.pack(">Q", v)


def cstr(s: bytes):
    return bytes([len(s)]) + s


class Built:
    """A small 7.2-shaped stream; ``at[name]`` is the offset of each part."""

    def __init__(self, machine=MACHINE, block_len=2 * PAGE, ram_version=4, dev=(7, 3, 2),
                 page_word=None, zero_fill=0, xbzrle_len=None, idstr=b"dev", dev_version=1,
                 footer_id=None, config_extra=b"", pci_config=bytes(CONFIG), irq=(0, 0, 0, 0),
                 sub_version=1):
        self.at = {}
        out = bytearray()

        def mark(name):
            self.at[name] = len(out)

        out += b"QEVM" + be32(3)
        mark("config")
        out += b"\x07" + be32(len(machine)) + machine + config_extra
        mark("ram_start")
        out += b"\x01" + be32(1) + cstr(b"ram") + be32(0) + be32(ram_version)
        mark("mem_size")
        out += be64(block_len | 0x04) + cstr(b"pc.ram") + be64(block_len)
        out += be64(0x10)
        out += b"\x7e" + be32(1)
        mark("ram_part")
        out += b"\x02" + be32(1)
        mark("page")
        out += be64(page_word if page_word is not None else 0x08) + cstr(b"pc.ram")
        mark("page_data")
        out += bytes(range(256)) * 16
        mark("zero")
        out += be64(PAGE | 0x22) + bytes([zero_fill])
        if xbzrle_len is not None:
            mark("xbzrle")
            out += be64(PAGE | 0x60) + b"\x01" + struct.pack(">H", xbzrle_len)
            out += b"\x01\x02" + b"\xaa\xbb" if xbzrle_len == 4 else bytes(xbzrle_len)
        mark("ram_eos")
        out += be64(0x10)
        out += b"\x7e" + be32(1)
        mark("ram_end")
        out += b"\x03" + be32(1) + be64(0x10) + b"\x7e" + be32(1)
        mark("dev")
        out += b"\x04" + be32(2) + cstr(idstr) + be32(0) + be32(dev_version)
        mark("dev_payload")
        out += be32(dev[0]) + bytes([dev[1]]) + struct.pack(">i", dev[2])
        mark("dev_footer")
        out += b"\x7e" + be32(2 if footer_id is None else footer_id)
        mark("pci")
        out += b"\x04" + be32(3) + cstr(b"0000:00:02.0/pcidev") + be32(0) + be32(1)
        mark("pci_config")
        out += pci_config
        mark("pci_irq")
        out += b"".join(struct.pack(">i", v) for v in irq)
        mark("pci_sub")
        out += b"\x05" + cstr(b"pcidev/sub") + be32(sub_version) + b"\x09"
        out += b"\x7e" + be32(3)
        mark("eof")
        out += b"\x00"
        mark("trailer")
        js = json.dumps(DESC).encode()
        out += b"\x06" + be32(len(js)) + js
        self.data = bytes(out)


@pytest.fixture
def ref(tmp_path):
    p = tmp_path / "ref.mig"
    p.write_bytes(Built().data)
    return str(p)


def fatal(data, ref, **kw):
    rep = check(data, reference=ref, **kw)
    assert not rep.loads
    f = rep.fatal
    return f.offset, f.message


def test_the_reference_itself_loads(ref):
    rep = check(ref, reference=ref, expect_machine="pc")
    assert rep.loads
    assert [p for p in rep.problems if p.level != "unchecked"] == []


def test_not_a_stream():
    with pytest.raises(BadMagic):
        check(b"")
    with pytest.raises(BadMagic):
        check(b"QEVN\x00\x00\x00\x03")


@pytest.mark.parametrize("version,msg", [
    (2, "SaveVM v2 format is obsolete and don't work anymore"),
    (4, "Unsupported migration stream version (found 4)")])
def test_file_version(ref, version, msg):
    b = Built().data
    assert fatal(b[:4] + be32(version) + b[8:], ref) == (4, msg)


def test_cut_inside_the_header(ref):
    assert fatal(Built().data[:6], ref) == (
        4, "stream ends inside the file header; QEMU: Unsupported migration stream version")


def test_machine_name(ref):
    b = Built(machine=b"pc-i440fx-7.1")
    assert fatal(b.data, ref) == (9, "Machine type received is 'pc-i440fx-7.1' and local "
                                     "is 'pc-i440fx-7.2'")
    assert fatal(Built().data, ref, expect_machine="q35") == (
        9, "Machine type received is 'pc-i440fx-7.2' and local is 'pc-q35-7.2'")


def test_machine_name_compared_over_the_sent_length(ref):
    rep = check(Built(machine=MACHINE + b"\0").data, reference=ref)
    assert rep.loads
    notes = [p for p in rep.problems if p.kind == "machine"]
    assert notes[0].offset == 9 and "strncmp" in notes[0].message


def test_unknown_capability(ref):
    extra = b"\x05" + cstr(b"configuration/capabilities") + be32(1) + be32(1) + cstr(b"nope")
    b = Built(config_extra=extra)
    off = b.at["config"] + 5 + len(MACHINE) + 2 + 26 + 4 + 4
    assert fatal(b.data, ref) == (off, "Received unknown capability nope")


def test_unknown_section(ref):
    b = Built(idstr=b"dez")
    assert fatal(b.data, ref) == (
        b.at["dev"] + 5, "Unknown savevm section or instance 'dez' 0. Make sure that your "
        "current VM setup matches your saved VM setup, including any hotplugged devices")


def test_section_version_too_high(ref):
    b = Built(dev_version=2)
    assert fatal(b.data, ref) == (b.at["dev"] + 13, "savevm: unsupported version 2 for "
                                                    "'dev' v1")
    b = Built(ram_version=5)
    assert fatal(b.data, ref) == (b.at["ram_start"] + 13,
                                  "savevm: unsupported version 5 for 'ram' v4")


def test_ram_version_below_4(ref):
    b = Built(ram_version=3)
    assert fatal(b.data, ref) == (b.at["ram_start"] + 13, "error while loading state for "
                                  "instance 0x0 of device 'ram' (ram_load takes only "
                                  "version 4, not 3)")


def test_footer(ref):
    b = Built(footer_id=9)
    assert fatal(b.data, ref) == (b.at["dev_footer"] + 1, "Mismatched section id in footer "
                                  "for dev - read 0x9 expected 0x2")
    d = bytearray(b.data)
    d[b.at["dev_footer"]] = 0x7F
    assert fatal(bytes(d), ref) == (b.at["dev_footer"], "Missing section footer for dev")


def test_section_type(ref):
    b = Built()
    d = bytearray(b.data)
    d[b.at["dev"]] = 0x09
    assert fatal(bytes(d), ref) == (b.at["dev"], "Unknown savevm section type 9")


def test_part_of_an_unknown_section(ref):
    b = Built()
    d = bytearray(b.data)
    d[b.at["ram_part"] + 1:b.at["ram_part"] + 5] = be32(7)
    assert fatal(bytes(d), ref) == (b.at["ram_part"] + 1, "Unknown savevm section 7")


def test_ram_block_list(ref):
    b = Built(block_len=3 * PAGE)
    assert fatal(b.data, ref) == (b.at["mem_size"] + 15, "Size mismatch: pc.ram: 0x3000 != "
                                  "0x2000: Invalid argument")
    d = bytearray(Built().data)
    at = Built().at["mem_size"] + 9 + 5
    d[at] = ord("x")
    assert fatal(bytes(d), ref) == (at - 6, 'Unknown ramblock "pc.rax", cannot accept '
                                            'migration')


def test_page_records(ref):
    b = Built(page_word=2 * PAGE | 0x08)
    assert fatal(b.data, ref) == (b.at["page"], "Illegal RAM offset 2000 (RAM block 'pc.ram' "
                                  "is 0x2000 bytes)")
    b = Built(page_word=0x408)
    assert fatal(b.data, ref) == (b.at["page"], "Unknown combination of migration flags: "
                                                "0x408")
    b = Built(page_word=0x80)
    off, msg = fatal(b.data, ref)
    assert off == b.at["page"] and msg.startswith(
        "error while loading state section id 1(ram) (RAM_SAVE_FLAG_HOOK")
    b = Built(page_word=0x100)
    assert fatal(b.data, ref, capabilities=[]) == (
        b.at["page"], "Received an unexpected compressed page (the destination does not "
        "have the compress capability)")
    d = bytearray(Built().data)
    at = Built().at["page"] + 9 + 5
    d[at] = ord("x")
    assert fatal(bytes(d), ref) == (at - 6, "Can't find block pc.rax")


def test_continue_without_a_block(ref):
    b = Built(page_word=0x28)
    d = b.data[:b.at["page"]] + be64(0x28) + b.data[b.at["page_data"]:]
    assert fatal(d, ref)[1] == "Ack, bad migration stream! (CONTINUE with no previous RAM " \
                               "block)"


def test_zero_fill_byte_is_a_note(ref):
    b = Built(zero_fill=0x5A)
    rep = check(b.data, reference=ref)
    assert rep.loads
    [p] = [p for p in rep.problems if p.kind == "zero-fill"]
    assert (p.offset, p.level) == (b.at["zero"] + 8, "note")
    assert p.message.startswith("ZERO page with fill byte 0x5a: QEMU 7.2 fills the page")


def test_xbzrle(ref):
    assert check(Built(xbzrle_len=4).data, reference=ref).loads
    b = Built(xbzrle_len=PAGE + 1)
    assert fatal(b.data, ref) == (b.at["xbzrle"] + 9, "Failed to load XBZRLE page - len "
                                  "overflow! (4097 > 4096)")
    b = Built(xbzrle_len=2)             # b"\0\0": a zero run, then 1 byte where 2 must be
    assert fatal(b.data, ref) == (b.at["xbzrle"] + 12, "Failed to load XBZRLE page - decode "
                                  "error! (invalid XBZRLE data: fewer than 2 bytes at the "
                                  "start of a run)")


def test_equal_and_le_fields(ref):
    b = Built(dev=(7, 4, 2))
    assert fatal(b.data, ref) == (b.at["dev_payload"] + 4, "3 != 4 (dev.n, uint8 equal: the "
                                  "destination has 3); QEMU: error while loading state for "
                                  "instance 0x0 of device 'dev'")
    b = Built(dev=(7, 3, 3))
    assert fatal(b.data, ref)[:2] == (b.at["dev_payload"] + 5, "Invalid value 3 expecting "
                                      "positive value <= 2 (dev.v, int32 le: the destination "
                                      "has 2); QEMU: error while loading state for instance "
                                      "0x0 of device 'dev'")
    assert check(Built(dev=(7, 3, 0)).data, reference=ref).loads


def test_equal_fields_without_a_reference_are_unchecked():
    rep = check(Built(dev=(7, 4, 2)).data)
    assert rep.loads
    eq = [p for p in rep.problems if p.kind == "equal"]
    assert [(p.level, p.offset) for p in eq] == [("unchecked", Built().at["dev_payload"] + 4),
                                                 ("unchecked", Built().at["dev_payload"] + 5)]


@pytest.mark.parametrize("part,extra,msg", [
    ("page_data", 100, "error while loading state section id 1(ram) (the stream ends "
                       "inside RAM page: 100 of 4096 bytes)"),
    ("dev_payload", 4, "Failed to load dev:n (the stream ends inside the state of dev: 4 of "
                       "9 bytes)"),
    ("dev_footer", 0, "stream ends before the section footer; QEMU: check_section_footer: "
                      "Read section footer failed: -5"),
    ("eof", 0, "stream ends before QEMU_VM_EOF; QEMU: load of migration failed: "
               "Input/output error"),
])
def test_truncations(ref, part, extra, msg):
    b = Built()
    cut = b.at[part] + extra
    off, got = fatal(b.data[:cut], ref)
    assert got == msg
    assert off == (cut if part == "dev_payload" else b.at[part])


@pytest.mark.parametrize("tail,kind", [
    (lambda d, t: d[:t], "trailer"),                    # no trailer
    (lambda d, t: d[:t + 3], "trailer"),                # cut in its header
    (lambda d, t: d[:t + 40], "trailer"),               # cut in its JSON
    (lambda d, t: d[:t] + b"\x07" + d[t + 1:], "trailer"),
    (lambda d, t: d + b"junk", "trailing-bytes")])
def test_after_eof_qemu_loads(ref, tail, kind):
    b = Built()
    rep = check(tail(b.data, b.at["trailer"]), reference=ref)
    assert rep.loads
    assert [p.offset for p in rep.problems if p.kind == kind] == \
        [b.at["trailer"] if kind == "trailer" else len(b.data)]


def test_cli_exit_codes_and_output(ref, tmp_path, capsys):
    good = tmp_path / "good.mig"
    good.write_bytes(Built().data)
    assert main(["check", str(good), "--reference", ref]) == 0
    assert "would load" in capsys.readouterr().out
    bad = tmp_path / "bad.mig"
    b = Built(footer_id=9)
    bad.write_bytes(b.data)
    assert main(["check", str(bad), "--reference", ref]) == 1
    out = capsys.readouterr().out
    assert f"at offset {b.at['dev_footer'] + 1} (0x{b.at['dev_footer'] + 1:x}) [dev]: fatal: " \
           "Mismatched section id in footer for dev - read 0x9 expected 0x2" in out
    assert main(["check", str(bad), "--reference", ref, "--json"]) == 1
    js = json.loads(capsys.readouterr().out)
    assert js["loads"] is False and js["first_error"]["offset"] == b.at["dev_footer"] + 1
    empty = tmp_path / "empty.mig"
    empty.write_bytes(b"")
    assert main(["check", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a QEMU migration stream" in err


def test_pci_config_read_only_bytes(ref):
    cfg = bytearray(CONFIG)
    cfg[2] ^= 1                                   # device id: cmask 0xff, not writable
    b = Built(pci_config=bytes(cfg))
    off, msg = fatal(b.data, ref)
    assert off == b.at["pci_config"] + 2
    assert msg.startswith("get_pci_config_device: Bad config data: i=0x2 read: 35 device: 34 "
                          "cmask: ff wmask: 0 w1cmask:0")
    cfg = bytearray(CONFIG)
    cfg[0x41] = 0x50                              # the capability's next pointer
    off, msg = fatal(Built(pci_config=bytes(cfg)).data, ref)
    assert msg.startswith("get_pci_config_device: Bad config data: i=0x41 read: 50 device: 0")
    cfg = bytearray(CONFIG)
    cfg[0x3C] = 0x0B                              # interrupt line: writable
    cfg[0x42] = 0x77                              # capability body: masks unknown, not compared
    assert check(Built(pci_config=bytes(cfg)).data, reference=ref).loads


def test_pci_irq_state(ref):
    b = Built(irq=(0, 1, 2, 0))
    assert fatal(b.data, ref) == (b.at["pci_irq"] + 8, "irq state 2: must be 0 or 1.")
    b = Built(irq=(0, 0, 0, -1))
    assert check(b.data).fatal.message == "irq state -1: must be 0 or 1."   # no reference


def test_subsection_version_is_a_uint8(ref):
    b = Built(sub_version=0x0301)                 # QEMU keeps the low byte: 1
    rep = check(b.data, reference=ref)
    assert rep.loads
    [p] = [p for p in rep.problems if p.kind == "version"]
    assert p.offset == b.at["pci_sub"] + 12 and "low byte (1)" in p.message
    b = Built(sub_version=2)
    assert fatal(b.data, ref) == (b.at["pci_sub"] + 12, "pcidev/sub: incoming version_id 2 "
                                  "is too new for local version_id 1")


def test_negative_le_field_fails_without_a_reference():
    b = Built(dev=(7, 3, -1))
    f = check(b.data).fatal
    assert f.offset == b.at["dev_payload"] + 5
    assert f.message.startswith("Invalid value -1 expecting positive value <= the "
                                "destination's own (dev.v, int32 le")


# -- VFIO sections (hw/vfio/migration.c vfio_load_state, 7.2's v1 protocol) ----------------

@pytest.fixture(scope="module")
def vfio_vector(tmp_path_factory):
    """A qemu-7.2 golden vector: a paused pc guest with an emulated VFIO device."""
    from qmigstream.codec.reader import read_records
    d = tmp_path_factory.mktemp("vfio")
    assert main(["golden", "generate", "--profiles", "qemu-7.2", "--scenarios", "paused",
                 str(d)]) == 0
    path = d / "qemu-7.2" / "paused.mig"
    recs = [r for r in read_records(str(path)) if r.kind.startswith("vfio")]
    return str(path), path.read_bytes(), recs


def _vput(data, off, word):
    return data[:off] + be64(word) + data[off + 8:]


def test_vfio_vector_loads(vfio_vector):
    path, data, recs = vfio_vector
    assert check(path, reference=path).loads


def test_vfio_unknown_tag(vfio_vector):
    path, data, recs = vfio_vector
    chunk = next(r for r in recs if r.kind == "vfio_data")
    bad = _vput(data, chunk.offset, 0xFFFFFFFFEF100005)      # INIT_DATA_SENT: 8.1+
    assert fatal(bad, path) == (chunk.offset, "0000:00:10.0: Unknown tag 0xffffffffef100005")


def test_vfio_setup_without_end(vfio_vector):
    path, data, recs = vfio_vector
    setup_end = recs[1]
    assert (recs[0].name, setup_end.name) == ("DEV_SETUP_STATE", "END_OF_STATE")
    bad = _vput(data, setup_end.offset, 0xFFFFFFFFEF100004)
    assert fatal(bad, path) == (setup_end.offset, "0000:00:10.0: SETUP STATE: EOS not found "
                                                  "0xffffffffef100004")


def test_vfio_config_end_flag(vfio_vector):
    path, data, recs = vfio_vector
    cfg = next(r for r in recs if r.kind == "vfio_config")
    end = cfg.offset + cfg.size - 8
    off, msg = fatal(_vput(data, end, 0x1234), path)
    assert off == cfg.offset + 8
    assert msg.startswith("0000:00:10.0: Failed loading device config space, end flag "
                          "incorrect")


def test_vfio_data_cut(vfio_vector):
    path, data, recs = vfio_vector
    chunk = next(r for r in recs if r.kind == "vfio_data")
    off, msg = fatal(data[:chunk.offset + 16 + 1000], path)
    assert off == chunk.offset + 16
    assert msg.startswith("error while loading state section id 3(0000:00:10.0/vfio) (VFIO "
                          "data of 65536 bytes, 1000 left")


def test_vfio_device_the_destination_lacks(vfio_vector):
    path, data, recs = vfio_vector
    name = b"0000:00:10.0/vfio"
    moved = data.replace(bytes([len(name)]) + name, bytes([len(name)]) + b"0000:00:11.0/vfio")
    start = data.index(bytes([len(name)]) + name) - 5
    assert fatal(moved, path) == (start + 5, "Unknown savevm section or instance "
                                  "'0000:00:11.0/vfio' 0. Make sure that your current VM setup "
                                  "matches your saved VM setup, including any hotplugged "
                                  "devices")


def test_empty_idstr(ref):
    b = Built()
    d = b.data[:b.at["dev"] + 5] + b"\x00" + b.data[b.at["dev"] + 6 + 3:]
    assert fatal(d, ref) == (b.at["dev"] + 5, "Unable to read ID string for section 2")


# -- dirty bitmaps and block migration on the real captures (verdicts as QEMU's, see
#    tests/test_check_differential.py) -------------------------------------------------

@pytest.mark.parametrize("capture_name,case,loads,message", [
    ("pc-7.2-dirty-bitmaps", "bitmap-node-name", True, None),
    ("pc-7.2-dirty-bitmaps", "bitmap-extra-flags", True, None),
    ("pc-7.2-dirty-bitmaps", "bitmap-start-flags", False,
     "Unknown flags in migrated dirty bitmap header: 9"),
    ("pc-7.2-dirty-bitmaps", "bitmap-twice", False,
     "Bitmap with the same name ('bm1') already exists on destination"),
    ("pc-7.2-dirty-bitmaps", "bitmap-buffer-size", False,
     "Bitmap migration stream buffer allocation request is too large"),
    ("pc-7.2-block", "block-device-name", False, "Error unknown block device xx"),
    ("pc-7.2-block", "block-flags-extra", True, None),
    ("pc-7.2-block", "block-flags-unknown", False, "Unknown block migration flags: 0x20"),
])
def test_capture_mutations(capture, capture_name, case, loads, message):
    from qmigstream.mutate import capture_mutations
    path, _ = capture(capture_name)
    data = path.read_bytes()
    m = next(m for m in capture_mutations(capture_name, data) if m.name == case)
    rep = check(m.data, reference=str(path))
    assert rep.loads is loads
    if message:
        assert rep.fatal.message == message


def test_unusable_reference(tmp_path, capsys):
    good = tmp_path / "good.mig"
    good.write_bytes(Built().data)
    bad = tmp_path / "bad.mig"
    bad.write_bytes(b"QEVN")
    assert main(["check", str(good), "--reference", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the reference {bad} is not a usable stream" in err


LOADED_BY_QEMU_72 = ["q35-7.2-devices", "pc-7.2-postcopy", "pc-7.2-devices", "pc-7.2-paused"]


@pytest.mark.parametrize("name", LOADED_BY_QEMU_72)
def test_captures_qemu_loads_check_as_loadable_without_a_reference(name, capture):
    """Captures QEMU 7.2 loads (tests/test_qemu_live.py) pass without --reference too:
    the destination is then assumed from the stream's own description, where an
    old-style section (slirp: no vmsd, described by name and size only) counts as
    present with an unknown version; a postcopy stream has no description at all."""
    from conftest import capture_names
    if name not in capture_names():
        pytest.skip(f"{name} not committed")
    path, _ = capture(name)
    r = check(str(path))
    assert r.loads, [p.message for p in r.problems if p.level == "fatal"]


@pytest.mark.parametrize("name", ["pc-7.2-devices", "q35-7.2-devices", "pc-11.1-devices"])
def test_a_trailer_cut_short_still_loads(name, capture, tmp_path, capsys):
    """QEMU stops reading at QEMU_VM_EOF: a VMDESCRIPTION cut anywhere (inside its
    length, or inside its JSON) loads, with or without a reference, although the
    device sections must then be bounded without the description (by their
    footers).  ``info`` says the trailer is cut short rather than absent."""
    from qmigstream.codec.reader import read_records
    path, _ = capture(name)
    data = path.read_bytes()
    trailer = next(r for r in read_records(str(path)) if r.kind == "vmdescription")
    t = trailer.offset
    profile = "qemu-11.1" if "11.1" in name else "qemu-7.2"
    for cut in (t + 1, t + 3, t + 5, t + 6, t + 200, len(data) - 1):
        p = tmp_path / f"cut-{cut}.mig"
        p.write_bytes(data[:cut])
        for ref in (None, str(path)):
            rep = check(str(p), profile_name=profile, reference=ref)
            assert rep.loads, (cut, ref, rep.fatal and rep.fatal.message)
    assert main(["info", str(tmp_path / f"cut-{t + 200}.mig")]) == 0
    out = capsys.readouterr().out
    assert f"VMDESCRIPTION at {t} cut short: 195 of" in out


def test_a_machine_type_no_release_has_fails_without_a_reference(capture, tmp_path):
    """Without a reference the destination's machine type is unknown, but it is one
    of the release's: a name no machine type of the release starts with (compared
    over the bytes sent, strncmp) cannot load whatever the destination runs."""
    path, _ = capture("pc-7.2-paused")
    data = path.read_bytes()
    name = b"pc-i440fx-7.2"
    at = data.index(name)
    assert data[at - 4:at] == len(name).to_bytes(4, "big")

    def named(new):
        return data[:at - 4] + len(new).to_bytes(4, "big") + new + data[at + len(name):]
    for new, loads in ((name, True), (b"pc-i440fx-7.9", False), (b"pc-i440fx-8.0", False),
                       (b"pX-i440fx-7.2", False), (b"pc-i440fx-7", True), (b"pc-q35-7.1", True),
                       (b"isapc", True), (b"pc-i440fx-7.2\0junk", True)):
        rep = check(named(new), profile_name="qemu-7.2")
        assert rep.loads == loads, (new, rep.fatal and rep.fatal.message)
        if not loads:
            assert rep.fatal.offset == at - 4 and "no x86 machine type of QEMU 7.2" in \
                rep.fatal.message
    # with 11.1's profile an 11.1 machine type is one
    rep = check(named(b"pc-i440fx-11.1"), profile_name="qemu-11.1")
    assert not rep.fatal or "no x86 machine type" not in rep.fatal.message


def _ahci_ports(path, capsys):
    """The ``ahci port`` structs of a capture's decoded tree (JSON), in order."""
    assert main(["decode", "--json", str(path)]) == 0
    tree = json.loads(capsys.readouterr().out)
    ports = []

    def find(n):
        if isinstance(n, dict):
            if n.get("vmsd_name") == "ahci port":
                ports.append(n)
                return
            for v in n.values():
                find(v)
        elif isinstance(n, list):
            for v in n:
                find(v)
    find(tree)
    return ports


def test_ahci_post_load(capture, capsys):
    """ahci_state_post_load's checks that need no guest memory, on ich9-ahci of a
    q35 capture; each case's outcome is QEMU 7.2's (the same mutations of a q35
    7.2 capture loaded with -incoming: EPERM for every one but busy_slot 5)."""
    path, _ = capture("q35-7.2-devices")
    data = path.read_bytes()
    ports = _ahci_ports(path, capsys)
    assert len(ports) == 6

    def field(node, name):
        return next(f for f in node["fields"] if f["name"] == name)
    p0 = ports[0]
    ncq = field(p0, "ncq_tfs")["value"]
    slot = (ncq if isinstance(ncq, list) else [ncq])[3]
    cmd = field(p0, "port_regs.cmd")

    def put(*changes):
        out = bytearray(data)
        for off, b in changes:
            out[off:off + len(b)] = b
        return bytes(out)
    used, halt = field(slot, "used")["offset"], field(slot, "halt")["offset"]
    busy = field(p0, "busy_slot")["offset"]
    cases = [
        (put((used, b"\x01")), halt, "NCQ slot 3: used (1) and halt (0) differ"),
        (put((used, b"\x02"), (halt, b"\x00")), halt, "used (2) and halt (0) differ"),
        (put((used, b"\x01"), (halt, b"\x01")), field(slot, "cmd")["offset"],
         "halted with command 0x0, not an NCQ command"),
        (put((cmd["offset"], struct.pack(">I", cmd["value"] | 1 << 15))), cmd["offset"],
         "AHCI: DMA engine should be off"),
        (put((cmd["offset"], struct.pack(">I", cmd["value"] | 1 << 14))), cmd["offset"],
         "AHCI: FIS RX engine should be off"),
        (put((busy, struct.pack(">i", 40))), busy, "busy_slot 40 is neither -1 nor"),
        (put((busy, struct.pack(">i", 5))), None, None),
        (data, None, None),
    ]
    for case, (mutated, at, message) in enumerate(cases):
        for ref in (None, str(path)):
            rep = check(mutated, profile_name="qemu-7.2", reference=ref)
            if message is None:
                assert rep.loads, (case, rep.fatal and rep.fatal.message)
                continue
            assert not rep.loads and message in rep.fatal.message, (case, rep.fatal)
            assert rep.fatal.offset == at
            assert "Operation not permitted" in rep.fatal.message
