"""Golden vectors: deterministic streams, per profile and scenario, for comparing a patched QEMU.

``generate(dir, profiles)`` writes, for every profile × scenario that applies
to it, ``<profile>/<scenario>.mig`` (the stream), ``.decode.json`` (its record
tree, as ``qmigstream decode --json`` prints it), ``.state.json`` (each
device's state before the migration on the source and after the replay on the
destination, the RAM digests) and one ``manifest.json`` listing every file with
its size, sha256 and CRC-32 (``crcmod``'s ``crc-32``), the profile, the
scenario's settings, the generator version and the command that regenerates
the set.  Everything is a function of the settings: the same command writes
the same bytes on every run and machine (no time stamps, no absolute paths).

A multifd vector (``multifd-device-state``, 10.0+) also has its channel
files ``<scenario>.mig.ch0``, ``.mig.ch1``, listed in the manifest like the
others.

``check(dir)`` verifies a set: every file's size and digests, every stream's
(and channel's) byte round trip and verified replay, and that regenerating
each vector gives the very same bytes.  ``compare(dir, stream)`` says how another stream (e.g.
one a patched QEMU wrote) differs from the vector it should match.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field

import crcmod.predefined

from .. import __version__
from ..codec.reader import StreamReader, read_records
from ..codec.tree import tree_events
from ..codec.writer import StreamWriter
from ..errors import QmigstreamError
from ..vfio import family as VF
from ..vfio import multifd as MF
from ..vfio.scan import scan
from ..device.blob import VERSION as _BLOB_VERSION
from ..device.pci_device import IMAGE_DIGEST, SIZED_CONTENT_GENERATION
from . import profiles as P
from .guest import DEFAULT_RAM_DIGEST, FILL_GENERATION
from .migrate import DeviceSpec, MigrateConfig, migrate
from .replay import replay

crc32 = crcmod.predefined.mkCrcFun("crc-32")

#: What the vectors' bytes depend on besides the settings and the QEMU layouts; a
#: change of any means every vector changes (``golden check`` says so): the device
#: blob version, the sized device's state generator, the synthetic guest's initial
#: fill, the RAM digests and the device image digest in .state.json.
CONTENT = {"device_blob": _BLOB_VERSION, "sized_state": SIZED_CONTENT_GENERATION,
           "ram_fill": FILL_GENERATION, "ram_digest": DEFAULT_RAM_DIGEST,
           "image_digest": IMAGE_DIGEST}

MIB = 1 << 20
#: Registers (64) + blob header and CRC (28): a sized:N device's stop-copy data is N + 92.
SIZED_OVERHEAD = 64 + 28


@dataclass(frozen=True)
class Scenario:
    """One golden-vector scenario: name, what it shows, migrate settings, what it needs."""

    name: str
    what: str
    settings: dict
    needs: str = ""          # "v1", "v2", "switchover-ack", "precopy", "multifd" or ""

    def applies(self, prof: P.Profile) -> bool:
        if self.needs == "v1":
            return prof.interface == "v1"
        if self.needs == "v2":
            return prof.interface == "v2"
        if self.needs == "switchover-ack":
            return VF.get(prof.vfio_family).init_data_sent
        if self.needs == "multifd":
            return prof.multifd_transfer_possible(prof.machine)
        if self.needs == "precopy":
            return VF.get(prof.vfio_family).has_part and (prof.interface == "v1" or
                                                          prof.v2_precopy)
        return True


def _dev(profile, seed=1, dma=0, features="p2p,pre_copy"):
    return {"profile": profile, "seed": seed, "dma_rate": dma, "features": features}


BASE = {"ram_size": 2 * MIB, "initial_fraction": 0.125, "bandwidth": 32 * MIB, "seed": 1}

SCENARIOS = [Scenario(*s) for s in (
    ("paused", "paused guest, stop-and-copy only: one pass over RAM, no pre-copy data",
     {"iterations": 1, "devices": [_dev("sized:64K", features="p2p")]}),
    ("precopy", "running guest and device: several pre-copy iterations",
     {"iterations": 4, "dirty_rate": 20000, "devices": [_dev("sized:64K", dma=1000)]},
     "precopy"),
    ("zero-state", "a device with zero bytes of internal state",
     {"iterations": 1, "devices": [_dev("sized:0")]}),
    ("data-1m", "stop-and-copy data of exactly 1 MiB",
     {"iterations": 1, "devices": [_dev(f"sized:{MIB - SIZED_OVERHEAD}", features="p2p")]}),
    ("data-1m-plus-1", "stop-and-copy data of 1 MiB + 1 byte (a second chunk of 1 byte on v2)",
     {"iterations": 1, "devices": [_dev(f"sized:{MIB + 1 - SIZED_OVERHEAD}",
                                        features="p2p")]}),
    ("large-state", "a large device state (3 MiB): several 1 MiB chunks",
     {"iterations": 1, "devices": [_dev("sized:3M", features="p2p")]}),
    ("switchover-ack", "switchover-ack: DEV_INIT_DATA_SENT closes a pre-copy section",
     {"iterations": 3, "dirty_rate": 5000, "switchover_ack": True,
      "devices": [_dev("sized:128K", dma=2000)]}, "switchover-ack"),
    ("v1-partial-bitmap", "v1 RFC region with a 7-pfn dirty-bitmap buffer: the copied_pfns "
     "dialogue takes many reads per sync",
     {"iterations": 3, "v1_bitmap_bits": 7, "devices": [_dev("sized:32K", dma=8000)]}, "v1"),
    ("two-devices", "two VFIO devices (a mtty and a sized one)",
     {"iterations": 2, "dirty_rate": 5000,
      "devices": [_dev("mtty", seed=3), _dev("sized:128K", seed=4, dma=1000)]}),
    ("xbzrle", "XBZRLE pages across iterations",
     {"iterations": 4, "dirty_rate": 10000, "xbzrle": True,
      "devices": [_dev("sized:16K")]}),
    ("multifd-device-state", "10.x multifd: RAM packets, SYNC points and two devices' "
     "stop-and-copy data and config as device-state packets on 2 channels (a 1.5 MiB "
     "device without PRE_COPY: two data packets and its config; an mtty with pre-copy)",
     {"iterations": 3, "dirty_rate": 5000, "multifd_channels": 2,
      "devices": [_dev("sized:1536K", dma=1000, features="p2p"), _dev("mtty", seed=3)]},
     "multifd"),
)]

SCENARIO_NAMES = [s.name for s in SCENARIOS]


def scenario(name) -> Scenario:
    for s in SCENARIOS:
        if s.name == name:
            return s
    raise QmigstreamError(f"unknown scenario {name!r}; one of {', '.join(SCENARIO_NAMES)}")


def config_for(prof: P.Profile, sc: Scenario) -> MigrateConfig:
    s = dict(BASE)
    s.update(sc.settings)
    s["devices"] = [DeviceSpec(**d) for d in s["devices"]]
    return MigrateConfig(profile=prof.name, **s)


def regenerate_command(profiles, scenarios) -> str:
    cmd = "qmigstream golden generate DIR"
    if profiles is not None:
        cmd += " --profiles " + ",".join(profiles)
    if scenarios is not None:
        cmd += " --scenarios " + ",".join(scenarios)
    return cmd


def _file_entry(path, rel) -> dict:
    h = hashlib.sha256()
    c = 0
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
            c = crc32(b, c)
            n += len(b)
    return {"file": rel, "size": n, "sha256": h.hexdigest(), "crc32": f"{c:08x}"}


def _decode_json(stream_path, out_path):
    from ..cli.cmd_decode import write_json
    reader = StreamReader(str(stream_path))
    with open(out_path, "w") as f:
        write_json(f, tree_events(reader.records()), os.path.basename(stream_path), False,
                   lambda off: None, reader)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def make_vector(directory, prof: P.Profile, sc: Scenario) -> dict:
    """Write one vector into ``directory/<profile>/``; return its manifest entry."""
    sub = os.path.join(directory, prof.name)
    os.makedirs(sub, exist_ok=True)
    stream = os.path.join(sub, f"{sc.name}.mig")
    cfg = config_for(prof, sc)
    res = migrate(stream, cfg)
    channels = [c["file"] for c in res.channels]
    rr = replay(stream, expect=res.to_json(), channels=channels)
    if not (rr.ok and rr.verified):
        raise QmigstreamError(f"{prof.name}/{sc.name}: the vector does not replay: "
                              f"{rr.error or rr.mismatches}")
    _decode_json(stream, os.path.join(sub, f"{sc.name}.decode.json"))
    state = {
        "source_before": [{"idstr": d["idstr"], "state_digest": d["state_before"]}
                          for d in _source_before(res, rr)],
        "source_after": [{k: d[k] for k in ("idstr", "interface", "family", "profile", "seed",
                                             "data_bytes", "chunks", "state_digest",
                                             "image_digest", "config")}
                         for d in res.devices],
        "destination_before": [{"idstr": d["idstr"], "state_digest": d["state_before"]}
                               for d in rr.devices],
        "destination_after": [{"idstr": d["idstr"], "state_digest": d["state_after"],
                               "bytes": d["bytes"], "chunks": d["chunks"],
                               "verified": d["verified"]} for d in rr.devices],
        "ram": res.ram, "pages": res.pages, "rounds": res.rounds, "converged": res.converged,
        "phases": res.phases,
    }
    if channels:
        state["channels"] = [{"file": os.path.basename(c["file"]), "size": c["size"],
                              "packets": c["packets"]} for c in res.channels]
        state["destination_channels"] = [
            {k: v for k, v in c.items() if k != "file"} for c in rr.channels]
    _write_json(os.path.join(sub, f"{sc.name}.state.json"), state)
    rel = lambda name: f"{prof.name}/{name}"  # noqa: E731
    return {"profile": prof.name, "scenario": sc.name, "what": sc.what,
            "settings": cfg.to_json(),
            "files": [_file_entry(os.path.join(directory, rel(f"{sc.name}{ext}")),
                                  rel(f"{sc.name}{ext}"))
                      for ext in (".mig", ".decode.json", ".state.json") +
                      tuple(f".mig.ch{i}" for i in range(len(channels)))]}


def _source_before(res, rr):
    from ..device.pci_device import EmulatedPciDevice
    out = []
    for d in res.devices:
        dev = EmulatedPciDevice(d["profile"], seed=d["seed"])
        out.append({"idstr": d["idstr"], "state_before": dev.state_digest()})
    return out


def generate(directory, profiles=None, scenarios=None, progress=None) -> dict:
    profs = [P.get(p) for p in (profiles or list(P.PROFILES))]
    scs = [scenario(s) for s in (scenarios or SCENARIO_NAMES)]
    os.makedirs(directory, exist_ok=True)
    vectors, skipped = [], []
    for prof in profs:
        for sc in scs:
            if not sc.applies(prof):
                skipped.append({"profile": prof.name, "scenario": sc.name,
                                "why": f"needs {sc.needs}"})
                continue
            vectors.append(make_vector(directory, prof, sc))
            if progress:
                progress(f"{prof.name}/{sc.name}")
    manifest = {"format": "qmigstream-golden", "format_version": 1,
                "generator": f"qmigstream {__version__}", "content": CONTENT,
                "regenerate": regenerate_command(profiles and [p.name for p in profs],
                                                 scenarios),
                "profiles": [p.name for p in profs], "scenarios": [s.name for s in scs],
                "vectors": vectors, "skipped": skipped}
    _write_json(os.path.join(directory, "manifest.json"), manifest)
    return manifest


def load_manifest(directory) -> dict:
    path = os.path.join(directory, "manifest.json")
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise QmigstreamError(f"{path}: no manifest (not a golden vector set)") from None
    except ValueError as e:
        raise QmigstreamError(f"{path}: not JSON: {e}") from None
    if m.get("format") != "qmigstream-golden":
        raise QmigstreamError(f"{path}: not a qmigstream golden manifest")
    return m


@dataclass
class CheckResult:
    """What ``golden check`` found for one set."""

    ok: bool = True
    problems: list = field(default_factory=list)
    checked: int = 0

    def fail(self, msg):
        self.ok = False
        self.problems.append(msg)


def check(directory, *, regenerate=True) -> CheckResult:
    m = load_manifest(directory)
    res = CheckResult()
    if regenerate and m.get("content") != CONTENT:
        res.fail(f"the set was made with content {m.get('content')}, this qmigstream makes "
                 f"{CONTENT}: its vectors cannot regenerate the same; make the set again "
                 f"({m.get('regenerate', 'qmigstream golden generate DIR')})")
    for v in m["vectors"]:
        name = f"{v['profile']}/{v['scenario']}"
        for fe in v["files"]:
            path = os.path.join(directory, fe["file"])
            if not os.path.exists(path):
                res.fail(f"{fe['file']}: missing")
                continue
            got = _file_entry(path, fe["file"])
            for k in ("size", "sha256", "crc32"):
                if got[k] != fe[k]:
                    res.fail(f"{fe['file']}: {k} {got[k]} != manifest {fe[k]}")
        stream = os.path.join(directory, v["files"][0]["file"])
        if os.path.exists(stream):
            buf = io.BytesIO()
            w = StreamWriter(buf)
            for r in read_records(stream):
                w.write(r)
            with open(stream, "rb") as f:
                if buf.getvalue() != f.read():
                    res.fail(f"{name}: does not round-trip byte for byte")
        for fe in v["files"]:
            path = os.path.join(directory, fe["file"])
            if ".mig.ch" not in fe["file"] or not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                raw = f.read()
            try:
                recs = MF.parse_channel(raw, name=fe["file"])
                again = MF.build_channel(recs[1:], recs[0].channel_id, recs[0].uuid)
            except QmigstreamError as e:
                res.fail(f"{fe['file']}: does not parse as a multifd channel: {e}")
                continue
            if again != raw:
                res.fail(f"{fe['file']}: does not round-trip byte for byte")
        if regenerate:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    entry = make_vector(tmp, P.get(v["profile"]), scenario(v["scenario"]))
                except QmigstreamError as e:
                    res.fail(f"{name}: regenerating failed: {e}")
                    continue
                for a, b in zip(entry["files"], v["files"]):
                    if a["sha256"] != b["sha256"]:
                        res.fail(f"{b['file']}: regenerated bytes differ "
                                 f"(sha256 {a['sha256']})")
        res.checked += 1
    return res


# -- compare ------------------------------------------------------------------------

def channel_files(items) -> list:
    """Multifd channel files from ``items``: files as given; a directory stands for
    its files whose names end in ``ch<N>`` (``X.mig.ch0``, ``ch1``), in ``N`` order."""
    import re
    out = []
    for item in items or ():
        item = os.fspath(item)
        if not os.path.isdir(item):
            out.append(item)
            continue
        found = []
        for name in os.listdir(item):
            m = re.search(r"ch(\d+)\Z", name)
            if m and os.path.isfile(os.path.join(item, name)):
                found.append((int(m.group(1)), name))
        if not found:
            raise QmigstreamError(f"{item}: no multifd channel files (names ending in ch<N>)")
        out.extend(os.path.join(item, name) for _, name in sorted(found))
    return out


def vector_channels(directory, v) -> list:
    """The paths of a vector's multifd channel files, in channel order."""
    return [os.path.join(directory, f["file"]) for f in v["files"] if ".mig.ch" in f["file"]]


