"""VFIO v2 state machine: every (from, to) pair under every feature set.

The expected tables below are written out by hand from the paths the kernel
documents (reference map section 8.3, which lists vfio_mig_get_next_state()'s
results, and the arc list in the comment above vfio_from_fsm_table in Linux
drivers/vfio/vfio_main.c).  They are not computed by the code under test.
Cells: ">"-separated states entered after FROM, "-" = same state (no arc),
"EINVAL" = refused.  States a feature set lacks are refused as FROM and TO.
"""

import errno

import pytest

from qmigstream.device import fsm
from qmigstream.device.device_v2 import VfioDeviceV2
from qmigstream.device.fsm import MigState
from qmigstream.device.pci_device import EmulatedPciDevice
from qmigstream.errors import DeviceError

ABBREV = {"S": "STOP", "R": "RUNNING", "SC": "STOP_COPY", "RS": "RESUMING",
          "RP": "RUNNING_P2P", "PC": "PRE_COPY", "PP": "PRE_COPY_P2P", "ERR": "ERROR"}

GRID_NONE = """
      S       R       SC      RS
S     -       R       SC      RS
R     S       -       S>SC    S>RS
SC    S       S>R     -       S>RS
RS    S       S>R     S>SC    -
"""

GRID_P2P = """
      S       R        SC        RS        RP
S     -       RP>R     SC        RS        RP
R     RP>S    -        RP>S>SC   RP>S>RS   RP
SC    S       S>RP>R   -         S>RS      S>RP
RS    S       S>RP>R   S>SC      -         S>RP
RP    S       R        S>SC      S>RS      -
"""

GRID_PRE_COPY = """
      S       R       SC      RS        PC
S     -       R       SC      RS        R>PC
R     S       -       S>SC    S>RS      PC
SC    S       S>R     -       S>RS      EINVAL
RS    S       S>R     S>SC    -         S>R>PC
PC    R>S     R       SC      R>S>RS    -
"""

GRID_ALL = """
      S        R        SC        RS          RP      PC          PP
S     -        RP>R     SC        RS          RP      RP>R>PC     RP>PP
R     RP>S     -        RP>S>SC   RP>S>RS     RP      PC          RP>PP
SC    S        S>RP>R   -         S>RS        S>RP    EINVAL      EINVAL
RS    S        S>RP>R   S>SC      -           S>RP    S>RP>R>PC   S>RP>PP
RP    S        R        S>SC      S>RS        -       R>PC        PP
PC    R>RP>S   R        PP>SC     R>RP>S>RS   R>RP    -           PP
PP    RP>S     RP>R     SC        RP>S>RS     RP      PC          -
"""


def expected_table(grid: str) -> dict:
    """{from_name: {to_name: [names] | None}} for all 64 pairs."""
    lines = [ln.split() for ln in grid.strip().splitlines()]
    cols = [ABBREV[x] for x in lines[0]]
    out = {a: {b: ([] if a == b else None) for b in ABBREV.values()} for a in ABBREV.values()}
    for row in lines[1:]:
        cur = ABBREV[row[0]]
        for col, cell in zip(cols, row[1:]):
            if cell == "-":
                out[cur][col] = []
            elif cell == "EINVAL":
                out[cur][col] = None
            else:
                out[cur][col] = [ABBREV[x] for x in cell.split(">")]
    return out


FEATURE_SETS = {
    "none": GRID_NONE,
    "p2p": GRID_P2P,
    "pre_copy": GRID_PRE_COPY,
    "p2p,pre_copy": GRID_ALL,
}
EXPECTED = {k: expected_table(v) for k, v in FEATURE_SETS.items()}


def test_expected_tables_are_complete():
    for name, tab in EXPECTED.items():
        assert len(tab) == 8 and all(len(r) == 8 for r in tab.values()), name
    # sanity of the hand-written grids: every listed path ends in its column
    for tab in EXPECTED.values():
        for cur, row in tab.items():
            for new, p in row.items():
                if p:
                    assert p[-1] == new


@pytest.mark.parametrize("features", list(FEATURE_SETS))
def test_all_64_pairs(features):
    exp = EXPECTED[features]
    checked = 0
    for cur in MigState:
        for new in MigState:
            want = exp[cur.name][new.name]
            if want is None:
                with pytest.raises(DeviceError) as ei:
                    fsm.path(cur, new, features)
                assert ei.value.errno == errno.EINVAL, (cur, new)
            else:
                assert [s.name for s in fsm.path(cur, new, features)] == want, (cur, new)
            checked += 1
    assert checked == 64


