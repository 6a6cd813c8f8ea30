"""QEMU's side of the two VFIO migration interfaces, driving the emulated device.

:class:`SourceV1` / :class:`SourceV2` do what ``hw/vfio/migration.c`` does on
the source (5.2-7.2 with the v1 region, 8.0+ with the v2 state machine);
:class:`DestV1` / :class:`DestV2` what it does on the destination.  They
produce and consume the device's data as the chunks the stream carries; the
framing (markers, sections) is :mod:`qmigstream.vfio.builder`'s.

Dirty pages the device wrote by DMA reach the RAM saver through
:meth:`dirty_pages`: v1 with the 2019 RFC region asks the region itself (the
copied_pfns dialogue, :func:`~qmigstream.device.region_v1.get_dirty_pfns`);
v1 with the merged 5.8 layout has no such field — there the type1 IOMMU
tracks DMA (``VFIO_IOMMU_DIRTY_PAGES``), modelled by listening to the
device's DMA; v2 uses DMA logging (start, report, stop).
"""

from __future__ import annotations

import errno as _errno

from ..device.blob import byte_view
from ..device.device_v2 import VfioDeviceV2
from ..device.fsm import MigFeature, MigState
from ..device.pci_device import PAGE, EmulatedPciDevice
from ..errors import DeviceError
from ..wire.vfio import VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE


def _v1():
    """The v1 region module, loaded when a v1 device is first made."""
    from ..device import region_v1
    return region_v1


class SourceV1:
    interface = "v1"

    def __init__(self, device: EmulatedPciDevice, *, layout="rfc", window_size=64 * 1024,
                 bitmap_bits=None):
        self.device = device
        self.region = _v1().MigrationRegionV1(device, layout=layout, window_size=window_size,
                                           bitmap_bits=bitmap_bits)
        self._iommu_dirty = set()
        if layout != "rfc":
            device.add_dma_listener(self._on_dma)
        self.layout = layout
        self.precopy = True

    def _on_dma(self, gpa, n):
        if n:
            self._iommu_dirty.update(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1))

    def setup(self):
        """``vfio_save_setup``: _SAVING on top of _RUNNING (pre-copy)."""
        self.region.write_field("device_state", _v1().SAVING | _v1().RUNNING)

    def precopy_chunk(self):
        """``vfio_save_iterate``: the chunk now pending (b"" when nothing is)."""
        r = self.region
        if r.read_field("pending_bytes") == 0:
            return b""
        off = r.read_field("data_offset")
        n = r.read_field("data_size")
        return r.read(off, n) if n else b""

    def pending_estimate(self) -> int:
        """What ``vfio_save_pending`` would report: the bytes the session still holds
        (the whole state before setup), without touching the region."""
        sess = self.region._save
        return sess.pending() if sess is not None else self.device.stop_copy_length()

    def dirty_pages(self, total_pfns: int) -> set:
        if self.layout == "rfc":
            return _v1().get_dirty_pfns(self.region, 0, total_pfns, PAGE)
        out, self._iommu_dirty = self._iommu_dirty, set()
        return {p for p in out if p < total_pfns}

    def stop_and_copy(self) -> tuple:
        """``vfio_save_complete_precopy``: (_SAVING) chunks until nothing is pending.

        Returns ``(chunks, zero_terminator)``: QEMU writes ``DATA 0`` and stops
        when a round yields no data though pending_bytes was non-zero."""
        r = self.region
        r.write_field("device_state", _v1().SAVING)
        chunks, zero = [], False
        while r.read_field("pending_bytes") > 0:
            off = r.read_field("data_offset")
            n = r.read_field("data_size")
            if n == 0:
                zero = True
                break
            chunks.append(r.read(off, n))
        return chunks, zero

    def finish(self):
        """Cleanup after completion: _STOP."""
        self.region.write_field("device_state", _v1().STOP)

    def config_space(self) -> bytes:
        return self.device.config_space()