def _parse_channels(paths) -> list:
    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise QmigstreamError(f"cannot read multifd channel {path}: {e}") from None
        out.append((path, MF.parse_channel(raw, name=path)))
    return out


def _vfio_shape(path, multifd=None):
    """Each VFIO device's sections, data, config (and multifd packets): what
    :func:`vfio_differences` compares."""
    devices, hints = scan(path, multifd=multifd or None)
    out = {}
    for dev in devices.values():
        secs = []
        for s in dev.sections:
            tags = []
            for r in s["records"]:
                if r.kind == "vfio_marker":
                    tags.append(r.marker.name)
                elif r.kind == "vfio_data":
                    tags.append(f"DATA[{r.data_size}]")
                elif r.kind == "vfio_config":
                    tags.append("CONFIG")
            secs.append(f"{s['type']}: {' '.join(tags)}")
        cfg = dev.config_record()
        out[dev.idstr] = {"family": dev.family.family if dev.family else None,
                          "sections": secs, "data_bytes": dev.data_bytes,
                          "config": cfg.fields() if cfg is not None else None}
        if dev.multifd is not None:
            t = dev.multifd
            out[dev.idstr]["multifd"] = [
                f"idx {i}: " + ("CONFIG" if i == t.config_idx else
                                f"DATA[{len(t.packets[i][1].data)}]")
                for i in sorted(t.packets)]
            out[dev.idstr]["multifd_data_sha256"] = hashlib.sha256(t.data).hexdigest()
    return out, hints


