"""``qmigstream vfio FILE``: each VFIO device's phases, chunks, data size and config."""

from __future__ import annotations

import json
import os
import re

from ..errors import QmigstreamError
from ..vfio.multifd import parse_channel
from ..vfio.scan import scan


def register(sub):
    p = sub.add_parser("vfio", help="VFIO devices: family, phases, data chunks, config")
    p.add_argument("file", help="stream file, or - for stdin")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--extract", metavar="DIR",
                   help="write each device's data (stream order) and config bytes into DIR")
    p.add_argument("--multifd", metavar="CHANNEL", nargs="+", default=None,
                   help="10.x multifd channel files (device-state packets)")
    p.add_argument("--page-size", type=int, default=None, help=argparse_hide())
    p.set_defaults(func=run)


def argparse_hide():
    import argparse
    return argparse.SUPPRESS


def safe_name(idstr: str, instance_id: int = 0) -> str:
    """A file name from an idstr that cannot leave the directory it is put in."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", idstr).strip("._") or "vfio"
    base = base[:120]
    return f"{base}.{instance_id}" if instance_id else base


class Extractor:
    """Writes each device's data as it is read (``scan(on_data=...)``), then its
    multifd data and config.  File names come from :func:`safe_name` and must
    resolve inside ``outdir``."""

    def __init__(self, outdir):
        os.makedirs(outdir, exist_ok=True)
        self.outdir = outdir
        self.root = os.path.realpath(outdir)
        self.stems = {}
        self.files = {}
        self.written = []

    def _stem(self, dev):
        key = (dev.idstr, dev.instance_id)
        if key not in self.stems:
            base = safe_name(dev.idstr, dev.instance_id)
            stem, n = base, 1
            while stem in self.stems.values():
                n += 1
                stem = f"{base}-{n}"
            self.stems[key] = stem
        return self.stems[key]

    def _open(self, dev, suffix):
        path = os.path.join(self.root, f"{self._stem(dev)}.{suffix}")
        if os.path.dirname(os.path.realpath(path)) != self.root:
            raise QmigstreamError(f"refusing to write outside {self.outdir}: {path}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                     0o644)
        entry = {"idstr": dev.idstr, "kind": suffix, "path": path, "size": 0}
        self.written.append(entry)
        return os.fdopen(fd, "wb"), entry

    def data(self, dev, data):
        key = (dev.idstr, dev.instance_id)
        if key not in self.files:
            self.files[key] = self._open(dev, "data")
        f, entry = self.files[key]
        f.write(data)
        entry["size"] += len(data)

    def finish(self, devices):
        for dev in devices.values():
            for piece in dev.multifd_pieces():
                self.data(dev, piece)
            if (dev.idstr, dev.instance_id) not in self.files:
                self.files[(dev.idstr, dev.instance_id)] = self._open(dev, "data")
            cfg = dev.config_record()
            if cfg is not None:
                f, entry = self._open(dev, "config")
                with f:
                    raw = cfg.encode()
                    f.write(raw)
                    entry["size"] = len(raw)
        for f, _ in self.files.values():
            f.close()
        return self.written


def run(args) -> int:
    channels = None
    if args.multifd:
        channels = []
        for ch in args.multifd:
            with open(ch, "rb") as f:
                channels.append((ch, parse_channel(f.read(), name=ch)))
    ext = Extractor(args.extract) if args.extract else None
    devices, hints = scan(args.file, multifd=channels, page_size=args.page_size,
                          keep_data=False, on_data=ext.data if ext else None)
    d = {"devices": [dev.to_json() for dev in devices.values()], "hints": hints}
    if ext:
        d["extracted"] = ext.finish(devices)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(render(d))
    return 0


_SHORT = {"DEV_SETUP_STATE": "SETUP", "END_OF_STATE": "END", "DEV_INIT_DATA_SENT": "INIT_DATA_SENT",
          "DEV_CONFIG_LOAD_READY": "CONFIG_LOAD_READY"}


def render(d) -> str:
    out = []
    w = out.append
    if not d["devices"]:
        w("no VFIO devices in this stream")
    for dev in d["devices"]:
        w(f"device {dev['idstr']}" + (f" instance {dev['instance_id']}"
                                      if dev["instance_id"] else "")
          + (f"  (section id {dev['section_id']})" if dev["section_id"] is not None else ""))
        cands = dev["family_candidates"]
        alt = f"  [also fits: {', '.join(c for c in cands if c != dev['family'])}]" \
            if len(cands) > 1 else ""
        w(f"  family:     {dev['family'] or 'unknown'}{alt}")
        w(f"              {dev['family_reason']}")
        w(f"  data:       {dev['data_bytes']:,} bytes in {len(dev['chunks'])} chunk(s)"
          + (f" + {sum(1 for p in dev['multifd']['packets'] if not p.get('config'))}"
             " multifd packet(s)" if dev.get("multifd") else ""))
        for s in dev["sections"]:
            label = s["phase"] + (f" #{s['iteration']}" if "iteration" in s else "")
            marks = []
            for r in s["records"]:
                if r["kind"] == "vfio_data":
                    marks.append(f"DATA {r['data_size']}@{r['data_offset']}")
                elif r["kind"] == "vfio_config":
                    marks.append(f"CONFIG {r['body_length']}B")
                else:
                    marks.append(_SHORT.get(r["marker"], r["marker"]))
            w(f"  {s['type']:<5} @{s['offset']:<10} {label:<12} {' '.join(marks)}")
        if dev.get("multifd"):
            for p in dev["multifd"]["packets"]:
                what = "CONFIG" if p.get("config") else "DATA"
                w(f"  multifd {p['channel']} @{p['offset']} idx {p.get('idx')} {what} "
                  f"{p.get('data_size')}B")
        c = dev["config"]
        if c:
            where = f"@{c['record_offset']}" if c.get("record_offset") is not None else "(multifd)"
            w(f"  config {where} in {c['phase']}: {c['config_size']}-byte config space, "
              f"vendor {c['vendor_id']} device {c['device_id']} class {c['class_code']} "
              f"rev {c['revision']}, command {c['command']} status {c['status']}")
            for b in c.get("bars", []):
                if b["raw"] not in ("0x00000000",):
                    w(f"    BAR{b['index']} {b['type']} {b['address']}"
                      + (" prefetchable" if b.get("prefetchable") else ""))
            if c["capabilities"]:
                w("    capabilities: " + ", ".join(f"{x['name']}@0x{x['config_offset']:x}"
                                                   for x in c["capabilities"]))
            if c.get("extended_capabilities"):
                w("    extended: " + ", ".join(f"{x['name']}@0x{x['config_offset']:x}"
                                               for x in c["extended_capabilities"]))
            if "msi" in c:
                m = c["msi"]
                w(f"    MSI: control {m['control']} address {m['address']} data {m['data']}"
                  + (f" mask {m['mask']} pending {m['pending']}" if "mask" in m else ""))
            if "msix" in c:
                m = c["msix"]
                w(f"    MSI-X: {m['table_size']} vectors, table BIR {m['table_bir']} "
                  f"offset {m['table_offset']}, PBA BIR {m['pba_bir']} offset "
                  f"{m['pba_offset']}, {'enabled' if m['enabled'] else 'disabled'}")
                if "msix_table" in c:
                    used = [e for e in c["msix_table"] if e["address"] != "0x0"]
                    w(f"    MSI-X table: {len(used)} programmed, pending {c['msix_pending']}")
            w(f"    irq_state: {c['irq_state']}, interrupt pin {c['interrupt_pin']} "
              f"line {c['interrupt_line']}")
            if c.get("display"):
                r = c["display"]["ramfb"]
                w(f"    display (ramfb): {r['width']}x{r['height']} stride {r['stride']} "
                  f"at {r['addr']}")
    for e in d.get("extracted", []):
        w(f"wrote {e['path']} ({e['size']:,} bytes)")
    return "\n".join(out)
