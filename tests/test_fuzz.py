"""Bounded fuzzing of every entry point (a few hundred examples per target).

Inputs are structure-aware (tests/strategies.py): generated streams with RAM of
every record kind, described device sections, VFIO sections of every release
family, nested PACKAGED commands, qcow2 images; seeds cut from the real
captures; and mutations of all of them.  Each example goes through
:func:`fuzz_targets.run_one`, which fails on any exception outside
``QmigstreamError``, a re-encode that differs from the input, a run over its
time budget, a RecursionError, or a tracemalloc peak above 64 MiB + 8x the
input.  The long coverage-guided runs are ``tools/fuzz/run`` (docs/reliability.md).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fuzz_targets as FT
import strategies as S
from qmigstream import vmdesc as VD
from qmigstream import vmstate
from qmigstream.codec.reader import MAX_PACKAGED_DEPTH, read_records
from qmigstream.codec.writer import encode_records
from qmigstream.errors import LimitExceeded, QmigstreamError, StreamError

FT.warm_up()
FAST = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
BUDGET = 10.0


def ok(target, data):
    f = FT.run_one(target, data, budget=BUDGET)
    assert f is None, f"{f!r}\n{f.signature()}\ninput (hex): {data[:4096].hex()}"


# -- generated streams are what they claim to be -------------------------------------

@settings(max_examples=60, **FAST)
@given(st.one_of(S.streams(), S.vfio_streams()))
def test_generated_streams_decode_and_reencode(data):
    recs = list(read_records(data))
    assert encode_records(recs) == data
    for r in recs:
        enc = r.encode()
        assert data[r.offset:r.offset + len(enc)] == enc
    kinds = {r.kind for r in recs}
    assert {"file_header", "section", "eof"} <= kinds


def test_generators_cover_every_record_kind():
    seen = set()
    for i in range(150):
        d = S.RandomDraw(i)
        for data in (S.stream(d), S.vfio_stream(d)):
            seen |= {r.kind for r in read_records(data)}
    assert {"configuration", "ram_mem_size", "ram_page", "ram_zero", "ram_xbzrle",
            "ram_compressed", "ram_multifd_flush", "ram_hook", "ram_eos", "device_state",
            "payload", "command", "packaged_end", "vfio_marker", "vfio_data",
            "vfio_config", "vmdescription", "footer"} <= seen


def test_fixture_seeds_decode_and_reencode():
    seeds = S.fixture_seeds()
    assert len(seeds) >= 16
    for name, data in seeds.items():
        assert encode_records(list(read_records(data))) == data, name


# -- each target under mutation ---------------------------------------------------------

mutated = S.mutated_streams


@settings(max_examples=250, **FAST)
@given(mutated)
def test_fuzz_decode(data):
    ok("decode", data)


@st.composite
def vmstate_inputs(draw):
    d = S.HypothesisDraw(draw)
    entry, payload = S.device_entry(d, S.name(d, 1, 10), d.int(0, 3), max_depth=4)
    js = VD.dump({"page_size": 4096, "devices": [entry]}, d.choice(VD.STYLES))
    data = FT.vmstate_input(js, payload)
    if d.int(0, 4):
        data = S.mutate(d, data)
    return data


@settings(max_examples=120, **FAST)
@given(vmstate_inputs())
def test_fuzz_vmstate(data):
    ok("vmstate", data)


@settings(max_examples=50, **FAST)
@given(st.data())
def test_generated_vmstate_roundtrips(data):
    d = S.HypothesisDraw(data.draw)
    entry, payload = S.device_entry(d, "dev", 0, max_depth=4)
    tree = vmstate.decode(entry, payload, 0)
    assert vmstate.encode(tree) == payload
    from qmigstream.vmstate.decode import payload_size
    assert payload_size(entry) == len(payload)


@settings(max_examples=200, **FAST)
@given(S.mutated(S.vfio_streams()))
def test_fuzz_vfio(data):
    ok("vfio", data)


@pytest.mark.skipif(not FT.have_check(), reason="qmigstream.check is not there yet")
@settings(max_examples=80, **FAST)
@given(mutated)
def test_fuzz_check(data):
    ok("check", data)


@settings(max_examples=100, **FAST)
@given(st.one_of(S.mutated(S.vfio_streams()), mutated))
def test_fuzz_replay(data):
    ok("replay", data)


@settings(max_examples=200, **FAST)
@given(mutated)
def test_fuzz_analyze(data):
    ok("analyze", data)


@settings(max_examples=80, **FAST)
@given(mutated)
def test_fuzz_ram_extract(data):
    ok("ram", data)


@settings(max_examples=60, **FAST)
@given(mutated)
def test_fuzz_diff(data):
    ok("diff", data)


@settings(max_examples=40, **FAST)
@given(mutated)
def test_fuzz_cli(data):
    ok("cli", data)


@st.composite
def multifd_channels(draw):
    d = S.HypothesisDraw(draw)
    seeds = S.multifd_channel_seeds()
    base = seeds[d.choice(sorted(seeds))][:d.int(64, 12000)]
    return S.mutate(d, base)


@settings(max_examples=30, **FAST)
@given(multifd_channels())
def test_fuzz_multifd(data):
    ok("multifd", data)


@st.composite
def qcow2_images(draw):
    d = S.HypothesisDraw(draw)
    vm = S.stream(d)[:3000]
    img = S.qcow2_image(vm, version=d.choice([2, 3]), compressed=d.bool())
    return S.mutate(d, img) if d.int(0, 5) else img


@settings(max_examples=150, **FAST)
@given(qcow2_images())
def test_fuzz_qcow2(data):
    ok("qcow2", data)


def test_qcow2_builder_holds_the_stream():
    import io
    from qmigstream.qcow2 import Qcow2Image
    vm = S.stream(S.RandomDraw(5))
    for version in (2, 3):
        for compressed in (False, True):
            img = Qcow2Image(io.BytesIO(S.qcow2_image(vm, version=version,
                                                      compressed=compressed)))
            assert img.read_vmstate(img.snapshot()) == vm


# -- nesting and hostile lengths -----------------------------------------------------------

@pytest.mark.parametrize("depth", [MAX_PACKAGED_DEPTH, MAX_PACKAGED_DEPTH + 1, 5000])
def test_deeply_nested_packaged(depth):
    data = S.deep_packaged(depth)
    ok("decode", data)
    if depth <= MAX_PACKAGED_DEPTH:
        assert encode_records(list(read_records(data))) == data
    else:
        with pytest.raises(LimitExceeded):
            list(read_records(data))


@pytest.mark.parametrize("kind", ["struct", "subsection"])
def test_deeply_nested_description(kind):
    entry, payload = S.deep_vmsd(20, kind)
    assert vmstate.encode(vmstate.decode(entry, payload, 0)) == payload
    entry, payload = S.deep_vmsd(3000, kind)
    with pytest.raises(LimitExceeded):
        vmstate.decode(entry, payload, 0)
    # as JSON in a trailer, nested far beyond the limits
    js = deep_description_json(3000, kind)
    ok("vmstate", FT.vmstate_input(js, payload))
    with pytest.raises(QmigstreamError):
        VD.parse(js)


def deep_description_json(depth, kind):
    """The JSON text of :func:`strategies.deep_vmsd` (json.dumps itself would recurse)."""
    leaf = '{"vmsd_name": "leaf", "version": 1, "fields": []}'
    text = leaf
    for i in range(depth):
        if kind == "struct":
            text = (f'{{"vmsd_name": "n{i}", "version": 1, "fields": [{{"name": "s", '
                    f'"type": "struct", "struct": {text}, "size": 1}}]}}')
        else:
            text = f'{{"vmsd_name": "n{i}", "version": 1, "fields": [], "subsections": [{text}]}}'
    entry = '{"name": "deep", "instance_id": 0, ' + text[1:]
    return ('{"page_size": 4096, "devices": [' + entry + ']}').encode()


def test_deeply_nested_json_in_a_stream():
    seed = S.fixture_seeds()["pc-7.2-paused.0"]
    eof = seed.rindex(b"\x06")      # the trailer marker
    js = b"[" * 200000 + b"]" * 200000
    data = seed[:eof] + b"\x06" + struct.pack(">I", len(js)) + js
    for target in ("decode", "analyze", "vfio", "replay"):
        ok(target, data)


def _set(data, at, value):
    return data[:at] + value + data[at + len(value):]


@pytest.mark.parametrize("target", ["decode", "analyze", "ram"])
def test_hostile_length_fields(target):
    """Every be32/be64 in the first records set to huge values: typed errors, bounded memory."""
    seed = S.fixture_seeds()["pc-7.2-paused.0"]
    starts = S.record_starts(seed)[:24]
    for off in starts:
        for k in range(0, 11, 2):
            for v in (b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff\xff\xff\xff\xff"):
                ok(target, _set(seed, off + k, v))


def test_truncations_of_a_real_seed():
    """Every cut before the EOF byte is an error; a cut after it (inside the
    VMDESCRIPTION trailer, which QEMU never reads) decodes, the cut trailer
    kept as trailing bytes."""
    seed = S.fixture_seeds()["pc-7.2-paused.0"]
    eof = next(r.offset for r in read_records(seed) if r.kind == "eof")
    for n in list(range(0, len(seed), max(1, len(seed) // 150))) + [eof, eof + 1, eof + 3]:
        if n <= eof:
            with pytest.raises(StreamError):
                list(read_records(seed[:n]))
        else:
            recs = list(read_records(seed[:n]))
            k = [r.kind for r in recs].index("eof")
            assert recs[k].offset == eof and [r.kind for r in recs[k + 1:]] == \
                (["trailing_bytes"] if n > eof + 1 else []), n
        ok("decode", seed[:n])


def test_run_one_reports_what_it_must():
    """The checks themselves: a non-typed exception, a hang, a memory blow-up."""
    def boom(data):
        raise KeyError("x")

    def spin(data):
        while True:
            pass

    def hog(data):
        return bytearray(200 << 20)

    saved = dict(FT.TARGETS)
    try:
        FT.TARGETS.update(boom=boom, spin=spin, hog=hog)
        assert FT.run_one("boom", b"").kind == "exception"
        assert FT.run_one("spin", b"", budget=0.2).kind == "hang"
        assert FT.run_one("hog", b"").kind == "memory"
    finally:
        FT.TARGETS.clear()
        FT.TARGETS.update(saved)
