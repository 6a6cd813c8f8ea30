"""Collect each VFIO device's sections, chunks and config from a decoded stream."""

from __future__ import annotations

from ..codec.reader import StreamReader
from ..codec.records import Command, SectionFooter, SectionHeader, VmDescription
from ..codec.sections.vfio import VfioConfig, VfioDataChunk, VfioMarker, is_vfio_idstr
from ..wire.commands import MigCmd
from .family import infer_family
from .pci import decode_config_state

PHASES = {"START": "setup", "PART": "precopy", "END": "complete", "FULL": "config"}


class ChunkInfo:
    """A data chunk's place and size without its bytes (what scan keeps by default)."""

    kind = "vfio_data"
    __slots__ = ("offset", "data_size")

    def __init__(self, offset, data_size):
        self.offset, self.data_size = offset, data_size

    @property
    def size(self):
        return 16 + self.data_size

    @property
    def data_offset(self):
        return self.offset + 16

    def to_json(self):
        return {"kind": self.kind, "offset": self.offset, "size": self.size,
                "marker": "DEV_DATA_STATE", "data_size": self.data_size,
                "data_offset": self.data_offset}


class VfioDevice:
    """One device (idstr + instance): its sections in stream order and what they hold."""

    def __init__(self, idstr, instance_id, section_id):
        self.idstr, self.instance_id, self.section_id = idstr, instance_id, section_id
        self.sections = []          # dicts: type, offset, records
        self.chunks = []            # dicts: phase, iteration, offset, data_offset, size, chunk
        self.configs = []           # (phase, VfioConfig)
        self.iterations = 0
        self.multifd = None         # DeviceTransfer (10.x)
        self.family = None

    @property
    def name(self):
        return f"{self.idstr}({self.instance_id})" if self.instance_id else self.idstr

    @property
    def data_bytes(self):
        n = sum(c["size"] for c in self.chunks)
        if self.multifd is not None:
            n += sum(len(p.data) for _, p in self.multifd.data_packets())
        return n

    def data_pieces(self):
        """Device data in stream order (main channel, then multifd by idx).  The
        main-channel chunks are there unless :func:`scan` ran with ``keep_data=False``."""
        for c in self.chunks:
            if "chunk" not in c:
                raise ValueError("scan() ran with keep_data=False: chunk bytes were not kept")
            yield bytes(c["chunk"].data)
        yield from self.multifd_pieces()

    def multifd_pieces(self):
        if self.multifd is not None:
            for _, p in self.multifd.data_packets():
                yield bytes(p.data)

    def config_record(self):
        return self.configs[-1][1] if self.configs else None

    def to_json(self):
        cfg = self.config_record()
        d = {"idstr": self.idstr, "instance_id": self.instance_id,
             "section_id": self.section_id,
             "family": self.family.family if self.family else None,
             "family_candidates": self.family.candidates if self.family else [],
             "family_reason": self.family.reason if self.family else None,
             "data_bytes": self.data_bytes,
             "sections": [{"type": s["type"], "offset": s["offset"],
                           "phase": PHASES[s["type"]],
                           **({"iteration": s["iteration"]} if "iteration" in s else {}),
                           "records": [r.to_json() for r in s["records"]]}
                          for s in self.sections],
             "chunks": [{k: v for k, v in c.items() if k != "chunk"} for c in self.chunks],
             "config": None}
        if cfg is not None:
            d["config"] = decode_config_state(cfg.state, cfg.offset)
            d["config"]["record_offset"] = cfg.offset
            d["config"]["record_size"] = cfg.size
            d["config"]["phase"] = self.configs[-1][0]
        if self.multifd is not None:
            d["multifd"] = {"packets": [dict(p.to_json(), channel=ch)
                                        for ch, p in (self.multifd.packets[i]
                                                      for i in sorted(self.multifd.packets))],
                            "config_idx": self.multifd.config_idx}
            if cfg is not None and d["config"]["phase"] == "multifd":
                d["config"].pop("record_offset")
        return d


def scan(source, *, multifd=None, keep_data=True, on_data=None, **options):
    """Devices of a stream: ``{key: VfioDevice}`` in first-seen order, and hints.

    ``multifd``: ``[(name, channel records)]`` from
    :func:`qmigstream.vfio.multifd.parse_channel` (10.x device-state transfer).
    ``keep_data`` (default True): keep each chunk's bytes
    (``VfioDevice.data_pieces``); False keeps only offsets and sizes.
    ``on_data(device, data)`` is called for each main-channel chunk as it is
    read, so device data can be written out without holding it.
    """
    reader = StreamReader(source, **options)
    devices = {}
    by_sid = {}
    hints = {"switchover_start": False, "vmdesc_configuration": False}
    cur = None
    for rec in reader.records():
        if isinstance(rec, SectionHeader):
            info = reader.sections.get(rec.section_id)
            if info is not None and is_vfio_idstr(info.idstr):
                key = (info.idstr, info.instance_id)
                dev = devices.get(key)
                if dev is None:
                    dev = devices[key] = VfioDevice(info.idstr, info.instance_id,
                                                    rec.section_id)
                by_sid[rec.section_id] = dev
                cur = {"type": rec.type_name, "offset": rec.offset, "records": []}
                if rec.type_name == "PART":
                    dev.iterations += 1
                    cur["iteration"] = dev.iterations
                dev.sections.append(cur)
                cur_dev = dev
            else:
                cur = None
            continue
        if isinstance(rec, SectionFooter):
            cur = None
            continue
        if cur is not None and isinstance(rec, (VfioMarker, VfioDataChunk, VfioConfig)):
            cur["records"].append(rec if keep_data or not isinstance(rec, VfioDataChunk)
                                  else ChunkInfo(rec.offset, rec.data_size))
            phase = PHASES[cur["type"]]
            if isinstance(rec, VfioDataChunk):
                c = {"phase": phase, "offset": rec.offset, "data_offset": rec.data_offset,
                     "size": rec.data_size}
                if keep_data:
                    c["chunk"] = rec
                if on_data is not None:
                    on_data(cur_dev, rec.data)
                if "iteration" in cur:
                    c["iteration"] = cur["iteration"]
                cur_dev.chunks.append(c)
            elif isinstance(rec, VfioConfig):
                cur_dev.configs.append((phase, rec))
            continue
        if isinstance(rec, Command) and rec.cmd == MigCmd.__members__.get("SWITCHOVER_START"):
            hints["switchover_start"] = True
        if isinstance(rec, VmDescription):
            try:
                obj = rec.obj
                hints["vmdesc_configuration"] = isinstance(obj, dict) and "configuration" in obj
            except ValueError:
                pass
    if multifd:
        from .multifd import reassemble
        transfers = reassemble(multifd)
        for key, t in transfers.items():
            dev = devices.get(key)
            if dev is None:
                dev = devices[key] = VfioDevice(key[0], key[1], None)
            dev.multifd = t
            cfgb = t.config_bytes
            if cfgb is not None:
                from ..wire import vfio as W
                from ..errors import StreamError
                if cfgb[:8] != W.CONFIG_STATE_BYTES:
                    _, p = t.packets[t.config_idx]
                    raise StreamError("multifd config packet does not start with "
                                      "DEV_CONFIG_STATE", p.data_offset,
                                      expected=W.CONFIG_STATE_BYTES, found=cfgb[:8])
                state, n = W.parse_config_state(cfgb, 8)
                dev.configs.append(("multifd", VfioConfig(state, None)))
        hints["multifd_packets"] = bool(transfers)
    for dev in devices.values():
        dev.family = infer_family([(s["type"], s["records"]) for s in dev.sections], hints)
    return devices, hints
