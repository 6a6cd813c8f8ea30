"""Mutations of real streams, located with the decoder (record offsets, never guesses).

:func:`index` decodes a stream once and keeps the offsets of the records a
mutation needs; :func:`mutations` turns one capture into a list of
:class:`Mutation` (a name, a sentence saying what was changed at which
offset, and the mutated bytes).  ``tools/differential`` loads each into QEMU
and compares QEMU's verdict with ``qmigstream check``'s.
"""

from __future__ import annotations

import dataclasses
import re
import struct

from .codec.reader import read_records

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


@dataclasses.dataclass
class Mutation:
    name: str
    capture: str
    what: str
    data: bytes
    #: destination capabilities for this case (None: the capture's own)
    capabilities: dict | None = None


class Index:
    """Offsets of the records of one stream."""

    def __init__(self, data: bytes):
        self.data = data
        self.config = None            # Configuration record
        self.sections = []            # FULL/START SectionHeader records
        self.footers = []
        self.mem_size = None
        self.pages = []               # RamPage records
        self.zero = []                # RamZero / RamZeroRun records
        self.xbzrle = []
        self.states = {}              # idstr -> DeviceState record
        self.payloads = []            # device payload records (DeviceState/OpaquePayload)
        self.eof = None
        self.trailer = None
        self.commands = []
        self.compressed = []
        self.blocks = []
        self.bitmaps = []
        self.block_entries = []       # RamBlockEntry records (mapped-ram)
        section = None
        for rec in read_records(data, compact=False):
            k = rec.kind
            if k == "configuration":
                self.config = rec
            elif k == "section":
                if rec.full:
                    self.sections.append(rec)
                    section = rec
            elif k == "footer":
                self.footers.append(rec)
            elif k == "ram_mem_size" and self.mem_size is None:
                self.mem_size = rec
            elif k == "ram_page":
                self.pages.append(rec)
            elif k == "ram_zero":
                self.zero.append(rec)
            elif k == "ram_xbzrle":
                self.xbzrle.append(rec)
            elif k in ("device_state", "payload") and section is not None:
                self.payloads.append((section, rec))
                if k == "device_state":
                    self.states.setdefault(section.idstr, (section, rec))
            elif k == "command":
                self.commands.append(rec)
            elif k == "ram_compressed":
                self.compressed.append(rec)
            elif k == "block":
                self.blocks.append(rec)
            elif k == "dirty_bitmap":
                self.bitmaps.append(rec)
            elif k == "ram_block_entry":
                self.block_entries.append(rec)
            elif k == "eof" and rec.depth == 0:
                self.eof = rec
            elif k == "vmdescription":
                self.trailer = rec

    def section(self, idstr, instance=0):
        for s in self.sections:
            if s.idstr == idstr and s.instance_id == instance:
                return s
        raise LookupError(f"no section {idstr!r} ({instance})")

    def field(self, idstr, name):
        """(offset, Field) of the first field called ``name`` in section ``idstr``."""
        _, st = self.states[idstr]
        for f in st.tree.walk():
            if f.name == name:
                return f.offset, f
        raise LookupError(f"no field {name!r} in {idstr!r}")


def _subsection_header(ix, idstr, vmsd_name):
    """Offset of the first subsection header ``vmsd_name`` in section ``idstr``."""
    _, st = ix.states[idstr]

    def walk(node):
        for f in node.fields:
            for sub in f.nested():
                hit = walk(sub)
                if hit is not None:
                    return hit
        for sub in node.subsections:
            if sub.vmsd_name == vmsd_name:
                return sub.offset
            hit = walk(sub)
            if hit is not None:
                return hit
        return None
    return walk(st.tree)


def _put(data: bytes, off: int, new: bytes) -> bytes:
    return data[:off] + new + data[off + len(new):]


def _cont_zero(ix: Index, block="pc.ram"):
    """A ZERO|CONTINUE record of ``block`` with a plain record before it."""
    for z in ix.zero:
        if z.flags == 0x22 and z.block == block:
            return z
    raise LookupError("no ZERO|CONTINUE record")


