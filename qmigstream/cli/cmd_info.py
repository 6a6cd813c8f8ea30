"""``qmigstream info FILE``: what a stream contains, in one screen."""

from __future__ import annotations

import json

from ..summary import summarize
from .progress import Progress, file_size


def register(sub):
    p = sub.add_parser("info", help="machine, version hints, capabilities, sections, RAM counts")
    p.add_argument("file", help="stream file, or - for stdin")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--page-size", type=int, default=None,
                   help="target page size when the stream does not say (default 4096)")
    p.set_defaults(func=run)


def run(args) -> int:
    prog = Progress(file_size(args.file), "info")
    try:
        s = summarize(args.file, progress=prog if prog.enabled else None,
                      page_size=args.page_size)
    finally:
        prog.close()
    d = s.to_json()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(render(d))
    return 0


def _n(x):
    return f"{x:,}"


def render(d) -> str:
    out = []
    w = out.append
    w(f"size:          {_n(d['size'])} bytes")
    w(f"machine:       {d['machine'] or '(no configuration record)'}")
    h = d["qemu_version_hints"]
    rng = f">= {h['min']}" + (f", <= {h['max']}" if h["max"] else "")
    w(f"QEMU version:  {rng}")
    for e in h["evidence"]:
        w(f"               {e}")
    if d["configuration"]:
        subs = [s["name"].split("/", 1)[1] for s in d["configuration"]["subsections"]]
        w(f"config subsections: {', '.join(subs) or 'none'}")
    w(f"capabilities:  {', '.join(d['capabilities']) or 'none listed'}")
    w(f"footers:       {'yes' if d['footers'] else 'no'}")
    w(f"page size:     {d['page_size']}")
    if d["commands"]:
        w("commands:      " + ", ".join(f"{k} x{v}" for k, v in d["commands"].items()))
    t = d["trailer"]
    if t and t.get("cut"):
        w(f"trailer:       VMDESCRIPTION at {t['offset']} cut short: {_n(max(0, t['present']))} "
          f"of {_n(t['json_length'])} bytes of JSON (QEMU never reads it; the stream "
          f"still loads)")
    elif t:
        w(f"trailer:       VMDESCRIPTION at {t['offset']}, {_n(t['json_length'])} bytes of JSON "
          f"({t['style']}), {t.get('devices', '?')} devices described")
    else:
        w("trailer:       none")
    if d["trailing_bytes"]:
        w(f"trailing bytes after the stream: {_n(d['trailing_bytes'])}")
    r = d["ram"]
    if r["blocks"]:
        w("RAM blocks:")
        for b in r["blocks"]:
            extra = "".join(f" {k}=0x{b[k]:x}" for k in ("page_size", "mr_addr") if k in b)
            w(f"  {b['name']:<28} {b['used_length']:>14,} bytes{extra}")
    p = r["pages"]
    w(f"RAM pages:     zero {_n(p['zero'])}, normal {_n(p['normal'])}, "
      f"xbzrle {_n(p['xbzrle'])}, compressed {_n(p['compressed'])}")
    if r.get("mapped_ram_pages"):
        mp = r["mapped_ram_pages"]
        w(f"mapped-ram:    {_n(sum(mp.values()))} pages in place ("
          + ", ".join(f"{b} {_n(c)}" for b, c in mp.items()) + ")")
    rs = r["sections"]
    if rs:
        w("RAM sections:  " + ", ".join(f"{k} {v}" for k, v in rs.items())
          + (f"; MULTIFD_FLUSH x{r['multifd_flushes']}" if r["multifd_flushes"] else ""))
    w(f"sections ({len(d['sections'])}):")
    w(f"  {'id':>4} {'idstr':<34} {'inst':>4} {'ver':>4} {'headers':<22} {'bytes':>12}")
    for s in d["sections"]:
        hdrs = " ".join(f"{k}x{v}" if v > 1 else k for k, v in s["headers"].items())
        w(f"  {s['section_id']:>4} {s['idstr']:<34} {s['instance_id']:>4} {s['version_id']:>4} "
          f"{hdrs:<22} {s['bytes']:>12,}")
    w(f"EOF:           {'yes' if d['eof'] else 'no'}")
    return "\n".join(out)
