"""VFIO device sections (``<pci address>/vfio`` or ``vfio``, version 1).

The payload is a walk of be64 markers (hw/vfio/migration.c ``vfio_load_state``):

* ``DEV_SETUP_STATE`` must be followed by ``END_OF_STATE`` (START sections);
* ``DEV_DATA_STATE`` is followed by be64 size and that many bytes;
* ``DEV_CONFIG_STATE`` is followed by the vmstate ``VFIOPCIDevice`` and its own
  ``END_OF_STATE``; 5.2 goes on reading markers after it (config then data in
  the END section), 6.0+ stops there (FULL section);
* ``END_OF_STATE``, ``DEV_INIT_DATA_SENT`` (8.1+) and
  ``DEV_CONFIG_LOAD_READY`` (10.1+) end the payload.

Every release's layout is accepted; :mod:`qmigstream.vfio.family` says which
release family a device's sections match.
"""

from __future__ import annotations

import struct

from ...errors import LimitExceeded, StreamError, Truncated
from ...pieces import Pieces
from ...wire import vfio as W
from ...wire.vfio import Marker
from ..boundary import payload_start
from ..records import Record
from . import register

_U64 = struct.Struct(">Q")
_READ_PIECE = 1 << 20


class VfioMarker(Record):
    """A bare marker: SETUP, END_OF_STATE, INIT_DATA_SENT, CONFIG_LOAD_READY."""

    __slots__ = ("marker",)
    kind = "vfio_marker"

    def __init__(self, marker, offset=None, depth=0):
        self.marker = Marker(marker)
        self.offset, self.depth = offset, depth

    @property
    def name(self):
        return W.MARKER_NAMES[self.marker]

    def encode(self):
        return _U64.pack(self.marker)

    size = 8

    def fields(self):
        return {"marker": self.name}


class VfioDataChunk(Record):
    """``DEV_DATA_STATE``, be64 size, ``size`` bytes of device data.

    ``data_offset`` is the stream offset of the first data byte (offset + 16).
    """

    __slots__ = ("data",)
    kind = "vfio_data"

    def __init__(self, data, offset=None, depth=0):
        # bytes, a view, or Pieces (views kept as they are: the writer sends their parts)
        self.data = data if isinstance(data, (bytes, memoryview, Pieces)) else bytes(data)
        self.offset, self.depth = offset, depth

    @property
    def data_size(self) -> int:
        return len(self.data)

    @property
    def data_offset(self):
        return None if self.offset is None else self.offset + 16

    def encode(self):
        return W.data_chunk_header(len(self.data)) + bytes(self.data)

    @property
    def size(self):
        return 16 + len(self.data)

    def fields(self):
        return {"marker": "DEV_DATA_STATE", "data_size": len(self.data),
                "data_offset": self.data_offset}


class VfioConfig(Record):
    """``DEV_CONFIG_STATE``, the vmstate ``VFIOPCIDevice``, ``END_OF_STATE``."""

    __slots__ = ("state",)
    kind = "vfio_config"

    def __init__(self, state: W.PciConfigState, offset=None, depth=0):
        self.state = state
        self.offset, self.depth = offset, depth

    def encode(self):
        return W.CONFIG_STATE_BYTES + self.state.encode() + W.END_OF_STATE_BYTES

    @property
    def size(self):
        return 16 + len(self.state)

    @property
    def body_offset(self):
        return None if self.offset is None else self.offset + 8

    def fields(self):
        st = self.state
        cfg = st.config
        d = {"marker": "DEV_CONFIG_STATE", "body_length": len(st),
             "version_id": st.version_id, "config_size": len(cfg),
             "vendor_id": f"0x{cfg[0] | cfg[1] << 8:04x}",
             "device_id": f"0x{cfg[2] | cfg[3] << 8:04x}",
             "irq_state": list(st.irq_state), "msix_entries": st.msix_entries}
        if st.display is not None:
            d["display"] = True
        return d


def _whole_marker(raw: bytes, off: int, name) -> None:
    """Refuse a marker cut by the end of the input (``raw``: the 8 bytes peeked)."""
    if len(raw) < 8:
        raise Truncated("stream ends inside a VFIO marker", off, section=name,
                        needed=8, available=len(raw))


def is_vfio_idstr(idstr: str) -> bool:
    return idstr == "vfio" or idstr.endswith("/vfio")


@register(is_vfio_idstr)
class VfioSection:
    name = "vfio"
    self_delimiting = True

    def read(self, reader, src, header):
        # the FULL section's (old-style) trailer entry is taken, to keep the cursor in step
        start = payload_start(reader, src, header, bound=False)
        name = start.sec.name if start.sec else start.idstr
        depth = header.depth
        first = True
        after_config = False
        while True:
            off = src.offset
            raw = src.peek(8)
            if after_config and (len(raw) < 8 or raw[:6] != W.MARKER_PREFIX_BYTES):
                return          # 6.0+: the config group ends the payload
            _whole_marker(raw, off, name)
            word = _U64.unpack(raw)[0]
            try:
                m = Marker(word)
            except ValueError:
                raise StreamError("unknown VFIO marker", off, section=name,
                                  expected="0xffffffffef100001..0xffffffffef100006",
                                  found=f"0x{word:016x}") from None
            if m == Marker.DEV_SETUP_STATE:
                if not first:
                    raise StreamError("DEV_SETUP_STATE after other VFIO records", off,
                                      section=name, expected="DEV_SETUP_STATE first",
                                      found="DEV_SETUP_STATE")
                src.read(8)
                yield VfioMarker(m, off, depth)
                noff = src.offset
                nxt = src.peek(8)
                _whole_marker(nxt, noff, name)
                if nxt != W.END_OF_STATE_BYTES:
                    raise StreamError("DEV_SETUP_STATE not followed by END_OF_STATE", noff,
                                      section=name, expected="0xffffffffef100001",
                                      found=f"0x{_U64.unpack(nxt)[0]:016x}")
                src.read(8)
                yield VfioMarker(Marker.END_OF_STATE, noff, depth)
                return
            if m == Marker.DEV_DATA_STATE:
                yield self._chunk(src, off, depth, name)
            elif m == Marker.DEV_CONFIG_STATE:
                yield self._config(src, off, depth, name)
                after_config = True
            else:
                src.read(8)
                yield VfioMarker(m, off, depth)
                return
            first = False

    def _chunk(self, src, off, depth, name):
        head = src.peek(16)
        if len(head) < 16:
            raise Truncated("stream ends inside a VFIO data chunk header", off, section=name,
                            needed=16, available=len(head))
        size = _U64.unpack(head[8:16])[0]
        left = src.remaining_known()
        if left is not None and 16 + size > left:
            raise Truncated("VFIO data chunk runs past the end of the input", off + 8,
                            section=name, needed=size, available=left - 16)
        if size >= 1 << 63:
            raise LimitExceeded("VFIO data chunk size out of range", off + 8, section=name,
                                found=size)
        src.read(16)
        if size <= _READ_PIECE or left is not None:
            data = src.read_view(size, "VFIO device data")
        else:
            # Input of unknown length: never ask for more than arrives.
            parts, need = [], size
            while need:
                take = min(need, _READ_PIECE)
                parts.append(src.read(take, "VFIO device data"))
                need -= take
            data = b"".join(parts)
        return VfioDataChunk(data, off, depth)

    def _config(self, src, off, depth, name):
        buf = src.peek(8 + W.MAX_CONFIG_BODY + 8)
        state, n = W.parse_config_state(buf, 8, base=off, section=name)
        src.read(8 + n + 8)
        return VfioConfig(state, off, depth)
