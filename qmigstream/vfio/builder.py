"""Write a VFIO device's sections as a given release family writes them.

The family (:mod:`qmigstream.vfio.family`) is data; this module is the small
code that turns it plus the device's bytes into section payloads (lists of
records) and, for 10.x, multifd packets::

    from qmigstream.vfio.builder import DeviceWriter
    w = DeviceWriter("8.1-9.x", "0000:00:05.0/vfio", config=state)
    b.section(*w.start())                       # (type, idstr, records)
    b.section(*w.part(b"precopy bytes"))
    b.section(*w.part(None, init_data_sent=True))
    b.section(*w.end([b"stop", b"copy"]))
    b.section(*w.full())
    desc_entry = w.vmdesc_entry()               # the trailer's devices[] entry

or all at once: :func:`plan` returns a :class:`DevicePlan` with the payloads
of every phase (the caller interleaves them with other sections in QEMU's
order: setup of all handlers, then iterations, then END of all iterables, then
FULL of all devices).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..codec.sections.vfio import VfioConfig, VfioDataChunk, VfioMarker
from ..wire import vfio as W
from ..wire.header import SectionType as T
from ..wire.vfio import Marker, PciConfigState
from . import family as F
from .multifd import DeviceStatePacket, device_packets


def split_reads(data: bytes, buffer_size: int = W.VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE):
    """Cut device data into the pieces successive read()s of a v2 data fd of
    ``buffer_size`` return (``vfio_save_block``): full buffers, then the rest."""
    mv = memoryview(bytes(data))
    return [bytes(mv[i:i + buffer_size]) for i in range(0, len(mv), buffer_size)]


def config_record(config) -> VfioConfig:
    if isinstance(config, VfioConfig):
        return VfioConfig(config.state)
    if isinstance(config, (bytes, bytearray, memoryview)):
        config = PciConfigState.make(bytes(config))
    return VfioConfig(config)


def _chunk(fam, data, where):
    data = b"" if data is None else data
    if fam.chunk_limit is not None and len(data) > fam.chunk_limit:
        raise ValueError(f"{fam.name}: a {where} chunk of {len(data)} bytes exceeds one "
                         f"read() of {fam.chunk_limit} bytes (use split_reads)")
    if fam.protocol == "v2" and not len(data):
        raise ValueError(f"{fam.name}: v2 never writes an empty data chunk")
    return VfioDataChunk(data)


def start_records(fam):
    """START: ``vfio_save_setup`` (every release)."""
    return [VfioMarker(Marker.DEV_SETUP_STATE), VfioMarker(Marker.END_OF_STATE)]


def part_records(fam, chunk=None, *, init_data_sent=False):
    """One PART: ``vfio_save_iterate``.  ``chunk`` None/empty = nothing pending."""
    fam = F.get(fam)
    if not fam.has_part:
        raise ValueError(f"{fam.name} writes no PART sections (no iterate handler)")
    if init_data_sent and not fam.init_data_sent:
        raise ValueError(f"{fam.name} has no DEV_INIT_DATA_SENT")
    out = []
    if fam.part_always_chunk:
        out.append(VfioDataChunk(b"" if chunk is None else chunk))
    elif chunk:
        out.append(_chunk(fam, chunk, "pre-copy"))
    out.append(VfioMarker(Marker.DEV_INIT_DATA_SENT if init_data_sent else Marker.END_OF_STATE))
    return out


def end_records(fam, chunks=(), config=None, *, zero_terminator=False):
    """END: ``vfio_save_complete_precopy``.  For multifd families the chunks are
    not written here (see :func:`plan` / :func:`device_packets`)."""
    fam = F.get(fam)
    if fam.end_over_multifd:
        return [VfioMarker(Marker.END_OF_STATE)]
    out = []
    if fam.config_in == "END":
        if config is None:
            raise ValueError(f"{fam.name} writes the config record in END: pass config")
        out.append(config_record(config))
    for c in chunks:
        out.append(VfioDataChunk(c) if fam.protocol == "v1" else _chunk(fam, c, "stop-copy"))
    if zero_terminator:
        if not fam.end_zero_chunk:
            raise ValueError(f"{fam.name} never ends END with a DATA 0 chunk")
        out.append(VfioDataChunk(b""))
    out.append(VfioMarker(Marker.END_OF_STATE))
    return out


def full_records(fam, config=None, *, load_config_after_iter=None):
    """FULL: ``vfio_save_state`` (None for 5.2, which has no save_state).

    Multifd families: ``load_config_after_iter`` None = the family's marker
    (10.x END_OF_STATE, 10.1+ DEV_CONFIG_LOAD_READY); True/False chooses."""
    fam = F.get(fam)
    if fam.config_in == "END":
        return None
    if fam.config_in == "multifd":
        if load_config_after_iter is None:
            m = fam.full_marker
        else:
            m = Marker.DEV_CONFIG_LOAD_READY if load_config_after_iter else Marker.END_OF_STATE
        if m == Marker.DEV_CONFIG_LOAD_READY and not fam.can_load_ready:
            raise ValueError(f"{fam.name} has no DEV_CONFIG_LOAD_READY")
        return [VfioMarker(m)]
    if config is None:
        raise ValueError(f"{fam.name} writes the config record in FULL: pass config")
    return [config_record(config)]


def vmdesc_entry(idstr, full_payload, instance_id=0):
    """The trailer's old-style ``devices[]`` entry for the FULL section (6.0+)."""
    size = sum(r.size for r in full_payload)
    return {"name": idstr, "instance_id": instance_id, "size": size,
            "fields": [{"name": "data", "size": size, "type": "buffer"}]}


