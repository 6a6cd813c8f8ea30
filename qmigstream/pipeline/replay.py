"""The destination side: load a stream into resuming VFIO devices and a guest RAM model, atomically.

What QEMU's destination does (``vfio_load_setup`` / ``vfio_load_state`` /
``vfio_load_cleanup``, ``ram_load_precopy``), with one difference that is the
point of a replay: **nothing is half-applied**.

* Each device's START puts it in RESUMING (v1: ``device_state = _RESUMING``;
  v2: ``set_state(RESUMING)``); every data chunk is handed to it as QEMU hands
  it (v1: data_offset / window / data_size, :func:`~qmigstream.device.region_v1.load_all`;
  v2: writes to the data file, resumed after short writes). The device stages
  what it gets; it applies nothing before it leaves RESUMING.
* RAM records go into a *new* RAM model; the destination's own RAM is replaced
  only when the whole load succeeded.
* Only after ``QEMU_VM_EOF`` are the devices committed (leave RESUMING, which
  is where each checks its data, then the config record's config space and
  MSI-X table are loaded). If any step fails — a malformed stream, a device
  rejecting its data, the stream ending early — every device goes back to
  exactly its state before the load (the ones already committed are restored
  from the copy taken at ``begin``), and the error names the offset and why.

Destination devices come from the source's manifest (``--expect``, written by
``qmigstream migrate``) or are made to match the stream: the interface from the
release family the sections show, the device profile from its first data blob.

A 10.x multifd stream comes with its channel files (``channels``, or the ones
the manifest lists).  Their RAM packets are applied at the sync points, as
``multifd_recv_sync_main`` orders them: at each ``MULTIFD_FLUSH`` on the main
channel every channel is read up to and including its next SYNC packet, so all
pages of a round land before the main channel goes on (and before the same
page of a later round).  Device-state packets are collected by idx
(``vfio_multifd_load_state_buffer``: unknown version, idx 0xffffffff and an
idx already filled are errors); after ``QEMU_VM_EOF`` each device's data is
written in idx order (``vfio_load_bufs_thread``) and its config record, the
packet with the CONFIG flag, loaded last at the commit.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..codec import ram_records as R
from ..codec.reader import StreamReader
from ..codec.source import open_mapped
from ..codec.records import EndOfStream, SectionHeader
from ..codec.sections.vfio import VfioConfig, VfioDataChunk, VfioMarker, is_vfio_idstr
from ..device import blob as B
from ..device.pci_device import EmulatedPciDevice
from ..errors import DeviceError, QmigstreamError, StreamError
from ..vfio import family as VF
from ..vfio import multifd as MF
from ..vfio.scan import scan
from ..wire import vfio as W
from .guest import DEFAULT_RAM_DIGEST, RAM_DIGESTS, GuestRam, RamLoader, run_parallel
from .vfiodev import DestV1, DestV2

#: The reader's window while loading (bytes).
REPLAY_WINDOW = 512 << 10
#: Seeds of destination devices made here: their state before the load differs from any source.
DEST_SEED = 0xDE57


class ReplayError(QmigstreamError):
    """A load that failed: ``offset`` (None if not tied to a byte), ``reason``, ``device``;
    ``file``: the multifd channel file the offset is in (None: the main stream)."""

    def __init__(self, reason, offset=None, device=None, errno=None, file=None):
        self.reason, self.offset, self.device, self.errno = reason, offset, device, errno
        self.file = file
        where = f"at offset {offset} (0x{offset:x}): " if offset is not None else ""
        if file:
            where = f"{file}: {where}"
        dev = f"{device}: " if device else ""
        super().__init__(f"{where}{dev}{reason}")


@dataclass
class DeviceReport:
    """What the load did to one destination device."""

    idstr: str
    interface: str
    profile: str
    bytes: int = 0
    chunks: int = 0
    config_loaded: bool = False
    state_before: str = ""
    state_after: str = ""
    verified: bool | None = None


@dataclass
class ReplayResult:
    """A load's outcome: error (if any), device reports, RAM digests, verification."""

    ok: bool
    error: dict | None = None
    devices: list = field(default_factory=list)
    ram_digest: str = DEFAULT_RAM_DIGEST               # how ``ram`` is computed
    ram: dict = field(default_factory=dict)
    pages: int = 0
    verified: bool | None = None
    mismatches: list = field(default_factory=list)
    channels: list = field(default_factory=list)      # multifd channels read

    def to_json(self):
        return asdict(self)


