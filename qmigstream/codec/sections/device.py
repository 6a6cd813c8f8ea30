"""Device sections: payloads the codec keeps as bytes, bounded as boundary.py says."""

from __future__ import annotations

from ..boundary import description_size, scan_for_end
from ..records import OpaquePayload


class DeviceSection:
    name = "device"
    self_delimiting = False

    def read(self, reader, src, header):
        sec = reader.sections.get(header.section_id)
        length = how = None
        entry = reader.description_entry(header) if header.type_name == "FULL" else None
        if entry is not None:
            try:
                n = description_size(entry)
            except (ValueError, TypeError, KeyError):
                n = None
            if n is not None and reader.check_end_at(src, n, header.section_id):
                length, how = n, "description"
        if length is None:
            length, how = scan_for_end(src, header.section_id, reader.footers,
                                       reader.ids, header.depth)
        off = src.offset
        data = src.read(length, "device section payload")
        yield OpaquePayload(data, how, off, header.depth, section=sec.idstr if sec else None)
