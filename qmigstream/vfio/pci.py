"""The VFIO config record decoded into named fields with offsets.

Offsets are within the config space (``config_offset``) and, when the record's
stream offset is known, absolute (``offset``).  PCI config space and the MSI-X
table are little-endian (the PCI specification; QEMU keeps them as the guest
sees them); the record's own integers (version, irq_state) are big-endian.
"""

from __future__ import annotations

import struct

from ..wire import vfio as W

_LE16 = struct.Struct("<H")
_LE32 = struct.Struct("<I")

#: Standard capability ids (PCI Local Bus spec / Linux pci_regs.h).
CAP_NAMES = {0x01: "PM", 0x03: "VPD", 0x05: "MSI", 0x09: "VNDR", 0x0D: "SSVID",
             0x10: "EXP", 0x11: "MSIX", 0x12: "SATA", 0x13: "AF", 0x14: "EA"}
#: Extended capability ids (4096-byte config space).
EXT_CAP_NAMES = {0x0001: "AER", 0x0002: "VC", 0x0003: "DSN", 0x0004: "PWR", 0x000B: "VNDR",
                 0x000D: "ACS", 0x000E: "ARI", 0x000F: "ATS", 0x0010: "SRIOV", 0x0013: "PRI",
                 0x0015: "REBAR", 0x0017: "TPH", 0x0018: "LTR", 0x0019: "SECPCI",
                 0x001B: "PASID", 0x001E: "L1SS", 0x0023: "DVSEC", 0x0025: "DLF",
                 0x0026: "PL_16GT"}
MAX_EXT_CAPABILITIES = (4096 - 256) // 4


def _f(name, cfg_off, size, value, base):
    d = {"name": name, "config_offset": cfg_off, "size": size, "value": value}
    if base is not None:
        d["offset"] = base + cfg_off
    return d


def decode_bars(cfg, base=None):
    """BARs 0-5 of a type-0 header; a 64-bit memory BAR takes the next slot too."""
    out = []
    i = 0
    while i < 6:
        off = 0x10 + 4 * i
        raw = _LE32.unpack_from(cfg, off)[0]
        bar = {"index": i, "config_offset": off, "raw": f"0x{raw:08x}"}
        if base is not None:
            bar["offset"] = base + off
        if raw & 1:
            bar.update(type="io", address=f"0x{raw & ~0x3 & 0xFFFFFFFF:x}")
            i += 1
        else:
            kind = (raw >> 1) & 3
            bar["prefetchable"] = bool(raw & 0x8)
            if kind == 2 and i < 5:
                hi = _LE32.unpack_from(cfg, off + 4)[0]
                bar.update(type="mem64", address=f"0x{(hi << 32) | (raw & ~0xF & 0xFFFFFFFF):x}",
                           raw_high=f"0x{hi:08x}")
                i += 2
            else:
                bar.update(type="mem32" if kind == 0 else ("mem1M" if kind == 1 else "mem64?"),
                           address=f"0x{raw & ~0xF & 0xFFFFFFFF:x}")
                i += 1
        out.append(bar)
    return out


def decode_msi(cfg, off, base=None):
    ctrl = _LE16.unpack_from(cfg, off + 2)[0]
    is64 = bool(ctrl & 0x80)
    maskable = bool(ctrl & 0x100)
    d = {"config_offset": off, "control": f"0x{ctrl:04x}", "enabled": bool(ctrl & 1),
         "multiple_message_capable": 1 << ((ctrl >> 1) & 7),
         "multiple_message_enable": 1 << ((ctrl >> 4) & 7),
         "64bit": is64, "per_vector_masking": maskable}
    lo = _LE32.unpack_from(cfg, off + 4)[0]
    if is64:
        hi = _LE32.unpack_from(cfg, off + 8)[0]
        d["address"] = f"0x{(hi << 32) | lo:x}"
        doff = off + 0xC
    else:
        d["address"] = f"0x{lo:x}"
        doff = off + 0x8
    d["data"] = f"0x{_LE16.unpack_from(cfg, doff)[0]:04x}"
    if maskable:
        moff = doff + 4
        d["mask"] = f"0x{_LE32.unpack_from(cfg, moff)[0]:08x}"
        d["pending"] = f"0x{_LE32.unpack_from(cfg, moff + 4)[0]:08x}"
    if base is not None:
        d["offset"] = base + off
    return d


def decode_msix_cap(cfg, off, base=None):
    ctrl = _LE16.unpack_from(cfg, off + 2)[0]
    table = _LE32.unpack_from(cfg, off + 4)[0]
    pba = _LE32.unpack_from(cfg, off + 8)[0]
    d = {"config_offset": off, "control": f"0x{ctrl:04x}", "table_size": (ctrl & 0x7FF) + 1,
         "enabled": bool(ctrl & 0x8000), "function_mask": bool(ctrl & 0x4000),
         "table_bir": table & 7, "table_offset": f"0x{table & ~7 & 0xFFFFFFFF:x}",
         "pba_bir": pba & 7, "pba_offset": f"0x{pba & ~7 & 0xFFFFFFFF:x}"}
    if base is not None:
        d["offset"] = base + off
    return d


