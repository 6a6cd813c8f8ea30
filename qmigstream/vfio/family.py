"""Release families of the VFIO section layout, as data.

Each family says which markers each section carries and where the config
record goes; the builder (:mod:`qmigstream.vfio.builder`) writes sections from
it, :func:`infer_family` matches a device's sections against it.  Read from
``hw/vfio/migration.c`` (and ``migration-multifd.c`` for 10.x) at the commits
listed in docs/vfio-stream.md.

======== ======== ======================== =========================== ==================
family   protocol PART (pre-copy)          END (stop-and-copy)         FULL (save_state)
======== ======== ======================== =========================== ==================
5.2      v1       DATA n [n bytes] END     CONFIG cfg END, DATA..., END (none)
6.0-7.2  v1       DATA n [n bytes] END     DATA..., END                CONFIG cfg END
8.0      v2       (no iterate handler)     DATA(n>0)..., END           CONFIG cfg END
8.1-9.x  v2       [DATA n>0] END|INIT_SENT DATA(n>0)..., END           CONFIG cfg END
10.x     v2       as 8.1-9.x               END (data over multifd)     END
10.1+    v2       as 8.1-9.x               END (data over multifd)     CONFIG_LOAD_READY
======== ======== ======================== =========================== ==================

v1 PART with nothing pending is ``DATA 0 END``; v1 END may end its data loop
with a ``DATA 0`` chunk.  10.x with multifd transfer off writes exactly what
8.1-9.x writes (and is reported as that family).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wire.vfio import Marker, VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE


@dataclass(frozen=True)
class Family:
    """One release family's VFIO savevm layout: what its sections hold and in which order."""

    name: str
    protocol: str                 # "v1" migration region, "v2" data fd
    has_part: bool                # save_live_iterate exists (PART sections)
    part_always_chunk: bool       # v1: every PART starts with a DATA chunk (size may be 0)
    config_in: str                # "END", "FULL" or "multifd"
    end_zero_chunk: bool          # v1: a DATA 0 chunk may end the END section's loop
    init_data_sent: bool          # DEV_INIT_DATA_SENT may close one PART (switchover-ack)
    end_over_multifd: bool        # END is a lone END_OF_STATE; data goes over multifd
    full_marker: Marker | None    # FULL without config: END_OF_STATE / CONFIG_LOAD_READY
    can_load_ready: bool          # CONFIG_LOAD_READY possible in FULL
    chunk_limit: int | None       # largest chunk one read() can give (v2: 1 MiB)
    releases: str                 # what QEMU releases write this


FAMILIES = {f.name: f for f in (
    Family("5.2", "v1", True, True, "END", True, False, False, None, False, None,
           "QEMU 5.2"),
    Family("6.0-7.2", "v1", True, True, "FULL", True, False, False, None, False, None,
           "QEMU 6.0 to 7.2"),
    Family("8.0", "v2", False, False, "FULL", False, False, False, None, False,
           VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE, "QEMU 8.0"),
    Family("8.1-9.x", "v2", True, False, "FULL", False, True, False, None, False,
           VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE,
           "QEMU 8.1 to 9.2, and 10.x with multifd device-state transfer off"),
    Family("10.x", "v2", True, False, "multifd", False, True, True, Marker.END_OF_STATE,
           False, VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE,
           "QEMU 10.0+ with multifd device-state transfer (10.1+ without "
           "load-config-after-iter)"),
    Family("10.1+", "v2", True, False, "multifd", False, True, True,
           Marker.DEV_CONFIG_LOAD_READY, True, VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE,
           "QEMU 10.1+ with multifd device-state transfer and "
           "x-migration-load-config-after-iter"),
)}

FAMILY_ORDER = ["5.2", "6.0-7.2", "8.0", "8.1-9.x", "10.x", "10.1+"]


def get(name) -> Family:
    if isinstance(name, Family):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown VFIO release family {name!r}; "
                         f"one of {', '.join(FAMILY_ORDER)}") from None


@dataclass
class FamilyMatch:
    """The families a stream's VFIO sections fit, and why."""

    family: str | None            # the best match (None: nothing to go on)
    candidates: list              # every family the layout is consistent with
    reason: str

    def to_json(self):
        return {"family": self.family, "candidates": list(self.candidates),
                "reason": self.reason}


def _kinds(records):
    """Payload records -> list of short tags: SETUP END INIT READY CONFIG DATA DATA0."""
    out = []
    for r in records:
        k = getattr(r, "kind", None)
        if k == "vfio_marker":
            out.append({Marker.DEV_SETUP_STATE: "SETUP", Marker.END_OF_STATE: "END",
                        Marker.DEV_INIT_DATA_SENT: "INIT",
                        Marker.DEV_CONFIG_LOAD_READY: "READY"}.get(r.marker, "?"))
        elif k == "vfio_data":
            out.append("DATA" if r.data_size else "DATA0")
        elif k == "vfio_config":
            out.append("CONFIG")
    return out


