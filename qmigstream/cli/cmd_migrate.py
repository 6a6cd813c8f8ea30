"""``qmigstream migrate -o OUT``: emulated VFIO devices + guest RAM -> the stream a QEMU release writes."""

from __future__ import annotations

import json
import sys

from ..pipeline import profiles as P
from ..pipeline.guest import DEFAULT_RAM_DIGEST, RAM_DIGESTS
from ..pipeline.migrate import DeviceSpec, MigrateConfig, migrate, write_manifest
from .progress import Progress


def _size(text: str) -> int:
    t = text.strip().lower()
    for suffix, mul in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if t.endswith(suffix) or t.endswith(suffix + "ib"):
            return int(float(t.rstrip("ib").rstrip(suffix)) * mul)
    return int(t, 0)


def register(sub):
    p = sub.add_parser("migrate", help="emulated source: VFIO devices + guest RAM -> a stream")
    p.add_argument("-o", "--output", required=True, help="stream file to write")
    p.add_argument("--profile", default=P.DEFAULT_PROFILE,
                   help=f"QEMU release to write as (default {P.DEFAULT_PROFILE}; "
                        "see `qmigstream profiles`)")
    p.add_argument("--template", help="take configuration, devices and RAM from a real capture")
    p.add_argument("--device", action="append", default=None, metavar="SPEC",
                   help="a VFIO device: PROFILE[,seed=N][,dma=PAGES_PER_S][,features=p2p+pre_copy]"
                        "[,addr=0000:00:05.0]; PROFILE is mtty, mtty2 or sized:SIZE "
                        "(default: one sized:64K device; --device none for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ram-size", type=_size, default=64 << 20, help="without --template")
    p.add_argument("--iterations", type=int, default=None,
                   help="fixed number of pre-copy rounds (default: until it converges)")
    p.add_argument("--max-iterations", type=int, default=30)
    p.add_argument("--bandwidth", type=_size, default=1 << 30, help="bytes per second")
    p.add_argument("--downtime-ms", type=int, default=300)
    p.add_argument("--dirty-rate", type=int, default=0, help="CPU stores per second")
    p.add_argument("--xbzrle", action="store_true")
    p.add_argument("--switchover-ack", action="store_true")
    p.add_argument("--v1-layout", choices=["rfc", "5.8"], default="rfc",
                   help="v1 migration region layout (rfc: with the dirty-pfn fields)")
    p.add_argument("--v1-window", type=_size, default=64 * 1024)
    p.add_argument("--v1-bitmap-bits", type=int, default=None,
                   help="v1 RFC: the device's dirty-bitmap buffer, in pfns")
    p.add_argument("--multifd-channels", type=int, default=0, metavar="N",
                   help="10.0+ profiles: RAM and VFIO device state on N multifd channel "
                        "files OUTPUT.ch0 ... (0: off)")
    p.add_argument("--load-config-after-iter", action="store_true", default=None,
                   help="10.1+ with --multifd-channels: FULL carries DEV_CONFIG_LOAD_READY "
                        "(x-migration-load-config-after-iter=on)")
    p.add_argument("--ram-digest", choices=list(RAM_DIGESTS), default=DEFAULT_RAM_DIGEST,
                   help="the manifest's RAM digests: pages-crc32 (default: the non-zero "
                        "pages' indexes and CRC-32) or sha256 (of each whole block)")
    p.add_argument("--stream-sha256", dest="stream_sha256", action="store_true",
                   default=False,
                   help="put the stream's sha256 in the manifest (computed on a thread "
                        "reading the stream back as it is written; about 1.4 GB/s)")
    p.add_argument("--no-stream-sha256", dest="stream_sha256", action="store_false",
                   help="leave it out (the default)")
    p.add_argument("--manifest", help="where to write the source manifest "
                                      "(default OUTPUT.json)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run, fast_exit=True)      # every file it opens is closed


def config_from_args(args) -> MigrateConfig:
    specs = args.device if args.device is not None else ["sized:64K"]
    devices = [] if specs == ["none"] else [DeviceSpec.parse(s, i) for i, s in enumerate(specs)]
    return MigrateConfig(profile=args.profile, template=args.template, devices=devices,
                         seed=args.seed, ram_size=args.ram_size, iterations=args.iterations,
                         max_iterations=args.max_iterations, bandwidth=args.bandwidth,
                         downtime_ms=args.downtime_ms, dirty_rate=args.dirty_rate,
                         xbzrle=args.xbzrle, switchover_ack=args.switchover_ack,
                         v1_layout=args.v1_layout, v1_window=args.v1_window,
                         v1_bitmap_bits=args.v1_bitmap_bits,
                         multifd_channels=args.multifd_channels,
                         load_config_after_iter=args.load_config_after_iter,
                         ram_digest=args.ram_digest, stream_sha256=args.stream_sha256)


def run(args) -> int:
    try:
        cfg = config_from_args(args)
        P.get(cfg.profile)
    except ValueError as e:
        print(f"qmigstream migrate: error: {e}", file=sys.stderr)
        return 2
    prog = Progress(None, "migrate")
    try:
        res = migrate(args.output, cfg, progress=prog)
    finally:
        prog.close()
    manifest = args.manifest or args.output + ".json"
    write_manifest(res, manifest)
    if args.json:
        print(json.dumps({"manifest": manifest, **res.to_json()}, indent=2))
        return 0
    sha = f", sha256 {res.sha256}" if res.sha256 else ""
    print(f"wrote {res.path}: {res.size:,} bytes as {res.profile}{sha}")
    print(f"  rounds:   {res.rounds} ({res.converged})")
    print("  pages:    " + ", ".join(f"{k} {v:,}" for k, v in res.pages.items() if v))
    print("  phases:   " + ", ".join(f"{k} {v:,}" for k, v in res.phases.items()))
    for d in res.devices:
        print(f"  device {d['idstr']}: {d['interface']} {d['profile']}, family {d['family']}, "
              f"{d['data_bytes']:,} bytes in {d['chunks']} chunks")
    for c in res.channels:
        pk = c["packets"]
        print(f"  channel {c['file']}: {c['size']:,} bytes, {pk['ram']} RAM, {pk['sync']} SYNC, "
              f"{pk['device_state']} device-state packets")
    print(f"  manifest: {manifest}  (qmigstream replay {res.path} --expect {manifest})")
    return 0