class SourceV2:
    interface = "v2"

    def __init__(self, device: EmulatedPciDevice, *, features="p2p,pre_copy",
                 precopy=True, ram_bytes=0):
        self.dev = VfioDeviceV2(device, features=features)
        self.device = device
        self.precopy = precopy and bool(self.dev.migration_flags & MigFeature.PRE_COPY)
        self.file = None
        self.ram_bytes = ram_bytes
        self.buffer = VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE
        self.logging = False

    def setup(self):
        """``vfio_save_setup``: buffer size from MIG_DATA_SIZE, PRE_COPY when supported;
        DMA logging starts over guest RAM (``vfio_devices_dma_logging_start``)."""
        self.buffer = max(1, min(VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE, self.dev.mig_data_size()))
        if self.precopy:
            self.file = self.dev.set_state(MigState.PRE_COPY)
        if self.ram_bytes:
            self.dev.dma_logging_start([(0, self.ram_bytes)], PAGE)
            self.logging = True

    def precopy_chunk(self):
        """``vfio_save_iterate``: one read of the data fd (b"" at a temporary end)."""
        if self.file is None:
            return b""
        try:
            return self.file.read_view(self.buffer)
        except DeviceError as e:
            if e.errno == _errno.ENOMSG:
                return b""
            raise

    def initial_bytes(self) -> int:
        if self.file is None:
            return 0
        return self.file.precopy_info()[0]

    def pending_estimate(self) -> int:
        """``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``: the device's estimate of what is left."""
        return self.dev.mig_data_size()

    def dirty_pages(self, total_pfns: int) -> set:
        if not self.logging:
            return set()
        words = self.dev.dma_logging_report(0, total_pfns * PAGE, PAGE)
        return VfioDeviceV2.bitmap_pages(words, 0, PAGE)

    def stop_and_copy(self) -> tuple:
        """VM stop then ``vfio_save_complete_precopy``: STOP_COPY, read until end of data."""
        f = self.dev.set_state(MigState.STOP_COPY)
        if f is not None:
            self.file = f
        chunks = []
        while True:
            got = self.file.read_view(self.buffer)      # views of the blob: no copies
            if not got:
                break
            chunks.append(got)
        return chunks, False

    def finish(self):
        if self.logging:
            self.dev.dma_logging_stop()
            self.logging = False
        self.dev.set_state(MigState.STOP)

    def config_space(self) -> bytes:
        return self.device.config_space()


def _saved(device: EmulatedPciDevice):
    """What a destination device holds before a load.  The image is kept by
    reference: a load never changes it in place (``apply_image`` installs a new
    image) and a resuming device does no DMA, so no copy of it is needed; an
    initial image never made (None) stays unmade."""
    return (device._img, device.config_space(), bytes(device.msix_table))


def _restore(device: EmulatedPciDevice, saved):
    image, config, msix = saved
    if image is None:
        device.restore_initial_image()
    else:
        device.apply_image(image)
    device.load_config_space(config)
    device.msix_table[:] = msix


class DestV1:
    """``vfio_load_setup`` / ``vfio_load_state`` with the v1 region."""
    interface = "v1"

    def __init__(self, device: EmulatedPciDevice, *, layout="rfc", window_size=64 * 1024):
        self.device = device
        self.region = _v1().MigrationRegionV1(device, layout=layout, window_size=window_size)
        self.before = None
        self.bytes = 0
        self.chunks = 0

    def begin(self):
        self.before = (self.region.read_field("device_state"), _saved(self.device))
        self.region.write_field("device_state", _v1().RESUMING)

    def write(self, data):
        _v1().load_all(self.region, data)
        self.bytes += len(data)
        self.chunks += 1

    def commit(self):
        """Leave _RESUMING: the device checks and applies what it received."""
        self.region.write_field("device_state", _v1().RUNNING)

    def abort(self):
        """Back to exactly the state before :meth:`begin`."""
        if self.before is None:
            return
        state, saved = self.before
        self.region.reset()
        _restore(self.device, saved)
        if state & _v1().STATE_MASK != _v1().RUNNING and _v1().state_valid(state):
            self.region.write_field("device_state", state)
        self.before = None


class DestV2:
    interface = "v2"

    def __init__(self, device: EmulatedPciDevice, *, features="p2p,pre_copy"):
        self.device = device
        self.dev = VfioDeviceV2(device, features=features)
        self.file = None
        self.before = None
        self.bytes = 0
        self.chunks = 0

    def begin(self):
        self.before = (self.dev.state, _saved(self.device))
        self.file = self.dev.set_state(MigState.RESUMING)

    def write(self, data):
        """``qemu_file_get_to_fd``: write the chunk, going on after short writes."""
        mv = byte_view(data)                 # the device copies what it accepts
        while len(mv):
            n = self.file.write(mv)
            if n <= 0:
                raise DeviceError("data fd accepted no bytes", _errno.EIO)
            mv = mv[n:]
        self.bytes += len(data)
        self.chunks += 1

    def commit(self):
        self.dev.set_state(MigState.RUNNING)

    def abort(self):
        if self.before is None:
            return
        state, saved = self.before
        self.dev.reset()
        _restore(self.device, saved)
        if state != MigState.RUNNING and state != MigState.ERROR:
            self.dev.set_state(state)
        self.before = None
