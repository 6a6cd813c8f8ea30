"""The source side: emulated VFIO devices and guest RAM migrated into the stream a QEMU release writes.

Order of the stream (``migration_thread`` in migration/migration.c, savevm.c):

1. header and configuration record (the template's, or the profile's machine);
2. with switchover-ack: ``OPEN_RETURN_PATH`` and ``PING(1)`` (the return path);
3. setup: ``START`` of ``ram`` (MEM_SIZE, EOS), then ``START`` of each VFIO device;
4. iterations: each round a ``PART`` of ``ram`` (one pass over the dirty pages),
   then a ``PART`` of each VFIO device whose release has an iterate handler and
   that is still in pre-copy; between rounds the CPU workload and the devices'
   DMA run for the modelled time the round took (bytes / bandwidth), and the
   dirty log is synced (CPU writes plus the devices' own dirty tracking);
5. the VM stops: 10.0+ ``SWITCHOVER_START`` (machine types >= 10.0), then ``END``
   of ``ram`` (the last dirty pages) and of each device (stop-and-copy data;
   5.2 also its config record);
6. ``FULL`` sections: the template's devices in their order, each VFIO device's
   config section (6.0+) before ``acpi_build``/``globalstate``;
7. ``EOF`` and the VMDESCRIPTION trailer describing every FULL section, in the
   profile's JSON style (8.2+: with the configuration description first).

With ``multifd_channels`` (10.0+ profiles, machine types >= 10.0) the RAM
pages travel in RAM packets on channel files ``OUT.ch0`` ... (see
:mod:`.multifd`); the main channel's RAM sections keep MEM_SIZE, a
``MULTIFD_FLUSH`` at every scan wrap (and in setup) and EOS
(``multifd_ram_flush_and_sync``, per-round mode); each VFIO device's END is a
lone END_OF_STATE, its stop-and-copy data and config record go as
device-state packets on the channels, and its FULL is END_OF_STATE (10.1+ with
``load_config_after_iter``: DEV_CONFIG_LOAD_READY).

Convergence: after each round, stop when the round count reaches
``iterations`` (if given), else when the remaining dirty bytes can be sent
within ``downtime`` at ``bandwidth`` (and, with switchover-ack, every device
has sent its initial data), or at ``max_iterations``.  All choices come from
the seed: the same configuration gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field

from .. import __version__, vmdesc
from ..codec.ram_records import RamBlockInfo, RamEos, RamMemSize, RamMultifdFlush
from ..codec.records import (Command, Configuration, EndOfStream, FileHeader, SectionFooter,
                             SectionHeader, VmDescription)
from ..device.pci_device import PAGE, EmulatedPciDevice
from ..errors import QmigstreamError
from ..pieces import Pieces
from ..vfio import builder as VB
from ..vfio import family as VF
from ..vfio import multifd as MF
from ..wire.commands import MigCmd
from ..wire.header import SectionType as T
from ..codec.sections.vfio import VfioDataChunk
from ..wire.vfio import PciConfigState, data_chunk_header
from . import profiles as P
from .guest import (DEFAULT_RAM_DIGEST, DIGEST_THREAD_MIN, RAM_DIGESTS, CpuWorkload, GuestRam, fill_initial,
                    run_parallel)
from .ramsave import RamSaver
from .vfiodev import SourceV1, SourceV2

NS = 1_000_000_000


@dataclass
class DeviceSpec:
    """One emulated VFIO device: its state profile, seed, DMA rate (pages/s), v2 features."""
    profile: str = "sized:64K"
    seed: int = 1
    dma_rate: int = 0
    features: str = "p2p,pre_copy"
    address: str | None = None          # PCI address; default 0000:00:1N.0

    @classmethod
    def parse(cls, text: str, index: int = 0) -> "DeviceSpec":
        """``PROFILE[,seed=N][,dma=RATE][,features=a+b][,addr=0000:00:05.0]``."""
        parts = text.split(",")
        spec = cls(profile=parts[0] or "sized:64K", seed=index + 1)
        for p in parts[1:]:
            k, _, v = p.partition("=")
            if k == "seed":
                spec.seed = int(v, 0)
            elif k == "dma":
                spec.dma_rate = int(v, 0)
            elif k == "features":
                spec.features = v.replace("+", ",")
            elif k == "addr":
                spec.address = v
            else:
                raise QmigstreamError(f"device option {k!r}: one of seed, dma, features, addr")
        return spec


@dataclass
class MigrateConfig:
    """Everything ``migrate`` is told: profile, machine, devices, workload, convergence."""

    profile: str = P.DEFAULT_PROFILE
    template: str | None = None
    devices: list = field(default_factory=lambda: [DeviceSpec()])
    seed: int = 0
    ram_size: int = 64 << 20
    initial_fraction: float = 0.25
    iterations: int | None = None
    max_iterations: int = 30
    bandwidth: int = 1 << 30              # bytes per second
    downtime_ms: int = 300
    dirty_rate: int = 0                   # CPU stores per second
    store_size: int = 64
    xbzrle: bool = False
    xbzrle_cache: int = 64 << 20
    switchover_ack: bool = False
    v1_layout: str = "rfc"
    v1_window: int = 64 * 1024
    v1_bitmap_bits: int | None = None
    multifd_channels: int = 0             # 0: no multifd
    load_config_after_iter: bool | None = None   # 10.1+; None: the default (off on x86)
    ram_digest: str = DEFAULT_RAM_DIGEST  # the manifest's RAM digests (guest.RAM_DIGESTS)
    stream_sha256: bool = False           # the sha256 of the main stream, in the manifest

    def to_json(self):
        d = asdict(self)
        d["devices"] = [asdict(x) for x in self.devices]
        return d


@dataclass
class MigrationResult:
    """What ``migrate`` wrote and the source's final state (the manifest)."""

    path: str
    profile: str
    size: int = 0
    sha256: str | None = None                         # of the stream (None: not made)
    rounds: int = 0
    phases: dict = field(default_factory=dict)        # phase -> bytes
    pages: dict = field(default_factory=dict)
    devices: list = field(default_factory=list)
    ram_digest: str = DEFAULT_RAM_DIGEST              # how ``ram`` is computed
    ram: dict = field(default_factory=dict)           # block -> digest of final memory
    converged: str = ""
    config: dict = field(default_factory=dict)
    channels: list = field(default_factory=list)      # multifd channel files

    def to_json(self):
        return asdict(self)