def vfio_differences(expected_path, actual_path, multifd_expected=None,
                     multifd_actual=None) -> list:
    """How the VFIO sections of two streams differ, device by device (text lines).

    ``multifd_expected``/``multifd_actual``: each stream's parsed multifd channels
    (``[(name, records)]``), whose device-state packets then count too: by
    index, whatever channel carried them, and the reassembled data's digest.
    """
    from ..errors import StreamError
    a, ha = _vfio_shape(expected_path, multifd_expected)
    try:
        b, hb = _vfio_shape(actual_path, multifd_actual)
    except StreamError as e:
        if multifd_actual is None:
            raise
        return [f"stream: the device state on its multifd channels does not reassemble: "
                f"{e.one_line()}"]
    out = []
    for k in ("switchover_start", "vmdesc_configuration"):
        if ha.get(k) != hb.get(k):
            out.append(f"stream: {k} {ha.get(k)} in the vector, {hb.get(k)} in the stream")
    for idstr in sorted(set(a) | set(b)):
        if idstr not in b:
            out.append(f"{idstr}: in the vector only")
            continue
        if idstr not in a:
            out.append(f"{idstr}: in the stream only")
            continue
        da, db = a[idstr], b[idstr]
        if da["family"] != db["family"]:
            out.append(f"{idstr}: layout family {da['family']} in the vector, "
                       f"{db['family']} in the stream")
        for what, sa, sb in (("section", da["sections"], db["sections"]),
                             ("multifd packet", da.get("multifd", []), db.get("multifd", []))):
            for i in range(max(len(sa), len(sb))):
                x = sa[i] if i < len(sa) else "(none)"
                y = sb[i] if i < len(sb) else "(none)"
                if x != y:
                    out.append(f"{idstr}: {what} {i}: vector '{x}', stream '{y}'")
        if da["data_bytes"] != db["data_bytes"]:
            out.append(f"{idstr}: {da['data_bytes']} data bytes in the vector, "
                       f"{db['data_bytes']} in the stream")
        elif da.get("multifd_data_sha256") != db.get("multifd_data_sha256"):
            out.append(f"{idstr}: multifd device data differs (sha256 "
                       f"{str(da.get('multifd_data_sha256'))[:16]}... in the vector, "
                       f"{str(db.get('multifd_data_sha256'))[:16]}... in the stream)")
        ca, cb = da["config"] or {}, db["config"] or {}
        for key in sorted(set(ca) | set(cb)):
            if ca.get(key) != cb.get(key):
                out.append(f"{idstr}: config {key}: {ca.get(key)!r} in the vector, "
                           f"{cb.get(key)!r} in the stream")
    return out


