"""10.x multifd channels: device-state packets (VFIO) and RAM packets, parsed and built.

A channel starts with ``MultiFDInit_t`` (64 bytes: magic 0x11223344, version 1,
uuid, channel id); then packets, each with the common header
``MultiFDPacketHdr_t`` (be32 magic, version, flags):

* flags & ``MULTIFD_FLAG_DEVICE_STATE`` (0x40): ``MultiFDPacketDeviceState_t``
  (256-byte NUL-padded idstr, be32 instance_id, be32 next_packet_size), then
  next_packet_size bytes of payload; for VFIO the payload is
  ``VFIODeviceStatePacket``: be32 version (0), be32 idx, be32 flags
  (bit 0 = config state), data.
* otherwise a RAM packet ``MultiFDPacket_t``: fixed part (320 bytes), the
  offset array, then the page data: normal_pages whole pages without
  compression, next_packet_size bytes with it.  The offset array always has
  ``MULTIFD_PACKET_SIZE / page size`` entries (128 for 4 KiB pages): the
  receiver reads a packet of its fixed ``packet_len``
  (``multifd_recv_setup``: ``sizeof(MultiFDPacket_t) + 8 * page_count``)
  whatever pages_alloc says, and 9.2+ SYNC packets carry pages_alloc 0
  (``multifd_send_fill_packet`` fills no RAM fields for them; 9.0 and 9.1
  still fill them).

The VFIO save thread (``vfio_multifd_save_complete_precopy_thread``) sends
data packets with idx 0, 1, 2, ... (one read() each) and then one config
packet with the next idx whose data is the config record (DEV_CONFIG_STATE ...
END_OF_STATE).  The loader (``vfio_multifd_load_state_buffer``) refuses
version != 0, idx 0xffffffff and an idx already filled.
"""

from __future__ import annotations

import struct

from ..errors import LimitExceeded, StreamError, Truncated
from ..wire import vfio as W

_BE32 = struct.Struct(">I")
_HDR = struct.Struct(">III")


class ChannelInit:
    kind = "multifd_init"

    def __init__(self, channel_id=0, uuid=bytes(16), version=W.MULTIFD_VERSION, offset=None,
                 unused=bytes(39)):
        self.channel_id, self.uuid, self.version = channel_id, bytes(uuid), version
        self.unused, self.offset = bytes(unused), offset

    def encode(self):
        return W.MultiFDInit.build(dict(version=self.version, uuid=self.uuid,
                                        id=self.channel_id, unused1=self.unused[:7],
                                        unused2=self.unused[7:]))

    size = W.MULTIFD_INIT_SIZE

    def to_json(self):
        return {"kind": self.kind, "offset": self.offset, "version": self.version,
                "channel_id": self.channel_id, "uuid": self.uuid.hex()}


class DeviceStatePacket:
    """One device-state packet; ``payload`` is what the device handler gets."""

    kind = "multifd_device_state"

    def __init__(self, idstr, instance_id, payload, flags=W.MULTIFD_FLAG_DEVICE_STATE,
                 offset=None, idstr_raw=None, magic=W.MULTIFD_MAGIC,
                 version=W.MULTIFD_VERSION):
        self.idstr, self.instance_id = idstr, instance_id
        self.payload = bytes(payload)
        self.flags, self.offset, self.magic, self.version = flags, offset, magic, version
        self.idstr_raw = idstr_raw

    # -- the VFIO view of the payload -------------------------------------------
    @property
    def vfio_version(self):
        return _BE32.unpack_from(self.payload, 0)[0]

    @property
    def idx(self):
        return _BE32.unpack_from(self.payload, 4)[0]

    @property
    def vfio_flags(self):
        return _BE32.unpack_from(self.payload, 8)[0]

    @property
    def is_config(self):
        return bool(self.vfio_flags & W.VFIO_DEVICE_STATE_CONFIG_STATE)

    @property
    def data(self):
        return self.payload[W.VFIO_PACKET_HEADER_SIZE:]

    @property
    def data_offset(self):
        return None if self.offset is None else \
            self.offset + W.MULTIFD_DEVICE_STATE_HEADER_SIZE + W.VFIO_PACKET_HEADER_SIZE

    def encode(self):
        raw = self.idstr_raw
        if raw is None:
            name = self.idstr.encode("latin-1")[:W.MULTIFD_IDSTR_LEN - 1]
            raw = name + bytes(W.MULTIFD_IDSTR_LEN - len(name))
        return _HDR.pack(self.magic, self.version, self.flags) + raw + \
            struct.pack(">II", self.instance_id, len(self.payload)) + self.payload

    @property
    def size(self):
        return W.MULTIFD_DEVICE_STATE_HEADER_SIZE + len(self.payload)

    def to_json(self):
        d = {"kind": self.kind, "offset": self.offset, "size": self.size,
             "flags": f"0x{self.flags:x}", "idstr": self.idstr,
             "instance_id": self.instance_id, "payload_size": len(self.payload)}
        if len(self.payload) >= W.VFIO_PACKET_HEADER_SIZE:
            d.update(vfio_version=self.vfio_version, idx=self.idx,
                     vfio_flags=self.vfio_flags, config=self.is_config,
                     data_offset=self.data_offset, data_size=len(self.data))
        return d


