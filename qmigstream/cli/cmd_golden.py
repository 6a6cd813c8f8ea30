"""``qmigstream golden generate|check|compare``: deterministic vector sets for QEMU patch authors."""

from __future__ import annotations

import json
import sys

from ..pipeline import golden as G


def register(sub):
    p = sub.add_parser("golden", help="golden vector sets: generate, check, compare")
    s = p.add_subparsers(dest="golden_command", metavar="ACTION")
    g = s.add_parser("generate", help="write a vector set into DIR")
    g.add_argument("dir")
    g.add_argument("--profiles", help="comma-separated (default: all; see `qmigstream profiles`)")
    g.add_argument("--scenarios", help="comma-separated (default: all: "
                                       + ", ".join(G.SCENARIO_NAMES) + ")")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=run_generate)
    c = s.add_parser("check", help="verify a set: digests, round trips, bit-identical regeneration")
    c.add_argument("dir")
    c.add_argument("--no-regenerate", action="store_true", help="skip regenerating each vector")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run_check)
    m = s.add_parser("compare", help="how STREAM differs from the matching vector")
    m.add_argument("dir")
    m.add_argument("stream")
    m.add_argument("channels", nargs="*", metavar="CHANNEL",
                   help="the stream's multifd channel files (10.x), or a directory of them")
    m.add_argument("--multifd", metavar="CHANNEL", nargs="+", default=[],
                   help="the same as CHANNEL arguments (as `qmigstream vfio --multifd`)")
    m.add_argument("--vector", help="PROFILE/SCENARIO (default: the closest vector)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run_compare)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])


def _list(text):
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def run_generate(args) -> int:
    profiles = _list(args.profiles)
    if profiles:
        profiles = [p if p.startswith("qemu-") else f"qemu-{p}" for p in profiles]
    try:
        m = G.generate(args.dir, profiles, _list(args.scenarios),
                       progress=None if args.json else lambda name: print(f"  {name}",
                                                                          file=sys.stderr))
    except ValueError as e:
        print(f"qmigstream golden: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    total = sum(f["size"] for v in m["vectors"] for f in v["files"])
    print(f"wrote {len(m['vectors'])} vectors ({total:,} bytes) and manifest.json to {args.dir}")
    for s in m["skipped"]:
        print(f"  skipped {s['profile']}/{s['scenario']}: {s['why']}")
    print(f"regenerate with: {m['regenerate']}")
    return 0


def run_check(args) -> int:
    r = G.check(args.dir, regenerate=not args.no_regenerate)
    if args.json:
        print(json.dumps({"ok": r.ok, "checked": r.checked, "problems": r.problems}, indent=2))
    else:
        for p in r.problems:
            print(f"FAIL {p}")
        print(f"{r.checked} vectors checked: " + ("all good" if r.ok else
                                                  f"{len(r.problems)} problem(s)"))
    return 0 if r.ok else 1


def run_compare(args) -> int:
    given = list(args.channels) + list(args.multifd)
    channels = G.channel_files(given) if given else None
    r = G.compare(args.dir, args.stream, vector=args.vector, channels=channels)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "text"}, indent=2))
        return 0 if r["equal"] else 1
    print(f"compared with vector {r['vector']} (closest of {r['chosen_from']})")
    ch = r["channels"]
    if ch["stream"] is not None:
        print(f"multifd channels: {ch['vector']} in the vector, {ch['stream']} given")
    for note in r["notes"]:
        print(f"note: {note}")
    if r["equal"]:
        print("equal: the stream matches the vector" +
              (" (main stream only)" if r["notes"] else ""))
        return 0
    if r["vfio"]:
        print("VFIO sections:")
        for line in r["vfio"]:
            print(f"  {line}")
    if r["multifd"]:
        print("multifd channels:")
        for line in r["multifd"]:
            print(f"  {line}")
    print(r["text"])
    return 1
