"""The VFIO v2 migration state machine (Linux 5.18+ uAPI), as the kernel answers it.

States and values are those of ``enum vfio_device_mig_state`` in Linux
``include/uapi/linux/vfio.h``; the feature flags are those of
``struct vfio_device_feature_migration``.  :data:`NEXT_STEP` is the kernel's
``vfio_from_fsm_table`` (``drivers/vfio/vfio_main.c``) and :func:`next_state`
is ``vfio_mig_get_next_state()``: it returns the next arc a driver executes on
its way from ``cur`` to ``new``, skipping states whose feature the device lacks.

One deliberate difference from the loop as written up to Linux 7.0: for the two
blocked arcs STOP_COPY -> PRE_COPY and STOP_COPY -> PRE_COPY_P2P the table says
ERROR, whose feature requirement ``~0`` is never met, so the skip loop of
older kernels never terminated.  Linux commit a26b499b ("vfio: prevent infinite
loop in vfio_mig_get_next_state() on blocked arc") makes it answer ``-EINVAL``,
which is what this model does.

API::

    path(cur, new, features) -> [states entered after cur, ending in new]
                                (raises DeviceError(errno=EINVAL) when refused)
    next_state(cur, new, features) -> MigState
    table(features) -> {cur: {new: [..] or None}}
"""

from __future__ import annotations

import enum
import errno as _errno

from ..errors import DeviceError


