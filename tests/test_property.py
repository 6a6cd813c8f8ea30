"""Property: any record sequence the format allows encodes, decodes and re-encodes identically."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, example, given, settings, strategies as st

from qmigstream.codec.build import StreamBuilder
from qmigstream.codec.ram_records import (RamCompressed, RamEos, RamHook, RamMultifdFlush)
from qmigstream.codec.reader import read_records
from qmigstream.codec.records import OpaquePayload
from qmigstream.codec.writer import encode_records
from qmigstream.wire.commands import MigCmd
from qmigstream.wire.header import SectionType as T
from qmigstream.wire.ram import RamFlag

PS = 4096
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789./@-_:", min_size=1, max_size=40)

page_op = st.one_of(
    st.tuples(st.just("zero"), st.integers(0, 15)),
    st.tuples(st.just("page"), st.integers(0, 15), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("xbzrle"), st.integers(0, 15), st.binary(min_size=0, max_size=64)),
    st.tuples(st.just("comp"), st.integers(0, 15), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("hook")),
)

command = st.one_of(
    st.builds(lambda v: (MigCmd.PING, {"value": v}), st.integers(0, 2**32 - 1)),
    st.just((MigCmd.OPEN_RETURN_PATH, {})),
    st.just((MigCmd.SWITCHOVER_START, {})),
    st.builds(lambda n: (MigCmd.RECV_BITMAP, {"block": n}), names),
    st.builds(lambda n, r: (MigCmd.POSTCOPY_RAM_DISCARD,
                            {"version": 0, "block": n, "terminator": 0,
                             "ranges": [{"start": a, "length": b} for a, b in r]}),
              names, st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)), max_size=4)),
)

stream = st.fixed_dictionaries({
    "footers": st.booleans(),
    "config": st.booleans(),
    "machine": names,
    "blocks": st.lists(names, min_size=1, max_size=4, unique=True),
    "commands": st.lists(command, max_size=4),
    "iterations": st.lists(st.lists(st.tuples(st.integers(0, 3), page_op), max_size=20), max_size=4),
    "devices": st.lists(st.tuples(names, st.integers(0, 3), st.binary(max_size=300)), max_size=5),
    "trailer": st.booleans(),
    "trailing": st.binary(max_size=8),
})


def build(spec):
    b = StreamBuilder(footers=spec["footers"])
    b.header()
    if spec["config"]:
        b.configuration(spec["machine"])
    for cmd, args in spec["commands"]:
        b.command(cmd, **args)
    blocks = spec["blocks"]
    b.section(T.SECTION_START, "ram", b.ram_setup_records([(n, 16 * PS) for n in blocks]),
              version_id=4, section_id=1000)
    for it in spec["iterations"]:
        recs = []
        for bi, op in it:
            blk = blocks[bi % len(blocks)]
            kind = op[0]
            if kind == "zero":
                recs.append(b.ram_page_record(blk, op[1] * PS, zero=True))
            elif kind == "page":
                recs.append(b.ram_page_record(blk, op[1] * PS, (op[2] * PS)[:PS]))
            elif kind == "xbzrle":
                recs.append(b.ram_page_record(blk, op[1] * PS, xbzrle=op[2]))
            elif kind == "comp":
                cont = RamFlag.CONTINUE if b.last_block == blk else 0
                b.last_block = blk
                recs.append(RamCompressed(blk, op[1] * PS, op[2], RamFlag.COMPRESS_PAGE | cont))
            elif kind == "flush":
                recs.append(RamMultifdFlush())
            else:
                recs.append(RamHook())
        recs.append(RamEos())
        b.section(T.SECTION_PART, "ram", recs, section_id=1000)
    b.section(T.SECTION_END, "ram", [RamEos()], section_id=1000)
    devs = []
    seen = set()
    for i, (name, inst, payload) in enumerate(spec["devices"]):
        if (name, inst) in seen or name == "ram":
            continue
        seen.add((name, inst))
        b.section(T.SECTION_FULL, name, [OpaquePayload(payload)], instance_id=inst,
                  version_id=1, section_id=i)
        devs.append({"name": name, "instance_id": inst, "vmsd_name": name, "version": 1,
                     "fields": [{"name": "data", "type": "buffer", "size": len(payload)}]})
    b.eof()
    if spec["trailer"] or devs:
        b.vmdescription(json.dumps({"page_size": PS, "devices": devs}).encode())
    data = b.encode()
    return data + (spec["trailing"] if (spec["trailer"] or devs) else b"")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream)
# Bytes after the trailer: the trailer must still bound the devices (a payload
# that looks like a command byte cannot be bounded by a scan without footers).
@example({"footers": False, "config": False, "machine": "0", "blocks": ["0"], "commands": [],
          "iterations": [], "devices": [("0", 0, b"\x08")], "trailer": False,
          "trailing": b"\x00"})
def test_encode_decode_encode_identical(spec):
    data = build(spec)
    recs = list(read_records(data))
    assert encode_records(recs) == data
    # Offsets are exact: each record's bytes sit at its offset.
    for r in recs:
        enc = r.encode()
        assert data[r.offset:r.offset + len(enc)] == enc
    # The fast path and the schema path agree record by record.
    slow = list(read_records(data, fast=False, compact=False))
    assert encode_records(slow) == data
    assert sum(1 for r in slow if r.kind == "payload") == len(
        [1 for r in recs if r.kind == "payload"])
