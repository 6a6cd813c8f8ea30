"""``qmigstream check FILE``: would QEMU load this stream?  (exit 0 yes, 1 no, 2 not a stream)."""

from __future__ import annotations

import json

from ..check import PROFILES, check, profile_for_stream


def register(sub):
    p = sub.add_parser("check", help="would QEMU load this stream? exit 0 yes, 1 no "
                                     "(each problem with its offset and QEMU's message)")
    p.add_argument("file")
    p.add_argument("--profile", choices=PROFILES,
                   help="the loader to model; without it qemu-11.1 (qemu-10.0, qemu-5.2) "
                        "for a stream whose machine type is pc-i440fx-11.1 or pc-q35-11.1 "
                        "(10.0, 5.2), else qemu-7.2")
    p.add_argument("--expect-machine", metavar="NAME",
                   help="the destination's machine type (pc, q35 or a full name)")
    p.add_argument("--reference", metavar="REAL.mig",
                   help="a stream QEMU made with the destination's machine arguments: its "
                        "sections, versions, layouts, equal-field values and RAM blocks are "
                        "the destination's")
    p.add_argument("--capability", action="append", metavar="NAME[,NAME]",
                   help="migration capabilities on at the destination (repeatable); without "
                        "it the destination is assumed to be set up like the source")
    p.add_argument("--all", action="store_true", help="also list unchecked items")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args):
    caps = None
    if args.capability is not None:
        caps = [c.strip() for a in args.capability for c in a.split(",") if c.strip()]
    chosen = None
    if args.profile is None:
        name, machine = profile_for_stream(args.file)
        args.profile = name or "qemu-7.2"
        if name is not None:
            chosen = f"profile {name} (the stream's machine type is {machine}; " \
                     f"--profile chooses another)"
    rep = check(args.file, profile_name=args.profile, expect_machine=args.expect_machine,
                reference=args.reference, capabilities=caps)
    if args.json:
        print(json.dumps(rep.to_json(), indent=1))
    else:
        if chosen:
            print(chosen)
        for p in rep.problems:
            if p.level != "unchecked" or args.all:
                print(p.line())
        f = rep.fatal
        if f is None:
            n = sum(1 for p in rep.problems if p.level == "unchecked")
            extra = f" ({n} items unchecked, --all lists them)" if n and not args.all else ""
            print(f"QEMU {args.profile.split('-')[-1]} would load this stream{extra}")
        else:
            print(f"QEMU {args.profile.split('-')[-1]} would not load this stream: {f.message}")
    return 0 if rep.loads else 1