_COUNTS = {"ram": "RAM packets", "sync": "SYNC packets", "device_state": "device-state packets",
           "normal_pages": "normal pages", "zero_pages": "zero pages",
           "compressed": "compressed RAM packets (pages not compared)"}


def _channel_view(parsed):
    """What a migration's channels carry, whichever channel each packet took:
    packet and page counts, and each RAM page's final content (``(block, offset)``
    -> sha256, ``None`` for a zero page), packets applied a sync epoch at a time."""
    from ..wire import vfio as W
    counts = dict.fromkeys(_COUNTS, 0)
    epochs = []
    for _, recs in parsed:
        chan, cur = [], []
        for pkt in recs[1:]:
            if isinstance(pkt, MF.DeviceStatePacket):
                counts["device_state"] += 1
                continue
            cur.append(pkt)
            if pkt.is_sync:
                chan.append(cur)
                cur = []
        chan.append(cur)
        epochs.append(chan)
    pages = {}
    for k in range(max((len(c) for c in epochs), default=0)):
        for chan in epochs:
            for pkt in chan[k] if k < len(chan) else ():
                counts["sync" if pkt.is_sync else "ram"] += 1
                normal, zero = pkt.offsets()
                counts["normal_pages"] += len(normal)
                counts["zero_pages"] += len(zero)
                if pkt.flags & W.MULTIFD_FLAG_COMPRESSION_MASK:
                    counts["compressed"] += 1
                    continue
                for i, off in enumerate(normal):
                    pages[(pkt.ramblock, off)] = hashlib.sha256(pkt.page(i)).digest()
                for off in zero:
                    pages[(pkt.ramblock, off)] = None
    return counts, pages


