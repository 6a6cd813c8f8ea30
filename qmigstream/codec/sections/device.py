"""Device sections: vmstate payloads, decoded field by field when the stream describes them.

A device section carries no length on the wire.  Its end is found as
:mod:`qmigstream.codec.boundary` explains (preferably from the stream's own
VMDESCRIPTION entry).  When the entry is known and agrees with the bytes, the
payload is decoded through it (:mod:`qmigstream.vmstate`) into a
:class:`DeviceState` record whose bytes are rebuilt from the decoded values;
otherwise it stays an :class:`OpaquePayload` whose ``reason`` says why.
"""

from __future__ import annotations

from ...errors import StreamError
from ... import vmstate
from ..boundary import payload_start
from ..records import OpaquePayload


class DeviceState(OpaquePayload):
    """A device section payload decoded through its VMDESCRIPTION entry.

    ``tree`` is the :class:`qmigstream.vmstate.Vmsd` of the payload; ``encode()``
    rebuilds the bytes from the decoded values (not from a saved copy).
    """

    __slots__ = ("tree", "entry")
    kind = "device_state"

    def __init__(self, data, tree, entry, offset=None, depth=0, section=None):
        super().__init__(data, "description", offset, depth, section)
        self.tree, self.entry = tree, entry

    def encode(self):
        return vmstate.encode(self.tree)

    def fields(self):
        d = super().fields()
        d["vmsd_name"] = self.tree.vmsd_name
        d["version"] = self.tree.version
        d["state"] = vmstate.to_json(self.tree)
        return d


class DeviceSection:
    name = "device"
    self_delimiting = False

    def read(self, reader, src, header):
        start = payload_start(reader, src, header)
        idstr, entry, how, reason = start.idstr, start.entry, start.how, start.reason
        off = src.offset
        data = src.read(start.length, "device section payload")
        if how == "description" and reader.options.get("vmstate", True):
            try:
                tree = vmstate.decode(entry, data, off)
            except StreamError as e:
                reason = f"vmstate decoding failed: {e.one_line()}"
            else:
                yield DeviceState(data, tree, entry, off, header.depth, section=idstr)
                return
        rec = OpaquePayload(data, how, off, header.depth, section=idstr)
        rec.reason = reason
        yield rec
