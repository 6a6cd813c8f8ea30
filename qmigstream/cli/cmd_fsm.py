"""``qmigstream fsm FROM TO`` / ``qmigstream fsm --table``: the VFIO v2 state machine.

Answers as Linux's ``vfio_mig_get_next_state()`` does (with the a26b499b fix:
the blocked arcs STOP_COPY -> PRE_COPY(_P2P) give EINVAL), for a device with
the optional features given by ``--features`` (``p2p``, ``pre_copy``, both as
``p2p,pre_copy``, ``all`` or ``none``; STOP_COPY is always there; default none).

Output: the states entered after FROM, ending in TO (``[]`` when FROM == TO),
or the error.  ``--table --json`` prints
``{FROM: {TO: [states...] or "EINVAL"}}`` for all 64 pairs, uAPI names.
Exit 0 for a path, 1 when the request is refused (EINVAL), 2 on bad usage.
"""

from __future__ import annotations

import json
import sys

from ..device import fsm
from ..errors import DeviceError


def register(sub):
    p = sub.add_parser("fsm", help="VFIO v2 migration state machine: path FROM -> TO, or --table")
    p.add_argument("from_state", nargs="?", metavar="FROM",
                   help="current state (uAPI name, e.g. RUNNING, or its value)")
    p.add_argument("to_state", nargs="?", metavar="TO", help="requested state")
    p.add_argument("--features", default="none",
                   help="optional device features: p2p, pre_copy, p2p,pre_copy, all, none "
                        "(default none; STOP_COPY is always supported)")
    p.add_argument("--table", action="store_true", help="all 64 (FROM, TO) pairs")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=run)


def _usage(msg: str) -> int:
    print(f"qmigstream fsm: error: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    try:
        features = fsm.parse_features(args.features)
    except DeviceError as e:
        return _usage(str(e))
    if args.table:
        if args.from_state or args.to_state:
            return _usage("--table takes no FROM/TO")
        return _table(features, args.json)
    if not args.from_state or not args.to_state:
        return _usage("FROM and TO are required (or --table)")
    try:
        cur = fsm.parse_state(args.from_state)
        new = fsm.parse_state(args.to_state)
    except DeviceError as e:
        return _usage(str(e))
    try:
        steps = fsm.path(cur, new, features)
    except DeviceError as e:
        if args.json:
            print(json.dumps({"from": cur.name, "to": new.name,
                              "features": fsm.feature_names(features),
                              "error": "EINVAL", "message": str(e)}))
        else:
            print(f"{cur.name} -> {new.name}: EINVAL ({e})")
        return 1
    if args.json:
        print(json.dumps({"from": cur.name, "to": new.name,
                          "features": fsm.feature_names(features),
                          "path": [s.name for s in steps]}))
    else:
        print(" -> ".join([cur.name] + [s.name for s in steps])
              + ("" if steps else " (already there)"))
    return 0


def _table(features, as_json: bool) -> int:
    tab = fsm.table(features)
    if as_json:
        out = {cur.name: {new.name: ("EINVAL" if p is None else [s.name for s in p])
                          for new, p in row.items()} for cur, row in tab.items()}
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    abbrev = {"ERROR": "ERR", "STOP": "S", "RUNNING": "R", "STOP_COPY": "SC",
              "RESUMING": "RS", "RUNNING_P2P": "RP", "PRE_COPY": "PC", "PRE_COPY_P2P": "PP"}
    names = [s.name for s in fsm.MigState]
    w = 14
    feats = ",".join(fsm.feature_names(features)) or "none"
    print(f"features: stop_copy{',' + feats if feats != 'none' else ''}   "
          "(cell: states entered; '-' same state; EINVAL refused)")
    print("cur \\ new".ljust(w) + "".join(abbrev[n].ljust(w) for n in names))
    for cur, row in tab.items():
        cells = []
        for new, p in row.items():
            if p is None:
                cells.append("EINVAL")
            elif not p:
                cells.append("-")
            else:
                cells.append(">".join(abbrev[s.name] for s in p))
        print(abbrev[cur.name].ljust(w) + "".join(c.ljust(w) for c in cells))
    return 0