def multifd_differences(expected, actual) -> list:
    """How two migrations' multifd channels differ (text lines): the number of
    channels, packet and page counts over all channels, and the RAM pages they
    carry, block by block.  Which channel carried a packet does not count (QEMU's
    threads decide it); device-state packets are :func:`vfio_differences`' part."""
    out = []
    if len(expected) != len(actual):
        out.append(f"channels: {len(expected)} in the vector, {len(actual)} in the stream")
    (ca, pa), (cb, pb) = _channel_view(expected), _channel_view(actual)
    for k, label in _COUNTS.items():
        if ca[k] != cb[k]:
            out.append(f"{label}: {ca[k]} in the vector, {cb[k]} in the stream")
    for blk in sorted({b for b, _ in pa} | {b for b, _ in pb}):
        ka = {o for b, o in pa if b == blk}
        kb = {o for b, o in pb if b == blk}
        changed = sorted(o for o in ka & kb if pa[(blk, o)] != pb[(blk, o)])
        only_a, only_b = sorted(ka - kb), sorted(kb - ka)
        if changed or only_a or only_b:
            first = ", ".join(f"0x{o:x}" for o in (changed or only_a or only_b)[:4])
            out.append(f"RAM block {blk} on the channels: {len(changed)} page(s) differ, "
                       f"{len(only_a)} only in the vector, {len(only_b)} only in the stream "
                       f"(first at {first})")
    return out


