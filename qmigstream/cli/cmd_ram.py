"""``qmigstream ram extract FILE -o DIR``: the guest's RAM blocks as sparse files.

See docs/ram-extract.md for the file names, the manifest and ``--physical``.
"""

from __future__ import annotations

import gc
import json
import os

from .. import guestmem


def register(sub):
    p = sub.add_parser("ram", help="guest RAM held by a stream")
    rsub = p.add_subparsers(dest="ram_command", metavar="SUBCOMMAND")
    e = rsub.add_parser("extract", help="write each RAM block's final contents to DIR "
                        "(sparse files) and manifest.json")
    e.add_argument("file", help="the stream (- for stdin)")
    e.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output directory (created if missing)")
    e.add_argument("--until-iteration", type=_nonneg, metavar="N",
                   help="memory as of the end of RAM iteration N (0 = setup, k = k-th PART "
                        "section, last PART + 1 = END)")
    e.add_argument("--physical", choices=("pc", "q35"),
                   help="also write physical.img, pc.ram laid out at guest-physical "
                        "addresses as that machine does")
    e.add_argument("--max-ram-below-4g", type=_size, metavar="SIZE",
                   help="the machine's max-ram-below-4g property, if it was set "
                        "(not in the stream)")
    e.add_argument("--multifd", action="append", default=[], metavar="CHANNEL",
                   help="a recorded multifd channel of the same migration (repeatable): "
                        "its pages are applied too")
    e.add_argument("--no-sha256", action="store_true",
                   help="leave the sha256 of each block out of the manifest (faster)")
    e.add_argument("--json", action="store_true", help="print the manifest as JSON")
    e.set_defaults(func=run_extract)
    p.set_defaults(func=_usage(p))


def _usage(p):
    def run(args):
        p.print_help()
        return 2
    return run


def _nonneg(text):
    n = int(text, 0)
    if n < 0:
        raise ValueError(text)
    return n


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text):
    """``2G``, ``3584M``, ``0xe0000000``, ``3221225472`` -> bytes."""
    t = text.strip().upper()
    if t.startswith("0X"):
        return int(t, 16)
    t = t[:-1] if t.endswith("B") else t
    unit = t[-1:] if t[-1:] in ("K", "M", "G", "T") else ""
    n = float(t[:len(t) - len(unit)]) * _UNITS[unit]
    if n < 0 or n != int(n):
        raise ValueError(text)
    return int(n)


def run_extract(args) -> int:
    # Every page of a run is a (short-lived) memoryview: without this the cyclic
    # garbage collector runs a few hundred times over everything imported.
    was = gc.isenabled()
    gc.disable()
    try:
        m = guestmem.extract(args.file, args.output, until_iteration=args.until_iteration,
                             physical=args.physical, max_ram_below_4g=args.max_ram_below_4g,
                             hash=not args.no_sha256, channels=args.multifd)
    finally:
        if was:
            gc.enable()
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    it = m["iterations"]
    print(f"{len(m['blocks'])} RAM blocks written to {args.output} "
          f"(page size {m['page_size']}; RAM sections applied: "
          f"{'setup' if it['setup'] else 'no setup'}, {it['parts']} PART, "
          f"{'END' if it['end'] else 'no END'})")
    w = max([len(b["name"]) for b in m["blocks"]] + [5])
    fw = max([len(b["file"]) for b in m["blocks"]] + [4])
    print(f"  {'block':<{w}}  {'file':<{fw}}  {'used_length':>12}  {'data pages':>10}  "
          f"pages by kind")
    for b in m["blocks"]:
        kinds = ", ".join(f"{k} {v}" for k, v in b["pages"].items() if v) or "none sent"
        print(f"  {b['name']:<{w}}  {b['file']:<{fw}}  {b['used_length']:>#12x}  "
              f"{b['data_pages']:>10}  {kinds}")
    if "physical" in m:
        ph = m["physical"]
        pieces = "; ".join(f"{p['region']} 0x{p['gpa']:x}-0x{p['gpa'] + p['length']:x} "
                           f"<- {ph['block']}+0x{p['block_offset']:x}" for p in ph["map"])
        print(f"  physical.img ({ph['machine']}, {ph['size']:#x} bytes): {pieces}")
    for n in m.get("notes", []):
        print(f"  note: {n}")
    print(f"  manifest: {os.path.join(args.output, 'manifest.json')}")
    return 0
