"""``qmigstream diff A B``: semantic differences between two streams (docs/diff.md)."""

from __future__ import annotations

import json

from .. import diff as D


def register(sub):
    p = sub.add_parser("diff", help="semantic differences between two streams: "
                       "configuration, sections, device fields, RAM pages; exit 0 equal, 1 not")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true", help="the result as JSON")
    p.add_argument("--ignore-ram", action="store_true", help="do not compare guest memory")
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="drop differences whose path matches this fnmatch pattern "
                        "(repeatable), e.g. 'timer/*'")
    p.add_argument("--until-iteration", type=_nonneg, metavar="N",
                   help="compare memory as of the end of RAM iteration N in both")
    p.add_argument("--multifd-a", action="append", default=[], metavar="CHANNEL",
                   help="a recorded multifd channel of A's migration (repeatable)")
    p.add_argument("--multifd-b", action="append", default=[], metavar="CHANNEL",
                   help="a recorded multifd channel of B's migration (repeatable)")
    p.set_defaults(func=run)


def _nonneg(text):
    n = int(text, 0)
    if n < 0:
        raise ValueError(text)
    return n


def run(args) -> int:
    if args.a == "-" and args.b == "-":
        raise SystemExit("qmigstream diff: A and B cannot both be stdin")
    res = D.diff(args.a, args.b, ignore_ram=args.ignore_ram, ignore=args.ignore,
                 until_iteration=args.until_iteration, channels_a=args.multifd_a,
                 channels_b=args.multifd_b)
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
    else:
        print(res.format_text())
    return 0 if res.equal else 1
