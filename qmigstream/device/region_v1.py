"""The VFIO v1 migration interface: the migration region (Linux 5.8 - 5.17).

:class:`MigrationRegionV1` is the region as the kernel's region file takes it:
``read(offset, size) -> bytes`` and ``write(offset, data) -> int`` at offsets
inside the region.  At offset 0 is ``struct vfio_device_migration_info``; two
layouts are modelled, each described once by a field table
(:data:`LAYOUT_5_8`, :data:`LAYOUT_RFC_V4`) that gives the offsets, the
widths, the access rights and (through :func:`info_struct`) a construct Struct:

* ``"5.8"`` - as merged in Linux 5.8: device_state u32, reserved u32,
  pending_bytes u64, data_offset u64, data_size u64 (32 bytes);
* ``"rfc"`` - the 2019 RFC (v4 series): the same, then start_pfn, page_size,
  total_pfns (write) and copied_pfns (read), 64 bytes.

Integers are in the host's native order, made explicit as ``byteorder``
(``"little"`` by default, as on x86).  A field is accessed only at its native
width and natural alignment; anything else (a partial, straddling or
misaligned access, a read of a write-only field, a write of a read-only one,
an access in the gap between the struct and the data section or past the
region) is ``DeviceError(EINVAL)``.  The reserved field reads as zero and
ignores writes.  The data section starts at ``data_offset`` (page-aligned when
it is declared mmap-able, right after the struct otherwise) and takes
accesses of any size inside it.

device_state: bit 0 ``_RUNNING``, bit 1 ``_SAVING``, bit 2 ``_RESUMING``; 0
stop, 1 running (the default), 2 stop-and-copy, 3 pre-copy, 4 resuming; 5
and 7 are invalid and 6 (``_SAVING|_RESUMING``) is the error state - none of
the three can be written (EINVAL).  Bits 3-31 are kept as written (the user
does read-modify-write) and survive entry into the error state
(``VFIO_DEVICE_STATE_SET_ERROR``).  Stop-and-copy back to pre-copy is refused
(EINVAL).  A transition failing inside the driver (:meth:`inject_fault`)
returns its errno and leaves the device in the error state; only
:meth:`reset` leaves it.  Data that fails its checks when the device leaves
_RESUMING returns the driver's errno and the device stays in _RESUMING with
its previous content ("return previous state of the device").

Saving (QEMU's order): read pending_bytes (starts an iteration; also marks
the chunk of the previous iteration as consumed) -> read data_offset (makes
the next chunk available in the window) -> read data_size -> read the data
-> read pending_bytes ...  Resuming: read data_offset -> write the chunk into
the window -> write data_size (the device consumes it then; this write
returns the errno of bad data).

Dirty pfns (RFC layout only), as the 2019 thread settles it: start_pfn,
page_size and total_pfns are sticky and written in any order (each write
starts a new update).  Each read of copied_pfns copies the next piece of the
bitmap - at most ``bitmap_bits`` pfns, the device's buffer - into the data
section and returns how many pfns it covers; that piece describes the pfns
from ``start_pfn + count``, where ``count`` is what the user has received so
far.  A read after the whole range is done returns 0, a read when no page is
dirty in the rest of the range returns 0, and ``~0`` means "treat the whole
range as dirty" (a device that cannot track).  The next read after a 0 (or
~0) starts a fresh pass over the same sticky range.  Directly after a
copied_pfns read, data_offset gives the bitmap's place (a separate part of
the data section, so pending migration data is never overwritten).
:func:`get_dirty_pfns` is the user side (QEMU's ``vfio_get_dirty_page_list``
loop).  Pages are "dirty" when the device wrote them by DMA since they were
last reported.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass


from ..errors import DeviceError
from .pci_device import PAGE, EmulatedPciDevice

RUNNING = 1 << 0
SAVING = 1 << 1
RESUMING = 1 << 2
STATE_MASK = RUNNING | SAVING | RESUMING
STOP = 0
ERROR = SAVING | RESUMING
STATE_NAMES = {0: "_STOP", 1: "_RUNNING", 2: "_SAVING", 3: "_SAVING|_RUNNING",
               4: "_RESUMING", 5: "invalid", 6: "error", 7: "invalid"}
ALL_ONES = (1 << 64) - 1

#: Region type / subtype of the migration region (5.8: type 3; the RFC used 2).
REGION_TYPE = {"5.8": 3, "rfc": 2}
REGION_SUBTYPE = 1


def state_valid(state: int) -> bool:
    """``VFIO_DEVICE_STATE_VALID``: with _RESUMING set, nothing else may be set."""
    return (state & STATE_MASK) == RESUMING if state & RESUMING else True


def state_is_error(state: int) -> bool:
    """``VFIO_DEVICE_STATE_IS_ERROR``."""
    return (state & STATE_MASK) == ERROR


def state_set_error(state: int) -> int:
    """``VFIO_DEVICE_STATE_SET_ERROR``: keep the reserved bits, set _SAVING|_RESUMING."""
    return (state & ~STATE_MASK & 0xFFFFFFFF) | ERROR


@dataclass(frozen=True)
class Field:
    """One field of the v1 migration region's info block."""

    name: str
    offset: int
    size: int
    access: str          # "rw", "r", "w", or "reserved"


