"""Emulated VFIO device with the v1 (migration region) and v2 (state machine) interfaces.

Modules:

* :mod:`.fsm`        - v2 states, feature flags, the kernel's next-state table and paths
* :mod:`.device_v2`  - :class:`VfioDeviceV2`: set_state / data file / PRECOPY_INFO /
  MIG_DATA_SIZE / DMA logging
* :mod:`.region_v1`  - :class:`MigrationRegionV1`: the v1 region (5.8 layout and the
  2019 RFC layout with the dirty-pfn protocol), plus the user-side loops
* :mod:`.pci_device` - :class:`EmulatedPciDevice`: config space, image, DMA engine,
  profiles (mtty-like and sized), save sessions
* :mod:`.blob`       - the migration data format (versioned, CRC-checked blobs) and the
  resuming-side assembler

Typical use (v2)::

    src = VfioDeviceV2(EmulatedPciDevice("sized:65536", seed=1))
    dst = VfioDeviceV2(EmulatedPciDevice("sized:65536", seed=2))
    f = src.set_state("PRE_COPY");  ...read until ENOMSG...
    src.set_state("STOP_COPY");     ...read until b""...
    g = dst.set_state("RESUMING");  g.write(chunk) for each chunk
    dst.set_state("STOP")           # data checked and applied here
    dst.device.load_config_space(src.device.config_space())
    assert src.device == dst.device

Every refusal raises :class:`qmigstream.errors.DeviceError` carrying the errno a
Linux driver returns.  docs/vfio.md describes all of it.
"""

_WHERE = {
    "BlobAssembler": "blob", "Rejects": "blob", "parse_blobs": "blob",
    "MigrationFile": "device_v2", "VfioDeviceV2": "device_v2", "drain": "device_v2",
    "MigFeature": "fsm", "MigState": "fsm", "next_state": "fsm", "path": "fsm",
    "EmulatedPciDevice": "pci_device", "MttyProfile": "pci_device",
    "PciConfigSpace": "pci_device", "SizedProfile": "pci_device",
    "SparseGuestMemory": "pci_device", "make_profile": "pci_device",
    "MigrationRegionV1": "region_v1", "get_dirty_pfns": "region_v1",
    "load_all": "region_v1", "save_all": "region_v1",
}


def __getattr__(name):
    """The names above, imported from their module when first asked for (a
    program that needs one interface does not load the other)."""
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BlobAssembler", "Rejects", "parse_blobs", "MigrationFile", "VfioDeviceV2", "drain",
    "MigFeature", "MigState", "next_state", "path", "EmulatedPciDevice", "MttyProfile",
    "PciConfigSpace", "SizedProfile", "SparseGuestMemory", "make_profile",
    "MigrationRegionV1", "get_dirty_pfns", "load_all", "save_all",
]