class _Out:
    """Writes records (and pre-encoded pieces), hashing as it goes if asked; bytes
    per phase.

    Every list of pieces goes out with ``writev`` (:func:`writev_all`), so the
    pages, memoryviews of guest RAM, are copied once: into the file.  The
    writes are made by a :class:`_Writer` thread while this one goes on making
    the next pieces (``writev`` lets go of the GIL); the pieces are views of
    memory that must not change until they are written, so every section ends
    with :meth:`sync` (nothing changes guest RAM or a device inside a
    section) and :meth:`sync` is what a caller that changes either first
    calls.  Records of a few bytes are gathered into one write."""

    def __init__(self, f, footers, sha256=None, hasher=None):
        self.f = f
        self.fd = f.fileno()
        self.footers = footers
        self.offset = 0
        self.phase = "header"
        self.phases = {}
        self.sha256 = sha256               # hashed here, as written
        self.hasher = hasher               # or: a _FileHasher reading the file behind us
        self._writer = _Writer(self.fd, hasher)
        self._small = []                   # small pieces not yet handed to the writer
        self._small_n = 0

    def raw(self, pieces):
        h = self.sha256
        if h is not None:
            for p in pieces:
                h.update(p)
        if len(pieces) <= 8:
            n = sum(map(len, pieces))
            if n < _SMALL:
                self._small += pieces
                self._small_n += n
                self._count(n)
                if self._small_n >= _SMALL or len(self._small) >= IOV_MAX:
                    self._hand_small()
                return n
        self._hand_small()
        totals = _totals(pieces)
        n = sum(totals)
        self._count(n)
        self._writer.put(pieces, totals, n, self.offset)
        return n

    def _count(self, n):
        self.offset += n
        self.phases[self.phase] = self.phases.get(self.phase, 0) + n

    def _hand_small(self):
        if self._small:
            pieces, n = self._small, self._small_n
            self._small, self._small_n = [], 0
            self._writer.put(pieces, _totals(pieces), n, self.offset)

    def sync(self):
        """Every byte so far is in the file (raises the error a write met)."""
        self._hand_small()
        self._writer.sync()

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        try:
            if et is None:
                self.sync()
        finally:
            self._writer.close(drop=et is not None)
            if self.hasher is not None:
                self.hasher.abandon()
                self.hasher = None

    def rec(self, r):
        r.offset = self.offset
        if type(r) is VfioDataChunk and len(r.data) > 4096:
            # what r.encode() gives, without copying the data (views of the device's blob)
            d = r.data
            if type(d) is Pieces:
                return self.raw([data_chunk_header(len(d))] + d.parts)
            return self.raw((data_chunk_header(len(d)), d))
        return self.raw((r.encode(),))

    def section(self, type_, sid, payload, idstr=None, instance_id=0, version_id=1, *,
                sync=True):
        """Header, payload (records, or lists of encoded pieces), footer; then
        :meth:`sync` unless ``sync`` is false (the caller syncs before anything
        changes what the payload's pieces show)."""
        n = self.rec(SectionHeader(type_, sid, idstr, instance_id, version_id)
                     if type_ in (T.SECTION_START, T.SECTION_FULL) else SectionHeader(type_, sid))
        for r in payload:
            n += self.raw(r) if isinstance(r, list) else self.rec(r)
        if self.footers:
            n += self.rec(SectionFooter(sid))
        if sync:
            self.sync()
        return n