LAYOUT_5_8 = (
    Field("device_state", 0, 4, "rw"),
    Field("reserved", 4, 4, "reserved"),
    Field("pending_bytes", 8, 8, "r"),
    Field("data_offset", 16, 8, "r"),
    Field("data_size", 24, 8, "rw"),
)
LAYOUT_RFC_V4 = LAYOUT_5_8 + (
    Field("start_pfn", 32, 8, "w"),
    Field("page_size", 40, 8, "w"),
    Field("total_pfns", 48, 8, "w"),
    Field("copied_pfns", 56, 8, "r"),
)
LAYOUTS = {"5.8": LAYOUT_5_8, "rfc": LAYOUT_RFC_V4}


def layout_size(layout) -> int:
    return max(f.offset + f.size for f in layout)


def info_struct(layout, byteorder: str = "little"):
    """The construct Struct of ``struct vfio_device_migration_info`` for a layout."""
    import construct as c
    ints = {4: (c.Int32ul, c.Int32ub), 8: (c.Int64ul, c.Int64ub)}
    pos = 0
    fields = []
    for f in sorted(layout, key=lambda f: f.offset):
        assert f.offset == pos, "layouts have no holes"
        fields.append(f.name / ints[f.size][0 if byteorder == "little" else 1])
        pos += f.size
    return c.Struct(*fields)


