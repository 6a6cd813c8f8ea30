"""``qmigstream demo``: the whole story on a bundled real capture and an emulated VFIO device.

1. decode a real QEMU 7.2 capture (bundled): every record, every device field;
   write it back and compare the bytes;
2. migrate: the capture's machine as a template plus an emulated VFIO device,
   written as QEMU 7.2 (v1 region) and as QEMU 8.2 (v2 state machine, with
   switchover-ack) would write it, with a running guest and XBZRLE;
3. show the VFIO sections of what was written;
4. replay each stream into a fresh resuming device and guest RAM, and verify
   both equal the source;
5. if QEMU is installed, let it load the template output (without the VFIO
   device) and compare its guest memory with the pipeline's.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import sys
import tempfile
from importlib import resources

from ..codec.reader import StreamReader
from ..codec.records import OpaquePayload
from ..codec.sections.device import DeviceState
from ..codec.writer import StreamWriter
from ..pipeline.migrate import DeviceSpec, MigrateConfig, migrate, write_manifest
from ..pipeline.replay import replay
from ..vfio.scan import scan

CAPTURE = "demo-pc-7.2.mig.xz"
PAUSED = "demo-pc-7.2-paused.mig.xz"
PAUSED_ARGS = ["-machine", "pc", "-m", "32"]


def register(sub):
    p = sub.add_parser("demo", help="decode, migrate, replay and verify, on a bundled real capture")
    p.add_argument("--keep", metavar="DIR", help="write the demo's files into DIR and keep them")
    p.add_argument("--no-qemu", action="store_true", help="skip the real-QEMU step")
    p.set_defaults(func=run)


def _unpack(name, dest):
    with resources.files("qmigstream.data").joinpath(name).open("rb") as src, \
            lzma.open(src) as x, open(dest, "wb") as out:
        shutil.copyfileobj(x, out)
    return dest


def _say(text=""):
    print(text)
    sys.stdout.flush()


def run(args) -> int:
    work = args.keep or tempfile.mkdtemp(prefix="qmigstream-demo-")
    os.makedirs(work, exist_ok=True)
    try:
        return _story(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _story(work, args) -> int:
    ok = True
    cap = _unpack(CAPTURE, os.path.join(work, "pc-7.2.mig"))
    _say("== 1. decode a real QEMU 7.2 capture (pc, 64 MiB, 14 PCI/USB/ISA devices)")
    reader = StreamReader(cap)
    copy = os.path.join(work, "pc-7.2.copy.mig")
    kinds, decoded, opaque, fields, example = {}, 0, 0, 0, None
    with open(copy, "wb") as f:
        w = StreamWriter(f)
        for rec in reader.records():
            kinds[rec.kind] = kinds.get(rec.kind, 0) + 1
            if isinstance(rec, DeviceState):
                decoded += 1
                n = sum(1 for _ in rec.tree.walk())
                fields += n
                if rec.section and rec.section.endswith("/e1000"):
                    example = rec
            elif isinstance(rec, OpaquePayload):
                opaque += 1
            w.write(rec)
    a, b = _sha(cap), _sha(copy)
    _say(f"   {sum(kinds.values()):,} records; machine {reader.configuration.machine.decode()}; "
         f"{len(reader.sections)} sections")
    _say(f"   {decoded} device sections decoded field by field ({fields:,} fields), "
         f"{opaque} kept opaque; RAM pages: {kinds.get('ram_page', 0)} data, "
         f"{kinds.get('ram_zero', 0) + kinds.get('ram_zero_run', 0)} zero records/runs")
    if example is not None:
        ra = next((f for f in example.tree.walk()
                   if f.name == "mac_reg[0]" and f.array_len == 32), None)
        if ra is not None:                      # e1000 RA[0]: RAL0, RAH0 = the MAC address
            lo, hi = ra.value[0], ra.value[1]
            addr = (lo | (hi & 0xFFFF) << 32).to_bytes(6, "little")
            _say(f"   e.g. {example.section}: receive address RAL0/RAH0 at offset "
                 f"{ra.offset}: MAC {addr.hex(':')}")
    same = a == b
    ok &= same
    _say(f"   re-encoded from the decoded fields: {'identical' if same else 'DIFFERENT'} "
         f"(sha256 {a[:16]}...)")

    _say("\n== 2. migrate: that machine + an emulated VFIO device, as two QEMU releases write it")
    runs = {}
    for prof, extra in (("qemu-7.2", {}), ("qemu-8.2", {"switchover_ack": True})):
        out = os.path.join(work, f"vfio-{prof}.mig")
        cfg = MigrateConfig(profile=prof, template=cap, iterations=3, dirty_rate=20000,
                            bandwidth=64 << 20, xbzrle=True, seed=7,
                            devices=[DeviceSpec("sized:256K", seed=1, dma_rate=2000)], **extra)
        res = migrate(out, cfg)
        write_manifest(res, out + ".json")
        runs[prof] = (out, res)
        d = res.devices[0]
        _say(f"   {prof}: {res.size:,} bytes, {res.rounds} rounds, pages "
             f"{res.pages['normal']} normal / {res.pages['zero']} zero / "
             f"{res.pages['xbzrle']} xbzrle; {d['idstr']} over {d['interface']}: "
             f"{d['data_bytes']:,} bytes in {d['chunks']} chunks")

    _say("\n== 3. the VFIO sections as the stream frames them")
    for prof, (out, res) in runs.items():
        devices, _ = scan(out)
        for dev in devices.values():
            also = [c for c in dev.family.candidates if c != dev.family.family]
            _say(f"   {prof} {dev.idstr}: layout family {dev.family.family}"
                 + (f" (the layout alone also fits {', '.join(also)})" if also else ""))
            for s in dev.sections:
                tags = []
                for r in s["records"]:
                    tags.append(r.marker.name if r.kind == "vfio_marker" else
                                f"DATA[{r.data_size}]" if r.kind == "vfio_data" else "CONFIG")
                _say(f"      {s['type']:<5} @{s['offset']:<9} {' '.join(tags)}")

    _say("\n== 4. replay into fresh resuming devices and guest RAM, then verify")
    for prof, (out, res) in runs.items():
        rr = replay(out, expect=res.to_json())
        good = rr.ok and rr.verified
        ok &= bool(good)
        _say(f"   {prof}: " + ("loaded; device state and RAM equal the source's" if good else
                               f"FAILED: {rr.error or rr.mismatches}"))
    # a failure leaves nothing half-applied
    out, res = runs["qemu-8.2"]
    data = open(out, "rb").read()
    cut = os.path.join(work, "cut.mig")
    with open(cut, "wb") as f:
        f.write(data[:len(data) * 2 // 3])
    rr = replay(cut, expect=res.to_json())
    before_after = all(d["state_before"] == d["state_after"] for d in rr.devices)
    ok &= (not rr.ok) and before_after
    _say(f"   the same stream cut at 2/3: not loaded ({rr.error['message'] if rr.error else '?'});"
         f" devices unchanged: {before_after}")

    _say("\n== 5. real QEMU loads the pipeline's output")
    if args.no_qemu or shutil.which("qemu-system-x86_64") is None:
        _say("   skipped (qemu-system-x86_64 not installed; `apt-get install qemu-system-x86`)")
    else:
        ok &= _qemu_step(work)

    _say("\n== where to look next")
    where = work if args.keep else "DIR"
    _say(f"   qmigstream decode {where}/pc-7.2.mig | less     every record and field, with offsets")
    _say(f"   qmigstream analyze -f {where}/pc-7.2.mig        analyze-migration.py's JSON")
    _say(f"   qmigstream vfio {where}/vfio-qemu-8.2.mig --json  VFIO sections, chunks, config")
    _say(f"   qmigstream replay {where}/vfio-qemu-8.2.mig --expect {where}/vfio-qemu-8.2.mig.json")
    _say("   qmigstream fsm --table --features p2p,pre_copy  the v2 state machine")
    _say("   qmigstream golden generate DIR                  vectors to test a QEMU patch with")
    _say("   docs/: format.md, analyze.md, vfio.md, pipeline.md, golden-vectors.md")
    if not args.keep:
        _say("   (`qmigstream demo --keep DIR` keeps the demo's files in DIR)")
    _say("\ndemo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _qemu_step(work) -> bool:
    from ..pipeline.guest import load_stream_ram
    from ..qemu.runner import load_incoming
    tpl = _unpack(PAUSED, os.path.join(work, "pc-7.2-paused.mig"))
    out = os.path.join(work, "template-7.2.mig")
    res = migrate(out, MigrateConfig(profile="qemu-7.2", template=tpl, devices=[],
                                     iterations=3, dirty_rate=40000, xbzrle=True,
                                     bandwidth=32 << 20, seed=11))
    m0, m1 = os.path.join(work, "m0"), os.path.join(work, "m1")
    size = 32 << 20
    r = load_incoming(PAUSED_ARGS, out, pmemsave=[(0, 0xA0000, m0),
                                                  (0x100000, size - 0x100000, m1)])
    if not r.loaded:
        _say(f"   QEMU did not load it: {r.status}: {r.stderr.strip()[-300:]}")
        return False
    ram = load_stream_ram(out)
    pc = ram.block("pc.ram").mem
    same = open(m0, "rb").read() == pc[:0xA0000] and open(m1, "rb").read() == pc[0x100000:size]
    _say(f"   QEMU 7.2 -incoming loaded a {res.size:,}-byte stream ({res.pages['xbzrle']} "
         f"XBZRLE pages); its guest memory (pmemsave) {'equals' if same else 'DIFFERS from'} "
         "the pipeline's RAM")
    return same


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()