#: ``MultiFDPacket_t`` fields after the common header, up to ``ramblock``.
_RAM_TAIL = struct.Struct(">IIIQI")


def ram_page_count(page_size=4096) -> int:
    """``multifd_ram_page_count()``: offsets per RAM packet (MULTIFD_PACKET_SIZE / page)."""
    return W.MULTIFD_PACKET_SIZE // page_size


class RamPacket:
    """A RAM packet, kept as bytes; its fields, offsets and pages decoded on demand."""

    kind = "multifd_ram"

    def __init__(self, raw, offset=None, page_size=4096):
        self.raw, self.offset, self.page_size = bytes(raw), offset, page_size

    def encode(self):
        return self.raw

    @property
    def size(self):
        return len(self.raw)

    @property
    def flags(self):
        return _HDR.unpack_from(self.raw, 0)[2]

    @property
    def is_sync(self):
        return bool(self.flags & W.MULTIFD_FLAG_SYNC)

    def fields(self):
        """(pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages)."""
        return _RAM_TAIL.unpack_from(self.raw, W.MULTIFD_HDR_SIZE)

    @property
    def packet_num(self):
        return self.fields()[3]

    @property
    def ramblock(self):
        raw = self.raw[W.MULTIFD_RAM_FIXED_SIZE - 256:W.MULTIFD_RAM_FIXED_SIZE]
        return raw.split(b"\0", 1)[0].decode("latin-1")

    def offsets(self):
        """(normal page offsets, zero page offsets), as the packet lists them."""
        _alloc, normal, _nps, _num, zero = self.fields()
        n = normal + zero
        offs = struct.unpack_from(f">{n}Q", self.raw, W.MULTIFD_RAM_FIXED_SIZE)
        return offs[:normal], offs[normal:]

    @property
    def pages_offset(self):
        """Where the page data starts, relative to the packet."""
        return W.MULTIFD_RAM_FIXED_SIZE + 8 * ram_page_count(self.page_size)

    def page(self, i) -> memoryview:
        """The i-th normal page's bytes (no compression)."""
        ps = self.page_size
        at = self.pages_offset + i * ps
        return memoryview(self.raw)[at:at + ps]

    def to_json(self):
        magic, version, flags = _HDR.unpack_from(self.raw, 0)
        t = W.MultiFDRamTail.parse(self.raw[W.MULTIFD_HDR_SIZE:W.MULTIFD_RAM_FIXED_SIZE])
        return {"kind": self.kind, "offset": self.offset, "size": self.size,
                "flags": f"0x{flags:x}", "pages_alloc": t.pages_alloc,
                "normal_pages": t.normal_pages,
                "zero_pages": t.zero_pages, "packet_num": t.packet_num,
                "ramblock": t.ramblock.split(b"\0", 1)[0].decode("latin-1"),
                "next_packet_size": t.next_packet_size}


def ram_packet_header(packet_num, *, ramblock=None, normal=(), zero=(), flags=0,
                      page_size=4096) -> bytes:
    """The header + offset array QEMU 9.0+ writes for a RAM packet without compression
    (``multifd_send_fill_packet`` / ``multifd_ram_fill_packet``): zero-filled to
    ``packet_len``; a SYNC packet (``flags`` with MULTIFD_FLAG_SYNC) has no RAM fields
    (pages_alloc, page counts, ramblock all 0).  The normal pages' bytes follow it."""
    count = ram_page_count(page_size)
    offs = list(normal) + list(zero)
    if len(offs) > count:
        raise ValueError(f"a RAM packet holds at most {count} pages")
    sync = bool(flags & W.MULTIFD_FLAG_SYNC)
    nps = 0 if sync else len(normal) * page_size
    if sync:
        tail = _RAM_TAIL.pack(0, 0, nps, packet_num, 0)
        name = b""
    else:
        tail = _RAM_TAIL.pack(count, len(normal), nps, packet_num, len(zero))
        name = (ramblock or "").encode("latin-1")[:255]
    out = bytearray(W.MULTIFD_RAM_FIXED_SIZE + 8 * count)
    _HDR.pack_into(out, 0, W.MULTIFD_MAGIC, W.MULTIFD_VERSION, flags)
    out[W.MULTIFD_HDR_SIZE:W.MULTIFD_HDR_SIZE + len(tail)] = tail
    base = W.MULTIFD_RAM_FIXED_SIZE - 256
    out[base:base + len(name)] = name
    if offs and not sync:
        struct.pack_into(f">{len(offs)}Q", out, W.MULTIFD_RAM_FIXED_SIZE, *offs)
    return bytes(out)