class MigrationRegionV1:
    """The migration region of one device.  See the module docstring."""

    def __init__(self, device=None, *, layout: str = "5.8", window_size: int = 64 * 1024,
                 mmap: bool = True, byteorder: str = "little", bitmap_bits: int | None = None,
                 dirty_tracking: bool = True, reserved_bits: int = 0, **device_kwargs):
        if layout not in LAYOUTS:
            raise ValueError(f"layout is one of {sorted(LAYOUTS)}")
        if device is None or not isinstance(device, EmulatedPciDevice):
            device = EmulatedPciDevice(device if device is not None else "sized",
                                       **device_kwargs)
        self.device = device
        self.layout_name = layout
        self.layout = LAYOUTS[layout]
        self.fields = {f.offset: f for f in self.layout}
        self.byteorder = byteorder
        self.struct = info_struct(self.layout, byteorder)
        self.info_size = layout_size(self.layout)
        self.mmap = mmap
        self.window_size = window_size
        align = PAGE if mmap else 8
        self.data_offset = -(-self.info_size // align) * align
        self.bitmap_bits = bitmap_bits if bitmap_bits is not None else window_size * 8
        if layout == "rfc":
            self.bitmap_offset = -(-(self.data_offset + window_size) // align) * align
            self.size = self.bitmap_offset + -(-self.bitmap_bits // 8)
        else:
            self.bitmap_offset = None
            self.size = self.data_offset + window_size
        self.region_type = REGION_TYPE[layout]
        self.region_subtype = REGION_SUBTYPE
        self._data = bytearray(self.size - self.data_offset)
        self.device_state = RUNNING | (reserved_bits & ~STATE_MASK & 0xFFFFFFFF)
        self.device.running = True
        self._save = None
        self._resume = None
        self._chunk = None           # size of the chunk now in the window, or None
        self._fault = None
        # RFC dirty-pfn protocol
        self.dirty_tracking = dirty_tracking
        self.start_pfn = 0
        self.page_size = 0
        self.total_pfns = 0
        self._pass = None            # dict(count=, dirty=sorted pfns) while a pass runs
        self._last_produced = None   # "bitmap" right after a copied_pfns read
        self._dirty_pages = set()    # 4 KiB guest pages written since last reported
        self.device.add_dma_listener(self._on_dma)

    # -- helpers -------------------------------------------------------------
    @property
    def mmap_areas(self) -> list:
        """Sparse-mmap capability areas ``[(offset, size)]``: the data section when mmap-able."""
        if not self.mmap:
            return []
        return [(self.data_offset, self.size - self.data_offset)]

    @property
    def state(self) -> int:
        return self.device_state & STATE_MASK

    def _on_dma(self, gpa, n):
        if n:
            self._dirty_pages.update(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1))

    def _int(self, v: int, size: int) -> bytes:
        return int(v).to_bytes(size, self.byteorder)

    def snapshot(self) -> dict:
        """The info struct as a construct parse of its current readable values (no side effects)."""
        vals = {f.name: 0 for f in self.layout}
        vals["device_state"] = self.device_state
        vals["data_offset"] = self.data_offset
        vals["data_size"] = self._chunk or 0
        vals.update(start_pfn=self.start_pfn, page_size=self.page_size,
                    total_pfns=self.total_pfns)
        vals = {k: v for k, v in vals.items() if k in {f.name for f in self.layout}}
        return dict(self.struct.parse(self.struct.build(vals)))

    def _field_at(self, offset: int, size: int) -> Field:
        f = self.fields.get(offset)
        if f is None or f.size != size:
            raise DeviceError(f"access of {size} bytes at 0x{offset:x} is not one "
                              "field at its native width and alignment", _errno.EINVAL)
        return f

    def _data_range(self, offset: int, size: int) -> int:
        if size < 0 or offset < self.data_offset or offset + size > self.size:
            raise DeviceError(f"access [0x{offset:x}, 0x{offset + size:x}) outside the "
                              "info struct fields and the data section", _errno.EINVAL)
        return offset - self.data_offset

    # -- the region file -----------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset < self.info_size:
            f = self._field_at(offset, size)
            if f.access == "w":
                raise DeviceError(f"{f.name} is write-only", _errno.EINVAL)
            if f.access == "reserved":
                return bytes(size)
            return self._int(getattr(self, "_read_" + f.name)(), size)
        rel = self._data_range(offset, size)
        return bytes(self._data[rel:rel + size])

    def write(self, offset: int, data) -> int:
        data = bytes(data)
        if offset < self.info_size:
            f = self._field_at(offset, len(data))
            if f.access == "r":
                raise DeviceError(f"{f.name} is read-only", _errno.EINVAL)
            if f.access == "reserved":
                return len(data)
            getattr(self, "_write_" + f.name)(int.from_bytes(data, self.byteorder))
            return len(data)
        rel = self._data_range(offset, len(data))
        if not self.state & RESUMING or state_is_error(self.device_state):
            raise DeviceError("the data section is written only in _RESUMING", _errno.EINVAL)
        self._data[rel:rel + len(data)] = data
        return len(data)

    def read_field(self, name: str) -> int:
        f = next(f for f in self.layout if f.name == name)
        return int.from_bytes(self.read(f.offset, f.size), self.byteorder)

    def write_field(self, name: str, value: int) -> None:
        f = next(f for f in self.layout if f.name == name)
        self.write(f.offset, self._int(value, f.size))

    # -- device_state ----------------------------------------------------------
    def _read_device_state(self) -> int:
        return self.device_state

    def inject_fault(self, errno: int = _errno.EIO) -> None:
        """Make the next device_state transition fail inside the driver (-> error state)."""
        self._fault = errno

    def _write_device_state(self, value: int) -> None:
        new = value & STATE_MASK
        if state_is_error(self.device_state):
            raise DeviceError("device is in the error state; reset it", _errno.EINVAL)
        if not state_valid(value) or state_is_error(value):
            raise DeviceError(f"device_state {new:03b}b is not a state that can be set",
                              _errno.EINVAL)
        cur = self.state
        if new == cur:
            self.device_state = value & 0xFFFFFFFF
            return
        if cur == SAVING and new == SAVING | RUNNING:
            raise DeviceError("stop-and-copy cannot go back to pre-copy", _errno.EINVAL)
        if self._fault is not None:
            err, self._fault = self._fault, None
            self._drop()
            self.device.running = False
            self.device_state = state_set_error(self.device_state)
            raise DeviceError(f"transition {STATE_NAMES[cur]} -> {STATE_NAMES[new]} failed "
                              "in the device; device is in the error state", err)
        if cur & RESUMING:
            image = self._resume.finish()        # raises: stay in _RESUMING, unchanged
            self.device.apply_image(image, crc=self._resume.image_crc)
            self._resume = None
        if cur & SAVING and not new & SAVING:
            self._end_save()
        if new & SAVING:
            if not cur & SAVING:
                self._save = self.device.open_save(precopy=bool(new & RUNNING))
                self._chunk = None
            elif not new & RUNNING:
                self._save.stop_copy()
        if new & RESUMING:
            self._resume = self.device.open_resume()
        self.device.running = bool(new & RUNNING)
        self.device_state = value & 0xFFFFFFFF

    def _end_save(self):
        if self._save is not None:
            self._save.close()
            self._save = None
        self._chunk = None

    def _drop(self):
        self._end_save()
        self._resume = None

    def reset(self) -> None:
        """Device reset: _RUNNING, sessions dropped, error state left."""
        self._drop()
        self._fault = None
        self._abandon_pass()
        self.device_state = RUNNING
        self.device.running = True

    # -- saving / resuming fields ------------------------------------------------
    def _need(self, bit: int, what: str):
        if state_is_error(self.device_state) or not self.state & bit:
            raise DeviceError(f"{what} in device_state {STATE_NAMES[self.state]}",
                              _errno.EINVAL)

    def _read_pending_bytes(self) -> int:
        self._need(SAVING, "pending_bytes")
        self._chunk = None                       # the previous chunk has been read
        self._last_produced = None
        return self._save.pending()

    def _read_data_offset(self) -> int:
        if self._last_produced == "bitmap":
            return self.bitmap_offset
        if self.state & RESUMING and not state_is_error(self.device_state):
            return self.data_offset
        self._need(SAVING, "data_offset")
        if self._chunk is None:
            out = self._save.read(self.window_size)
            out = out or b""
            self._data[:len(out)] = out
            self._chunk = len(out)
        return self.data_offset

    def _read_data_size(self) -> int:
        self._need(SAVING, "reading data_size")
        self._last_produced = None
        return self._chunk or 0

    def _write_data_size(self, n: int) -> None:
        self._need(RESUMING, "writing data_size")
        if n > self.window_size:
            raise DeviceError(f"data_size {n} exceeds the {self.window_size}-byte window",
                              _errno.EINVAL)
        self._resume.write(memoryview(self._data)[:n])

    # -- RFC dirty-pfn protocol ------------------------------------------------------
    def _set_sticky(self, name, v):
        setattr(self, name, v)
        self._abandon_pass()                    # the next copied_pfns read is a new update

    def _abandon_pass(self):
        """Give pages not yet delivered by an unfinished pass back to the tracker."""
        p = self._pass
        if p is not None:
            done = p["start"] + p["count"]
            self._dirty_pages.update(pg for pg, hi in p["pages"] if hi >= done)
        self._pass = None

    def _write_start_pfn(self, v):
        self._set_sticky("start_pfn", v)

    def _write_page_size(self, v):
        self._set_sticky("page_size", v)

    def _write_total_pfns(self, v):
        self._set_sticky("total_pfns", v)

    def _new_pass(self) -> dict:
        """Snapshot (and take out of the tracker) the dirty pages of the sticky range."""
        ps, start, end = self.page_size, self.start_pfn, self.start_pfn + self.total_pfns
        pfns = set()
        taken = []
        for p in self._dirty_pages:
            a = p * PAGE
            lo, hi = a // ps, (a + PAGE - 1) // ps
            if hi < start or lo >= end:
                continue
            pfns.update(range(max(lo, start), min(hi, end - 1) + 1))
            taken.append((p, min(hi, end - 1)))
        self._dirty_pages.difference_update(p for p, _ in taken)
        return {"start": start, "count": 0, "dirty": sorted(pfns), "pages": taken}

    def _read_copied_pfns(self) -> int:
        ps = self.page_size
        if not ps or ps & (ps - 1):
            raise DeviceError(f"page_size {ps} is not a power of two", _errno.EINVAL)
        if self._pass is None:
            if not self.dirty_tracking:
                self._last_produced = None
                return ALL_ONES                  # the whole range is dirty
            self._pass = self._new_pass()
        p = self._pass
        cursor = p["count"]
        rest = [x for x in p["dirty"] if x >= self.start_pfn + cursor]
        if cursor >= self.total_pfns or not rest:
            self._pass = None                   # done: the next read starts afresh
            self._last_produced = None
            return 0
        n = min(self.bitmap_bits, self.total_pfns - cursor)
        base = self.start_pfn + cursor
        nbytes = -(-n // 8)
        bits = bytearray(nbytes)
        for x in rest:
            if x >= base + n:
                break
            i = x - base
            bits[i // 8] |= 1 << (i % 8)
        rel = self.bitmap_offset - self.data_offset
        self._data[rel:rel + nbytes] = bits
        p["count"] = cursor + n
        self._last_produced = "bitmap"
        return n


def get_dirty_pfns(region: MigrationRegionV1, start_pfn: int, total_pfns: int,
                   page_size: int = PAGE) -> set:
    """The user side of the RFC protocol (QEMU's ``vfio_get_dirty_page_list`` loop).

    Writes the three sticky fields, then reads copied_pfns until the whole
    range is covered or it returns 0, reading each piece of the bitmap at
    data_offset and placing it at ``start_pfn + count``.  Returns the set of
    dirty pfns (the whole range for ``~0``).
    """
    region.write_field("start_pfn", start_pfn)
    region.write_field("page_size", page_size)
    region.write_field("total_pfns", total_pfns)
    dirty = set()
    count = 0
    while count < total_pfns:
        copied = region.read_field("copied_pfns")
        if copied == 0:
            break
        if copied == ALL_ONES:
            return set(range(start_pfn, start_pfn + total_pfns))
        off = region.read_field("data_offset")
        bits = region.read(off, -(-copied // 8))
        for i in range(copied):
            if bits[i // 8] >> (i % 8) & 1:
                dirty.add(start_pfn + count + i)
        count += copied
    return dirty


def save_all(region: MigrationRegionV1, *, max_rounds: int | None = None) -> bytes:
    """QEMU's save loop in the current _SAVING state: chunks until pending_bytes is 0."""
    out = bytearray()
    rounds = 0
    while region.read_field("pending_bytes") > 0:
        off = region.read_field("data_offset")
        n = region.read_field("data_size")
        if n == 0:
            break
        out += region.read(off, n)
        rounds += 1
        if max_rounds is not None and rounds >= max_rounds:
            break
    return bytes(out)


def load_all(region: MigrationRegionV1, data, chunk: int | None = None) -> None:
    """QEMU's resume loop: read data_offset, write a chunk into the window, write data_size."""
    data = memoryview(bytes(data))
    step = min(chunk or region.window_size, region.window_size)
    for pos in range(0, len(data), step):
        piece = data[pos:pos + step]
        off = region.read_field("data_offset")
        region.write(off, piece)
        region.write_field("data_size", len(piece))
