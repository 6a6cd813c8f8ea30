"""QEMU release profiles: what a given release writes, as data.

A profile is the handful of facts in which releases' streams differ; the
migration pipeline (:mod:`qmigstream.pipeline.migrate`) reads them and does
nothing version-specific of its own.  Each row names the QEMU source it
follows:

* ``vfio_family`` — how VFIO sections frame device data
  (:mod:`qmigstream.vfio.family`, from ``hw/vfio/migration.c``);
* ``json_style`` — the VMDESCRIPTION writer (``migration/qjson.c`` up to 5.2,
  ``qobject/json-writer.c`` from 6.0);
* ``vmdesc_configuration`` — 8.2+ describes the configuration record in the
  trailer (``qemu_savevm_state_header``);
* ``switchover_start`` — 10.0+ sends ``MIG_CMD_SWITCHOVER_START`` after the VM
  stops, for machine types from 10.0 on (``hw_compat_9_2`` turns
  ``send-switchover-start`` off for older ones);
* ``v2_precopy`` — 8.1+ runs a v2 device in PRE_COPY during iterations (8.0
  has no iterate handler);
* ``compress_page`` — the ``compress`` capability exists (removed in 9.1);
* ``multifd_flush`` — the ``MULTIFD_FLUSH`` RAM flag exists (8.1+);
* ``multifd_device_state`` — 10.0+ can send VFIO device state over multifd
  channels (``multifd_device_state_supported``, migration/multifd-device-state.c;
  ``vfio_multifd_transfer_supported`` also needs send-switchover-start, so
  machine types >= 10.0: ``hw_compat_9_2`` turns ``x-migration-multifd-transfer``
  off);
* ``iterate_walks_all`` — each round walks every iterative handler (9.0+,
  ``all_finished`` in ``qemu_savevm_state_iterate``); up to 8.2 a round stops
  at the first handler whose iterate returns 0 ("not done"), which a v1 VFIO
  device (5.2-7.2) does whenever it sent data (v2 in 8.1/8.2 always returns 1);
* ``load_config_after_iter`` — 10.1+ has ``x-migration-load-config-after-iter``
  (FULL carries ``DEV_CONFIG_LOAD_READY``; auto is on for ARM only, so off for
  the x86 machine types here; ``hw_compat_10_0`` turns it off);
* ``vmdesc_array_index`` — the trailer gives ``"index": i`` in the entry of
  each element of an array it cannot describe once with ``array_len`` (arrays
  of structs, say: one entry per element, ``vmsd_desc_field_start`` in
  ``migration/vmstate.c`` up to 10.x).  QEMU 11.1 writes those entries without
  it (its committed captures have no ``"index"`` anywhere); 11.0 has not been
  checked against a real capture, so ``qemu-11.0`` keeps the 10.x form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..vmdesc import JSONWRITER, QJSON


@dataclass(frozen=True)
class Profile:
    """One QEMU release family's stream layout (see the module docstring)."""

    name: str
    release: str                  # the QEMU release modelled
    vfio_family: str              # qmigstream.vfio.family name
    interface: str                # "v1" migration region, "v2" state machine
    json_style: str
    vmdesc_configuration: bool
    switchover_start: bool
    v2_precopy: bool
    compress_page: bool
    multifd_flush: bool
    machine: str                  # default machine type (no --template)
    notes: str = ""
    multifd_device_state: bool = False
    load_config_after_iter: bool = False
    iterate_walks_all: bool = False
    vmdesc_array_index: bool = True

    def machine_version(self, machine: str):
        m = re.search(r"-(\d+)\.(\d+)$", machine)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def sends_switchover_start(self, machine: str) -> bool:
        """``send-switchover-start`` for this machine type (off for <= 9.2 machines)."""
        if not self.switchover_start:
            return False
        v = self.machine_version(machine)
        return v is None or v >= (10, 0)

    def multifd_transfer_possible(self, machine: str) -> bool:
        """VFIO device state over multifd for this machine type (10.0+ machine types)."""
        return self.multifd_device_state and self.sends_switchover_start(machine)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _p(name, release, family, interface, style, vcfg, sws, pre, comp, flush, machine, **kw):
    return Profile(name, release, family, interface, style, vcfg, sws, pre, comp, flush,
                   machine, **kw)