def vfio_payload(idx, data, config=False):
    return struct.pack(">III", W.VFIO_DEVICE_STATE_PACKET_VER_CURRENT, idx,
                       W.VFIO_DEVICE_STATE_CONFIG_STATE if config else 0) + bytes(data)


def device_packets(idstr, instance_id, chunks, config_record_bytes):
    """The packets the VFIO save thread queues: data idx 0..n-1, then config idx n."""
    out = [DeviceStatePacket(idstr, instance_id, vfio_payload(i, c))
           for i, c in enumerate(chunks)]
    out.append(DeviceStatePacket(idstr, instance_id,
                                 vfio_payload(len(out), config_record_bytes, config=True)))
    return out


def build_channel(packets, channel_id=0, uuid=bytes(16), init=True) -> bytes:
    head = ChannelInit(channel_id, uuid).encode() if init else b""
    return head + b"".join(p.encode() for p in packets)


def parse_channel(data, *, init=True, name=None, max_pages=None, page_size=4096):
    """Records of one channel's bytes: ChannelInit, then packets, with offsets."""
    buf = memoryview(bytes(data)) if not isinstance(data, memoryview) else data
    n = len(buf)
    pos = 0
    out = []
    if init:
        if n < W.MULTIFD_INIT_SIZE:
            raise Truncated("channel ends inside MultiFDInit_t", 0, section=name,
                            needed=W.MULTIFD_INIT_SIZE, available=n)
        magic = _BE32.unpack_from(buf, 0)[0]
        if magic != W.MULTIFD_MAGIC:
            raise StreamError("not a multifd channel (bad magic)", 0, section=name,
                              expected=W.MULTIFD_MAGIC, found=magic)
        ver = _BE32.unpack_from(buf, 4)[0]
        if ver != W.MULTIFD_VERSION:
            raise StreamError("unsupported multifd version", 4, section=name,
                              expected=W.MULTIFD_VERSION, found=ver)
        raw = bytes(buf[:W.MULTIFD_INIT_SIZE])
        out.append(ChannelInit(raw[24], raw[8:24], ver, 0, raw[25:64]))
        pos = W.MULTIFD_INIT_SIZE
    while pos < n:
        if n - pos < W.MULTIFD_HDR_SIZE:
            raise Truncated("channel ends inside a packet header", pos, section=name,
                            needed=W.MULTIFD_HDR_SIZE, available=n - pos)
        magic, version, flags = _HDR.unpack_from(buf, pos)
        if magic != W.MULTIFD_MAGIC:
            raise StreamError("bad multifd packet magic", pos, section=name,
                              expected=W.MULTIFD_MAGIC, found=magic)
        if version != W.MULTIFD_VERSION:
            raise StreamError("bad multifd packet version", pos + 4, section=name,
                              expected=W.MULTIFD_VERSION, found=version)
        if flags & W.MULTIFD_FLAG_DEVICE_STATE:
            hl = W.MULTIFD_DEVICE_STATE_HEADER_SIZE
            if n - pos < hl:
                raise Truncated("channel ends inside a device-state packet header", pos,
                                section=name, needed=hl, available=n - pos)
            idraw = bytes(buf[pos + 12:pos + 12 + W.MULTIFD_IDSTR_LEN])
            inst, size = struct.unpack_from(">II", buf, pos + 12 + W.MULTIFD_IDSTR_LEN)
            if size > n - pos - hl:
                raise Truncated("device-state packet runs past the end of the channel",
                                pos + hl - 4, section=name, needed=size,
                                available=n - pos - hl)
            idstr = idraw.split(b"\0", 1)[0].decode("latin-1")
            canon = idstr.encode("latin-1") + bytes(W.MULTIFD_IDSTR_LEN - len(idstr))
            out.append(DeviceStatePacket(idstr, inst, buf[pos + hl:pos + hl + size], flags,
                                         pos, None if canon == idraw else idraw,
                                         magic, version))
            pos += hl + size
        else:
            if n - pos < W.MULTIFD_RAM_FIXED_SIZE:
                raise Truncated("channel ends inside a RAM packet header", pos, section=name,
                                needed=W.MULTIFD_RAM_FIXED_SIZE, available=n - pos)
            pages_alloc, normal, nps = struct.unpack_from(">III", buf, pos + 12)
            zero = struct.unpack_from(">I", buf, pos + 32)[0]
            limit = ram_page_count(page_size) if max_pages is None else max_pages
            if pages_alloc > limit or normal > pages_alloc or zero > pages_alloc - normal:
                raise LimitExceeded("RAM packet page count out of range", pos + 12,
                                    section=name,
                                    expected=f"normal + zero <= alloc <= {limit}",
                                    found=f"{normal} + {zero} of {pages_alloc}")
            # The offset array has the receiver's page count of entries (its fixed
            # packet_len), not pages_alloc: 9.2+ SYNC packets say pages_alloc 0.
            # Without compression the receiver reads normal_pages whole pages
            # (next_packet_size is stale in SYNC packets of 7.2, seen in real
            # captures); with compression it reads next_packet_size bytes.
            body = nps if flags & W.MULTIFD_FLAG_COMPRESSION_MASK else normal * page_size
            total = W.MULTIFD_RAM_FIXED_SIZE + 8 * ram_page_count(page_size) + body
            if total > n - pos:
                raise Truncated("RAM packet runs past the end of the channel", pos,
                                section=name, needed=total, available=n - pos)
            out.append(RamPacket(buf[pos:pos + total], pos, page_size))
            pos += total
    return out