def decode_msix_table(table: bytes, pba: bytes, base=None):
    """Entries (addr, data, vector control) and the pending vectors of the PBA."""
    entries = []
    for i in range(len(table) // W.PCI_MSIX_ENTRY_SIZE):
        p = i * W.PCI_MSIX_ENTRY_SIZE
        lo, hi, data, vctl = struct.unpack_from("<IIII", table, p)
        e = {"vector": i, "address": f"0x{(hi << 32) | lo:x}", "data": f"0x{data:08x}",
             "vector_control": f"0x{vctl:08x}", "masked": bool(vctl & 1)}
        if base is not None:
            e["offset"] = base + p
        entries.append(e)
    pending = [i for i in range(len(entries)) if pba[i // 8] >> (i % 8) & 1]
    return entries, pending


def decode_ext_capabilities(cfg):
    out = []
    if len(cfg) <= W.PCI_CONFIG_SPACE_SIZE:
        return out
    ptr = 0x100
    seen = set()
    while 0x100 <= ptr <= len(cfg) - 4 and ptr not in seen and len(out) < MAX_EXT_CAPABILITIES:
        seen.add(ptr)
        h = _LE32.unpack_from(cfg, ptr)[0]
        if h in (0, 0xFFFFFFFF):
            break
        cid = h & 0xFFFF
        out.append({"config_offset": ptr, "id": f"0x{cid:04x}",
                    "name": EXT_CAP_NAMES.get(cid, "unknown"), "version": (h >> 16) & 0xF})
        ptr = (h >> 20) & ~3
    return out


def decode_config_state(state: W.PciConfigState, offset=None) -> dict:
    """Named fields of a config record.  ``offset`` = stream offset of the
    record's DEV_CONFIG_STATE marker (absolute offsets are then filled in)."""
    cfg = state.config
    body = None if offset is None else offset + 8
    cbase = None if body is None else body + 4
    hdr = cfg[0x0E]
    d = {
        "version_id": state.version_id,
        "config_size": len(cfg),
        "express": state.express,
        "vendor_id": f"0x{_LE16.unpack_from(cfg, 0)[0]:04x}",
        "device_id": f"0x{_LE16.unpack_from(cfg, 2)[0]:04x}",
        "command": f"0x{_LE16.unpack_from(cfg, 4)[0]:04x}",
        "status": f"0x{_LE16.unpack_from(cfg, 6)[0]:04x}",
        "revision": cfg[8],
        "class_code": f"0x{cfg[0x0B]:02x}{cfg[0x0A]:02x}{cfg[0x09]:02x}",
        "header_type": f"0x{hdr:02x}",
        "multifunction": bool(hdr & 0x80),
        "interrupt_line": cfg[0x3C],
        "interrupt_pin": cfg[0x3D],
        "irq_state": list(state.irq_state),
    }
    fields = [_f("vendor_id", 0, 2, d["vendor_id"], cbase),
              _f("device_id", 2, 2, d["device_id"], cbase),
              _f("command", 4, 2, d["command"], cbase),
              _f("status", 6, 2, d["status"], cbase),
              _f("revision", 8, 1, d["revision"], cbase),
              _f("class_code", 9, 3, d["class_code"], cbase),
              _f("header_type", 0x0E, 1, d["header_type"], cbase)]
    if hdr & 0x7F == 0:
        d["bars"] = decode_bars(cfg, cbase)
        d["subsystem_vendor_id"] = f"0x{_LE16.unpack_from(cfg, 0x2C)[0]:04x}"
        d["subsystem_id"] = f"0x{_LE16.unpack_from(cfg, 0x2E)[0]:04x}"
        fields += [_f("subsystem_vendor_id", 0x2C, 2, d["subsystem_vendor_id"], cbase),
                   _f("subsystem_id", 0x2E, 2, d["subsystem_id"], cbase)]
    fields += [_f("interrupt_line", 0x3C, 1, d["interrupt_line"], cbase),
               _f("interrupt_pin", 0x3D, 1, d["interrupt_pin"], cbase)]
    d["fields"] = fields
    caps = []
    for off, cid in W.capabilities(cfg):
        c = {"config_offset": off, "id": f"0x{cid:02x}", "name": CAP_NAMES.get(cid, "unknown")}
        if cbase is not None:
            c["offset"] = cbase + off
        caps.append(c)
        if cid == W.PCI_CAP_ID_MSI and off + 0x18 <= len(cfg):
            d["msi"] = decode_msi(cfg, off, cbase)
        elif cid == W.PCI_CAP_ID_MSIX and off + 12 <= len(cfg):
            d["msix"] = decode_msix_cap(cfg, off, cbase)
    d["capabilities"] = caps
    if state.express:
        d["extended_capabilities"] = decode_ext_capabilities(cfg)
    if state.msix_table is not None:
        tbase = None if cbase is None else cbase + len(cfg) + 16
        entries, pending = decode_msix_table(state.msix_table, state.msix_pba, tbase)
        d["msix_table"] = entries
        d["msix_pending"] = pending
        if tbase is not None:
            d["msix_table_offset"] = tbase
            d["msix_pba_offset"] = tbase + len(state.msix_table)
    if state.display is not None:
        v = W.RamfbCfg.parse(state.display)
        d["display"] = {"subsection": W.VFIO_DISPLAY_SUBSECTION,
                        "version_id": state.display_version,
                        "ramfb": {"addr": f"0x{v.addr:x}", "fourcc": f"0x{v.fourcc:08x}",
                                  "flags": v.flags, "width": v.width, "height": v.height,
                                  "stride": v.stride}}
    return d