PROFILES = {p.name: p for p in (
    _p("qemu-5.2", "5.2", "5.2", "v1", QJSON, False, False, False, True, False,
       "pc-i440fx-5.2", notes="v1 migration region; config record inside the END section; "
       "QJSON trailer"),
    _p("qemu-6.0", "6.0", "6.0-7.2", "v1", JSONWRITER, False, False, False, True, False,
       "pc-i440fx-6.0", notes="v1; config record as its own FULL section; JSONWriter trailer"),
    _p("qemu-7.2", "7.2", "6.0-7.2", "v1", JSONWRITER, False, False, False, True, False,
       "pc-i440fx-7.2", notes="as 6.0 (the QEMU Debian 12 ships)"),
    _p("qemu-8.0", "8.0", "8.0", "v2", JSONWRITER, False, False, False, True, False,
       "pc-i440fx-8.0", notes="v2 state machine; no pre-copy iterations for VFIO"),
    _p("qemu-8.1", "8.1", "8.1-9.x", "v2", JSONWRITER, False, False, True, True, True,
       "pc-i440fx-8.1", notes="v2 PRE_COPY iterations; switchover-ack DEV_INIT_DATA_SENT; "
       "MULTIFD_FLUSH exists"),
    _p("qemu-8.2", "8.2", "8.1-9.x", "v2", JSONWRITER, True, False, True, True, True,
       "pc-i440fx-8.2", notes="as 8.1; the trailer describes the configuration record"),
    _p("qemu-9.2", "9.2", "8.1-9.x", "v2", JSONWRITER, True, False, True, False, True,
       "pc-i440fx-9.2", notes="as 8.2; COMPRESS_PAGE gone (9.1); every handler "
       "iterates every round (9.0)", iterate_walks_all=True),
    _p("qemu-10.0", "10.0", "8.1-9.x", "v2", JSONWRITER, True, True, True, False, True,
       "pc-i440fx-10.0", notes="SWITCHOVER_START command (machine types >= 10.0); "
       "VFIO on the main channel, or with --multifd-channels device state on the "
       "multifd channels", multifd_device_state=True, iterate_walks_all=True),
    _p("qemu-10.1", "10.1", "8.1-9.x", "v2", JSONWRITER, True, True, True, False, True,
       "pc-i440fx-10.1", notes="as 10.0; x-migration-load-config-after-iter",
       multifd_device_state=True, load_config_after_iter=True, iterate_walks_all=True),
    _p("qemu-11.0", "11.0", "8.1-9.x", "v2", JSONWRITER, True, True, True, False, True,
       "pc-i440fx-11.0", notes="as 10.1", multifd_device_state=True, iterate_walks_all=True,
       load_config_after_iter=True),
    _p("qemu-11.1", "11.1", "8.1-9.x", "v2", JSONWRITER, True, True, True, False, True,
       "pc-i440fx-11.1", notes="as 11.0; no \"index\" in the trailer's per-element "
       "array entries", multifd_device_state=True, iterate_walks_all=True,
       load_config_after_iter=True, vmdesc_array_index=False),
)}

DEFAULT_PROFILE = "qemu-7.2"


def get(name) -> Profile:
    if isinstance(name, Profile):
        return name
    key = name if name.startswith("qemu-") else f"qemu-{name}"
    try:
        return PROFILES[key]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; one of {', '.join(PROFILES)}") from None


def differences(a: Profile, b: Profile) -> dict:
    """The facts in which two profiles differ: {field: (a's, b's)}."""
    skip = {"name", "release", "notes", "machine"}
    return {k: (getattr(a, k), getattr(b, k)) for k in a.__dataclass_fields__
            if k not in skip and getattr(a, k) != getattr(b, k)}