class Destination:
    """One destination device and QEMU's side of its interface."""

    def __init__(self, idstr, interface, profile, *, features="p2p,pre_copy", v1_layout="rfc",
                 seed=DEST_SEED):
        self.idstr = idstr
        self.device = EmulatedPciDevice(profile, seed=seed)
        if interface == "v1":
            self.io = DestV1(self.device, layout=v1_layout or "rfc")
        else:
            self.io = DestV2(self.device, features=features or "p2p,pre_copy")
        self.report = DeviceReport(idstr, interface, str(profile))
        self._before = self.device.state_digest_later()    # hashed while the load runs
        self.config = None
        self.begun = False
        self.committed = False

    def begin(self):
        self.io.begin()
        self.begun = True

    def write(self, chunk: VfioDataChunk):
        self.write_bytes(chunk.data)

    def write_bytes(self, data):
        self.io.write(data)
        self.report.bytes += len(data)
        self.report.chunks += 1

    def commit(self):
        self.io.commit()
        if self.config is not None:
            st = self.config.state
            self.device.load_config_space(st.config[:256])
            if st.msix_table is not None and len(st.msix_table) == len(self.device.msix_table):
                self.device.msix_table[:] = st.msix_table
            self.report.config_loaded = True
        self.committed = True

    def abort(self):
        if self.begun:
            self.io.abort()
            self.begun = self.committed = False


def _profile_from_blob(data: bytes) -> str | None:
    """The device profile a saving device of this data had (from its first blob)."""
    if len(data) < B.HEADER_SIZE or data[:4] != B.MAGIC:
        return None
    h = B.parse_header(data)
    if h.kind != B.KIND_FULL:
        return None
    for spec in ("mtty", "mtty2"):
        p = EmulatedPciDevice(spec).profile
        if p.profile_id == h.profile and p.image_size == h.length:
            return spec
    if h.profile == EmulatedPciDevice("sized:0").profile.profile_id and h.length >= 64:
        return f"sized:{h.length - 64}"
    return None


def _plan_devices(path, expect, page_size, channels=None):
    """idstr -> (interface, profile, features, v1_layout), from the manifest or the stream."""
    if expect is not None:
        return {d["idstr"]: (d["interface"], d["profile"], d.get("features"),
                             d.get("v1_layout")) for d in expect.get("devices", [])}
    plan = {}
    devices, _hints = scan(path, page_size=page_size,
                           multifd=[(c.name, c.records) for c in channels or []] or None)
    for dev in devices.values():
        fam = dev.family.family if dev.family else None
        interface = VF.get(fam).protocol if fam else "v2"
        first = next(iter(dev.data_pieces()), b"")
        profile = _profile_from_blob(first) or "sized:0"
        plan[dev.idstr] = (interface, profile, None, None)
    return plan


def channel_files(path, expect) -> list:
    """The multifd channel files a manifest lists: as written, else beside ``path``."""
    import os
    out = []
    for ch in (expect or {}).get("channels", []) or []:
        f = ch["file"]
        if not os.path.exists(f):
            alt = os.path.join(os.path.dirname(os.fspath(path)), os.path.basename(f))
            f = alt if os.path.exists(alt) else f
        out.append(f)
    return out