def _totals(pieces) -> list:
    """The bytes of each ``IOV_MAX`` of ``pieces`` (what :func:`writev_all` takes)."""
    return [sum(map(len, pieces[i:i + IOV_MAX])) for i in range(0, len(pieces), IOV_MAX)]


#: Pieces shorter than this in all are gathered before they are written.
_SMALL = 64 << 10
#: Bytes handed to the writer thread and not yet written at most: the maker of
#: pieces waits beyond this (the pieces of a big guest are not all held at once).
_AHEAD = 64 << 20
#: The GIL switch interval while a writer thread runs: a thread whose ``writev``
#: returned waits about this long (not the default 5 ms) for the thread making
#: pieces to let the GIL go.
_WRITER_SWITCH_INTERVAL = 20e-6


class _Writer:
    """Writes lists of pieces, in order, on a thread of its own (started at the
    first list); :meth:`sync` waits for all handed over so far, :meth:`put` while
    more than :data:`_AHEAD` bytes wait.  After a failed write the rest are
    dropped and the error is raised in the caller (by the next :meth:`put` or
    :meth:`sync`)."""

    def __init__(self, fd, hasher=None):
        self.fd = fd
        self.hasher = hasher
        self._thread = None
        self._error = None
        self._drop = False                 # skip what is queued (an error, or closing after one)
        self._ahead = 0                    # bytes handed over, not yet written
        self._switch = self._ours = None

    def _start(self):
        import queue
        import sys
        import threading
        self._q = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._switch = self._ours = sys.getswitchinterval()
        if self._switch > _WRITER_SWITCH_INTERVAL:
            sys.setswitchinterval(_WRITER_SWITCH_INTERVAL)
            self._ours = sys.getswitchinterval()      # as the interpreter keeps it
        self._thread = threading.Thread(target=self._run, name="qmigstream-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self):
        q, cv = self._q, self._cv
        while True:
            item = q.get()
            if item is None:
                return
            pieces, totals, n, end = item
            if not self._drop:
                try:
                    writev_all(self.fd, pieces, totals)
                    if self.hasher is not None:
                        self.hasher.advance(end)
                except BaseException as e:        # raised in the caller
                    self._error = e
                    self._drop = True
            with cv:
                self._ahead -= n
                cv.notify_all()

    def _check(self):
        if self._error is not None:
            raise self._error

    def put(self, pieces, totals, n, end):
        """Hand over ``pieces`` (``n`` bytes; ``totals``: :func:`_totals`), which end
        at stream offset ``end``."""
        if self._thread is None:
            self._start()
        with self._cv:
            while self._ahead > _AHEAD and self._error is None:
                self._cv.wait()
            self._check()
            self._ahead += n
        self._q.put((pieces, totals, n, end))

    def sync(self):
        if self._thread is None:
            return
        with self._cv:
            while self._ahead:
                self._cv.wait()
        self._check()

    def close(self, drop: bool = False):
        """Stop the thread; ``drop``: what is still queued is not written."""
        if self._thread is None:
            return
        import sys
        if drop:
            self._drop = True
        self._q.put(None)
        self._thread.join()
        self._thread = None
        if sys.getswitchinterval() == self._ours:        # (unless changed since)
            sys.setswitchinterval(self._switch)


def _pci_address(i: int, spec: DeviceSpec) -> str:
    return spec.address or f"0000:00:{0x10 + i:02x}.0"


class _Device:
    """One VFIO device on the source: the emulated device and QEMU's side of its interface."""

    def __init__(self, i, spec, prof, cfg, ram, family=None):
        self.spec = spec
        self.idstr = f"{_pci_address(i, spec)}/vfio"
        main = ram.main
        dma_pages = max(1, min(256, main.npages - 0x100000 // PAGE)) \
            if main.used_length > 0x100000 else max(1, main.npages // 2)
        dma_base = 0x100000 if main.used_length > 0x100000 + PAGE else 0
        self.device = EmulatedPciDevice(spec.profile, seed=spec.seed, memory=ram,
                                        dma_base=dma_base, dma_pages=dma_pages)
        self.family = VF.get(family or prof.vfio_family)
        if prof.interface == "v1":
            self.src = SourceV1(self.device, layout=cfg.v1_layout, window_size=cfg.v1_window,
                                bitmap_bits=cfg.v1_bitmap_bits)
        else:
            self.src = SourceV2(self.device, features=spec.features,
                                precopy=prof.v2_precopy, ram_bytes=main.used_length)
        self.precopy_active = self.family.has_part and self.src.precopy
        self.init_sent = False
        self.data_bytes = 0
        self.chunks = 0
        self._carry = 0

    def run_for(self, ns):
        if not self.spec.dma_rate:
            return
        total = self.spec.dma_rate * ns + self._carry
        ticks, self._carry = divmod(total, NS)
        if ticks:
            self.device.run(ticks)

    def config_state(self):
        dev = self.device
        table = bytes(dev.msix_table) if len(dev.msix_table) else None
        return PciConfigState.make(dev.config_space(), msix_table=table)


def migrate(out_path, cfg: MigrateConfig, progress=None) -> MigrationResult:
    """Write the stream to ``out_path``; return what was written and the source's final state."""
    prof = P.get(cfg.profile)
    tpl = None
    if cfg.template:
        from .template import load_template
        tpl = load_template(cfg.template)
    if tpl is not None:
        ram = tpl.ram
        footers = tpl.footers
        conf = tpl.configuration
        machine = tpl.machine or prof.machine
    else:
        ram = GuestRam([("pc.ram", cfg.ram_size)])
        footers = True
        machine = prof.machine
        conf = Configuration(machine.encode("latin-1"))
    if cfg.ram_digest not in RAM_DIGESTS:
        raise QmigstreamError(f"RAM digest {cfg.ram_digest!r}: one of {', '.join(RAM_DIGESTS)}")
    if cfg.switchover_ack and prof.interface != "v2":
        raise QmigstreamError(f"{prof.name}: switchover-ack needs the v2 interface (8.1+)")
    if cfg.switchover_ack and not VF.get(prof.vfio_family).init_data_sent:
        raise QmigstreamError(f"{prof.name}: this release has no switchover-ack")
    family, lcai = _multifd_choice(prof, cfg, machine)

    def make_devices():
        return [_Device(i, s, prof, cfg, ram, family) for i, s in enumerate(cfg.devices)]
    if tpl is None:
        # the guest's initial data: pages placed on the seed's tape (no copies)
        fill_initial(ram, seed=cfg.seed, fraction=cfg.initial_fraction)
    devices = make_devices()       # a device's state is made only when read
    ram_sid = tpl.ram_section_id if tpl else 2
    next_sid = (tpl.max_section_id if tpl else ram_sid) + 1
    for d in devices:
        d.sid = next_sid
        next_sid += 1
    workload = CpuWorkload(ram, seed=cfg.seed, rate=cfg.dirty_rate, store_size=cfg.store_size,
                           start=0x100000 if ram.main.used_length > 0x200000 else 0)
    saver = RamSaver(ram, xbzrle_on=cfg.xbzrle, cache_size=cfg.xbzrle_cache)
    total_pfns = ram.main.npages
    res = MigrationResult(str(out_path), prof.name, config=cfg.to_json())
    sender = None
    if cfg.multifd_channels:
        from .multifd import MultifdSender, channel_paths
        sender = MultifdSender(channel_paths(out_path, cfg.multifd_channels), ram.page_size,
                               saver.counts)
    with _open_output(out_path) as f, \
            _Out(f, footers, *_stream_hashing(f, cfg.stream_sha256)) as out:
        out.rec(FileHeader())
        if conf is not None:
            out.rec(Configuration(conf.machine, conf.subsections))
        if cfg.switchover_ack:
            out.phase = "commands"
            out.rec(Command(MigCmd.OPEN_RETURN_PATH))
            out.rec(Command(MigCmd.PING, {"value": 1}))
        # -- setup -----------------------------------------------------------------
        out.phase = "setup"
        blocks = [b.info if b.info is not None else RamBlockInfo(b.name, b.used_length)
                  for b in ram]
        saver.setup()
        if sender is None:
            setup = [RamMemSize(ram.total, blocks), RamEos()]
        else:                          # ram_save_setup: flush and sync before EOS
            setup = _then(_flush(sender, [RamMemSize(ram.total, blocks)]), RamEos())
        out.section(T.SECTION_START, ram_sid, setup, "ram", 0, 4)
        for d in devices:
            d.src.setup()
            out.section(T.SECTION_START, d.sid, VB.start_records(d.family), d.idstr, 0, 1)
        # -- iterations ------------------------------------------------------------
        early = None
        digest_now = False
        if not cfg.dirty_rate and not any(s.dma_rate for s in cfg.devices):
            # Nothing writes guest RAM from here on: its digests are made now, on
            # another thread beside the pre-copy passes; pages-crc32 keeps each
            # region's part, so the digests at the stop redo only regions written
            # since (none, unless something wrote RAM after all).
            # Digests that read little (pages on the synthetic guest's tape) are
            # arithmetic that keeps the GIL: made on this thread once the first
            # pass is handed to the writer thread.
            if cfg.ram_digest == "pages-crc32" and ram.crc_read_bytes() < DIGEST_THREAD_MIN:
                digest_now = True            # beside the writes of the first pass
            else:
                early = _Later(lambda: ram.digests(cfg.ram_digest))
        rounds = 0
        reason = ""
        while True:
            out.phase = f"iteration {rounds + 1}"
            saver.sync()
            _merge_device_dirty(devices, ram, total_pfns)
            before = out.offset + (sender.bytes if sender else 0)
            out.section(T.SECTION_PART, ram_sid, _ram_pass(saver, sender), sync=not digest_now)
            if digest_now:
                # made while the writer thread writes the pass (RAM stays as it is
                # until the sync)
                early = _Now(ram.digests(cfg.ram_digest))
                digest_now = False
                out.sync()
            for d in devices:
                if not d.precopy_active:
                    continue
                chunk = d.src.precopy_chunk()
                init = False
                if cfg.switchover_ack and not d.init_sent and d.src.initial_bytes() == 0:
                    init = d.init_sent = True
                if chunk:
                    d.data_bytes += len(chunk)
                    d.chunks += 1
                payload = VB.part_records(d.family, chunk or None, init_data_sent=init)
                out.section(T.SECTION_PART, d.sid, payload)
                # vfio_save_iterate's answer: v1 "not done" (0) after sending data,
                # done (1) after "DATA 0"; v2 1 (8.x; 9.0+ only when nothing is
                # pending, but 9.0+ walks every handler anyway).  Up to 8.2 a round ends
                # at the first handler that is not done.
                done = bool(d.family.protocol == "v2" or not chunk)
                if not done and not prof.iterate_walks_all:
                    break
            rounds += 1
            sent = out.offset + (sender.bytes if sender else 0) - before
            elapsed = sent * NS // max(1, cfg.bandwidth)
            workload.run_for(elapsed)
            for d in devices:
                d.run_for(elapsed)
            if progress:
                progress(out.offset)
            reason = _converged(cfg, rounds, saver, devices)
            if reason:
                break
        res.rounds = rounds
        res.converged = reason
        # -- stop and copy -----------------------------------------------------------
        out.phase = "completion"
        if prof.sends_switchover_start(machine):
            out.rec(Command(MigCmd.SWITCHOVER_START))
        saver.sync()
        finals = []
        for d in devices:
            finals.append(d.src.stop_and_copy())
        _merge_device_dirty(devices, ram, total_pfns)
        # The VM and the devices are stopped: RAM and device images are final.  Their
        # digests are made on other threads while the rest is written.

        def ram_digests():
            if early is not None:
                early.result()               # its region parts are what is reused here
            return ram.digests(cfg.ram_digest)
        digests = _Later(lambda: run_parallel(
            [ram_digests, lambda: [d.device.image_digest() for d in devices]],
            weights=[ram.total // 3, sum(d.device.profile.image_size for d in devices)]))
        out.section(T.SECTION_END, ram_sid, _ram_pass(saver, sender, last_stage=True))
        fulls = {}
        packets = []
        for d, (chunks, zero) in zip(devices, finals):
            d.data_bytes += sum(len(c) for c in chunks)
            d.chunks += len(chunks)
            cstate = d.config_state()
            out.section(T.SECTION_END, d.sid, VB.end_records(d.family, chunks, cstate,
                                                             zero_terminator=zero))
            fulls[d.idstr] = VB.full_records(d.family, cstate, load_config_after_iter=lcai)
            if d.family.end_over_multifd:
                # vfio_multifd_save_complete_precopy_thread: data idx 0.., then config
                packets += MF.device_packets(d.idstr, 0, chunks,
                                             VB.config_record(cstate).encode())
            d.src.finish()
        for pkt in packets:
            sender.queue_device_state(pkt)
        # -- device state ------------------------------------------------------------
        out.phase = "devices"
        entries = []
        tdevs = tpl.devices if tpl else []
        vfio_at = _vfio_position(tdevs)
        for i, td in enumerate(tdevs + [None]):
            if i == vfio_at:
                for d in devices:
                    payload = fulls[d.idstr]
                    if payload is None:
                        continue
                    out.section(T.SECTION_FULL, d.sid, payload, d.idstr, 0, 1)
                    entries.append(VB.vmdesc_entry(d.idstr, payload))
            if td is None:
                break
            out.section(T.SECTION_FULL, td.section_id, td.payload, td.idstr,
                        td.instance_id, td.version_id)
            if td.entry is not None:
                entries.append(td.entry)
        out.rec(EndOfStream())
        out.phase = "trailer"
        if tpl is None or tpl.description is not None:
            out.rec(VmDescription(_trailer(prof, tpl, conf, ram.page_size, entries)))
        out.sync()
        res.size = out.offset
        res.phases = out.phases
        _end_output(f)
        if out.sha256 is not None:
            res.sha256 = out.sha256.hexdigest()
        elif out.hasher is not None:
            f.flush()
            res.sha256 = out.hasher.finish(out.offset)
            out.hasher = None
    if sender is not None:
        sender.close()
        res.channels = sender.entries()
    res.pages = dict(saver.counts)
    res.ram_digest = cfg.ram_digest
    # the RAM digests and the devices' image sha256 (cached, used below) side by side
    res.ram, _ = digests.result()
    if ram.any_dirty():                     # written after the stop: not final after all
        res.ram = ram.digests(cfg.ram_digest)
    for d in devices:
        res.devices.append({"idstr": d.idstr, "interface": d.src.interface,
                            "family": d.family.name, "profile": d.spec.profile,
                            "seed": d.spec.seed, "features": d.spec.features,
                            "v1_layout": cfg.v1_layout if d.src.interface == "v1" else None,
                            "data_bytes": d.data_bytes, "chunks": d.chunks,
                            "state_digest": d.device.state_digest(),
                            "image_digest": d.device.image_digest(),
                            "config": d.device.config_space().hex()})
    return res


#: Pieces one ``writev`` takes at most (Linux's IOV_MAX).
IOV_MAX = 1024


def writev_all(fd, pieces, totals=None) -> int:
    """Write the bytes-like ``pieces`` in order, ``IOV_MAX`` to a ``writev``, going
    on after a short write (a pipe); returns the bytes written.  ``totals``: the
    bytes of each ``IOV_MAX`` pieces, when the caller knows them."""
    total = 0
    for j, i in enumerate(range(0, len(pieces), IOV_MAX)):
        batch = pieces[i:i + IOV_MAX] if i or len(pieces) > IOV_MAX else pieces
        left = totals[j] if totals is not None else sum(map(len, batch))
        total += left
        while left:
            done = os.writev(fd, batch)
            left -= done
            if not left:
                break
            k = 0
            while done >= len(batch[k]):
                done -= len(batch[k])
                k += 1
            batch = [memoryview(batch[k]).cast("B")[done:]] + list(batch[k + 1:])
    return total


def _open_output(path):
    """The stream file (unbuffered: :class:`_Out` writes lists of pieces), for
    writing from its start.  An existing regular file is overwritten in place and
    cut to length at the end (:func:`_end_output`): truncating a file just written
    costs its pages and, on ext4, starts their writeback at close
    (auto_da_alloc), 0.1 s and more for a 400 MB stream."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return open(path, "r+b", buffering=0)
    except OSError:
        pass
    return open(path, "wb", buffering=0)


def _stream_hashing(f, wanted):
    """(sha256 object, _FileHasher) for _Out: the file is hashed by reading it back
    on a thread when it can be (a regular file), else as it is written."""
    if not wanted:
        return None, None
    try:
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode) and hasattr(os, "preadv"):
            return None, _FileHasher(f.name)
    except OSError:
        pass
    return hashlib.sha256(), None


def _end_output(f):
    if f.seekable() and f.mode == "rb+":
        f.truncate()                   # at the end of what was written


class _FileHasher:
    """The sha256 of a file being written, on a thread that reads it back (from the
    page cache) up to what has been written and flushed (:meth:`advance`), so the
    hashing runs beside the writing instead of after it."""

    def __init__(self, path):
        import threading
        self._fd = os.open(path, os.O_RDONLY)
        self._h = hashlib.sha256()
        self._limit = 0
        self._closed = False
        self._cv = threading.Condition()
        self._error = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def advance(self, upto: int):
        with self._cv:
            self._limit = max(self._limit, upto)
            self._cv.notify()

    def _run(self):
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        pos = 0
        try:
            while True:
                with self._cv:
                    while pos >= self._limit and not self._closed:
                        self._cv.wait()
                    limit, closed = self._limit, self._closed
                if pos >= limit and closed:
                    return
                while pos < limit:
                    n = os.preadv(self._fd, [view[:min(len(buf), limit - pos)]], pos)
                    if n <= 0:
                        raise OSError(f"stream file shorter than written ({pos} < {limit})")
                    self._h.update(view[:n])
                    pos += n
        except BaseException as e:            # handed to finish()
            self._error = e

    def finish(self, size: int) -> str:
        """The sha256 of the first ``size`` bytes (all written and flushed)."""
        self.advance(size)
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        os.close(self._fd)
        if self._error is not None:
            raise self._error
        return self._h.hexdigest()

    def abandon(self):
        with self._cv:
            self._closed = True
            self._limit = 0
            self._cv.notify()
        self._thread.join()
        os.close(self._fd)


class _Now:
    """A result already made, with :class:`_Later`'s ``result()``."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class _Later:
    """``fn()`` on another thread; :meth:`result` waits for it (and raises its error)."""

    def __init__(self, fn):
        import threading
        self._out = []
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self._out.append((True, fn()))
        except BaseException as e:            # handed to result()
            self._out.append((False, e))

    def result(self):
        self._thread.join()
        ok, value = self._out[0]
        if not ok:
            raise value
        return value


def _then(pieces, last):
    yield from pieces
    yield last


def _flush(sender, first):
    """``first``, then ``multifd_ram_flush_and_sync``'s MULTIFD_FLUSH (setup)."""
    yield from first
    sender.flush_and_sync()
    yield RamMultifdFlush()


def _ram_pass(saver, sender, last_stage=False):
    """One RAM section's records: the main-channel pass, or with multifd the scan
    whose pages go to the channels and whose wraps are MULTIFD_FLUSH; then EOS."""
    if sender is None:
            yield from saver.pass_bytes(last_stage=last_stage)
    else:
        for ev in saver.scan_pass():
            if ev[0] == "wrap":
                sender.flush_and_sync()
                yield RamMultifdFlush()
            else:
                sender.queue_pages(ev[1], ev[2])
    yield RamEos()


def _multifd_choice(prof, cfg, machine):
    """(VFIO family name or None, load_config_after_iter) for ``cfg``; refuses what
    the release or machine type cannot do."""
    n = cfg.multifd_channels
    if not n:
        if cfg.load_config_after_iter:
            raise QmigstreamError("load-config-after-iter is a multifd device-state "
                                  "setting: give multifd channels too")
        return None, None
    if n < 0 or n > 255:
        raise QmigstreamError(f"multifd channels: {n} is not in 1..255 (multifd-channels)")
    if not prof.multifd_device_state:
        raise QmigstreamError(f"{prof.name}: this release has no multifd device-state "
                              "transfer (10.0+ profiles have it; see `qmigstream profiles`)")
    if not prof.multifd_transfer_possible(machine):
        raise QmigstreamError(f"{prof.name}: machine type {machine} turns VFIO multifd "
                              "transfer off (hw_compat_9_2: x-migration-multifd-transfer=off, "
                              "send-switchover-start=off); it needs a 10.0+ machine type")
    if cfg.xbzrle:
        raise QmigstreamError("Multifd is not compatible with xbzrle (migration/options.c)")
    lcai = bool(cfg.load_config_after_iter)
    if lcai and not prof.load_config_after_iter:
        raise QmigstreamError(f"{prof.name}: x-migration-load-config-after-iter is 10.1+")
    return ("10.1+" if lcai else "10.x"), lcai


def _merge_device_dirty(devices, ram, total_pfns):
    """Pages the devices wrote by DMA, from their own dirty tracking, into the RAM dirty log."""
    main = ram.main
    for d in devices:
        for pfn in d.src.dirty_pages(total_pfns):
            if pfn < main.npages:
                main.dirty[pfn] = 1


def _converged(cfg, rounds, saver, devices) -> str:
    acks = all(d.init_sent for d in devices if d.precopy_active) \
        if cfg.switchover_ack else True
    if cfg.iterations is not None:
        if rounds >= cfg.iterations and acks:
            return f"fixed iteration count ({cfg.iterations})"
        if rounds >= cfg.max_iterations + cfg.iterations:
            return "switchover-ack never arrived within the iteration limit"
        return ""
    pending = saver.dirty_bytes()
    for d in devices:
        pending += d.src.pending_estimate()
    if acks and pending * 1000 <= cfg.downtime_ms * cfg.bandwidth:
        return (f"remaining {pending} bytes fit in the downtime limit "
                f"({cfg.downtime_ms} ms at {cfg.bandwidth} B/s)")
    if rounds >= cfg.max_iterations:
        return f"iteration limit ({cfg.max_iterations}) reached"
    return ""


def _vfio_position(tdevs) -> int:
    for i, td in enumerate(tdevs):
        if td.idstr in ("acpi_build", "globalstate"):
            return i
    return len(tdevs)


def _config_description(conf: Configuration) -> dict:
    """The 8.2+ trailer's description of the configuration record (vmstate "configuration")."""
    d = vmdesc.JsonObject([
        ("vmsd_name", "configuration"), ("version", 1),
        ("fields", [
            vmdesc.JsonObject([("name", "len"), ("type", "uint32"), ("size", 4)]),
            vmdesc.JsonObject([("name", "name"), ("type", "buffer"),
                               ("size", len(conf.machine))]),
        ])])
    if conf.subsections:
        raise QmigstreamError("describing configuration subsections in an 8.2+ trailer "
                              "is not supported; use a template without capabilities")
    return d


def _trailer(prof, tpl, conf, page_size, entries) -> bytes:
    members = []
    if prof.vmdesc_configuration and conf is not None:
        members.append(("configuration", _config_description(conf)))
    members.append(("page_size", page_size))
    if not prof.vmdesc_array_index:
        # a template from an older release describes its arrays with "index"
        entries = [vmdesc.without_array_index(e) for e in entries]
    members.append(("devices", entries))
    return vmdesc.dump(vmdesc.JsonObject(members), prof.json_style)


def write_manifest(res: MigrationResult, path) -> None:
    with open(path, "w") as f:
        json.dump({"format": "qmigstream-migration", "generator": f"qmigstream {__version__}",
                   **res.to_json()}, f, indent=2, sort_keys=False)
        f.write("\n")
