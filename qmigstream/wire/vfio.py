"""VFIO savevm sections (``<pci address>/vfio``, version 1) and the 10.x multifd packets.

Sources, QEMU (each checked at the commits named in docs/vfio-stream.md):

* ``hw/vfio/migration.c`` - the be64 markers, ``vfio_save_setup``,
  ``vfio_save_iterate``, ``vfio_save_complete_precopy``, ``vfio_save_state``,
  ``vfio_load_state``; 10.1+ moves the markers to
  ``hw/vfio/vfio-migration-internal.h``.
* ``hw/vfio/pci.c`` - ``vmstate_vfio_pci_config`` (``VFIOPCIDevice``):
  ``VMSTATE_PCI_DEVICE`` then ``VMSTATE_MSIX_TEST(vfio_msix_present)``;
  8.2+ subsection ``VFIOPCIDevice/VFIODisplay`` (ramfb state).
* ``hw/pci/pci.c`` - ``vmstate_pci_device``: int32 version_id, config space
  (256 bytes, or 4096 when ``pci_is_express``), irq_state 4 x be32.
* ``hw/pci/msix.c`` - ``msix_save``: table (n x 16 bytes), PBA (ceil(n/8)).
* ``hw/vfio/migration-multifd.c``, ``migration/multifd.h``,
  ``migration/multifd.c``, ``migration/multifd-device-state.c`` - the 10.x
  device-state packets on multifd channels.

All integers are big-endian, as QEMU writes them (``qemu_put_be64`` and
``cpu_to_be32``).
"""

from __future__ import annotations

import struct as _struct
from enum import IntEnum

import sys as _sys

from ..errors import StreamError as _StreamError, Truncated as _Truncated
from . import schemas_on_first_use

#: register_savevm_live(..., version_id = 1, ...) in every release.
VFIO_SECTION_VERSION = 1


class Marker(IntEnum):
    """``VFIO_MIG_FLAG_*``: 0xffffffff, magic 0xef10, 16-bit code."""

    END_OF_STATE = 0xFFFFFFFFEF100001
    DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
    DEV_SETUP_STATE = 0xFFFFFFFFEF100003
    DEV_DATA_STATE = 0xFFFFFFFFEF100004
    DEV_INIT_DATA_SENT = 0xFFFFFFFFEF100005       # 8.1+ (switchover-ack)
    DEV_CONFIG_LOAD_READY = 0xFFFFFFFFEF100006    # 10.1+ (load-config-after-iter)


#: The high 48 bits every marker shares: all-ones, then the 0xef10 magic.
MARKER_PREFIX = 0xFFFFFFFFEF10
MARKER_PREFIX_BYTES = MARKER_PREFIX.to_bytes(6, "big")

#: Short names used in records, JSON and the CLI.
MARKER_NAMES = {
    Marker.END_OF_STATE: "END_OF_STATE",
    Marker.DEV_CONFIG_STATE: "DEV_CONFIG_STATE",
    Marker.DEV_SETUP_STATE: "DEV_SETUP_STATE",
    Marker.DEV_DATA_STATE: "DEV_DATA_STATE",
    Marker.DEV_INIT_DATA_SENT: "DEV_INIT_DATA_SENT",
    Marker.DEV_CONFIG_LOAD_READY: "DEV_CONFIG_LOAD_READY",
}

#: ``VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE`` (v2, 8.0+): one read() of the data fd.
VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE = 1 << 20



# --- the config record ----------------------------------------------------------

PCI_CONFIG_SPACE_SIZE = 256
PCIE_CONFIG_SPACE_SIZE = 4096
PCI_NUM_PINS = 4
PCI_MSIX_ENTRY_SIZE = 16
#: PCIDevice.version_id as do_pci_register_device sets it ("int32 le" on load).
PCI_DEVICE_VERSION_ID = 2