def replay(path, *, expect=None, page_size=None, destinations=None,
           channels=None, ram_digest=None, map_file=True) -> ReplayResult:
    """Load ``path``; returns a :class:`ReplayResult`, never a half-loaded device.

    ``expect``: the source manifest (dict) to verify against; ``destinations``:
    ready :class:`Destination` objects by idstr (else they are made here);
    ``channels``: multifd channel files (default: those ``expect`` lists);
    ``ram_digest``: how to digest the loaded RAM (default: as the manifest's
    digests are made — ``sha256`` for a manifest that does not say — else
    ``pages-crc32``); ``map_file``: a stream that is a regular file is mapped
    (:func:`~qmigstream.codec.source.open_mapped`) and the RAM model's pages
    stay where they lie in it, else it is read and the pages copied.
    """
    if ram_digest is None:
        ram_digest = expect.get("ram_digest", "sha256") if expect is not None \
            else DEFAULT_RAM_DIGEST
    if ram_digest not in RAM_DIGESTS:
        raise QmigstreamError(f"RAM digest {ram_digest!r}: one of {', '.join(RAM_DIGESTS)}")
    result = ReplayResult(ok=False, ram_digest=ram_digest)
    if channels is None:
        channels = channel_files(path, expect)
    if destinations is None and expect is not None:
        destinations = {idstr: Destination(idstr, *spec[:2], features=spec[2],
                                           v1_layout=spec[3])
                        for idstr, spec in _plan_devices(path, expect, page_size).items()}
    try:
        chans = [_Channel(c, page_size or 4096) for c in channels]
    except (StreamError, OSError) as e:
        err = e if isinstance(e, StreamError) else ReplayError(f"cannot read channel: {e}")
        result.error = _error_json(err)
        if destinations is not None:
            result.devices = [_final_report(d) for d in destinations.values()]
        return result
    result.channels = [c.to_json() for c in chans]
    if destinations is None:
        try:
            plan = _plan_devices(path, expect, page_size, chans)
        except StreamError as e:
            result.error = _error_json(e)
            return result
        destinations = {idstr: Destination(idstr, *spec[:2], features=spec[2],
                                           v1_layout=spec[3])
                        for idstr, spec in plan.items()}
    ram = early = None
    try:
        ram, early = _load(path, destinations, page_size, result, chans, ram_digest,
                           map_file)
        _commit(destinations)
    except (StreamError, DeviceError, ReplayError) as e:
        for d in destinations.values():
            d.abort()
        if early is not None:
            early.wait()
        if ram is not None:
            ram.close()
        result.error = _error_json(e)
        result.devices = [_final_report(d) for d in destinations.values()]
        result.channels = [c.to_json() for c in chans]
        return result
    result.ok = True
    result.channels = [c.to_json() for c in chans]
    # the RAM digests (unless made already while the devices' data loaded) and the
    # devices' image sha256 (cached for the reports) side by side
    ready = early.result() if early is not None else None
    result.ram, _ = run_parallel([lambda: ready or ram.digests(ram_digest),
                                  lambda: [d.device.image_digest()
                                           for d in destinations.values()]],
                                 weights=[0 if ready else ram.total // 3,
                                          sum(d.device.profile.image_size
                                              for d in destinations.values())])
    result.devices = [_final_report(d) for d in destinations.values()]
    if expect is not None:
        _verify(result, expect, destinations)
    ram.close()
    return result


def _final_report(d):
    if not d.report.state_before:
        d.report.state_before = d._before()
    d.report.state_after = d.device.state_digest()
    return asdict(d.report)