def mutations(name: str, data: bytes, ix: Index | None = None) -> list:
    """The mutation table for capture ``name`` (stream bytes ``data``)."""
    ix = ix or Index(data)
    out = []

    def add(mname, what, new):
        out.append(Mutation(mname, name, what, new))

    if name.startswith("pc-") and "-running-xbzrle" in name:
        x = ix.xbzrle[0]
        hl = 8 if x.flags & 0x20 else 9 + len(x.block)
        lo = x.offset + hl + 1
        add("xbzrle-length-overflow", f"XBZRLE record at {x.offset}: be16 length at {lo} "
            f"set to 4097 (page size + 1)", _put(data, lo, struct.pack(">H", 4097)))
        add("xbzrle-encoding-flag", f"XBZRLE record at {x.offset}: encoding byte at "
            f"{lo - 1} set to 0x02", _put(data, lo - 1, b"\x02"))
        add("xbzrle-decode-error", f"XBZRLE record at {x.offset}: first data byte at "
            f"{lo + 2} set to 0x00 (an empty zero run is fine first) and the second to 0x00 "
            f"(an empty non-zero run)", _put(data, lo + 2, b"\x00\x00"))
        add("original", "unchanged", data)
        return out

    add("original", "unchanged", data)
    add("bad-magic", "magic at 0 'QEVM' -> 'QEVN'", _put(data, 0, b"QEVN"))
    add("version-2", "file version at 4: 3 -> 2", _put(data, 4, _U32.pack(2)))
    add("version-4", "file version at 4: 3 -> 4", _put(data, 4, _U32.pack(4)))
    c = ix.config
    if c is not None:
        noff = c.offset + 5
        m = c.machine
        add("machine-name", f"machine name at {noff}: {m.decode()!r} -> last byte +1",
            _put(data, noff + len(m) - 1, bytes([m[-1] + 1])))
        grown = data[:c.offset + 1] + _U32.pack(len(m) + 1) + m + b"\0" + data[noff + len(m):]
        add("machine-name-nul", f"machine name at {noff}: {m.decode()!r} + NUL, length "
            f"{len(m)} -> {len(m) + 1} (QEMU compares with strncmp)", grown)
    t = ix.section("timer")
    ln = len(t.idstr)
    add("idstr", f"idstr of section 'timer' at {t.offset + 6}: 'timer' -> 'timez'",
        _put(data, t.offset + 6 + ln - 1, b"z"))
    add("instance-id", f"instance id of 'timer' at {t.offset + 6 + ln}: 0 -> 1",
        _put(data, t.offset + 6 + ln, _U32.pack(1)))
    add("version-too-high", f"version of 'timer' at {t.offset + 10 + ln}: "
        f"{t.version_id} -> {t.version_id + 1}",
        _put(data, t.offset + 10 + ln, _U32.pack(t.version_id + 1)))
    cpu = ix.section("cpu")
    add("version-too-low", f"version of 'cpu' at {cpu.offset + 10 + len(cpu.idstr)}: "
        f"{cpu.version_id} -> 10 (minimum 11)",
        _put(data, cpu.offset + 10 + len(cpu.idstr), _U32.pack(10)))
    pit = ix.section("i8254")
    add("version-lower-ok", f"version of 'i8254' at {pit.offset + 10 + 5}: "
        f"{pit.version_id} -> 2 (minimum 2)",
        _put(data, pit.offset + 15, _U32.pack(2)))
    ram = ix.section("ram")
    add("ram-version-5", f"version of 'ram' at {ram.offset + 13}: 4 -> 5",
        _put(data, ram.offset + 13, _U32.pack(5)))
    add("ram-version-3", f"version of 'ram' at {ram.offset + 13}: 4 -> 3",
        _put(data, ram.offset + 13, _U32.pack(3)))
    add("section-type", f"section type byte of 'timer' at {t.offset}: 0x04 -> 0x09",
        _put(data, t.offset, b"\x09"))
    add("section-type-subsection", f"section type byte of 'timer' at {t.offset}: 0x04 -> "
        f"0x05", _put(data, t.offset, b"\x05"))
    if ix.footers:
        f = ix.footers[3]
        add("footer-id", f"footer at {f.offset}: section id {f.section_id} -> "
            f"{f.section_id + 100}", _put(data, f.offset + 1, _U32.pack(f.section_id + 100)))
        add("footer-byte", f"footer marker at {f.offset}: 0x7e -> 0x7f",
            _put(data, f.offset, b"\x7f"))
    ms = ix.mem_size
    # block entries follow the MEM_SIZE word: u8 len, name, be64 length
    p = ms.offset + 8
    entries = []
    for b in ms.blocks:
        entries.append((p, b))
        p += 1 + len(b.name) + 8 + (8 if b.mr_addr is not None else 0)
    (p0, b0) = entries[0]
    (pb, bb) = next(e for e in entries if e[1].name == "pc.bios")
    add("ram-block-name", f"MEM_SIZE entry at {pb}: block name 'pc.bios' -> 'pc.biox'",
        _put(data, pb + 1 + 6, b"x"))
    total = ms.total
    add("ram-block-length", f"MEM_SIZE entry at {p0}: length of {b0.name} "
        f"0x{b0.used_length:x} -> 0x{b0.used_length - 4096:x}, MEM_SIZE total at "
        f"{ms.offset} reduced by 4096 to match",
        _put(_put(data, p0 + 1 + len(b0.name), _U64.pack(b0.used_length - 4096)),
             ms.offset, _U64.pack((total - 4096) | (ms.flags or 0x04))))
    (pa, ba) = next(e for e in entries if e[1].name == "/rom@etc/acpi/tables")
    add("ram-block-resize", f"MEM_SIZE entry at {pa}: length of {ba.name} "
        f"0x{ba.used_length:x} -> 0x{ba.used_length + 4096:x} (resizeable), total at "
        f"{ms.offset} raised by 4096",
        _put(_put(data, pa + 1 + len(ba.name), _U64.pack(ba.used_length + 4096)),
             ms.offset, _U64.pack((total + 4096) | (ms.flags or 0x04))))
    add("ram-block-length-sum", f"MEM_SIZE entry at {pb}: length of pc.bios +4096 with "
        f"the total unchanged (the loader reads on past the list)",
        _put(data, pb + 1 + 7, _U64.pack(bb.used_length + 4096)))
    z = _cont_zero(ix)
    addr = z.addr
    add("ram-flag-unknown", f"RAM record at {z.offset}: flags 0x22 -> 0x200 "
        f"(MULTIFD_FLUSH, 8.1+)", _put(data, z.offset, _U64.pack(addr | 0x200)))
    add("ram-flag-full", f"RAM record at {z.offset}: flags 0x22 -> 0x01 (obsolete FULL)",
        _put(data, z.offset, _U64.pack(addr | 0x01)))
    add("ram-hook", f"RAM record at {z.offset}: flags 0x22 -> 0x80 (HOOK)",
        _put(data, z.offset, _U64.pack(addr | 0x80)))
    sw = next((c for c in ix.commands if int(c.cmd) == 11), None)
    if sw is not None:
        # streams of 10.0 and later: the cases of what changed since 7.2
        add("ram-compress-page", f"RAM record at {z.offset}: flags 0x22 -> 0x120 "
            f"(CONTINUE|COMPRESS_PAGE; compress was removed in 9.1)",
            _put(data, z.offset, _U64.pack(addr | 0x120)))
        add("ram-multifd-flush", f"a bare MULTIFD_FLUSH word (0x200, 8.1+) inserted before "
            f"the RAM record at {z.offset}",
            data[:z.offset] + _U64.pack(0x200) + data[z.offset:])
        # QEMU_VM_COMMAND at sw.offset: be16 command, be16 length
        add("switchover-start-length", f"SWITCHOVER_START at {sw.offset}: be16 length at "
            f"{sw.offset + 3} 0 -> 4, 4 bytes inserted after it",
            data[:sw.offset + 3] + struct.pack(">H", 4) + b"\0" * 4 + data[sw.offset + 5:])
        add("switchover-start-unknown", f"SWITCHOVER_START at {sw.offset}: be16 command "
            f"at {sw.offset + 1} 11 -> 12 (no such command)",
            _put(data, sw.offset + 1, struct.pack(">H", 12)))
        add("switchover-start-removed", f"SWITCHOVER_START at {sw.offset} removed "
            f"(5 bytes)", data[:sw.offset] + data[sw.offset + 5:])
    blen = next(b.used_length for b in ms.blocks if b.name == z.block)
    add("ram-offset-beyond", f"RAM record at {z.offset}: page offset 0x{addr:x} -> "
        f"0x{blen:x} (the length of {z.block})", _put(data, z.offset, _U64.pack(blen | 0x22)))
    add("ram-zero-fill", f"ZERO record at {z.offset}: fill byte at {z.offset + 8} 0 -> 0x5a",
        _put(data, z.offset + 8, b"\x5a"))
    named = next(r for r in ix.zero + ix.pages if not r.flags & 0x20 and r.block == "pc.ram")
    add("ram-page-block", f"RAM record at {named.offset}: block name 'pc.ram' -> 'pc.rax'",
        _put(data, named.offset + 9 + 5, b"x"))
    pg = ix.pages[len(ix.pages) // 2]
    dstart = pg.offset + (8 if pg.flags & 0x20 else 9 + len(pg.block))
    add("page-byte", f"PAGE record at {pg.offset}: data byte at {dstart + 100} +1",
        _put(data, dstart + 100, bytes([(data[dstart + 100] + 1) & 0xFF])))
    foff, fld = ix.field("fdc", "num_floppies")
    add("equal-field", f"fdc num_floppies (uint8 equal) at {foff}: {fld.value} -> "
        f"{fld.value + 1}", _put(data, foff, bytes([fld.value + 1])))
    foff, fld = ix.field("PCIBUS", "nirq")
    add("equal-field-int32", f"PCIBUS nirq (int32 equal) at {foff}: {fld.value} -> "
        f"{fld.value + 1}", _put(data, foff, struct.pack(">i", fld.value + 1)))
    host = next(s for s in ix.sections if s.idstr.endswith("/I440FX"))
    foff, fld = ix.field(host.idstr, "version_id")
    add("le-field-high", f"{host.idstr} version_id (int32 le) at {foff}: {fld.value} -> "
        f"{fld.value + 1}", _put(data, foff, struct.pack(">i", fld.value + 1)))
    add("le-field-low", f"{host.idstr} version_id (int32 le) at {foff}: {fld.value} -> 1",
        _put(data, foff, struct.pack(">i", 1)))
    add("le-field-negative", f"{host.idstr} version_id (int32 le) at {foff}: {fld.value} "
        f"-> -1", _put(data, foff, struct.pack(">i", -1)))
    piix = next(s for s in ix.sections if s.idstr.endswith("/PIIX3"))
    coff, cfg = ix.field(piix.idstr, "config[0]")
    add("pci-config-readonly", f"{piix.idstr} PCI config at {coff}: device id byte at "
        f"{coff + 2} 0x{cfg.value[2]:02x} -> 0x{cfg.value[2] ^ 1:02x}",
        _put(data, coff + 2, bytes([cfg.value[2] ^ 1])))
    add("pci-config-writable", f"{piix.idstr} PCI config at {coff}: interrupt line byte at "
        f"{coff + 0x3c} 0x{cfg.value[0x3c]:02x} -> 0x{cfg.value[0x3c] ^ 0x0f:02x}",
        _put(data, coff + 0x3c, bytes([cfg.value[0x3c] ^ 0x0F])))
    ioff, _ = ix.field(piix.idstr, "irq_state")
    add("pci-irq-state", f"{piix.idstr} PCI irq state at {ioff}: level 0 -> 2",
        _put(data, ioff, _U32.pack(2)))
    roff, run = ix.field("globalstate", "runstate")
    state = run.value.split(b"\0")[0].decode()
    add("globalstate-runstate", f"globalstate runstate at {roff}: {state!r} -> its first "
        f"byte 'q'", _put(data, roff, b"q"))
    sub = _subsection_header(ix, "fdc", "fdrive/media_rate")
    if sub is not None:
        vo = sub + 2 + len("fdrive/media_rate")
        add("subsection-version-wide", f"subsection fdrive/media_rate at {sub}: be32 "
            f"version at {vo} 1 -> 0x0000c201 (QEMU keeps a uint8_t)",
            _put(data, vo, _U32.pack(0xC201)))
        add("subsection-version-too-new", f"subsection fdrive/media_rate at {sub}: version "
            f"at {vo} 1 -> 2", _put(data, vo, _U32.pack(2)))
    # truncations
    add("cut-header", "cut at 6 (inside the file version)", data[:6])
    add("cut-config", f"cut at {c.offset + 8} (inside the machine name)",
        data[:c.offset + 8])
    add("cut-ram", f"cut at {pg.offset + 1000} (inside a PAGE record at {pg.offset})",
        data[:pg.offset + 1000])
    sec, st = ix.states["fdc"]
    add("cut-device", f"cut at {st.offset + 10} (inside the fdc payload at {st.offset})",
        data[:st.offset + 10])
    last = ix.footers[-1]
    add("cut-before-footer", f"cut at {last.offset} (right before the last footer)",
        data[:last.offset])
    add("cut-before-eof", f"cut at {ix.eof.offset} (right before QEMU_VM_EOF)",
        data[:ix.eof.offset])
    if ix.trailer is not None:
        tr = ix.trailer.offset
        add("cut-trailer-header", f"cut at {tr + 3} (inside the VMDESCRIPTION header at "
            f"{tr})", data[:tr + 3])
        add("cut-trailer", f"cut at {tr + 500} (inside the VMDESCRIPTION JSON)",
            data[:tr + 500])
        add("trailer-removed", f"cut at {tr} (VMDESCRIPTION removed)", data[:tr])
        add("trailer-damaged", f"VMDESCRIPTION JSON at {tr + 5}: '{{' -> 'X', bytes "
            f"{tr + 105}..{tr + 115} -> 0xff", _put(_put(data, tr + 5, b"X"), tr + 105,
                                                     b"\xff" * 10))
        add("trailer-type", f"VMDESCRIPTION marker at {tr}: 0x06 -> 0x07",
            _put(data, tr, b"\x07"))
    add("garbage-appended", f"4096 bytes of 0xa5 appended at {len(data)}",
        data + b"\xa5" * 4096)
    add("eof-garbage", f"QEMU_VM_EOF at {ix.eof.offset} and everything after replaced by "
        "a section type 0x42", data[:ix.eof.offset] + b"\x42")
    return out


def old_machine_mutations(name: str, data: bytes, ix: Index | None = None) -> list:
    """A few cases on a stream without configuration, footers or trailer."""
    ix = ix or Index(data)
    out = [Mutation("original", name, "unchanged", data)]
    t = ix.section("timer")
    out.append(Mutation("idstr", name, f"idstr of 'timer' at {t.offset + 6}: -> 'timez'",
                        _put(data, t.offset + 10, b"z")))
    out.append(Mutation("version-too-high", name, f"version of 'timer' at {t.offset + 15}: "
                        f"{t.version_id} -> {t.version_id + 1}",
                        _put(data, t.offset + 15, _U32.pack(t.version_id + 1))))
    out.append(Mutation("cut-before-eof", name, f"cut at {ix.eof.offset}",
                        data[:ix.eof.offset]))
    out.append(Mutation("garbage-appended", name, f"16 bytes appended at {len(data)}",
                        data + b"\x01" * 16))
    return out


def _generic(name, data, ix, out):
    out.append(Mutation("original", name, "unchanged", data))
    out.append(Mutation("cut-before-eof", name, f"cut at {ix.eof.offset} (right before "
                        f"QEMU_VM_EOF)", data[:ix.eof.offset]))
    if ix.trailer is not None:
        out.append(Mutation("trailer-removed", name, f"cut at {ix.trailer.offset} "
                            f"(VMDESCRIPTION removed)", data[:ix.trailer.offset]))
    out.append(Mutation("garbage-appended", name, f"64 bytes of 0x01 appended at {len(data)}",
                        data + b"\x01" * 64))


def _cmd(ix, name):
    return next(c for c in ix.commands if c.name == name)


def capture_mutations(name: str, data: bytes, ix: Index | None = None) -> list:
    """A few generic cases plus the ones a capture's own features allow."""
    ix = ix or Index(data)
    out = []
    _generic(name, data, ix, out)

    def add(mname, what, new, caps=None):
        out.append(Mutation(mname, name, what, new, caps))

    # captures are named MACHINE-RELEASE-SCENARIO (tools/capture.py): the cases go by
    # the scenario, whichever release made the capture
    m = re.match(r"(pc|q35)-(\d+\.\d+)-(.+)$", name)
    machine, release, scen = m.groups() if m else (None, None, name)
    if machine == "pc" and scen == "noconfig":
        mname = f"pc-i440fx-{release}".encode()
        conf = b"\x07" + _U32.pack(len(mname)) + mname
        add("configuration-inserted", f"a configuration record ({mname.decode()}) inserted "
            "at 8 (the destination runs with send-configuration=off)",
            data[:8] + conf + data[8:])
    if machine == "q35" and scen == "paused" and ix.config is not None:
        c = ix.config
        other = b"0" if c.machine.endswith(b"1") else b"1"
        wrong = (c.machine[:-1] + other).decode()
        add("machine-name", f"machine name at {c.offset + 5}: {c.machine.decode()!r} -> "
            f"{wrong!r}", _put(data, c.offset + 5 + len(c.machine) - 1, other))
    rng = next(((sec, st) for sec, st in ix.payloads if sec.idstr.endswith("/virtio-rng")),
               None) if machine == "pc" and scen == "devices" else None
    if rng is not None:
        sec, st = rng
        off = st.offset + 4 + 2       # the virtio field: be32 PCIDevice version, config
        add("virtio-pci-config", f"{sec.idstr}: PCI device id byte at {off} (config byte 2 "
            f"inside the virtio field at {st.offset}) xor 1",
            _put(data, off, bytes([data[off] ^ 1])))
    if machine == "pc" and scen == "compress" and ix.compressed:
        r = ix.compressed[0]
        lo = r.offset + (8 if r.flags & 0x20 else 9 + len(r.block))
        add("compress-length", f"COMPRESS_PAGE record at {r.offset}: be32 length at {lo} -> "
            f"8192 (above compressBound(4096))", _put(data, lo, _U32.pack(8192)))
        add("compress-data", f"COMPRESS_PAGE record at {r.offset}: zlib header byte at "
            f"{lo + 4} 0x{data[lo + 4]:02x} -> 0x00", _put(data, lo + 4, b"\x00"))
        mid = lo + 4 + min(40, r.size - (lo - r.offset) - 5)
        add("compress-data-inside", f"COMPRESS_PAGE record at {r.offset}: zlib data byte at "
            f"{mid} 0x{data[mid]:02x} -> 0x{data[mid] ^ 0x55:02x}",
            _put(data, mid, bytes([data[mid] ^ 0x55])))
        add("compress-without-capability", "unchanged; the destination does not have the "
            "compress capability", data, {})
    names = {c.name for c in ix.commands}
    if machine == "pc" and scen == "postcopy-advised" and \
            {"OPEN_RETURN_PATH", "POSTCOPY_ADVISE"} <= names:
        rp = _cmd(ix, "OPEN_RETURN_PATH")
        adv = _cmd(ix, "POSTCOPY_ADVISE")
        add("listen-before-advise", f"command at {rp.offset}: OPEN_RETURN_PATH (1) -> "
            f"POSTCOPY_LISTEN (4)", _put(data, rp.offset + 1, struct.pack(">H", 4)))
        add("resume-then-ping", f"command at {rp.offset}: OPEN_RETURN_PATH (1) -> "
            f"POSTCOPY_RESUME (9), so PING finds no return path",
            _put(data, rp.offset + 1, struct.pack(">H", 9)))
        add("unknown-command", f"command at {rp.offset}: OPEN_RETURN_PATH (1) -> 11",
            _put(data, rp.offset + 1, struct.pack(">H", 11)))
        add("ping-bad-length", f"command at {rp.offset}: OPEN_RETURN_PATH (1, length 0) -> "
            f"PING (2)", _put(data, rp.offset + 1, struct.pack(">H", 2)))
        add("advise-zero-length", f"POSTCOPY_ADVISE at {adv.offset}: length 16 -> 0, its "
            f"16 bytes removed", data[:adv.offset + 3] + b"\x00\x00" + data[adv.offset + 21:])
        add("advise-page-size", f"POSTCOPY_ADVISE at {adv.offset}: target page size at "
            f"{adv.offset + 13} 4096 -> 8192", _put(data, adv.offset + 13, _U64.pack(8192)))
        add("advise-twice", f"command at {rp.offset}: OPEN_RETURN_PATH -> a second "
            f"POSTCOPY_ADVISE of length 0 before it",
            data[:rp.offset] + b"\x08\x00\x03\x00\x00" + data[rp.offset:])
        add("advise-without-capability", "unchanged; the destination does not have the "
            "postcopy-ram capability", data, {})
    if machine == "pc" and scen == "ignore-shared-uuid":
        u = ix.config.subsection("configuration/uuid")
        uo = u.offset + 2 + len(u.name) + 4
        add("uuid", f"configuration/uuid at {uo}: last byte +1",
            _put(data, uo + 15, bytes([(data[uo + 15] + 1) & 0xFF])))
        ms = ix.mem_size
        p = ms.offset + 8
        for blk in ms.blocks:
            if blk.name == "mem":
                ao = p + 1 + len(blk.name) + 8
                add("ignored-block-gpa", f"MEM_SIZE entry at {p}: guest address of the "
                    f"shared block 'mem' at {ao} 0x{blk.mr_addr:x} -> 0x100000",
                    _put(data, ao, _U64.pack(0x100000)))
            p += 1 + len(blk.name) + 8 + 8
        add("ignore-shared-without-capability", "unchanged; the destination does not have "
            "the x-ignore-shared capability", data, {"validate-uuid": True})
    first = next((r for r in ix.bitmaps if r.node is not None and r.granularity), None) \
        if machine == "pc" and scen == "dirty-bitmaps" else None
    second = next((r for r in ix.bitmaps if r.granularity and r is not first), None) \
        if first is not None else None
    if second is not None:
        np_ = first.offset + 2                       # flags byte, u8 length, node name
        bp = np_ + len(first.node) + 1               # bitmap name
        gp = bp + len(first.bitmap)                  # be32 granularity, u8 start flags
        add("bitmap-node-name", f"dirty-bitmap START at {first.offset}: node name at {np_} "
            f"{first.node!r} -> 'x' (the destination cancels the bitmaps, loads the rest)",
            _put(data, np_, b"x" * len(first.node)))
        add("bitmap-granularity", f"dirty-bitmap START at {first.offset}: granularity at "
            f"{gp} 0x{first.granularity:x} -> 0x3000 (not a power of two)",
            _put(data, gp, _U32.pack(0x3000)))
        add("bitmap-start-flags", f"dirty-bitmap START at {first.offset}: start flags at "
            f"{gp + 4} 0x{first.start_flags:x} -> 0x{first.start_flags | 0x08:x} (reserved)",
            _put(data, gp + 4, bytes([first.start_flags | 0x08])))
        sb = second.offset + 2
        add("bitmap-twice", f"dirty-bitmap START at {second.offset}: bitmap name at {sb} "
            f"{second.bitmap!r} -> {first.bitmap!r} (a second START for the same bitmap)",
            _put(data, sb, first.bitmap.encode()))
        add("bitmap-extra-flags", f"dirty-bitmap START at {first.offset}: flags byte "
            f"0x{data[first.offset]:02x} -> 0x80 followed by it (QEMU keeps a uint8_t)",
            data[:first.offset] + b"\x80" + data[first.offset:])
        bits = next((r for r in ix.bitmaps if r.buf is not None), None)
        so = bits.offset + 2 + len(bits.bitmap) + 12 if bits is not None else None
    if second is not None and bits is not None:
        add("bitmap-buffer-size", f"dirty-bitmap BITS at {bits.offset}: buffer size at {so} "
            f"{len(bits.buf)} -> 20480 (above 10 * CHUNK_SIZE)",
            _put(data, so, _U64.pack(20480)))
    if ix.block_entries:
        # mapped-ram: u8 length, name, be64 length, then the 28-byte header (be32
        # version, be64 page size, be64 bitmap offset, be64 pages offset)
        e = next(b for b in ix.block_entries if b.info.name == "pc.ram")
        h = e.offset + 1 + len(e.info.name) + 8
        pages_end = e.info.mapped_ram["pages_offset"] + e.info.used_length
        add("mapped-ram-version", f"mapped-ram header of pc.ram at {h}: version 1 -> 2",
            _put(data, h, _U32.pack(2)))
        add("mapped-ram-page-size", f"mapped-ram header of pc.ram at {h}: page size "
            f"4096 -> 8192", _put(data, h + 4, _U64.pack(8192)))
        add("mapped-ram-block-name", f"mapped-ram entry at {e.offset}: 'pc.ram' -> 'pc.rax'",
            _put(data, e.offset + 6, b"x"))
        add("mapped-ram-cut-pages", f"cut at {pages_end - 4096} (inside the page area of "
            f"pc.ram)", data[:pages_end - 4096])
    dev = next((b for b in ix.blocks if b.device is not None), None) \
        if machine == "pc" and scen == "block" else None
    eos = next((b for b in ix.blocks if b.flags == 0x02), None) if dev is not None else None
    if eos is not None:
        add("block-device-name", f"block record at {dev.offset}: device name at "
            f"{dev.offset + 9} {dev.device!r} -> 'x'",
            _put(data, dev.offset + 9, b"x" * len(dev.device)))
        add("block-flags-unknown", f"block EOS record at {eos.offset}: flags 0x02 -> 0x20",
            _put(data, eos.offset, _U64.pack(0x20)))
        add("block-flags-extra", f"block EOS record at {eos.offset}: flags 0x02 -> 0x22 "
            f"(an unknown bit beside EOS)", _put(data, eos.offset, _U64.pack(0x22)))
    return out


def random_mutations(name: str, data: bytes, n: int, seed: int,
                     ix: Index | None = None) -> list:
    """``n`` seeded random cases: one byte set to a random value (anywhere before the
    trailer, or within the device sections, or within the first 300 bytes) or a cut."""
    import random
    ix = ix or Index(data)
    rnd = random.Random(seed)
    end = ix.trailer.offset if ix.trailer is not None else len(data)
    first_dev = min((s.offset for s in ix.sections if s.idstr != "ram"), default=0)
    out = []
    for i in range(n):
        k = rnd.random()
        if k < 0.15:
            cut = rnd.randrange(len(data))
            out.append(Mutation(f"random-{i}", name, f"cut at {cut}", data[:cut]))
            continue
        if k < 0.6:
            lo, hi = 0, end
        elif k < 0.9:
            lo, hi = first_dev, end
        else:
            lo, hi = 0, min(300, end)
        p = rnd.randrange(lo, hi)
        v = rnd.randrange(256)
        out.append(Mutation(f"random-{i}", name, f"byte at {p}: 0x{data[p]:02x} -> 0x{v:02x}",
                            _put(data, p, bytes([v]))))
    return out