def infer_family(sections, hints=None) -> FamilyMatch:
    """Which family a device's sections match.

    ``sections``: ``[(type_name, payload_records), ...]`` in stream order for one
    device (type_name START/PART/END/FULL).  ``hints`` (optional dict):
    ``switchover_start`` (the stream has a SWITCHOVER_START command: 10.0+),
    ``vmdesc_configuration`` (the trailer has a "configuration" key: 8.2+),
    ``multifd_packets`` (device-state packets were found on multifd channels).
    """
    hints = hints or {}
    tags = [(t, _kinds(recs)) for t, recs in sections]
    recs_all = [r for _, recs in sections for r in recs]
    ends = [k for t, k in tags if t == "END"]
    fulls = [k for t, k in tags if t == "FULL"]
    parts = [k for t, k in tags if t == "PART"]
    big = [r.data_size for r in recs_all if getattr(r, "kind", None) == "vfio_data"
           and r.data_size > VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE]
    zero = any("DATA0" in k for _, k in tags)
    if any("CONFIG" in k for k in ends):
        return FamilyMatch("5.2", ["5.2"],
                           "the config record is inside the END section, followed by data "
                           "(5.2's vfio_save_complete_precopy); 6.0+ writes it in FULL")
    if not fulls:
        return FamilyMatch(None, [], "no FULL section and no config record in END: the "
                                     "stream stops before the device's state was complete")
    full = fulls[-1]
    if "READY" in full:
        return FamilyMatch("10.1+", ["10.1+"],
                           "FULL carries DEV_CONFIG_LOAD_READY (10.1+ with "
                           "load-config-after-iter; config travels over multifd)")
    if full == ["END"]:
        why = "FULL is a lone END_OF_STATE and "
        why += ("END is a lone END_OF_STATE" if ends and all(k == ["END"] for k in ends)
                else "END is not a lone END_OF_STATE (unexpected)")
        why += ": data and config travel over multifd (vfio_multifd_emit_dummy_eos, 10.0+)"
        if hints.get("multifd_packets"):
            why += "; device-state packets found on the multifd channels"
        return FamilyMatch("10.x", ["10.x", "10.1+"], why)
    if "CONFIG" not in full:
        return FamilyMatch(None, [], f"FULL section holds {'/'.join(full) or 'nothing'}, "
                                     "which no release writes")
    # Config in FULL: 6.0 .. 9.x, or 10.x with multifd transfer off.
    extra = ""
    if hints.get("switchover_start"):
        extra = "; the stream has SWITCHOVER_START (10.0+ source, multifd transfer off)"
    elif hints.get("vmdesc_configuration"):
        extra = "; the trailer has a configuration entry (8.2+ source)"
    v2 = [k for k in parts if "DATA" not in k and "DATA0" not in k] + \
        [k for k in parts if "INIT" in k]
    if zero or big:
        why = []
        if zero:
            why.append("a zero-length data chunk (v1 writes DATA 0 when nothing is pending)")
        if big:
            why.append(f"a data chunk of {big[0]} bytes, above v2's 1 MiB read buffer")
        if v2:
            why.append("but also a v2-only PART shape (inconsistent)")
        return FamilyMatch("6.0-7.2", ["6.0-7.2"],
                           "config in FULL; " + "; ".join(why) + extra)
    if any("INIT" in k for k in parts):
        return FamilyMatch("8.1-9.x", ["8.1-9.x"],
                           "config in FULL; a PART closed by DEV_INIT_DATA_SENT "
                           "(switchover-ack, 8.1+)" + extra)
    if any(k == ["END"] for k in parts):
        return FamilyMatch("8.1-9.x", ["8.1-9.x"],
                           "config in FULL; a PART with no data chunk (v2 pre-copy writes "
                           "none when read() returns 0; v1 always writes DATA)" + extra)
    if not parts:
        cands = ["8.0", "8.1-9.x", "6.0-7.2"]
        if hints.get("switchover_start") or hints.get("vmdesc_configuration"):
            return FamilyMatch("8.1-9.x", ["8.1-9.x"],
                               "config in FULL, no PART sections (a device without "
                               "PRE_COPY)" + extra)
        return FamilyMatch("8.0", cands,
                           "config in FULL and no PART sections: 8.0 has no iterate handler; "
                           "also what 8.1+ writes for a device without PRE_COPY, and 6.0-7.2 "
                           "when migration completed before any iteration")
    cands = ["8.1-9.x", "6.0-7.2"]
    if extra:
        return FamilyMatch("8.1-9.x", ["8.1-9.x"],
                           "config in FULL; every PART is DATA n>0 then END" + extra)
    return FamilyMatch("8.1-9.x", cands,
                       "config in FULL; every PART is DATA n>0 then END, chunks within 1 MiB: "
                       "8.1-9.x, or 6.0-7.2 (v1) that never ran dry")
