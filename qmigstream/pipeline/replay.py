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
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field

from ..codec import ram_records as R
from ..codec.reader import StreamReader
from ..codec.records import EndOfStream, SectionHeader
from ..codec.sections.vfio import VfioConfig, VfioDataChunk, is_vfio_idstr
from ..device import blob as B
from ..device.pci_device import EmulatedPciDevice
from ..errors import DeviceError, QmigstreamError, StreamError
from ..vfio import family as VF
from ..vfio.scan import scan
from .guest import GuestRam, RamLoader
from .vfiodev import DestV1, DestV2

#: Seeds of destination devices made here: their state before the load differs from any source.
DEST_SEED = 0xDE57


class ReplayError(QmigstreamError):
    """A load that failed: ``offset`` (None if not tied to a byte), ``reason``, ``device``."""

    def __init__(self, reason, offset=None, device=None, errno=None):
        self.reason, self.offset, self.device, self.errno = reason, offset, device, errno
        where = f"at offset {offset} (0x{offset:x}): " if offset is not None else ""
        dev = f"{device}: " if device else ""
        super().__init__(f"{where}{dev}{reason}")


@dataclass
class DeviceReport:
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
    ok: bool
    error: dict | None = None
    devices: list = field(default_factory=list)
    ram: dict = field(default_factory=dict)
    pages: int = 0
    verified: bool | None = None
    mismatches: list = field(default_factory=list)

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
        self.report = DeviceReport(idstr, interface, str(profile),
                                   state_before=self.device.state_digest())
        self.config = None
        self.begun = False
        self.committed = False

    def begin(self):
        self.io.begin()
        self.begun = True

    def write(self, chunk: VfioDataChunk):
        self.io.write(chunk.data)
        self.report.bytes += chunk.data_size
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
    h = B.BlobHeader.parse(data[:B.HEADER_SIZE])
    if h.kind != B.KIND_FULL:
        return None
    for spec in ("mtty", "mtty2"):
        p = EmulatedPciDevice(spec).profile
        if p.profile_id == h.profile and p.image_size == h.length:
            return spec
    if h.profile == EmulatedPciDevice("sized:0").profile.profile_id and h.length >= 64:
        return f"sized:{h.length - 64}"
    return None


def _plan_devices(path, expect, page_size):
    """idstr -> (interface, profile, features, v1_layout), from the manifest or the stream."""
    if expect is not None:
        return {d["idstr"]: (d["interface"], d["profile"], d.get("features"),
                             d.get("v1_layout")) for d in expect.get("devices", [])}
    plan = {}
    devices, _hints = scan(path, page_size=page_size)
    for dev in devices.values():
        fam = dev.family.family if dev.family else None
        interface = VF.get(fam).protocol if fam else "v2"
        first = next(iter(dev.data_pieces()), b"")
        profile = _profile_from_blob(first) or "sized:0"
        plan[dev.idstr] = (interface, profile, None, None)
    return plan


def replay(path, *, expect=None, page_size=None, destinations=None) -> ReplayResult:
    """Load ``path``; returns a :class:`ReplayResult`, never a half-loaded device.

    ``expect``: the source manifest (dict) to verify against; ``destinations``:
    ready :class:`Destination` objects by idstr (else they are made here).
    """
    if destinations is None:
        destinations = {idstr: Destination(idstr, *spec[:2], features=spec[2],
                                           v1_layout=spec[3])
                        for idstr, spec in _plan_devices(path, expect, page_size).items()}
    result = ReplayResult(ok=False)
    ram = None
    try:
        ram = _load(path, destinations, page_size, result)
        _commit(destinations)
    except (StreamError, DeviceError, ReplayError) as e:
        for d in destinations.values():
            d.abort()
        if ram is not None:
            ram.close()
        result.error = _error_json(e)
        result.devices = [_final_report(d) for d in destinations.values()]
        return result
    result.ok = True
    result.ram = ram.digests()
    result.devices = [_final_report(d) for d in destinations.values()]
    if expect is not None:
        _verify(result, expect, destinations)
    ram.close()
    return result


def _final_report(d):
    d.report.state_after = d.device.state_digest()
    return asdict(d.report)


def _load(path, dests, page_size, result) -> GuestRam:
    reader = StreamReader(path, page_size=page_size)
    ram = loader = None
    current = None
    eof = False
    try:
        feed = None
        for rec in reader.records():
            if feed is not None and type(rec) in RamLoader._dispatch:
                feed(rec)
                continue
            if isinstance(rec, SectionHeader):
                idstr = reader.sections[rec.section_id].idstr
                current = dests.get(idstr) if is_vfio_idstr(idstr) else None
                if is_vfio_idstr(idstr) and current is None:
                    raise ReplayError(f"no destination device for {idstr}", rec.offset)
                if current is not None and rec.type_name == "START":
                    current.begin()
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
                current.config = rec
            elif isinstance(rec, R.RamMemSize):
                if ram is not None:
                    ram.close()
                ram = GuestRam([(b.name, b.used_length) for b in rec.blocks], reader.page_size)
                loader = RamLoader(ram)
                feed = loader.feed

            elif isinstance(rec, EndOfStream) and rec.depth == 0:
                eof = True
        if not eof:
            raise ReplayError("stream ended before QEMU_VM_EOF", reader.src.offset)
        missing = [d.idstr for d in dests.values() if not d.begun]
        if missing:
            raise ReplayError(f"the stream has no sections for {', '.join(missing)}", None)
        if ram is None:
            raise ReplayError("the stream has no RAM block list", None)
    except BaseException:
        if ram is not None:
            ram.close()
        raise
    result.pages = loader.pages
    return ram


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
                "message": str(e)}
    if isinstance(e, DeviceError):
        return {"reason": str(e), "offset": None, "device": None, "errno": e.errno,
                "message": str(e)}
    return {"reason": e.message, "offset": e.offset, "device": None, "errno": None,
            "section": e.section, "message": e.one_line(), "malformed": True}


def _verify(result, expect, dests):
    mism = []
    for name, digest in expect.get("ram", {}).items():
        got = result.ram.get(name)
        if got != digest:
            mism.append(f"RAM block {name}: sha256 {got} differs from the source's {digest}")
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
