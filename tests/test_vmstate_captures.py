"""Every committed real capture decodes field by field wherever its trailer describes it."""

from __future__ import annotations

import pytest

from conftest import capture_names
from qmigstream import vmstate
from qmigstream.codec.reader import StreamReader
from qmigstream.codec.records import OpaquePayload, SectionHeader
from qmigstream.codec.sections.device import DeviceState


def _payloads(path):
    reader = StreamReader(str(path))
    out = []
    sec = None
    for rec in reader.records():
        if isinstance(rec, SectionHeader):
            sec = reader.sections[rec.section_id]
        elif isinstance(rec, OpaquePayload):
            out.append((sec, rec))
    return reader, out


@pytest.mark.parametrize("name", capture_names())
def test_no_opaque_device_section_when_described(name, capture):
    path, _ = capture(name)
    reader, payloads = _payloads(path)
    described = reader.description is not None
    for sec, rec in payloads:
        if described:
            assert isinstance(rec, DeviceState), (sec.idstr, rec.reason)
            assert vmstate.encode(rec.tree) == rec.data
            assert rec.tree.size == len(rec.data)
        else:
            assert not isinstance(rec, DeviceState)
            assert rec.reason == "the stream has no VMDESCRIPTION trailer"
    if described:
        assert payloads, "a described stream with no device section"


def test_known_values_in_the_device_zoo(capture):
    if "pc-7.2-devices" not in capture_names():
        pytest.skip("pc-7.2-devices not committed")
    path, _ = capture("pc-7.2-devices")
    _, payloads = _payloads(path)
    by = {sec.idstr: rec for sec, rec in payloads}
    e1000 = by["0000:00:03.0/e1000"].tree
    ra = next(f for f in e1000.walk() if f.name == "mac_reg[0]" and f.array_len == 32)
    assert ra.value[0] == 0x12005452 and ra.value[1] & 0xFFFF == 0x5634   # 52:54:00:12:34:56
    assert ra.value[1] >> 31 == 1                                          # RAH0.AV
    raw = ra.raw
    assert raw[:4] == bytes.fromhex("12005452")                           # big-endian on the wire
    # every field's bytes are where its offset says
    for sec, rec in payloads:
        base = rec.offset
        for f in rec.tree.walk():
            assert rec.data[f.offset - base:f.offset - base + f.size] == f.raw