def _load(path, dests, page_size, result, chans=(), ram_digest=None, map_file=True):
    """Load the stream: ``(ram, early)``; ``early``: the RAM digests started on
    another thread once the RAM END section was over (None if not started)."""
    src = None
    if map_file and isinstance(path, (str, os.PathLike)) and str(path) != "-":
        src = open_mapped(path)
    reader = StreamReader(src if src is not None else path, page_size=page_size,
                          page_runs=True)
    if src is None:
        # windows of half a MiB: the page copies then read windows still in the
        # CPU's cache (measured 20-40% faster than 1 MiB on a page-heavy stream)
        reader.src.chunk = REPLAY_WINDOW
    ram = loader = None
    current = None
    section = None
    eof = False
    mf = _MultifdLoad(chans, dests) if chans else None
    full_markers = {}
    early = None
    ram_end = False
    try:
        dispatch = {}                  # RamLoader's handlers, once the block list came
        for rec in reader.records():
            fn = dispatch.get(type(rec))
            if fn is not None:
                fn(loader, rec)
                continue
            if isinstance(rec, SectionHeader):
                idstr = reader.sections[rec.section_id].idstr
                if ram_end and early is None and ram_digest and mf is None:
                    # the RAM END section is over: RAM is final (checked at the end)
                    early = _EarlyDigest(ram, ram_digest, loader)
                ram_end = idstr == "ram" and rec.type_name == "END"
                section = rec.type_name
                current = dests.get(idstr) if is_vfio_idstr(idstr) else None
                if is_vfio_idstr(idstr) and current is None:
                    raise ReplayError(f"no destination device for {idstr}", rec.offset)
                if current is not None and rec.type_name == "START":
                    current.begin()
            elif isinstance(rec, R.RamMultifdFlush) and mf is not None:
                if loader is None:
                    raise ReplayError("MULTIFD_FLUSH before the RAM block list", rec.offset)
                mf.sync(loader, rec.offset)
            elif isinstance(rec, VfioMarker) and current is not None and section == "FULL":
                full_markers[current.idstr] = rec.marker
            elif isinstance(rec, VfioDataChunk) and current is not None:
                if not current.begun:
                    raise ReplayError("device data before the device's setup section",
                                      rec.offset, current.idstr)
                try:
                    current.write(rec)
                except DeviceError as e:
                    raise ReplayError(f"device rejected its data: {e} (errno {e.errno})",
                                      rec.offset, current.idstr, e.errno) from None
            elif isinstance(rec, VfioConfig) and current is not None:
                if mf is not None and current.idstr in mf.transfers:
                    raise ReplayError("got DEV_CONFIG_STATE in main migration channel but "
                                      "doing multifd transfer", rec.offset, current.idstr)
                current.config = rec
            elif isinstance(rec, R.RamMemSize):
                if early is not None:
                    early.wait()
                    early = None
                if ram is not None:
                    ram.close()
                ram = None
                try:
                    ram = GuestRam([(b.name, b.used_length) for b in rec.blocks],
                                   reader.page_size)
                except QmigstreamError as e:
                    raise ReplayError(f"cannot hold the stream's RAM blocks: {e}",
                                      rec.offset) from None
                if loader is not None:
                    loader.close()
                loader = RamLoader(ram, digest_ahead=ram_digest == "pages-crc32" and mf is None)
                dispatch = RamLoader._dispatch

            elif isinstance(rec, EndOfStream) and rec.depth == 0:
                eof = True
        if not eof:
            raise ReplayError("stream ended before QEMU_VM_EOF", reader.src.offset)
        missing = [d.idstr for d in dests.values() if not d.begun]
        if missing:
            raise ReplayError(f"the stream has no sections for {', '.join(missing)}", None)
        if ram is None:
            raise ReplayError("the stream has no RAM block list", None)
        if mf is not None:
            mf.finish(loader)
        for d in dests.values():
            if d.config is None and full_markers.get(d.idstr) in (
                    W.Marker.END_OF_STATE, W.Marker.DEV_CONFIG_LOAD_READY):
                raise ReplayError("its FULL section says data and config travel on multifd "
                                  "channels, and " + ("none were given" if mf is None else
                                                      "they have no packets for it"),
                                  None, d.idstr)
    except BaseException:
        if loader is not None:
            loader.close()
        if early is not None:
            early.wait()
        if ram is not None:
            ram.close()
        raise
    loader.close()
    result.pages = loader.pages
    return ram, early


