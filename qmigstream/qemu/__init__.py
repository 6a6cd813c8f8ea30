"""Drive a local QEMU: QMP over a unix socket, outgoing and incoming migration.

Standard library only.  Used by ``tools/capture.py`` (making the committed
captures) and by tests that ask the real loader whether it accepts a stream.

* :mod:`qmigstream.qemu.qmp`    - a small QMP client (:class:`QMPClient`, :class:`QMPError`)
* :mod:`qmigstream.qemu.runner` - :class:`Qemu` (one process, always killed on exit),
  :func:`migrate_to_file`, :func:`load_incoming` and :func:`load_incoming_channels`
  (multifd) -> :class:`IncomingResult`, :class:`UnixSink` (records socket migrations,
  answers on the return path)
"""

from .qmp import QMPClient, QMPError, QMPTimeout
from .runner import (BASE_ARGS, IncomingResult, MigrationResult, Qemu, QemuError, UnixSink,
                     load_incoming, load_incoming_channels, migrate_to_file, qemu_binary)

__all__ = ["QMPClient", "QMPError", "QMPTimeout", "BASE_ARGS", "IncomingResult",
           "MigrationResult", "Qemu", "QemuError", "load_incoming", "load_incoming_channels",
           "migrate_to_file", "qemu_binary", "UnixSink"]