def test_state_values_are_the_uapi_ones():
    assert {s.name: s.value for s in MigState} == {
        "ERROR": 0, "STOP": 1, "RUNNING": 2, "STOP_COPY": 3, "RESUMING": 4,
        "RUNNING_P2P": 5, "PRE_COPY": 6, "PRE_COPY_P2P": 7}
    assert int(fsm.MigFeature.STOP_COPY) == 1 and int(fsm.MigFeature.P2P) == 2
    assert int(fsm.MigFeature.PRE_COPY) == 4


def test_blocked_arcs_answer_einval_not_loop():
    # Linux a26b499b: STOP_COPY -> PRE_COPY(_P2P) is EINVAL (older kernels spun forever).
    for feats in ("pre_copy", "p2p,pre_copy"):
        with pytest.raises(DeviceError) as ei:
            fsm.next_state("STOP_COPY", "PRE_COPY", feats)
        assert ei.value.errno == errno.EINVAL
    with pytest.raises(DeviceError) as ei:
        fsm.next_state("STOP_COPY", "PRE_COPY_P2P", "all")
    assert ei.value.errno == errno.EINVAL


def test_next_state_single_steps_match_kernel_arcs():
    # The kernel's single arcs with all features (from the vfio_main.c comment).
    assert fsm.next_state("PRE_COPY", "STOP_COPY", "all") == MigState.PRE_COPY_P2P
    assert fsm.next_state("PRE_COPY_P2P", "STOP_COPY", "all") == MigState.STOP_COPY
    assert fsm.next_state("RESUMING", "PRE_COPY", "all") == MigState.STOP
    # Without P2P the skipped RUNNING_P2P is invisible: one arc STOP -> RUNNING.
    assert fsm.next_state("STOP", "RUNNING", "none") == MigState.RUNNING
    # Current state the device does not support: EINVAL.
    with pytest.raises(DeviceError) as ei:
        fsm.next_state("RUNNING_P2P", "STOP", "none")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(DeviceError):
        fsm.next_state("RUNNING", "ERROR", "all")


def test_parse_names_and_features():
    assert fsm.parse_state("VFIO_DEVICE_STATE_STOP_COPY") == MigState.STOP_COPY
    assert fsm.parse_state("running_p2p") == MigState.RUNNING_P2P
    assert fsm.parse_state("6") == MigState.PRE_COPY
    assert fsm.parse_features("all") == 7 and fsm.parse_features("none") == 1
    assert fsm.parse_features("pre_copy") == 5
    with pytest.raises(DeviceError):
        fsm.parse_state("HALTED")
    with pytest.raises(DeviceError):
        fsm.parse_features("p2p,turbo")


def _resume_stream(profile="sized:128"):
    """A complete saved stream for a device of ``profile``."""
    src = VfioDeviceV2(EmulatedPciDevice(profile, seed=5), features="none")
    src.set_state("STOP")
    f = src.set_state("STOP_COPY")
    out = bytearray()
    while True:
        b = f.read(1 << 16)
        if not b:
            return bytes(out)
        out += b


@pytest.mark.parametrize("features", list(FEATURE_SETS))
def test_device_executes_exactly_the_kernel_arcs(features):
    """A VfioDeviceV2 walks the same arcs for every supported pair."""
    stream = _resume_stream()
    exp = EXPECTED[features]
    flags = fsm.parse_features(features)
    for cur in MigState:
        if cur == MigState.ERROR or not fsm.supported(cur, flags):
            continue
        for new in MigState:
            want = exp[cur.name][new.name]
            dev = VfioDeviceV2(EmulatedPciDevice("sized:128", seed=1), features=features)
            f = dev.set_state(cur)
            if cur == MigState.RESUMING:
                f.write(stream)
            dev.arcs.clear()
            if want is None:
                with pytest.raises(DeviceError) as ei:
                    dev.set_state(new)
                assert ei.value.errno == errno.EINVAL
                assert dev.state == cur and dev.arcs == []
            else:
                dev.set_state(new)
                assert [b.name for _, b in dev.arcs] == want, (cur, new)
                assert dev.state == new