#: ``VFIOPCIDevice/VFIODisplay`` subsection (8.2+): name and version as every
#: vmstate subsection (migration/vmstate.c ``vmstate_subsection_save``).
VFIO_DISPLAY_SUBSECTION = "VFIOPCIDevice/VFIODisplay"
VFIO_DISPLAY_VERSION = 1
QEMU_VM_SUBSECTION = 0x05

RAMFB_CFG_SIZE = 28


# --- 10.x multifd device state ---------------------------------------------------

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_FLAG_SYNC = 0x01
MULTIFD_FLAG_COMPRESSION_MASK = 0x1F << 1
MULTIFD_FLAG_DEVICE_STATE = 32 << 1     # 0x40
MULTIFD_IDSTR_LEN = 256
#: ``MULTIFD_PACKET_SIZE`` (migration/multifd.h): the page bytes one RAM packet holds.
MULTIFD_PACKET_SIZE = 512 * 1024

MULTIFD_INIT_SIZE = 64

MULTIFD_HDR_SIZE = 12

MULTIFD_DEVICE_STATE_HEADER_SIZE = MULTIFD_HDR_SIZE + MULTIFD_IDSTR_LEN + 8   # 276

MULTIFD_RAM_FIXED_SIZE = MULTIFD_HDR_SIZE + 4 * 3 + 8 + 4 + 4 + 24 + 256   # 320

#: ``VFIODeviceStatePacket`` (hw/vfio/migration-multifd.c), QEMU_PACKED.
VFIO_DEVICE_STATE_PACKET_VER_CURRENT = 0
VFIO_DEVICE_STATE_CONFIG_STATE = 0x1
VFIO_PACKET_INVALID_IDX = 0xFFFFFFFF
VFIO_PACKET_HEADER_SIZE = 12


# --- the config record, parsed and built ------------------------------------------

_BE32 = _struct.Struct(">I")
_BE64 = _struct.Struct(">Q")
_DATA_CHUNK = _struct.Struct(">QQ")
END_OF_STATE_BYTES = _BE64.pack(Marker.END_OF_STATE)
CONFIG_STATE_BYTES = _BE64.pack(Marker.DEV_CONFIG_STATE)
#: Length of the display subsection's header (u8 0x05, u8 length, name, be32 version).
_DISPLAY_HEADER_SIZE = 2 + len(VFIO_DISPLAY_SUBSECTION) + 4
def data_chunk_header(size: int) -> bytes:
    """``DataChunkHeader.build(dict(size=size))`` (its fast form, tested equal)."""
    return _DATA_CHUNK.pack(int(Marker.DEV_DATA_STATE), size)


#: The display subsection's header bytes (SubsectionHeader's fast form; the schemas
#: check they are the same).
DISPLAY_HEADER = bytes((QEMU_VM_SUBSECTION, len(VFIO_DISPLAY_SUBSECTION))) + \
    VFIO_DISPLAY_SUBSECTION.encode("latin-1") + _struct.pack(">I", VFIO_DISPLAY_VERSION)

PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
#: A capability list cannot hold more entries than fit in 256 - 64 bytes.
MAX_CAPABILITIES = 48

#: Upper bound of a config record's body: version, 4096 bytes, irq state,
#: 2048 MSI-X vectors (table + PBA), the display subsection.
MAX_CONFIG_BODY = 4 + PCIE_CONFIG_SPACE_SIZE + 16 + 2048 * 16 + 256 + _DISPLAY_HEADER_SIZE \
    + RAMFB_CFG_SIZE


def capabilities(config: bytes):
    """``(offset, id)`` of each standard capability, walked from 0x34 with a loop guard."""
    out = []
    if len(config) < 64 or not (config[6] | (config[7] << 8)) & PCI_STATUS_CAP_LIST:
        return out
    ptr = config[PCI_CAPABILITY_LIST] & ~3
    seen = set()
    while ptr >= 0x40 and ptr + 1 < min(len(config), PCI_CONFIG_SPACE_SIZE) and \
            ptr not in seen and len(out) < MAX_CAPABILITIES:
        seen.add(ptr)
        out.append((ptr, config[ptr]))
        ptr = config[ptr + 1] & ~3
    return out


