"""The source's multifd channels (QEMU 10.x): RAM packets, SYNC packets, device state.

What the sender side of migration/multifd.c, multifd-nocomp.c,
multifd-zero-page.c and multifd-device-state.c writes on each channel, with
QEMU's threads replaced by one deterministic schedule:

* every channel starts with ``MultiFDInit_t`` (``multifd_send_initial_packet``:
  magic, version 1, the VM uuid — all zero without ``-uuid`` — and the
  channel id);
* ``multifd_queue_page`` collects pages of one block into a packet of at most
  ``MULTIFD_PACKET_SIZE / page size`` pages (128 for 4 KiB) and hands it to a
  channel when the block changes or the packet is full; ``multifd_send``
  picks channels round-robin from a ``next_channel`` shared by RAM and device
  state (here every channel is always idle when asked, so the pick is plain
  round-robin);
* the sender thread's ``multifd_send_zero_page_detect`` (zero-page-detection
  ``multifd``, the default) partitions the packet's offsets: normal pages
  left, zero pages right, by swapping each zero page with the last unchecked
  one — the order QEMU's array ends in; only normal pages' bytes follow the
  header;
* ``multifd_send_fill_packet`` zero-fills the header to ``packet_len`` (320
  bytes + 8 x page count), sets ``packet_num`` from one counter shared by all
  channels (taken in the channel thread, so in QEMU the order across channels
  follows thread timing; here: the order packets are handed out); a SYNC packet (``multifd_send_sync_main(MULTIFD_SYNC_ALL)``) goes
  to every channel and has no RAM fields;
* ``multifd_ram_flush_and_sync`` first sends the partly filled packet, then
  the SYNC packets (here in channel order 0, 1, ...), and the caller writes
  ``MULTIFD_FLUSH`` on the main channel;
* device state (``multifd_queue_device_state``) is one packet per call,
  ``MultiFDPacketDeviceState_t`` + payload, on the next channel; it takes no
  packet_num.

In QEMU the VFIO save threads run while ram's END pass does; which channel
and what position each device-state packet gets depends on thread timing.
The pipeline sends them after ram's END pass, device by device in handler
order (one schedule QEMU can produce).
"""

from __future__ import annotations

import hashlib
import os


from ..vfio import multifd as MF
from ..wire import vfio as W


class ChannelFile:
    """One channel's output file, with its size so far."""

    def __init__(self, path, channel_id, uuid=bytes(16)):
        self.path = str(path)
        self.id = channel_id
        self.f = open(path, "wb", buffering=1 << 20)
        self.size = 0
        self.packets = {"ram": 0, "sync": 0, "device_state": 0}
        self.write(MF.ChannelInit(channel_id, uuid).encode())

    def write(self, *pieces):
        for p in pieces:
            self.f.write(p)
            self.size += len(p)

    def close(self):
        self.f.close()

    def entry(self) -> dict:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for b in iter(lambda: f.read(8 << 20), b""):
                h.update(b)
        return {"channel": self.id, "file": self.path, "size": self.size,
                "sha256": h.hexdigest(), "packets": dict(self.packets)}


class MultifdSender:
    """The multifd send side for ``nchannels`` channel files ``paths``."""

    def __init__(self, paths, page_size=4096, counts=None):
        self.channels = [ChannelFile(p, i) for i, p in enumerate(paths)]
        self.page_size = page_size
        self.page_count = MF.ram_page_count(page_size)
        self.next_channel = 0
        self.packet_num = 0
        self.block = None              # the packet being filled: its block and pages
        self.pages = []
        self.counts = counts if counts is not None else {"normal": 0, "zero": 0}
        self.bytes = 0                 # all bytes written to the channels

    def _pick(self) -> ChannelFile:
        ch = self.channels[self.next_channel]
        self.next_channel = (self.next_channel + 1) % len(self.channels)
        return ch

    # -- RAM ---------------------------------------------------------------------
    def queue_pages(self, blk, indices):
        """``multifd_queue_page`` for each page (indices ascending, one block)."""
        idx = list(indices)
        pos = 0
        while pos < len(idx):
            if self.pages and (self.block is not blk or len(self.pages) == self.page_count):
                self._send_ram()
            if not self.pages:
                self.block = blk
            take = min(self.page_count - len(self.pages), len(idx) - pos)
            self.pages.extend(idx[pos:pos + take])
            pos += take
        # A full packet goes out when the next page is queued or at the next
        # flush (multifd_queue_page's retry), as in QEMU.

    def _send_ram(self):
        blk, pages = self.block, self.pages
        self.block, self.pages = None, []
        ps = self.page_size
        nonzero = {k: not blk.page_is_zero(k) for k in pages}
        offs = list(pages)
        i, j = 0, len(offs) - 1                 # multifd_send_zero_page_detect
        while i <= j:
            if nonzero[offs[i]]:
                i += 1
                continue
            offs[i], offs[j] = offs[j], offs[i]
            j -= 1
        normal, zero = offs[:i], offs[i:]
        self.counts["normal"] = self.counts.get("normal", 0) + len(normal)
        self.counts["zero"] = self.counts.get("zero", 0) + len(zero)
        head = MF.ram_packet_header(self.packet_num, ramblock=blk.name,
                                    normal=[k * ps for k in normal],
                                    zero=[k * ps for k in zero], page_size=ps)
        self.packet_num += 1
        ch = self._pick()
        ch.write(head, *(blk.page(k) for k in normal))
        ch.packets["ram"] += 1
        self.bytes += len(head) + len(normal) * ps

    def flush_and_sync(self):
        """``multifd_ram_flush_and_sync`` (network migration, per-round mode): the
        pending packet, then a SYNC packet on every channel.  The caller writes
        ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` on the main channel."""
        if self.pages:
            self._send_ram()
        for ch in self.channels:
            head = MF.ram_packet_header(self.packet_num, flags=W.MULTIFD_FLAG_SYNC,
                                        page_size=self.page_size)
            self.packet_num += 1
            ch.write(head)
            ch.packets["sync"] += 1
            self.bytes += len(head)

    # -- device state --------------------------------------------------------------
    def queue_device_state(self, packet: MF.DeviceStatePacket):
        raw = packet.encode()
        ch = self._pick()
        ch.write(raw)
        ch.packets["device_state"] += 1
        self.bytes += len(raw)

    def close(self):
        if self.pages:
            raise RuntimeError("multifd pages queued but never flushed")
        for ch in self.channels:
            ch.close()

    def entries(self):
        return [ch.entry() for ch in self.channels]


def channel_paths(out_path, n) -> list:
    """``OUT.ch0``, ``OUT.ch1``, ... next to the main stream ``OUT``."""
    return [f"{os.fspath(out_path)}.ch{i}" for i in range(n)]