def compare(directory, stream, *, vector=None, channels=None) -> dict:
    """Differences between ``stream`` and a vector of the set (named, or the closest).

    ``channels``: the stream's multifd channel files (see :func:`channel_files`).
    Given, they are compared with the vector's (:func:`multifd_differences`) and
    their device-state packets count in the VFIO comparison; not given, only the
    main streams are compared, and ``notes`` says so for a vector that has channels.
    """
    from ..diff import diff
    m = load_manifest(directory)
    cands = m["vectors"]
    if vector is not None:
        cands = [v for v in cands if f"{v['profile']}/{v['scenario']}" == vector
                 or v["scenario"] == vector]
        if not cands:
            raise QmigstreamError(f"no vector {vector!r} in {directory}")
    theirs = None if channels is None else _parse_channels(channels)
    best = None
    for v in cands:
        path = os.path.join(directory, v["files"][0]["file"])
        ours = _parse_channels(vector_channels(directory, v)) if theirs is not None else None
        d = diff(path, stream)
        vf = vfio_differences(path, stream, ours, theirs)
        mf = multifd_differences(ours, theirs) if theirs is not None else []
        score = len(d.differences) + len(vf) + len(mf)
        if best is None or score < best[0]:
            best = (score, v, d, vf, mf)
        if score == 0:
            break
    score, v, d, vf, mf = best
    notes = []
    n_ours = len(vector_channels(directory, v))
    if theirs is None and n_ours:
        notes.append(f"the vector has {n_ours} multifd channel file(s) and none were given "
                     f"for the stream: only the main streams were compared")
    return {"vector": f"{v['profile']}/{v['scenario']}", "equal": score == 0,
            "differences": [x.to_json() for x in d.differences], "vfio": vf,
            "multifd": mf, "channels": {"vector": n_ours,
                                        "stream": None if theirs is None else len(theirs)},
            "notes": notes, "text": d.format_text(), "chosen_from": len(cands)}