def find_capability(config: bytes, cap_id: int):
    for off, cid in capabilities(config):
        if cid == cap_id:
            return off
    return None


def msix_vectors(config: bytes) -> int:
    """Vector count of the MSI-X capability (0 if there is none)."""
    off = find_capability(config, PCI_CAP_ID_MSIX)
    if off is None or off + 4 > len(config):
        return 0
    ctrl = config[off + 2] | (config[off + 3] << 8)
    return (ctrl & 0x7FF) + 1


class PciConfigState:
    """The vmstate ``VFIOPCIDevice`` as ``vfio_pci_save_config`` writes it.

    ``config`` 256 or 4096 bytes; ``irq_state`` four ints; ``msix_table`` and
    ``msix_pba`` bytes or None (no MSI-X); ``display`` the 28 raw RAMFBCfg
    bytes of the 8.2+ ``VFIOPCIDevice/VFIODisplay`` subsection, or None.
    """

    __slots__ = ("version_id", "config", "irq_state", "msix_table", "msix_pba", "display",
                 "display_version")

    def __init__(self, config, irq_state=(0, 0, 0, 0), msix_table=None, msix_pba=None,
                 display=None, version_id=PCI_DEVICE_VERSION_ID,
                 display_version=VFIO_DISPLAY_VERSION):
        self.version_id = version_id
        self.config = bytes(config)
        self.irq_state = tuple(irq_state)
        self.msix_table = None if msix_table is None else bytes(msix_table)
        self.msix_pba = None if msix_pba is None else bytes(msix_pba)
        self.display = None if display is None else bytes(display)
        self.display_version = display_version
        if len(self.config) not in (PCI_CONFIG_SPACE_SIZE, PCIE_CONFIG_SPACE_SIZE):
            raise ValueError("config space must be 256 or 4096 bytes")
        if len(self.irq_state) != PCI_NUM_PINS:
            raise ValueError("irq_state needs 4 pins")
        if (self.msix_table is None) != (self.msix_pba is None):
            raise ValueError("MSI-X table and PBA go together")

    @property
    def express(self) -> bool:
        return len(self.config) == PCIE_CONFIG_SPACE_SIZE

    @property
    def msix_entries(self) -> int:
        return 0 if self.msix_table is None else len(self.msix_table) // PCI_MSIX_ENTRY_SIZE

    def encode(self) -> bytes:
        out = [_BE32.pack(self.version_id & 0xFFFFFFFF), self.config,
               b"".join(_BE32.pack(v & 0xFFFFFFFF) for v in self.irq_state)]
        if self.msix_table is not None:
            out += [self.msix_table, self.msix_pba]
        if self.display is not None:
            out.append(_W.SubsectionHeader.build(dict(name=VFIO_DISPLAY_SUBSECTION,
                                                      version_id=self.display_version)))
            out.append(self.display)
        return b"".join(out)

    def __len__(self):
        n = 4 + len(self.config) + 16
        if self.msix_table is not None:
            n += len(self.msix_table) + len(self.msix_pba)
        if self.display is not None:
            n += _DISPLAY_HEADER_SIZE + len(self.display)
        return n

    def __eq__(self, other):
        return isinstance(other, PciConfigState) and self.encode() == other.encode()

    __hash__ = None

    @classmethod
    def make(cls, config, *, irq_state=(0, 0, 0, 0), msix_table=None, msix_pba=None,
             display=None):
        """Build one, sizing the MSI-X table and PBA from the config space's capability
        when they are not given (zero-filled), as ``msix_save`` would write them."""
        n = msix_vectors(config)
        if msix_table is not None:
            n = len(msix_table) // PCI_MSIX_ENTRY_SIZE
        elif n:
            msix_table = bytes(n * PCI_MSIX_ENTRY_SIZE)
        if msix_table is not None and msix_pba is None:
            msix_pba = bytes((n + 7) // 8)
        return cls(config, irq_state, msix_table, msix_pba, display)


def _layouts(buf, pos):
    """Candidate (config size, MSI-X vectors) pairs, the likeliest first."""
    first = bytes(buf[pos + 4:pos + 4 + PCI_CONFIG_SPACE_SIZE])
    express = find_capability(first, PCI_CAP_ID_EXP) is not None
    sizes = (PCIE_CONFIG_SPACE_SIZE, PCI_CONFIG_SPACE_SIZE) if express else \
        (PCI_CONFIG_SPACE_SIZE, PCIE_CONFIG_SPACE_SIZE)
    out = []
    for size in sizes:
        n = msix_vectors(first)
        out.append((size, n))
        if n:
            out.append((size, 0))
    return out


def parse_config_state(buf, pos: int = 0, *, base: int = 0, end: int | None = None,
                       section: str | None = None):
    """Parse a config record body at ``buf[pos:]`` up to and including the
    END_OF_STATE marker that closes it.

    Returns ``(PciConfigState, body_length)``; the END marker is the 8 bytes at
    ``pos + body_length``.  ``base`` is the stream offset of ``buf[0]`` (for
    errors); ``end`` bounds the bytes that may be used.  Nothing on the wire
    says how long the body is: the length follows from the config space
    (PCI Express capability => 4096 bytes, MSI-X capability => table + PBA)
    and is confirmed by the END marker, as the loader's check
    (``vfio_load_device_config_state``) would confirm it.
    """
    end = len(buf) if end is None else end
    if end - pos < 4 + PCI_CONFIG_SPACE_SIZE + 16 + 8:
        raise _Truncated("stream ends inside a VFIO config record", base + pos, section=section,
                         needed=4 + PCI_CONFIG_SPACE_SIZE + 16 + 8, available=end - pos)
    version_id = _BE32.unpack_from(buf, pos)[0]
    need_first = None
    for size, n in _layouts(buf, pos):
        p = pos + 4 + size + 16
        if n:
            p += n * PCI_MSIX_ENTRY_SIZE + (n + 7) // 8
        disp_at = None
        if p + _DISPLAY_HEADER_SIZE <= end and \
                bytes(buf[p:p + _DISPLAY_HEADER_SIZE - 4]) == DISPLAY_HEADER[:-4]:
            disp_at = p
            p += _DISPLAY_HEADER_SIZE + RAMFB_CFG_SIZE
        if need_first is None:
            need_first, end_first = p + 8 - pos, p
        if p + 8 > end or bytes(buf[p:p + 8]) != END_OF_STATE_BYTES:
            continue
        q = pos + 4
        config = bytes(buf[q:q + size])
        q += size
        irq = tuple(_BE32.unpack_from(buf, q + 4 * i)[0] for i in range(PCI_NUM_PINS))
        q += 16
        table = pba = None
        if n:
            table = bytes(buf[q:q + n * PCI_MSIX_ENTRY_SIZE])
            q += n * PCI_MSIX_ENTRY_SIZE
            pba = bytes(buf[q:q + (n + 7) // 8])
            q += (n + 7) // 8
        display = None
        dver = VFIO_DISPLAY_VERSION
        if disp_at is not None:
            dver = _BE32.unpack_from(buf, disp_at + _DISPLAY_HEADER_SIZE - 4)[0]
            display = bytes(buf[disp_at + _DISPLAY_HEADER_SIZE:p])
        st = PciConfigState(config, irq, table, pba, display, version_id, dver)
        return st, p - pos
    if end - pos < need_first:
        # The layout the config space describes runs past the input.
        raise _Truncated("stream ends inside a VFIO config record", base + pos, section=section,
                         needed=need_first, available=end - pos)
    raise _StreamError("VFIO config record does not end with END_OF_STATE where its config "
                       "space says it ends", base + end_first, section=section,
                       expected=END_OF_STATE_BYTES, found=bytes(buf[end_first:end_first + 8]))


def _schemas():
    from construct import Bytes, Const, Int32ub, Int64ub, Int8ub, PascalString, Struct

    MarkerWord = Int64ub

    #: ``DEV_DATA_STATE``, be64 size, then ``size`` bytes of device data.
    DataChunkHeader = Struct(
        "marker" / Const(int(Marker.DEV_DATA_STATE), Int64ub),
        "size" / Int64ub,
    )

    #: The fields of ``vmstate_pci_device`` that precede the config space.
    PciDeviceVersion = Struct("version_id" / Int32ub)

    #: ``put_pci_irq_state``: one be32 per INTx pin.
    PciIrqState = Struct("irq_state" / Int32ub[PCI_NUM_PINS])

    #: ``RAMFBCfg`` (hw/display/ramfb.c), sent raw by ``ramfb_vmstate`` as a
    #: 28-byte buffer; the guest writes it through fw_cfg in big-endian.
    RamfbCfg = Struct(
        "addr" / Int64ub,
        "fourcc" / Int32ub,
        "flags" / Int32ub,
        "width" / Int32ub,
        "height" / Int32ub,
        "stride" / Int32ub,
    )

    #: A vmstate subsection header: u8 0x05, u8 name length, name, be32 version.
    SubsectionHeader = Struct(
        "type" / Const(QEMU_VM_SUBSECTION, Int8ub),
        "name" / PascalString(Int8ub, "latin-1"),
        "version_id" / Int32ub,
    )

    #: ``MultiFDInit_t``: the first 64 bytes of every multifd channel.
    MultiFDInit = Struct(
        "magic" / Const(MULTIFD_MAGIC, Int32ub),
        "version" / Int32ub,
        "uuid" / Bytes(16),
        "id" / Int8ub,
        "unused1" / Bytes(7),
        "unused2" / Bytes(32),
    )

    #: ``MultiFDPacketHdr_t``.
    MultiFDPacketHdr = Struct(
        "magic" / Int32ub,
        "version" / Int32ub,
        "flags" / Int32ub,
    )

    #: ``MultiFDPacketDeviceState_t`` after the common header: idstr copied with
    #: strncpy into 256 bytes (255 chars at most, NUL-terminated), instance_id,
    #: next_packet_size = length of the payload that follows.
    MultiFDDeviceStateTail = Struct(
        "idstr" / Bytes(MULTIFD_IDSTR_LEN),
        "instance_id" / Int32ub,
        "next_packet_size" / Int32ub,
    )

    #: ``MultiFDPacket_t`` (RAM) after the common header, up to the offset array
    #: (pages_alloc entries of be64), 9.0+ layout; the page data (next_packet_size
    #: bytes) follows the array.
    MultiFDRamTail = Struct(
        "pages_alloc" / Int32ub,
        "normal_pages" / Int32ub,
        "next_packet_size" / Int32ub,
        "packet_num" / Int64ub,
        "zero_pages" / Int32ub,
        "unused32" / Bytes(4),
        "unused64" / Bytes(24),
        "ramblock" / Bytes(256),
    )

    VfioDeviceStatePacketHeader = Struct(
        "version" / Int32ub,
        "idx" / Int32ub,
        "flags" / Int32ub,
    )

    _DISPLAY_HEADER = SubsectionHeader.build(dict(name=VFIO_DISPLAY_SUBSECTION,
                                                  version_id=VFIO_DISPLAY_VERSION))
    assert _DISPLAY_HEADER == DISPLAY_HEADER and len(_DISPLAY_HEADER) == _DISPLAY_HEADER_SIZE
    return locals()


__getattr__ = schemas_on_first_use(__name__, _schemas)
#: This module, for its functions to reach the schemas (built on first use).
_W = _sys.modules[__name__]
