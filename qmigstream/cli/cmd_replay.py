"""``qmigstream replay FILE [--expect MANIFEST]``: load a stream into resuming devices, atomically."""

from __future__ import annotations

import json
import os
import sys

from ..pipeline.replay import channel_files, load_expect, replay


def register(sub):
    p = sub.add_parser("replay", help="load a stream into resuming VFIO devices and guest RAM")
    p.add_argument("file")
    p.add_argument("--expect", help="source manifest (from migrate) to verify against")
    p.add_argument("--channel", action="append", default=None, metavar="FILE",
                   help="a multifd channel file (repeat per channel; default: the ones "
                        "the --expect manifest lists)")
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--no-map", action="store_true",
                   help="read the stream file instead of mapping it (mapped, the RAM "
                        "model's pages stay where they lie in the file, which must not "
                        "shrink during the load)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run, fast_exit=True)      # every file it opens is closed


def run(args) -> int:
    expect = load_expect(args.expect) if args.expect else None
    channels = args.channel
    if channels is None and expect is not None:
        channels = channel_files(args.file, expect)
        if any(not os.path.exists(c) for c in channels):
            # the manifest's names, beside the manifest itself
            base = os.path.dirname(args.expect)
            channels = [c if os.path.exists(c) else os.path.join(base, os.path.basename(c))
                        for c in channels]
    res = replay(args.file, expect=expect, page_size=args.page_size, channels=channels,
                 map_file=not args.no_map)
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
    else:
        _text(res)
    if not res.ok:
        # 2: the input is not a usable stream; 1: a stream that does not load
        if res.error.get("malformed"):
            print(f"qmigstream replay: error: {res.error['message']}", file=sys.stderr)
            return 2
        return 1
    if res.verified is False:
        return 1
    return 0


def _text(res):
    if res.ok:
        print(f"loaded: {res.pages:,} RAM pages, {len(res.devices)} VFIO device(s)")
    else:
        print(f"NOT loaded: {res.error['message']}")
        print("  every device is as it was before the load")
    for d in res.devices:
        state = "restored" if res.ok else "unchanged"
        if res.ok:
            state = "loaded, config applied" if d["config_loaded"] else "loaded"
        ver = {True: ", verified equal to the source", False: ", DIFFERS from the source",
               None: ""}[d["verified"]]
        print(f"  {d['idstr']}: {d['interface']} {d['profile']}: {d['bytes']:,} bytes in "
              f"{d['chunks']} chunks, {state}{ver}")
    for c in res.channels:
        print(f"  channel {c['file']}: {c['ram']} RAM packets ({c['pages']:,} pages), "
              f"{c['sync']} SYNC, {c['device_state']} device-state packets")
    if res.ok:
        for name, digest in res.ram.items():
            print(f"  RAM {name}: {res.ram_digest} {digest}")
    if res.verified is not None:
        print("verified: source and destination are equal" if res.verified else
              "verification FAILED:\n  " + "\n  ".join(res.mismatches))