@dataclass
class DevicePlan:
    """Every section payload of one device, by phase, plus multifd packets."""
    family: F.Family
    idstr: str
    instance_id: int
    start: list
    parts: list = field(default_factory=list)
    end: list = field(default_factory=list)
    full: list | None = None
    packets: list = field(default_factory=list)      # DeviceStatePacket (10.x)

    def sections(self):
        """``(type, payload)`` in the order one device's sections appear."""
        out = [(T.SECTION_START, self.start)]
        out += [(T.SECTION_PART, p) for p in self.parts]
        out.append((T.SECTION_END, self.end))
        if self.full is not None:
            out.append((T.SECTION_FULL, self.full))
        return out

    def vmdesc_entry(self):
        return None if self.full is None else vmdesc_entry(self.idstr, self.full,
                                                           self.instance_id)


def plan(fam, idstr, *, precopy=(), stop_copy=(), config=None, switchover_ack=False,
         init_data_sent_at=None, zero_terminator=False, load_config_after_iter=None,
         instance_id=0) -> DevicePlan:
    """The sections (and packets) a family writes for a device.

    ``precopy``: one entry per iteration (bytes, or None/b"" when nothing was
    pending); ``stop_copy``: the chunks of the stop-and-copy phase (v2: each at
    most one read, see :func:`split_reads`); ``config``: a PciConfigState (or
    raw config-space bytes); ``switchover_ack``: close the PART at index
    ``init_data_sent_at`` (default: the first PART) with DEV_INIT_DATA_SENT.
    """
    fam = F.get(fam)
    p = DevicePlan(fam, idstr, instance_id, start_records(fam))
    at = None
    if switchover_ack:
        at = 0 if init_data_sent_at is None else init_data_sent_at
    for i, c in enumerate(precopy):
        p.parts.append(part_records(fam, c, init_data_sent=(i == at)))
    p.end = end_records(fam, stop_copy, config, zero_terminator=zero_terminator)
    p.full = full_records(fam, config, load_config_after_iter=load_config_after_iter)
    if fam.end_over_multifd:
        if config is None:
            raise ValueError(f"{fam.name} sends the config record over multifd: pass config")
        p.packets = device_packets(idstr, instance_id, stop_copy,
                                   config_record(config).encode())
    return p


class DeviceWriter:
    """One device's sections, phase by phase, ready for ``StreamBuilder.section``.

    Each method returns ``(section_type, idstr, payload_records)``.
    """

    def __init__(self, fam, idstr, config=None, instance_id=0):
        self.family = F.get(fam)
        self.idstr, self.config, self.instance_id = idstr, config, instance_id
        self.packets = []
        self._full = None

    def _t(self, t, recs):
        return (t, self.idstr, recs)

    def start(self):
        return self._t(T.SECTION_START, start_records(self.family))

    def part(self, chunk=None, *, init_data_sent=False):
        return self._t(T.SECTION_PART, part_records(self.family, chunk,
                                                    init_data_sent=init_data_sent))

    def end(self, chunks=(), *, zero_terminator=False):
        recs = end_records(self.family, chunks, self.config, zero_terminator=zero_terminator)
        if self.family.end_over_multifd:
            self.packets = device_packets(self.idstr, self.instance_id, chunks,
                                          config_record(self.config).encode())
        return self._t(T.SECTION_END, recs)

    def full(self, *, load_config_after_iter=None):
        recs = full_records(self.family, self.config,
                            load_config_after_iter=load_config_after_iter)
        self._full = recs
        return None if recs is None else self._t(T.SECTION_FULL, recs)

    def vmdesc_entry(self):
        if self._full is None:
            return None
        return vmdesc_entry(self.idstr, self._full, self.instance_id)


__all__ = ["DevicePlan", "DeviceStatePacket", "DeviceWriter", "config_record", "end_records",
           "full_records", "part_records", "plan", "split_reads", "start_records",
           "vmdesc_entry"]
