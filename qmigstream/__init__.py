"""qmigstream: QEMU's live-migration stream, byte for byte.

Layers, bottom up (a module imports only from layers below it):

* ``qmigstream.errors``  - the one exception family (offsets, expected vs found)
* ``qmigstream.wire``    - construct schemas, one module per QEMU area
* ``qmigstream.codec``   - streaming reader (records with offsets) and writer
* ``qmigstream.vmstate`` - device sections decoded through the VMDESCRIPTION JSON
* ``qmigstream.device``  - emulated VFIO device with the v1 and v2 migration interfaces
* ``qmigstream.guestmem`` - guest RAM replayed from a stream into sparse per-block files
* ``qmigstream.diff``    - semantic differences between two streams (device fields, RAM pages)
* ``qmigstream.cli``     - the ``qmigstream`` command
"""

__version__ = "0.1.0"

# The stand-ins for modules construct (and dataclasses) import but this package
# does not use, in place before any of them is imported (see qmigstream.wire).
from . import wire as _wire  # noqa: E402,F401