class _EarlyDigest:
    """RAM digests on another thread, from a point where RAM should be final;
    :meth:`result` gives them only if the loader changed nothing since."""

    def __init__(self, ram, scheme, loader):
        import threading
        self.loader = loader
        self.mark = loader.changes
        self._out = []
        self._thread = threading.Thread(target=self._run, args=(ram, scheme), daemon=True)
        self._thread.start()

    def _run(self, ram, scheme):
        try:
            self._out.append(ram.digests(scheme))
        except BaseException:                 # made again by the caller
            pass

    def wait(self):
        self._thread.join()

    def result(self):
        self.wait()
        if self._out and self.loader.changes == self.mark:
            return self._out[0]
        return None


def _commit(dests):
    for d in dests.values():
        try:
            d.commit()
        except DeviceError as e:
            raise ReplayError(f"device refused to leave RESUMING: {e} (errno {e.errno})",
                              None, d.idstr, e.errno) from None


def _error_json(e) -> dict:
    if isinstance(e, ReplayError):
        return {"reason": e.reason, "offset": e.offset, "device": e.device, "errno": e.errno,
                "file": e.file, "message": str(e)}
    if isinstance(e, DeviceError):
        return {"reason": str(e), "offset": None, "device": None, "errno": e.errno,
                "message": str(e)}
    return {"reason": e.message, "offset": e.offset, "device": None, "errno": None,
            "section": e.section, "message": e.one_line(), "malformed": True}


def _verify(result, expect, dests):
    mism = []
    scheme = result.ram_digest
    if scheme != expect.get("ram_digest", "sha256"):
        mism.append(f"RAM digests: {scheme} here, the manifest's are "
                    f"{expect.get('ram_digest', 'sha256')}")
    for name, digest in expect.get("ram", {}).items():
        got = result.ram.get(name)
        if got != digest:
            mism.append(f"RAM block {name}: {scheme} {got} differs from the source's {digest}")
    for d in expect.get("devices", []):
        dest = dests.get(d["idstr"])
        if dest is None:
            mism.append(f"{d['idstr']}: no destination device")
            continue
        ok = dest.device.state_digest() == d["state_digest"]
        dest.report.verified = ok
        if not ok:
            mism.append(f"{d['idstr']}: device state differs from the source's")
    result.devices = [_final_report(x) for x in dests.values()]
    result.mismatches = mism
    result.verified = not mism


def load_expect(path) -> dict:
    with open(path) as f:
        return json.load(f)


# -- multifd channels (10.x) -----------------------------------------------------------

class _Channel:
    """One multifd channel file, parsed whole, read forward by sync points."""

    def __init__(self, path, page_size):
        self.name = str(path)
        with open(path, "rb") as f:
            data = f.read()
        self.size = len(data)
        self.records = MF.parse_channel(data, name=self.name, page_size=page_size)
        self.pos = 1                       # after MultiFDInit_t
        self.counts = {"ram": 0, "sync": 0, "device_state": 0, "pages": 0}

    def to_json(self):
        return {"file": self.name, "size": self.size,
                "channel": self.records[0].channel_id, **self.counts}