class DeviceTransfer:
    """One device's data and config reassembled from its packets (by idx)."""

    def __init__(self, idstr, instance_id):
        self.idstr, self.instance_id = idstr, instance_id
        self.packets = {}          # idx -> (channel, DeviceStatePacket)
        self.config_idx = None

    def add(self, pkt, channel=None):
        where = pkt.offset if pkt.offset is not None else 0
        if len(pkt.payload) < W.VFIO_PACKET_HEADER_SIZE:
            raise StreamError("VFIO device-state packet too short", where, section=channel,
                              expected=f">= {W.VFIO_PACKET_HEADER_SIZE} bytes",
                              found=len(pkt.payload))
        if pkt.vfio_version != W.VFIO_DEVICE_STATE_PACKET_VER_CURRENT:
            raise StreamError("VFIO device-state packet has an unknown version",
                              where + W.MULTIFD_DEVICE_STATE_HEADER_SIZE, section=channel,
                              expected=0, found=pkt.vfio_version)
        idx = pkt.idx
        if idx == W.VFIO_PACKET_INVALID_IDX:
            raise StreamError("VFIO device-state packet index is invalid",
                              where + W.MULTIFD_DEVICE_STATE_HEADER_SIZE + 4, section=channel,
                              found=idx)
        if idx in self.packets:
            ch0, p0 = self.packets[idx]
            raise StreamError(f"state buffer {idx} of {self.idstr} already filled "
                              f"(first at {ch0 or 'channel'} offset {p0.offset})",
                              where + W.MULTIFD_DEVICE_STATE_HEADER_SIZE + 4, section=channel,
                              expected="a new idx", found=idx)
        if pkt.is_config:
            self.config_idx = idx
        self.packets[idx] = (channel, pkt)

    def check(self):
        """Every idx 0..config present, config last: what the load thread needs."""
        if self.config_idx is None:
            raise StreamError(f"no config packet for {self.idstr}", None,
                              expected="a packet with flags bit 0 set", found="none")
        # The first gap is at most len(packets) in: a huge config idx costs nothing.
        missing = next((i for i in range(self.config_idx) if i not in self.packets), None)
        if missing is not None:
            raise StreamError(f"{self.idstr}: state buffer {missing} missing", None,
                              expected=f"idx 0..{self.config_idx}", found="gap")
        beyond = [i for i in self.packets if i > self.config_idx]
        if beyond:
            _, p = self.packets[beyond[0]]
            raise StreamError(f"{self.idstr}: packet idx {beyond[0]} after the config packet",
                              p.offset, expected=f"idx <= {self.config_idx}", found=beyond[0])

    def data_packets(self):
        return [self.packets[i] for i in sorted(self.packets) if i != self.config_idx]

    @property
    def data(self) -> bytes:
        return b"".join(bytes(p.data) for _, p in self.data_packets())

    @property
    def config_bytes(self):
        return None if self.config_idx is None else bytes(self.packets[self.config_idx][1].data)


def reassemble(channels):
    """``channels``: ``[(name, records)]`` -> ``{(idstr, instance_id): DeviceTransfer}``."""
    devs = {}
    for name, recs in channels:
        for p in recs:
            if isinstance(p, DeviceStatePacket):
                key = (p.idstr, p.instance_id)
                if key not in devs:
                    devs[key] = DeviceTransfer(*key)
                devs[key].add(p, name)
    for d in devs.values():
        d.check()
    return devs
