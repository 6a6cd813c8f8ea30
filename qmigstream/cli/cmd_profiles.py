"""``qmigstream profiles [--json]``: the QEMU release profiles and what differs between them."""

from __future__ import annotations

import json

from ..pipeline import profiles as P


def register(sub):
    p = sub.add_parser("profiles", help="QEMU release profiles for migrate and golden")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    profs = list(P.PROFILES.values())
    if args.json:
        print(json.dumps([p.to_json() for p in profs], indent=2))
        return 0
    print(f"{'profile':<11} {'VFIO family':<12} {'if':<3} {'trailer':<10} {'cfg-desc':<8} "
          f"{'sw-start':<8} {'v2 precopy':<10} {'compress':<8} flush")
    yes = {True: "yes", False: "-"}
    for p in profs:
        print(f"{p.name:<11} {p.vfio_family:<12} {p.interface:<3} {p.json_style:<10} "
              f"{yes[p.vmdesc_configuration]:<8} {yes[p.switchover_start]:<8} "
              f"{yes[p.v2_precopy]:<10} {yes[p.compress_page]:<8} {yes[p.multifd_flush]}")
    print()
    prev = None
    for p in profs:
        if prev is not None:
            diff = P.differences(prev, p)
            what = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items()) or "same layout"
            print(f"{prev.name} -> {p.name}: {what}")
        prev = p
    print()
    for p in profs:
        print(f"{p.name}: {p.notes}")
    return 0
