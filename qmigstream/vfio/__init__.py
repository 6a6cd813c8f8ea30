"""VFIO devices in the stream: config decoding, release families, builder, multifd.

* :mod:`qmigstream.vfio.pci`     - the config record as named fields with offsets
* :mod:`qmigstream.vfio.family`  - release families as data; :func:`infer_family`
* :mod:`qmigstream.vfio.builder` - a device's START/PART/END/FULL payloads as a
  family writes them (:func:`~qmigstream.vfio.builder.plan`,
  :class:`~qmigstream.vfio.builder.DeviceWriter`)
* :mod:`qmigstream.vfio.multifd` - 10.x multifd channels: parse, build, reassemble
* :mod:`qmigstream.vfio.scan`    - each device's sections, chunks and config from a stream

The records themselves (markers, data chunks, config) are in
:mod:`qmigstream.codec.sections.vfio`; the schemas in :mod:`qmigstream.wire.vfio`.
"""

from .family import FAMILIES, FAMILY_ORDER, Family, FamilyMatch, infer_family

__all__ = ["FAMILIES", "FAMILY_ORDER", "Family", "FamilyMatch", "infer_family"]