class _MultifdLoad:
    """``multifd_recv_thread`` and ``multifd_recv_sync_main``, in one thread."""

    def __init__(self, chans, dests):
        self.chans = chans
        self.dests = dests
        self.transfers = {}                # idstr -> DeviceTransfer

    def _ram(self, ch, pkt, loader):
        flags = pkt.flags
        if flags & W.MULTIFD_FLAG_COMPRESSION_MASK:
            raise StreamError("compressed multifd RAM packets are not supported", pkt.offset + 8,
                              section=ch.name, found=f"flags 0x{flags:x}")
        normal, zero = pkt.offsets()
        if not normal and not zero:
            return
        ram = loader.ram
        blk = ram.blocks.get(pkt.ramblock)
        if blk is None:
            raise StreamError(f"multifd: unknown ram block {pkt.ramblock!r}",
                              pkt.offset + W.MULTIFD_RAM_FIXED_SIZE - 256, section=ch.name)
        ps = blk.page_size
        for i, off in enumerate(normal + zero):
            if off > blk.used_length - ps:
                raise StreamError("multifd: offset too long", pkt.offset +
                                  W.MULTIFD_RAM_FIXED_SIZE + 8 * i, section=ch.name,
                                  expected=f"<= 0x{blk.used_length - ps:x}", found=off)
        for i, off in enumerate(normal):
            blk.write(off, pkt.page(i), dirty=False)
        for off in zero:                   # multifd_recv_zero_page_process
            if off % ps or blk.written[off // ps]:  # a page never written is zero already
                blk.write(off, bytes(ps), dirty=False)
        loader.pages += len(normal) + len(zero)
        ch.counts["pages"] += len(normal) + len(zero)

    def _device(self, ch, pkt):
        if pkt.idstr not in self.dests:
            raise StreamError(f"device-state packet for {pkt.idstr!r}, which has no "
                              "destination device", pkt.offset + W.MULTIFD_HDR_SIZE,
                              section=ch.name)
        t = self.transfers.get(pkt.idstr)
        if t is None:
            t = self.transfers[pkt.idstr] = MF.DeviceTransfer(pkt.idstr, pkt.instance_id)
        t.add(pkt, ch.name)
        ch.counts["device_state"] += 1

    def _read(self, ch, loader, until_sync):
        """Apply ``ch``'s packets up to and including its next SYNC (or to the end)."""
        recs = ch.records
        while ch.pos < len(recs):
            pkt = recs[ch.pos]
            ch.pos += 1
            if isinstance(pkt, MF.DeviceStatePacket):
                self._device(ch, pkt)
                continue
            if pkt.is_sync:
                if not until_sync:
                    raise StreamError("a SYNC packet no MULTIFD_FLUSH on the main channel "
                                      "waits for", pkt.offset, section=ch.name)
                ch.counts["sync"] += 1
                self._ram(ch, pkt, loader)      # < 9.0 sources send pages with SYNC
                return True
            ch.counts["ram"] += 1
            self._ram(ch, pkt, loader)
        return False

    def sync(self, loader, main_offset):
        """``RAM_SAVE_FLAG_MULTIFD_FLUSH`` at ``main_offset``: every channel to its SYNC."""
        for ch in self.chans:
            if not self._read(ch, loader, True):
                raise StreamError(f"channel ends before the sync point the main channel's "
                                  f"MULTIFD_FLUSH at offset {main_offset} waits for",
                                  ch.size, section=ch.name, expected="a SYNC packet",
                                  found="end of channel")

    def finish(self, loader):
        """After EOF: the rest of each channel, then each device's data in idx order."""
        for ch in self.chans:
            self._read(ch, loader, False)
        for idstr, t in self.transfers.items():
            t.check()
            dest = self.dests[idstr]
            if not dest.begun:
                raise ReplayError("device-state packets for a device whose setup section "
                                  "never came", None, idstr)
            for chname, pkt in t.data_packets():
                try:
                    dest.write_bytes(bytes(pkt.data))
                except DeviceError as e:
                    raise ReplayError(f"device rejected state buffer {pkt.idx}: {e} "
                                      f"(errno {e.errno})", pkt.data_offset, idstr, e.errno,
                                      chname) from None
            cfg = t.config_bytes
            chname, cpkt = t.packets[t.config_idx]
            if cfg[:8] != W.CONFIG_STATE_BYTES:
                raise StreamError("expected FLAG_DEV_CONFIG_STATE at the start of the "
                                  "config packet", cpkt.data_offset, section=chname,
                                  expected=W.CONFIG_STATE_BYTES, found=cfg[:8])
            state, n = W.parse_config_state(cfg, 8, base=cpkt.data_offset, section=chname)
            dest.config = VfioConfig(state, cpkt.data_offset)