class MigState(enum.IntEnum):
    """``enum vfio_device_mig_state``."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigFeature(enum.IntFlag):
    """``VFIO_MIGRATION_*`` flags of ``VFIO_DEVICE_FEATURE_MIGRATION``."""

    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


S = MigState
F = MigFeature

#: Flags a state needs (the kernel's ``state_flags_table``); ERROR needs ``~0``.
STATE_FLAGS = {
    S.STOP: F.STOP_COPY,
    S.RUNNING: F.STOP_COPY,
    S.STOP_COPY: F.STOP_COPY,
    S.RESUMING: F.STOP_COPY,
    S.RUNNING_P2P: F.STOP_COPY | F.P2P,
    S.PRE_COPY: F.STOP_COPY | F.PRE_COPY,
    S.PRE_COPY_P2P: F.STOP_COPY | F.P2P | F.PRE_COPY,
    S.ERROR: 0xFFFFFFFF,
}


def _row(**cells):
    return {S[k]: S[v] for k, v in cells.items()}


#: ``vfio_from_fsm_table[cur][new]`` = the next step from cur towards new.
NEXT_STEP = {
    S.STOP: _row(STOP="STOP", RUNNING="RUNNING_P2P", PRE_COPY="RUNNING_P2P",
                 PRE_COPY_P2P="RUNNING_P2P", STOP_COPY="STOP_COPY", RESUMING="RESUMING",
                 RUNNING_P2P="RUNNING_P2P", ERROR="ERROR"),
    S.RUNNING: _row(STOP="RUNNING_P2P", RUNNING="RUNNING", PRE_COPY="PRE_COPY",
                    PRE_COPY_P2P="RUNNING_P2P", STOP_COPY="RUNNING_P2P",
                    RESUMING="RUNNING_P2P", RUNNING_P2P="RUNNING_P2P", ERROR="ERROR"),
    S.PRE_COPY: _row(STOP="RUNNING", RUNNING="RUNNING", PRE_COPY="PRE_COPY",
                     PRE_COPY_P2P="PRE_COPY_P2P", STOP_COPY="PRE_COPY_P2P",
                     RESUMING="RUNNING", RUNNING_P2P="RUNNING", ERROR="ERROR"),
    S.PRE_COPY_P2P: _row(STOP="RUNNING_P2P", RUNNING="RUNNING_P2P", PRE_COPY="PRE_COPY",
                         PRE_COPY_P2P="PRE_COPY_P2P", STOP_COPY="STOP_COPY",
                         RESUMING="RUNNING_P2P", RUNNING_P2P="RUNNING_P2P", ERROR="ERROR"),
    S.STOP_COPY: _row(STOP="STOP", RUNNING="STOP", PRE_COPY="ERROR", PRE_COPY_P2P="ERROR",
                      STOP_COPY="STOP_COPY", RESUMING="STOP", RUNNING_P2P="STOP",
                      ERROR="ERROR"),
    S.RESUMING: _row(STOP="STOP", RUNNING="STOP", PRE_COPY="STOP", PRE_COPY_P2P="STOP",
                     STOP_COPY="STOP", RESUMING="RESUMING", RUNNING_P2P="STOP",
                     ERROR="ERROR"),
    S.RUNNING_P2P: _row(STOP="STOP", RUNNING="RUNNING", PRE_COPY="RUNNING",
                        PRE_COPY_P2P="PRE_COPY_P2P", STOP_COPY="STOP", RESUMING="STOP",
                        RUNNING_P2P="RUNNING_P2P", ERROR="ERROR"),
    S.ERROR: {s: S.ERROR for s in S},
}

#: The states sharing one saving data session.
SAVING_GROUP = frozenset({S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY})
PRE_COPY_STATES = frozenset({S.PRE_COPY, S.PRE_COPY_P2P})
#: States in which the device operates (may DMA, may change its state).
RUNNING_STATES = frozenset({S.RUNNING, S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P})

FEATURE_NAMES = {"p2p": F.P2P, "pre_copy": F.PRE_COPY, "stop_copy": F.STOP_COPY}


def parse_state(value) -> MigState:
    """A state from its uAPI name (with or without ``VFIO_DEVICE_STATE_``), value or enum."""
    if isinstance(value, MigState):
        return value
    if isinstance(value, int):
        try:
            return MigState(value)
        except ValueError:
            raise DeviceError(f"no migration state {value}", _errno.EINVAL) from None
    name = str(value).strip().upper().replace("-", "_")
    if name.startswith("VFIO_DEVICE_STATE_"):
        name = name[len("VFIO_DEVICE_STATE_"):]
    if name.isdigit():
        return parse_state(int(name))
    try:
        return MigState[name]
    except KeyError:
        raise DeviceError(f"no migration state {value!r}", _errno.EINVAL) from None


def parse_features(value) -> MigFeature:
    """Feature flags from ``"p2p,pre_copy"``, ``"none"``, ``"all"``, an int or a flag.

    STOP_COPY is mandatory and always included.
    """
    if isinstance(value, MigFeature):
        return value | F.STOP_COPY
    if isinstance(value, int):
        return MigFeature(value) | F.STOP_COPY
    flags = F.STOP_COPY
    for part in str(value or "").replace("+", ",").split(","):
        part = part.strip().lower().replace("-", "_")
        if part in ("", "none"):
            continue
        if part == "all":
            flags |= F.P2P | F.PRE_COPY
            continue
        if part == "precopy":
            part = "pre_copy"
        if part not in FEATURE_NAMES:
            raise DeviceError(f"unknown migration feature {part!r} (p2p, pre_copy)",
                              _errno.EINVAL)
        flags |= FEATURE_NAMES[part]
    return flags


def feature_names(features: MigFeature) -> list:
    out = []
    if features & F.P2P:
        out.append("p2p")
    if features & F.PRE_COPY:
        out.append("pre_copy")
    return out


def supported(state: MigState, features: int) -> bool:
    need = STATE_FLAGS[state]
    return (need & features) == need


def next_state(cur, new, features=F.STOP_COPY) -> MigState:
    """``vfio_mig_get_next_state()``: the next arc from ``cur`` towards ``new``.

    Raises :class:`DeviceError` with ``EINVAL`` when the current or requested
    state needs a feature the device lacks (ERROR always does), or when the arc
    is blocked (STOP_COPY -> PRE_COPY / PRE_COPY_P2P).
    """
    cur, new = parse_state(cur), parse_state(new)
    features = int(parse_features(features))
    if not supported(cur, features):
        raise DeviceError(f"current state {cur.name} is not supported by the device",
                          _errno.EINVAL)
    if not supported(new, features):
        raise DeviceError(f"state {new.name} cannot be requested on this device",
                          _errno.EINVAL)
    nxt = NEXT_STEP[cur][new]
    while nxt != S.ERROR and not supported(nxt, features):
        nxt = NEXT_STEP[nxt][new]
    if nxt == S.ERROR:
        raise DeviceError(f"arc {cur.name} -> {new.name} is not permitted", _errno.EINVAL)
    return nxt


def path(cur, new, features=F.STOP_COPY) -> list:
    """The states a device passes through from ``cur`` to ``new`` (``cur`` excluded).

    ``cur == new`` gives ``[]``: drivers loop ``while (state != new)`` and so
    never consult the table.  A refused request raises ``DeviceError(EINVAL)``.
    """
    cur, new = parse_state(cur), parse_state(new)
    out = []
    state = cur
    while state != new:
        state = next_state(state, new, features)
        out.append(state)
        if len(out) > len(MigState):  # pragma: no cover - the table has no cycles
            raise DeviceError("state machine did not converge", _errno.ELOOP)
    return out


def table(features=F.STOP_COPY) -> dict:
    """``{cur: {new: path or None}}`` for all 64 pairs (None = EINVAL)."""
    out = {}
    for cur in MigState:
        row = {}
        for new in MigState:
            try:
                row[new] = path(cur, new, features)
            except DeviceError:
                row[new] = None
        out[cur] = row
    return out
