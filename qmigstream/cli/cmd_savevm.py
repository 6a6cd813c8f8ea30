"""``qmigstream savevm IMAGE.qcow2``: cut a snapshot's vmstate out of a qcow2 image.

The vmstate HMP ``savevm`` wrote is an ordinary migration stream; the output
can be given to every other command (``info``, ``decode``, ``roundtrip``).
Parts of the vmstate no cluster backs stay holes in a regular output file;
to a pipe they are written as zeros, up to
:data:`~qmigstream.qcow2.MAX_FILLED_ZEROS` bytes (an image declaring more is
refused, exit 2, rather than streaming terabytes of zeros).
"""

from __future__ import annotations

import json
import sys

from ..qcow2 import Qcow2Image


def register(sub):
    p = sub.add_parser("savevm", help="write a qcow2 snapshot's vmstate (a migration stream)")
    p.add_argument("image", help="qcow2 image holding internal snapshots")
    p.add_argument("--snapshot", help="snapshot name or id (default: the last one)")
    p.add_argument("-o", "--output", help="file to write the vmstate to (default: stdout); holes "
                                           "in the vmstate stay holes in the file")
    p.add_argument("--list", action="store_true", help="list the snapshots and exit")
    p.add_argument("--json", action="store_true", help="with --list: machine-readable")
    p.set_defaults(func=run)


def run(args) -> int:
    with Qcow2Image(args.image) as img:
        if args.list:
            return _list(img, args.json)
        snap = img.snapshot(args.snapshot)
        if args.output:
            with open(args.output, "wb") as out:
                n = img.copy_vmstate(snap, out)
            print(f"{snap.name}: {n} bytes of vmstate from offset 0x{img.vmstate_offset(snap):x} "
                  f"-> {args.output}", file=sys.stderr)
        else:
            if sys.stdout.isatty():
                print("qmigstream savevm: refusing to write binary to a terminal; use -o FILE",
                      file=sys.stderr)
                return 2
            img.copy_vmstate(snap, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    return 0


def _list(img, as_json) -> int:
    rows = [{"id": s.id_str, "name": s.name, "vm_state_size": s.vm_state_size,
             "vmstate_offset": img.vmstate_offset(s), "disk_size": s.disk_size,
             "date_sec": s.date_sec, "vm_clock_nsec": s.vm_clock_nsec} for s in img.snapshots]
    if as_json:
        print(json.dumps({"virtual_size": img.size, "cluster_size": img.cluster_size,
                          "snapshots": rows}, indent=2))
        return 0
    print(f"{'ID':<6} {'NAME':<20} {'VM STATE':>12}  VMSTATE OFFSET")
    for r in rows:
        print(f"{r['id']:<6} {r['name']:<20} {r['vm_state_size']:>12,}  0x{r['vmstate_offset']:x}")
    return 0
