"""The non-VFIO part of a machine, taken from a real capture (``migrate --template``).

A template gives the pipeline what real QEMU needs to accept a stream for its
machine: the configuration record (machine type and subsections), the RAM
block list and each block's final contents, and every device section with its
exact bytes and its VMDESCRIPTION entry.  The pipeline writes its own RAM and
VFIO sections around those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import vmdesc
from ..codec import ram_records as R
from ..codec.reader import StreamReader
from ..codec.records import (Command, Configuration, SectionFooter, SectionHeader,
                             VmDescription)
from ..errors import QmigstreamError
from .guest import GuestRam, RamLoader


@dataclass
class DeviceSection:
    """One FULL section of the template: header, payload records (bytes as captured)."""
    idstr: str
    instance_id: int
    version_id: int
    section_id: int
    payload: list
    entry: dict | None = None          # its VMDESCRIPTION entry


@dataclass
class Template:
    """The non-VFIO part of a real capture: configuration, RAM, device sections, trailer."""

    path: str
    configuration: Configuration | None
    page_size: int
    footers: bool
    blocks: list                        # RamBlockInfo, MEM_SIZE order
    ram: GuestRam
    devices: list = field(default_factory=list)      # DeviceSection, stream order
    description: vmdesc.VmDescription | None = None
    ram_section_id: int = 2
    max_section_id: int = 0
    commands: list = field(default_factory=list)

    @property
    def machine(self) -> str | None:
        return self.configuration.machine.decode("latin-1") if self.configuration else None


def load_template(path) -> Template:
    """Read a real capture as a template (precopy stream, no VFIO sections)."""
    reader = StreamReader(path)
    conf = None
    ram = None
    loader = None
    blocks = []
    devices = []
    current = None
    desc_rec = None
    commands = []
    ram_sid = None
    max_sid = 0
    for rec in reader.records():
        if rec.depth:
            raise QmigstreamError(f"{path}: a postcopy (PACKAGED) stream cannot be a template")
        if isinstance(rec, Configuration):
            conf = rec
            caps = set(rec.capabilities)
            if caps & {"x-ignore-shared", "mapped-ram"}:
                raise QmigstreamError(f"{path}: templates with capabilities "
                                      f"{sorted(caps)} are not supported")
        elif isinstance(rec, Command):
            commands.append(rec)
        elif isinstance(rec, SectionHeader):
            info = reader.sections[rec.section_id]
            max_sid = max(max_sid, rec.section_id)
            if info.idstr.endswith("/vfio") or info.idstr == "vfio":
                raise QmigstreamError(f"{path}: the template has a VFIO device "
                                      f"({info.idstr}); use a capture without one")
            if info.idstr == "ram":
                ram_sid = rec.section_id
                current = None
            elif rec.type_name == "FULL":
                current = DeviceSection(info.idstr, info.instance_id, info.version_id,
                                        rec.section_id, [])
                devices.append(current)
            else:
                raise QmigstreamError(f"{path}: iterative section {info.idstr!r} "
                                      "is not supported in a template")
        elif isinstance(rec, SectionFooter):
            current = None
        elif isinstance(rec, VmDescription):
            desc_rec = rec
        elif isinstance(rec, R.RamMemSize):
            blocks = list(rec.blocks)
            ram = GuestRam([(b.name, b.used_length, b) for b in blocks], reader.page_size)
            loader = RamLoader(ram)
        elif loader is not None and type(rec) in RamLoader._dispatch:
            loader.feed(rec)
        elif current is not None:
            current.payload.append(rec)
    if ram is None:
        raise QmigstreamError(f"{path}: no RAM block list in the template")
    desc = None
    if desc_rec is not None:
        try:
            desc = vmdesc.parse(desc_rec.json_bytes, desc_rec.offset + 5)
        except QmigstreamError:
            desc = None
    if desc is not None:
        seen = {}
        for d in devices:
            k = (d.idstr, d.instance_id)
            d.entry = desc.device(d.idstr, d.instance_id, seen.get(k, 0))
            seen[k] = seen.get(k, 0) + 1
    ram.clear_dirty()
    return Template(str(path), conf, reader.page_size, bool(reader.footers), blocks, ram,
                    devices, desc, ram_sid if ram_sid is not None else 2, max_sid, commands)
