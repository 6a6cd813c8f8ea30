"""Would QEMU load this stream?  ``qmigstream check``.

:func:`check` walks a stream the way QEMU 7.2's loader does
(``qemu_loadvm_state`` in migration/savevm.c and what it calls:
``qemu_loadvm_state_header``, the configuration vmsd and its post_load,
``qemu_loadvm_state_main``, ``qemu_loadvm_section_start_full`` /
``part_end``, ``check_section_footer``, ``loadvm_process_command``;
``ram_load_precopy`` in migration/ram.c; ``vmstate_load_state`` and the
``*_equal``/``int32 le`` infos of vmstate.c/vmstate-types.c, the PCI config
and irq-state infos of hw/pci/pci.c, ``global_state_post_load``; ``block_load``
and ``dirty_bitmap_load``; ``vfio_load_state`` of hw/vfio/migration.c) and
reports every problem with its byte offset and the text QEMU itself prints for
it.  docs/check.md lists each step with its source and the limits.

``profile("qemu-11.1")`` models QEMU 11.1 where it differs on the streams it
writes (SWITCHOVER_START, its capabilities, MULTIFD_FLUSH, no compress or block
migration, mapped-ram, ZERO fill bytes); ``qemu-10.0`` and ``qemu-5.2`` are the
other rows of the same table (:data:`_RELEASES`).  docs/check.md says what differs
and how each point was confirmed against the real release.

QEMU stops at its first error, and so does the verdict: the first *fatal*
problem is where QEMU would give up; *notes* are things QEMU accepts but a
reader should know (a non-zero ZERO fill byte, a damaged trailer), and
*unchecked* items say what could not be verified without knowing the
destination (``reference``).

What the destination has - its machine name, whether it expects a
configuration record and footers, its sections with their versions and
vmstate layouts, its own values of ``equal`` fields, its RAM blocks - is
learnt from a *reference* stream made by the same QEMU with the same machine
arguments (``--reference``, e.g. the committed capture).  Without one, the
stream's own VMDESCRIPTION and MEM_SIZE list stand in for the destination,
and what that cannot show is listed as unchecked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

from . import vmstate
from . import xbzrle as X
from .codec.boundary import SectionIds, scan_for_end
from .codec.ram_records import RamCompressed
from .codec.reader import StreamReader
from .codec.sections.vfio import is_vfio_idstr
from .codec.source import Source, open_source
from .codec.trailer import TAIL_BYTES, locate_trailer
from .errors import BadMagic, CompressedPageError, QmigstreamError, StreamError, Truncated

_U64 = struct.Struct(">Q")

PAGE = 4096
# RAM_SAVE_FLAG_* of QEMU 7.2 (migration/ram.c); 0x200 (MULTIFD_FLUSH) came in 8.1.
F_FULL, F_ZERO, F_MEM, F_PAGE, F_EOS, F_CONT, F_XBZRLE, F_HOOK, F_COMP = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100)
F_FLUSH = 0x200
PAGE_KINDS = F_ZERO | F_PAGE | F_COMP | F_XBZRLE
#: RunState names of 7.2 (qapi/run-state.json), for global_state_post_load.
RUN_STATES_72 = ("debug inmigrate internal-error io-error paused postmigrate prelaunch "
                 "finish-migrate restore-vm running save-vm shutdown suspended watchdog "
                 "guest-panicked colo").split()
# PostcopyState of the destination (migration/postcopy-ram.h)
PS_NONE, PS_ADVISE, PS_DISCARD, PS_LISTENING, PS_RUNNING = range(5)


class Profile:
    """What one QEMU release's loader knows, independent of the machine."""

    def __init__(self, name, machines, iterative, resizeable, commands, vmsd_versions,
                 target_page_bits, capabilities, validated_caps, release="7.2",
                 multifd_flush=False, compress=True, run_states=None, zero_fill_fatal=False,
                 hook_ignored=False, wording=None, mapped_ram_page_size=True,
                 header_words_111=False):
        self.name = name
        self.release = release            # "7.2", "11.1", ...: what messages say
        self.multifd_flush = multifd_flush    # RAM_SAVE_FLAG_MULTIFD_FLUSH (0x200) known
        self.compress = compress          # COMPRESS_PAGE records can be loaded at all
        self.run_states = run_states or RUN_STATES_72
        self.zero_fill_fatal = zero_fill_fatal  # a ZERO record's fill byte must be 0
        self.hook_ignored = hook_ignored        # RAM_SAVE_FLAG_HOOK accepted outside RDMA
        self.wording = wording or ()            # (7.2's words, this release's) pairs
        self.mapped_ram_page_size = mapped_ram_page_size  # mapped-ram page_size checked
        self.header_words_111 = header_words_111  # file-header errors name the version read
        self.machines = machines          # alias -> full machine name
        self.iterative = iterative        # idstr -> version_id (ram, block, ...)
        self.resizeable = resizeable      # RAM block -> max_length
        self.commands = commands          # cmd -> (name, fixed length or None)
        self.vmsd_versions = vmsd_versions
        self.target_page_bits = target_page_bits
        self.capabilities = capabilities  # MigrationCapability names
        self.validated_caps = validated_caps

    def reword(self, message: str) -> str:
        """A message in this release's words (the checker writes 7.2's)."""
        for old, new in self.wording:
            message = message.replace(old, new)
        return message

    def field_versions(self, vmsd_name, version):
        """{field: version_id} of the vmsd's top-level fields declared with a version
        (None when the table has no single row for it)."""
        rows = [r for r in self.vmsd_versions.get(vmsd_name, ())
                if r["version_id"] == version]
        return rows[0].get("field_versions", {}) if len(rows) == 1 else None

    def minimum_version(self, vmsd_name, version):
        """``minimum_version_id`` of the vmsd ``vmsd_name`` whose version is ``version``."""
        rows = [r for r in self.vmsd_versions.get(vmsd_name, ())
                if r["version_id"] == version]
        mins = {r["minimum_version_id"] for r in rows}
        return mins.pop() if len(mins) == 1 else None


def _load_vmsd_versions(ver):
    path = os.path.join(os.path.dirname(__file__), "data", f"qemu-{ver}-vmsd-versions.json")
    with open(path) as f:
        return json.load(f)


#: MigrationCapability names of 7.2 (qapi/migration.json), for configuration/capabilities.
_CAPS_72 = ("xbzrle rdma-pin-all auto-converge zero-blocks compress events postcopy-ram "
            "x-colo release-ram block return-path pause-before-switchover multifd "
            "dirty-bitmaps postcopy-blocktime late-block-activate x-ignore-shared "
            "validate-uuid background-snapshot zero-copy-send postcopy-preempt").split()


#: MigrationCapability names of 11.1, as its ``query-migrate-capabilities`` lists them
#: (block and compress went in 9.1, zero-blocks after 10.0; switchover-ack and
#: dirty-limit came in 8.1, mapped-ram in 9.0).
_CAPS_111 = ("xbzrle rdma-pin-all auto-converge events postcopy-ram x-colo release-ram "
             "return-path pause-before-switchover multifd dirty-bitmaps postcopy-blocktime "
             "late-block-activate x-ignore-shared validate-uuid background-snapshot "
             "zero-copy-send postcopy-preempt switchover-ack dirty-limit mapped-ram").split()

#: MigrationCapability names of 10.0 (``query-migrate-capabilities`` of 10.0.13): 11.1's
#: list with zero-blocks still in it.
_CAPS_100 = ("xbzrle rdma-pin-all auto-converge zero-blocks events postcopy-ram x-colo "
             "release-ram return-path pause-before-switchover multifd dirty-bitmaps "
             "postcopy-blocktime late-block-activate x-ignore-shared validate-uuid "
             "background-snapshot zero-copy-send postcopy-preempt switchover-ack dirty-limit "
             "mapped-ram").split()

#: MigrationCapability names of 5.2 (``query-migrate-capabilities`` of 5.2.0): 7.2's
#: list without background-snapshot (6.0), zero-copy-send (7.1), postcopy-preempt (7.2).
_CAPS_52 = ("xbzrle rdma-pin-all auto-converge zero-blocks compress events postcopy-ram "
            "x-colo release-ram block return-path pause-before-switchover multifd "
            "dirty-bitmaps postcopy-blocktime late-block-activate x-ignore-shared "
            "validate-uuid").split()

#: 11.1's words for the errors the checker writes in 7.2's (seen in its output)
_WORDING_111 = (("SaveVM v2 format is obsolete and don't work anymore",
                 "SaveVM v2 format is obsolete and no longer supported"),
                ("Unknown savevm section or instance", "Unknown section or instance"),
                ("Unknown savevm section type", "Unknown section type"),
                ("savevm: unsupported version", "unsupported version"),
                ("minimum version_id  ", "minimum version_id "))

#: The releases other than 7.2, one row each: what their loader does differently from 7.2 on
#: the streams they write.  The facts come from the Debian binary of each release
#: (``query-migrate-capabilities``, ``query-machines``, ``-dump-vmstate``) and from
#: loading mutated captures of it into it (``tools/differential --release R``).
#: ``vmsd``: qmigstream/data/qemu-R-vmsd-versions.json; block migration (the "block"
#: section) was removed in 9.1, compress in 9.1; MIG_CMD_SWITCHOVER_START (10.0) has a
#: row of length 0; MULTIFD_FLUSH (0x200) came in 8.1.  ``mapped_ram_page_size``: the
#: mapped-ram header's page size is compared with the target page size (11.1 refuses
#: 8192, 10.0 loads it).  ``wording``: 10.0 prints 7.2's words for the errors 11.1
#: rewords ("SaveVM v2 format is obsolete and don't work anymore", "Unknown savevm
#: section type", a bare "Unsupported migration stream version": ``header_words_111``
#: False), as seen in its output.
_RELEASES = {
    "5.2": dict(capabilities=_CAPS_52, switchover_start=False, block=True,
                multifd_flush=False, compress=True, zero_fill_fatal=False, hook_ignored=False,
                wording=(), mapped_ram_page_size=True, header_words_111=False),
    "10.0": dict(capabilities=_CAPS_100, switchover_start=True, block=False,
                 multifd_flush=True, compress=False, zero_fill_fatal=True, hook_ignored=True,
                 wording=(), mapped_ram_page_size=False, header_words_111=False),
    "11.1": dict(capabilities=_CAPS_111, switchover_start=True, block=False,
                 multifd_flush=True, compress=False, zero_fill_fatal=True, hook_ignored=True,
                 wording=_WORDING_111, mapped_ram_page_size=True, header_words_111=True),
}

#: the check profiles, oldest first
PROFILES = ("qemu-5.2", "qemu-7.2", "qemu-10.0", "qemu-11.1")


def profile(name="qemu-7.2") -> Profile:
    rel = name[len("qemu-"):] if name.startswith("qemu-") else None
    if rel in _RELEASES:
        return _profile_release(rel)
    if name != "qemu-7.2":
        raise QmigstreamError(f"unknown profile {name!r} (known: {', '.join(PROFILES)})")
    return Profile(
        "qemu-7.2",
        machines={"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"},
        # register_savevm_live() calls: ram.c "ram" 4, block.c "block" 1,
        # block-dirty-bitmap.c "dirty-bitmap" 1; hw/vfio/migration.c "vfio" 1.
        iterative={"ram": 4, "block": 1, "dirty-bitmap": 1, "vfio": 1},
        # acpi_add_rom_blob() (hw/acpi/utils.c): resizeable ROM blocks and their max_length.
        resizeable={"/rom@etc/acpi/tables": 0x200000, "/rom@etc/table-loader": 0x10000,
                    "/rom@etc/acpi/rsdp": 0x1000},
        # mig_cmd_args[] (savevm.c); ENABLE_COLO has no row, so its length must be 0.
        commands={1: ("OPEN_RETURN_PATH", 0), 2: ("PING", 4), 3: ("POSTCOPY_ADVISE", None),
                  4: ("POSTCOPY_LISTEN", 0), 5: ("POSTCOPY_RUN", 0),
                  6: ("POSTCOPY_RAM_DISCARD", None), 7: ("PACKAGED", 4),
                  8: ("ENABLE_COLO", 0), 9: ("POSTCOPY_RESUME", 0),
                  10: ("RECV_BITMAP", None)},
        vmsd_versions=_load_vmsd_versions("7.2"),
        target_page_bits=12,
        capabilities=_CAPS_72,
        validated_caps=("x-ignore-shared",),
    )


def _vmsd_versions_of(release, v72):
    """The release's table (from ``-dump-vmstate``), and for the vmsds the dump does not
    list (those registered with vmstate_register() rather than as a device's vmsd:
    "cpu", "timer", "ram"...) 7.2's rows.  A 7.2 row is used only where the stream's
    version is that row's version (Profile.minimum_version), so a vmsd whose version
    changed since 7.2 gets no minimum rather than a wrong one."""
    t = dict(_load_vmsd_versions(release))
    for name, rows in v72.items():
        if name not in t:
            t[name] = [dict(r, file=r["file"] + f" (7.2; not in the {release} dump)")
                       for r in rows]
    return t


def _profile_release(release) -> Profile:
    """The profile of a release of :data:`_RELEASES`: 7.2's, changed by its row."""
    row = _RELEASES[release]
    p = profile("qemu-7.2")
    iterative = dict(p.iterative)
    if not row["block"]:
        iterative.pop("block")
    commands = dict(p.commands)
    if row["switchover_start"]:
        commands[11] = ("SWITCHOVER_START", 0)
    return Profile(
        f"qemu-{release}",
        machines={"pc": f"pc-i440fx-{release}", "q35": f"pc-q35-{release}"},
        iterative=iterative,
        resizeable=p.resizeable,
        commands=commands,
        vmsd_versions=_vmsd_versions_of(release, p.vmsd_versions),
        target_page_bits=12,
        capabilities=row["capabilities"],
        validated_caps=("x-ignore-shared",),
        release=release,
        multifd_flush=row["multifd_flush"],
        compress=row["compress"],
        zero_fill_fatal=row["zero_fill_fatal"],
        hook_ignored=row["hook_ignored"],
        wording=row["wording"],
        mapped_ram_page_size=row["mapped_ram_page_size"],
        header_words_111=row["header_words_111"],
    )


# -- results -----------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    """One finding.  ``level``: ``fatal`` (QEMU gives up here), ``note``, ``unchecked``."""
    offset: int | None
    kind: str
    message: str
    level: str = "fatal"
    section: str | None = None

    def line(self) -> str:
        where = f"at offset {self.offset} (0x{self.offset:x})" if self.offset is not None \
            else "stream"
        sec = f" [{self.section}]" if self.section else ""
        return f"{where}{sec}: {self.level}: {self.message}"

    def to_json(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    problems: list
    profile: str
    reference: str | None = None

    @property
    def fatal(self):
        return next((p for p in self.problems if p.level == "fatal"), None)

    @property
    def loads(self) -> bool:
        return self.fatal is None

    def to_json(self):
        f = self.fatal
        return {"loads": self.loads, "profile": self.profile, "reference": self.reference,
                "first_error": f.to_json() if f else None,
                "problems": [p.to_json() for p in self.problems]}


class _Stop(Exception):
    """QEMU's loader gives up here (the Problem is already recorded)."""


# -- what the destination has ------------------------------------------------------

class Destination:
    """The destination QEMU's view, learnt from a reference stream or assumed."""

    def __init__(self):
        self.machine = None             # full machine name or None (unknown)
        self.config_expected = None     # send-configuration on the destination
        self.footers = None             # send-section-footer on the destination
        self.sections = None            # (idstr, instance) -> version_id, or None
        self.entries = {}               # (idstr, instance) -> description entry
        self.states = {}                # (idstr, instance) -> decoded Vmsd (own values)
        self.blocks = None              # RAM block name -> used_length, or None
        self.lengths = {}               # (idstr, instance) -> payload length seen
        self.uuid = None                # the destination's -uuid, when the reference says
        self.block_devices = None       # block-migration device names, when known
        self.bitmap_nodes = None        # dirty-bitmap node names, when known
        self.block_addrs = {}           # RAM block -> guest address (x-ignore-shared)
        self.ignored_blocks = None      # blocks x-ignore-shared leaves out, when known
        self.source = "assumed"


def destination_from_reference(path, prof: Profile) -> Destination:
    """Read a stream that QEMU made with the destination's machine arguments."""
    d = Destination()
    d.source = str(path)
    d.config_expected = False
    d.sections = {}
    rd = StreamReader(path)
    cur = None
    mem_size = None
    mem_size_done = False
    paged = set()
    for rec in rd.records():
        k = rec.kind
        if k.startswith("ram_") and k != "ram_block_entry" and mem_size is not None:
            mem_size_done = True
        if k == "configuration":
            d.config_expected = True
            d.machine = _c_str(rec.machine)
            u = rec.subsection("configuration/uuid")
            if u is not None:
                d.uuid = bytes(u.value["uuid"])
        elif k == "section" and rec.full:
            cur = (rec.idstr, rec.instance_id)
            d.sections[cur] = rec.version_id
        elif k == "device_state" and cur is not None:
            d.states[cur] = rec.tree
            d.entries[cur] = rec.entry
            d.lengths[cur] = len(rec.data)
        elif k == "payload" and cur is not None and rec.depth == 0:
            d.lengths.setdefault(cur, len(rec.data))
        elif k == "ram_mem_size" and mem_size is None:
            mem_size = list(rec.blocks)
        elif k == "ram_block_entry" and mem_size is not None and not mem_size_done:
            mem_size.append(rec.info)      # mapped-ram: one entry at a time
        elif k in ("ram_zero", "ram_zero_run", "ram_page", "ram_xbzrle", "ram_compressed"):
            paged.add(rec.block)
        elif k == "footer":
            d.footers = True
        elif k == "dirty_bitmap" and rec.node is not None:
            d.bitmap_nodes = (d.bitmap_nodes or set()) | {rec.node}
        elif k == "block" and rec.device is not None:
            d.block_devices = (d.block_devices or set()) | {rec.device}
    if mem_size is not None:
        d.blocks = {b.name: b.used_length for b in mem_size}
        d.block_addrs = {b.name: b.mr_addr for b in mem_size if b.mr_addr is not None}
    if d.footers is None:
        d.footers = False
    if "x-ignore-shared" in rd.capabilities and d.blocks is not None:
        # every block the source migrates has each of its pages sent once (a ZERO record
        # at least): the blocks of the list with no page at all are the ignored ones
        d.ignored_blocks = set(d.blocks) - paged
    devs = rd._desc_devices or []
    for e in devs:
        key = _entry_key(e)
        if key is not None:
            d.entries.setdefault(key, e)
    return d


def _entry_key(e):
    """(name, instance_id) of a devices[] entry, None if the JSON has other types there."""
    if isinstance(e, dict) and type(e.get("name")) is str and \
            type(e.get("instance_id")) is int:
        return e["name"], e["instance_id"]
    return None


def _usable_layout(e) -> bool:
    """Is a devices[] entry shaped like one QEMU writes (names strings, numbers ints)?"""
    if not isinstance(e, dict):
        return False
    v = e.get("version")
    if "vmsd_name" in e:
        return type(e["vmsd_name"]) is str and type(v) is int and \
            isinstance(e.get("fields", []), list)
    return type(e.get("size")) is int


# -- the check ---------------------------------------------------------------------

class Checker:
    def __init__(self, source, prof: Profile, dest: Destination, expect_machine=None,
                 capabilities=None):
        self.src = source if isinstance(source, Source) else open_source(source)
        self.prof = prof
        self.dest = dest
        self.problems = []
        self.expect_machine = prof.machines.get(expect_machine, expect_machine)
        self.caps = None if capabilities is None else set(capabilities)
        self.auto_caps = set()             # capabilities assumed on (auto mode)
        self.stream_caps = set()
        # loader state
        self.se_by_id = {}                 # load_section_id -> (idstr, instance, version)
        self.last_block = None
        self.blocks = None                 # destination RAM blocks (name -> used_length)
        self.postcopy_advised = False
        self.ps = PS_NONE                  # PostcopyState (migration/postcopy-ram.h)
        self.own_entries = None            # the stream's own description devices
        self._own_cursor = {}
        self.ids = SectionIds()

    # -- reporting -------------------------------------------------------------
    def fatal(self, offset, kind, message, section=None):
        message = self.prof.reword(message)
        self.problems.append(Problem(offset, kind, message, "fatal", section))
        raise _Stop()

    def note(self, offset, kind, message, section=None, level="note"):
        self.problems.append(Problem(offset, kind, message, level, section))

    def cap(self, name, offset=None, why=None) -> bool:
        """Is capability ``name`` on at the destination?"""
        if self.caps is not None:
            return name in self.caps
        if why is not None and name not in self.auto_caps:
            self.auto_caps.add(name)
            self.note(offset, "assumed-capability",
                      f"assuming the destination has the {name} capability on ({why}); "
                      f"give --capability to check against a given destination",
                      level="unchecked")
        return name in self.auto_caps

    # -- reading with QEMU's truncation semantics ----------------------------------
    def read(self, n, what, section=None, qemu=None):
        off = self.src.offset
        try:
            return self.src.read(n, what)
        except Truncated as e:
            if qemu is None:
                qemu = self.load_error() if self._in_ram else \
                    "load of migration failed: Input/output error"
            self.fatal(off, "truncated",
                       f"{qemu} (the stream ends inside {what}: {e.available or 0} of {n} "
                       f"bytes)", section)

    _in_ram = False
    _sec = None

    def be(self, n, what, section=None):
        return int.from_bytes(self.read(n, what, section), "big")

    # -- top level ---------------------------------------------------------------
    def run(self):
        try:
            self._header()
            self._own_description()
            self._main(0, None)
            self._after_eof()
        except _Stop:
            pass
        return self.problems

    def _header(self):
        src = self.src
        raw = src.peek(8)
        if len(raw) < 4 or raw[:4] != b"QEVM":
            raise BadMagic("not a QEMU migration stream (QEMU: Not a migration stream)", 0,
                           expected=b"QEVM", found=raw[:4])
        if len(raw) < 8:
            if not self.prof.header_words_111:
                self.fatal(4, "truncated", "stream ends inside the file header; QEMU: "
                           "Unsupported migration stream version")
            got = int.from_bytes(raw[4:8].ljust(4, b"\0"), "big")   # zeros past the end
            self.fatal(4, "truncated", f"stream ends inside the file header; QEMU: "
                       f"Unsupported migration stream version, file version {got} != 3")
        src.read(8)
        v = struct.unpack(">I", raw[4:8])[0]
        if v == 2:
            self.fatal(4, "version", "SaveVM v2 format is obsolete and don't work anymore")
        if v != 3:
            self.fatal(4, "version", f"Unsupported migration stream version (found {v})"
                       if not self.prof.header_words_111 else
                       f"Unsupported migration stream version, file version {v} != 3")
        has_config = src.peek(1) == b"\x07"
        expected = self.dest.config_expected
        if expected is None:
            expected = has_config
            self.note(None, "assumed-configuration",
                      "the destination is assumed to expect a configuration record iff the "
                      "stream has one (no --reference)", level="unchecked")
        if expected:
            b = src.peek(1)
            if not b:
                self.fatal(8, "truncated", "stream ends before the configuration record; "
                           "QEMU: Configuration section missing")
            if b != b"\x07":
                self.fatal(8, "configuration", "Configuration section missing")
            src.read(1)
            self._configuration()

    def _configuration(self):
        src = self.src
        noff = src.offset
        n = int.from_bytes(self.read(4, "machine name length", "configuration",
                                     qemu="Failed to load configuration:len"), "big")
        name = self.read(n, "machine name", "configuration",
                         qemu="Failed to load configuration:name")
        page_bits = None
        uuid_check = None
        caps = []
        # vmstate_subsection_load() of the configuration vmsd
        known = ("configuration/target-page-bits", "configuration/capabilities",
                 "configuration/uuid")
        while src.peek(1) == b"\x05":
            soff = src.offset
            head = src.peek(2)
            ln = head[1] if len(head) > 1 else 0
            if ln < len("configuration") + 1:
                break
            sname = src.peek(2 + ln)[2:]
            if len(sname) != ln:
                break
            sname = _c_str(sname)   # QEMU compares C strings
            if not sname.startswith("configuration"):
                break
            if sname not in known:
                self.fatal(soff, "configuration",
                           f"unknown configuration subsection {sname!r}: QEMU's "
                           f"vmstate_subsection_load returns -ENOENT (load of migration "
                           f"failed: No such file or directory)", "configuration")
            src.read(2 + ln)
            voff = src.offset
            ver = self.be(4, "subsection version", "configuration")
            if ver > 1:
                self.fatal(voff, "version", f"{sname}: incoming version_id {ver} is too new "
                           f"for local version_id 1", "configuration")
            if ver < 1:
                self.fatal(voff, "version", f"{sname}: incoming version_id {ver} is too old "
                           f"for local minimum version_id  1", "configuration")
            if sname.endswith("target-page-bits"):
                page_bits = (src.offset, self.be(4, "target page bits", "configuration"))
            elif sname.endswith("capabilities"):
                count = self.be(4, "capability count", "configuration")
                left = src.remaining_known()
                if left is not None and count > left:
                    self.fatal(src.offset, "truncated", f"{count} capabilities announced, "
                               f"the stream ends first", "configuration")
                for _ in range(count):
                    coff = src.offset
                    cl = self.be(1, "capability name length", "configuration")
                    cn = _c_str(self.read(cl, "capability name", "configuration"))
                    if cn not in self.prof.capabilities:
                        self.fatal(coff, "configuration", f"Received unknown capability {cn}",
                                   "configuration")
                    caps.append(cn)
            else:
                uoff = src.offset
                got = self.read(16, "uuid", "configuration")
                uuid_check = (uoff, got)
        # vmstate_uuid_post_load() runs when its subsection has been read
        if uuid_check is not None:
            uoff, got = uuid_check
            want = self.dest.uuid
            if want is None:
                self.note(uoff, "uuid", "configuration/uuid: the destination's -uuid is not "
                          "known (a reference made with -uuid and validate-uuid says it)",
                          "configuration", level="unchecked")
            elif got != want:
                self.fatal(uoff, "configuration", f"UUID received is {_uuid(got)} and local "
                           f"is {_uuid(want)}", "configuration")
        # configuration_post_load()
        local = self.expect_machine or self.dest.machine
        sent = name.decode("latin-1")
        if local is None:
            a = name[:n]
            if not any(_strncmp(a, m.encode(), n) == 0
                       for m in _machine_names(self.prof.release)):
                self.fatal(noff, "machine", f"Machine type received is '{_c_str(a)}' and "
                           f"local is the destination's: no x86 machine type of QEMU "
                           f"{self.prof.release} starts so (configuration_post_load "
                           f"compares the {n} bytes sent), whatever the destination runs",
                           "configuration")
            self.note(noff, "machine", f"machine type {sent!r} not compared (give "
                      "--expect-machine or --reference)", "configuration", level="unchecked")
        else:
            a = name[:n]
            b = local.encode("latin-1")
            if _strncmp(a, b, n) != 0:
                self.fatal(noff, "machine", f"Machine type received is '{_c_str(a)}' and "
                           f"local is '{local}'", "configuration")
            if sent != local:
                self.note(noff, "machine", f"machine name {sent!r} is not {local!r}, but "
                          f"QEMU compares only the {n} bytes sent (strncmp) and accepts it",
                          "configuration")
        if page_bits is not None and page_bits[1] != self.prof.target_page_bits:
            self.fatal(page_bits[0], "configuration", f"Received TARGET_PAGE_BITS is "
                       f"{page_bits[1]} but local is {self.prof.target_page_bits}",
                       "configuration")
        self.stream_caps = set(caps)
        for c in self.prof.validated_caps:
            src_on = c in caps
            dst_on = self.cap(c) if self.caps is not None else src_on
            if self.caps is None and src_on:
                self.auto_caps.add(c)
            if src_on != dst_on:
                self.fatal(noff - 1, "configuration",
                           f"Capability {c} is {'on' if dst_on else 'off'}, but received "
                           f"capability is {'on' if src_on else 'off'}", "configuration")

    def _own_description(self):
        """The stream's own VMDESCRIPTION, read ahead (it stands in for the destination)."""
        src = self.src
        if not (src.seekable and src.size is not None):
            src.spool()
        end = src.size
        start = max(src.offset, end - TAIL_BYTES)
        tail = src.read_at(start, end - start) or b""
        found = locate_trailer(tail, start)
        devs = None
        if found:
            devs = found[2].get("devices")
        self.own_entries = {}
        for e in devs if isinstance(devs, list) else ():
            key = _entry_key(e)
            if key is not None:
                self.own_entries.setdefault(key, []).append(e)
        d = self.dest
        if d.sections is None and found:
            # an old-style section (no vmsd: slirp, ...) is described by name and size
            # only; it exists on the destination, its version is not known
            d.sections = {k: v[0].get("version") if isinstance(v[0].get("version"), int)
                          else None for k, v in self.own_entries.items()}
            self.note(None, "assumed-sections", "the destination's sections and versions are "
                      "taken from the stream's own VMDESCRIPTION (no --reference)",
                      level="unchecked")
        elif d.sections is None:
            self.note(None, "assumed-sections", "no --reference and no VMDESCRIPTION: "
                      "section names, instances and versions are not checked",
                      level="unchecked")

    def _own_entry(self, key):
        lst = (self.own_entries or {}).get(key) or []
        i = self._own_cursor.get(key, 0)
        if i < len(lst):
            self._own_cursor[key] = i + 1
            return lst[i]
        return None

    def footers_on(self):
        if self.dest.footers is None:
            # assumed: the stream's own footers (decided at the first section end)
            return self._stream_footers
        return self.dest.footers

    _stream_footers = None

    # -- the main loop -------------------------------------------------------------
    def _main(self, depth, end):
        src = self.src
        while True:
            if end is not None and src.offset >= end:
                return
            off = src.offset
            b = src.peek(1)
            if not b:
                self.fatal(off, "truncated", "stream ends before QEMU_VM_EOF; QEMU: load of "
                           "migration failed: Input/output error")
            t = b[0]
            src.read(1)
            if t == 0:
                self.eof_offset = off
                return
            if t in (1, 4):
                self._start_full(off, t)
            elif t in (2, 3):
                self._part_end(off, t)
            elif t == 8:
                self._command(off, depth)
            else:
                self.fatal(off, "section-type", f"Unknown savevm section type {t}")

    def _start_full(self, off, t):
        sid = self.be(4, "section id")
        ln = self.be(1, "section idstr length")
        if ln == 0:
            # qemu_get_counted_string answers 0 for an empty string: a failure
            self.fatal(off + 5, "unknown-section", f"Unable to read ID string for section "
                       f"{sid}")
        idstr = _c_str(self.read(ln, "section idstr",
                                 qemu=f"Unable to read ID string for section {sid}"))
        inst = self.be(4, "instance id")
        voff = self.src.offset
        ver = self.be(4, "version id")
        name = f"{idstr}({inst})" if inst else idstr
        known = self._known_version(idstr, inst)
        if known is False:
            self.fatal(off + 5, "unknown-section",
                       f"Unknown savevm section or instance '{idstr}' {inst}. Make sure that "
                       f"your current VM setup matches your saved VM setup, including any "
                       f"hotplugged devices", name)
        if isinstance(known, int) and ver > known:
            self.fatal(voff, "version", f"savevm: unsupported version {ver} for '{idstr}' "
                       f"v{known}", name)
        self.se_by_id[sid] = (idstr, inst, ver)
        self.ids.saw(t, sid, idstr, inst)
        self._payload(off, t, sid, idstr, inst, ver, name, known)

    def _known_version(self, idstr, inst):
        """The destination's version_id of (idstr, inst); False: it has no such section;
        None: not known."""
        secs = self.dest.sections
        base = "vfio" if is_vfio_idstr(idstr) else idstr
        if secs is not None and (idstr, inst) in secs:
            return secs[(idstr, inst)]
        if base in self.prof.iterative and inst == 0:
            if base == "vfio" and self.dest.source != "assumed":
                return False        # the reference machine has no such VFIO device
            return self.prof.iterative[base]
        if secs is None:
            return None
        return False

    def _part_end(self, off, t):
        sid = self.be(4, "section id")
        se = self.se_by_id.get(sid)
        if se is None:
            self.fatal(off + 1, "unknown-section", f"Unknown savevm section {sid}")
        idstr, inst, ver = se
        self.ids.saw(t, sid)
        name = f"{idstr}({inst})" if inst else idstr
        self._payload(off, t, sid, idstr, inst, ver, name, None)

    def load_error(self):
        """QEMU's line when a section's load function fails (savevm.c)."""
        t, sid, idstr, inst = self._sec
        if t in (1, 4):
            return f"error while loading state for instance 0x{inst:x} of device '{idstr}'"
        return f"error while loading state section id {sid}({idstr})"

    def _payload(self, off, t, sid, idstr, inst, ver, name, known):
        self._sec = (t, sid, idstr, inst)
        voff = off + 10 + len(idstr) if t in (1, 4) else off
        if idstr == "ram":
            if ver != 4:
                self.fatal(voff, "version", f"error while loading state for instance "
                           f"0x{inst:x} of device 'ram' (ram_load takes only version 4, "
                           f"not {ver})", name)
            self._ram(name)
        elif idstr == "block":
            self._block_section(name)
        elif is_vfio_idstr(idstr):
            self._vfio_section(idstr, name)
        elif idstr == "dirty-bitmap":
            self._dirty_bitmap_section(ver, name)
        else:
            self._device(voff, t, sid, idstr, inst, ver, name)
        self._footer(sid, idstr, name)

    def _footer(self, sid, idstr, name):
        src = self.src
        foff = src.offset
        if self.dest.footers is None and self._stream_footers is None:
            self._stream_footers = src.peek(1) == b"\x7e"
        if not self.footers_on():
            return
        b = src.peek(1)
        if not b:
            self.fatal(foff, "truncated", "stream ends before the section footer; QEMU: "
                       "check_section_footer: Read section footer failed: -5", name)
        if b != b"\x7e":
            self.fatal(foff, "footer", f"Missing section footer for {idstr}", name)
        src.read(1)
        fid = self.be(4, "section footer id", name)
        if fid != sid:
            self.fatal(foff + 1, "footer", f"Mismatched section id in footer for {idstr} - "
                       f"read 0x{fid:x} expected 0x{sid:x}", name)

    # -- device sections (vmstate) ---------------------------------------------------
    def _device(self, off, t, sid, idstr, inst, ver, name):
        src = self.src
        key = (idstr, inst)
        ref_entry = self.dest.entries.get(key)
        own = self._own_entry(key) if t == 4 else None
        layout = ref_entry or own
        if layout is not None and not _usable_layout(layout):
            self.note(src.offset, "description", "the description of this section is "
                      "malformed: its layout is not used", name, level="unchecked")
            layout = None
        if t != 4 and layout is None:
            self.note(src.offset, "unchecked-payload", "iterative section of a handler "
                      "check does not model: payload not verified", name, level="unchecked")
        vmsd_name = layout.get("vmsd_name") if isinstance(layout, dict) else None
        if vmsd_name:
            mn = self.prof.minimum_version(vmsd_name, layout.get("version"))
            if mn is not None and ver < mn:
                self.fatal(off, "version", f"{vmsd_name}: incoming version_id {ver} is too "
                           f"old for local minimum version_id  {mn}", name)
            if mn is None and isinstance(layout.get("version"), int) and \
                    ver < layout["version"]:
                self.note(off, "version", f"version {ver} is below the destination's "
                          f"{layout['version']} and its minimum is not known", name,
                          level="unchecked")
            elif isinstance(layout.get("version"), int) and ver < layout["version"]:
                fv = self.prof.field_versions(vmsd_name, layout["version"])
                skipped = {k for k, v in (fv or {}).items() if v > ver}
                if fv is None:
                    self.note(off, "version", f"version {ver} < {layout['version']}: the "
                              f"fields QEMU skips are not known", name, level="unchecked")
                elif skipped:
                    layout = dict(layout)
                    layout["fields"] = [f for f in layout.get("fields", ())
                                        if not (isinstance(f, dict) and
                                                isinstance(f.get("name"), str) and
                                                f["name"] in skipped)]
                    self.note(off, "version", f"version {ver} < {layout['version']}: QEMU "
                              f"does not read {', '.join(sorted(skipped))} (added later)",
                              name)
        if layout is None and t == 4 and key in self.dest.lengths:
            n = self.dest.lengths[key]
            self.read(n, f"the state of {idstr}", name)
            self.note(src.offset - n, "unchecked-payload", f"no vmstate layout: {n} bytes "
                      f"read, the length of this section in the reference", name,
                      level="unchecked")
            return
        if layout is None or t != 4:
            self._bounded_by_scan(sid, name)
            return
        try:
            size = vmstate.payload_size(layout)
        except StreamError as e:
            self.note(src.offset, "description", f"layout not usable: {e.one_line()}", name,
                      level="unchecked")
            self._bounded_by_scan(sid, name)
            return
        poff = src.offset
        have = src.remaining_known()
        if have is not None and have < size:
            self._truncated_device(layout, poff, have, size, name, idstr)
        data = self.read(size, f"the {vmsd_name or 'old-style'} state of {idstr}", name)
        if vmsd_name:
            data = self._subsection_versions(layout, data, poff, name)
        try:
            tree = vmstate.decode(layout, data, poff)
        except Truncated as e:
            self.fatal(e.offset, "truncated", e.message, name)
        except StreamError as e:
            self.fatal(e.offset, "vmstate", f"the bytes do not follow the destination's "
                       f"vmstate layout ({e.message}); QEMU: error while loading state for "
                       f"instance 0x{inst:x} of device '{idstr}'", name)
        if not vmsd_name:
            self.note(poff, "old-style", "old-style (load_state) section: only its size is "
                      "checked", name, level="unchecked")
            return
        self._equal_fields(tree, key, name, inst, idstr)
        for node in _vmsds(tree):
            hook = _POST_LOADS.get(node.vmsd_name)
            if hook is not None:
                hook(self, node, name, inst, idstr)

    def _ahci(self, ahci, name, inst, idstr):
        """ahci_state_post_load (hw/ide/ahci.c), port by port, what needs no guest
        memory: a DMA or FIS engine marked running while it is off; an NCQ slot
        whose ``used`` and ``halt`` differ, or that is halted with a command that is
        not NCQ or a slot that is not its tag; a ``busy_slot`` that is neither -1
        nor a slot.  It returns -1: QEMU fails with EPERM."""
        qemu = (f"QEMU: error while loading state for instance 0x{inst:x} of device "
                f"'{idstr}', load of migration failed: Operation not permitted")

        def value(node, field):
            f = node.field(field)
            return (f.value, f.offset) if f is not None and type(f.value) in (int, bool) \
                else (None, None)
        def elements(node, field):       # one entry per element, or one for them all
            return [v for f in node.fields if f.name == field for v in f.elements
                    if hasattr(v, "field")]
        ports = elements(ahci, "dev")
        for i, port in enumerate(ports):
            cmd, coff = value(port, "port_regs.cmd")
            if cmd is not None:
                if not cmd & _AHCI_CMD_START and cmd & _AHCI_CMD_LIST_ON:
                    self.fatal(coff, "post-load", f"AHCI: DMA engine should be off, but status "
                               f"bit indicates it is still running. (port {i}: cmd "
                               f"0x{cmd:x}); {qemu}", name)
                if not cmd & _AHCI_CMD_FIS_RX and cmd & _AHCI_CMD_FIS_ON:
                    self.fatal(coff, "post-load", f"AHCI: FIS RX engine should be off, but "
                               f"status bit indicates it is still running. (port {i}: cmd "
                               f"0x{cmd:x}); {qemu}", name)
                if cmd & (_AHCI_CMD_START | _AHCI_CMD_FIS_RX):
                    self.note(coff, "post-load", f"AHCI port {i}: its engines restart from "
                              f"guest memory (the command list and FIS buffers) after the "
                              f"load; not checked", name, level="unchecked")
            for j, slot in enumerate(elements(port, "ncq_tfs")):
                used, _ = value(slot, "used")
                halt, hoff = value(slot, "halt")
                if used is None or halt is None:
                    continue
                if bool(used) != bool(halt):
                    self.fatal(hoff, "post-load", f"ahci_state_post_load: port {i} NCQ slot "
                               f"{j}: used ({int(used)}) and halt ({int(halt)}) differ; {qemu}",
                               name)
                if not halt:
                    continue
                ncmd, noff = value(slot, "cmd")
                if ncmd is not None and ncmd not in _NCQ_COMMANDS:
                    self.fatal(noff, "post-load", f"ahci_state_post_load: port {i} NCQ slot "
                               f"{j} halted with command 0x{ncmd:x}, not an NCQ command; "
                               f"{qemu}", name)
                tag, _ = value(slot, "tag")
                sl, soff = value(slot, "slot")
                if tag is not None and sl is not None and tag != sl:
                    self.fatal(soff, "post-load", f"ahci_state_post_load: port {i} NCQ slot "
                               f"{j} halted with slot {sl} and tag {tag}; {qemu}", name)
                self.note(hoff, "post-load", f"AHCI port {i} NCQ slot {j} is halted: its "
                          f"command header and scatter list come from guest memory; not "
                          f"checked", name, level="unchecked")
            busy, boff = value(port, "busy_slot")
            if busy is not None and busy != -1 and not 0 <= busy < _AHCI_MAX_CMDS:
                self.fatal(boff, "post-load", f"ahci_state_post_load: port {i} busy_slot "
                           f"{busy} is neither -1 nor a command slot; {qemu}", name)

    def _global_state(self, tree, name, inst, idstr):
        """global_state_post_load (migration/global_state.c): the run state by name."""
        f = tree.field("runstate")
        if f is None or not isinstance(f.value, bytes):
            return
        state = _c_str(f.value[:len(f.value) - 1] if b"\0" not in f.value else f.value)
        if state not in self.prof.run_states:
            self.fatal(f.offset, "globalstate", f"invalid parameter value: {state}", name)

    def _subsection_versions(self, layout, data, poff, name):
        """vmstate_subsection_load() keeps a subsection's be32 version in a uint8_t: only
        its low byte counts.  Check each against the destination's subsection version and
        return the payload with accepted versions written as described (for decoding)."""
        try:
            found = list(_subsections_at(layout, 0, 0))
        except (TypeError, ValueError, KeyError, AttributeError, StreamError):
            return data
        buf = None
        for pos, sub in found:
            if pos + 4 > len(data):
                break
            wire = struct.unpack_from(">I", data, pos)[0]
            want = sub.get("version")
            sname = sub.get("vmsd_name")
            # (a version no be32 can hold cannot be on the wire: nothing to compare)
            if type(want) is not int or not 0 <= want <= 0xFFFFFFFF or \
                    not isinstance(sname, str):
                continue
            v8 = wire & 0xFF
            if v8 > want:
                self.fatal(poff + pos, "version", f"{sname}: incoming version_id {v8} is too "
                           f"new for local version_id {want}", name)
            mn = self.prof.minimum_version(sname, want)
            if mn is not None and v8 < mn:
                self.fatal(poff + pos, "version", f"{sname}: incoming version_id {v8} is too "
                           f"old for local minimum version_id  {mn}", name)
            if v8 < want:
                self.note(poff + pos, "version", f"subsection {sname} version {v8} < {want}: "
                          f"fields QEMU skips are not modelled", name, level="unchecked")
            if wire != want and v8 == want:
                self.note(poff + pos, "version", f"subsection {sname} version 0x{wire:x}: "
                          f"QEMU keeps the low byte ({v8}) and accepts it", name)
            if wire != want:
                buf = buf or bytearray(data)
                struct.pack_into(">I", buf, pos, want)
        return bytes(buf) if buf is not None else data

    def _truncated_device(self, layout, poff, have, size, name, idstr):
        """The stream ends inside a vmstate payload: QEMU names the field it was reading."""
        cut = poff + have
        qemu = "load of migration failed: Input/output error"
        try:
            hit = _locate_field(layout, have, layout.get("vmsd_name"), 0)
        except (TypeError, ValueError, KeyError, AttributeError):
            hit = None
        if hit is not None:
            qemu = f"Failed to load {hit[0]}:{hit[1]}"
        self.fatal(cut, "truncated", f"{qemu} (the stream ends inside the state of {idstr}: "
                   f"{have} of {size} bytes)", name)

    def _equal_fields(self, tree, key, name, inst, idstr):
        own = self.dest.states.get(key)
        mine = _typed_fields(tree)
        theirs = _typed_fields(own) if own is not None else None
        for path, (typ, value, foff) in mine.items():
            if typ == "pci irq state":
                self._irq_state(value, foff, name)
                continue
            if typ == "virtio" and isinstance(value, bytes) and len(value) >= 276 and \
                    idstr.split("/")[-1].startswith("virtio"):
                self._irq_state(value[260:276], foff + 260, name)
            if theirs is None:
                if typ == "int32 le" and value < 0:
                    # get_int32_le: 0 <= v <= own value; the lower bound needs no destination
                    self.fatal(foff, "equal", f"Invalid value {value} expecting positive value "
                               f"<= the destination's own ({path}, int32 le: a negative value "
                               f"fails whatever the destination has); QEMU: error while "
                               f"loading state for instance 0x{inst:x} of device '{idstr}'",
                               name)
                if isinstance(value, bytes):
                    if typ == "pci config":
                        self.note(foff, "pci-config", f"{path}: the destination's read-only "
                                  f"PCI config bytes are not known (give --reference)", name,
                                  level="unchecked")
                    continue
                self.note(foff, "equal", f"{path} ({typ}) = {value}: the destination's own "
                          f"value is not known (give --reference)", name, level="unchecked")
                continue
            if path not in theirs:
                self.note(foff, "equal", f"{path} ({typ}): not in the reference", name,
                          level="unchecked")
                continue
            want = theirs[path][1]
            bad = None
            if typ == "pci config":
                self._pci_config(value, want, foff, path, name, inst, idstr)
                continue
            if typ == "virtio":
                self._virtio_pci(value, want, foff, path, name, inst, idstr)
                continue
            if typ == "int32 le":
                if not 0 <= value <= want:
                    bad = f"Invalid value {value} expecting positive value <= {want}"
            elif value != want:
                fmt = "{:x} != {:x}"
                bad = fmt.format(_unsigned(want, typ), _unsigned(value, typ))
            if bad:
                self.fatal(foff, "equal", f"{bad} ({path}, {typ}: the destination has "
                           f"{want}); QEMU: error while loading state for instance "
                           f"0x{inst:x} of device '{idstr}'", name)

    def _pci_config(self, got, want, foff, path, name, inst, idstr):
        """get_pci_config_device (hw/pci/pci.c): bytes under cmask & ~wmask & ~w1cmask must
        be the destination's.  The masks known without the device: pci_init_cmask's
        header bytes and the id/next bytes of each capability (pci_add_capability)."""
        if not isinstance(got, bytes) or not isinstance(want, bytes) or len(got) != len(want):
            return
        for i, cmask in _pci_fixed_bytes(want):
            if (got[i] ^ want[i]) & cmask:
                self.fatal(foff + i, "pci-config", f"get_pci_config_device: Bad config data: "
                           f"i=0x{i:x} read: {got[i]:x} device: {want[i]:x} cmask: {cmask:x} "
                           f"wmask: 0 w1cmask:0 ({path}); QEMU: error while loading state "
                           f"for instance 0x{inst:x} of device '{idstr}'", name)
        if self._pci_note_done is None:
            self._pci_note_done = True
            self.note(foff, "pci-config", "PCI config: only the header's read-only bytes and "
                      "capability ids/links are compared; a device's other read-only bits "
                      "(its cmask/wmask) are not known", name, level="unchecked")

    _pci_note_done = None

    def _irq_state(self, value, foff, name):
        """get_pci_irq_state (hw/pci/pci.c): each of the four be32 levels is 0 or 1."""
        if not isinstance(value, bytes) or len(value) != 16:
            return
        for i in range(4):
            v = struct.unpack_from(">i", value, 4 * i)[0]
            if v not in (0, 1):
                self.fatal(foff + 4 * i, "pci-irq", f"irq state {v}: must be 0 or 1.", name)

    def _virtio_pci(self, got, want, foff, path, name, inst, idstr):
        """A virtio-pci device's ``virtio`` field starts with virtio_pci_load_config's
        pci_device_load(): the vmstate PCIDevice (int32 le version_id, config)."""
        if not (isinstance(got, bytes) and isinstance(want, bytes)) or \
                len(got) < 260 or len(want) < 260 or not idstr.split("/")[-1].startswith("virtio"):
            return
        v, own = struct.unpack(">i", got[:4])[0], struct.unpack(">i", want[:4])[0]
        if not 0 <= v <= own:
            self.fatal(foff, "equal", f"Invalid value {v} expecting positive value <= {own} "
                       f"({path}: PCIDevice.version_id, int32 le); QEMU: error while loading "
                       f"state for instance 0x{inst:x} of device '{idstr}'", name)
        self._pci_config(got[4:260], want[4:260], foff + 4, path + "<PCIDevice.config>",
                         name, inst, idstr)

    def _bounded_by_scan(self, sid, name):
        src = self.src
        try:
            n, how = scan_for_end(src, sid, self.footers_on(), self.ids, 0)
        except StreamError as e:
            self.fatal(e.offset, "truncated", f"{e.message}; QEMU: load of migration failed: "
                       f"Input/output error", name)
        self.read(n, "device section payload", name)
        self.note(src.offset - n, "unchecked-payload", f"no layout for this section: "
                  f"{n} bytes bounded by {how}, fields not verified", name, level="unchecked")

    # -- block migration: block.c block_load ----------------------------------------------
    def _block_section(self, name):
        known = self.dest.block_devices
        while True:
            off = self.src.offset
            word = self.be(8, "block record word", name)
            flags = word & 0x1FF
            if flags & 0x01:                      # BLK_MIG_FLAG_DEVICE_BLOCK
                ln = self.be(1, "block device name length", name)
                dev = _c_str(self.read(ln, "block device name", name))
                if known is not None and dev not in known:
                    self.fatal(off + 8, "block", f"Error unknown block device {dev}", name)
                if known is None:
                    self.note(off + 8, "block", f"block device {dev!r}: whether the "
                              f"destination has it is not known", name, level="unchecked")
                if not flags & 0x08:              # BLK_MIG_FLAG_ZERO_BLOCK
                    self.read(1 << 20, "block data", name)
            elif flags & 0x04:                    # BLK_MIG_FLAG_PROGRESS
                pass
            elif not flags & 0x02:                # BLK_MIG_FLAG_EOS
                self.fatal(off, "block", f"Unknown block migration flags: 0x{flags:x}", name)
            if flags & 0x02:
                return

    # -- VFIO: hw/vfio/migration.c vfio_load_state (7.2: the v1 protocol) -----------------
    def _vfio_section(self, idstr, name):
        from .wire import vfio as W
        dev = idstr[:-len("/vfio")] if idstr.endswith("/vfio") else idstr
        END, CONFIG, SETUP, DATA = (0xFFFFFFFFEF100001, 0xFFFFFFFFEF100002,
                                    0xFFFFFFFFEF100003, 0xFFFFFFFFEF100004)
        src = self.src
        moff = src.offset
        data = self.be(8, "VFIO marker", name)
        while data != END:
            if data == CONFIG:
                boff = src.offset
                buf = src.peek(W.MAX_CONFIG_BODY + 8)
                try:
                    _, n = W.parse_config_state(buf, 0, base=boff, section=name)
                except Truncated as e:
                    self.fatal(e.offset, "truncated", f"{self.load_error()} (the stream ends "
                               f"inside the VFIO config record)", name)
                except StreamError:
                    self.fatal(boff, "vfio", f"{dev}: Failed loading device config space, "
                               f"end flag incorrect (no END_OF_STATE after any config layout "
                               f"the device could have)", name)
                src.read(n)
                eoff = src.offset
                tail = self.be(8, "VFIO END_OF_STATE", name)
                if tail != END:
                    self.fatal(eoff, "vfio", f"{dev}: Failed loading device config space, "
                               f"end flag incorrect 0x{tail:x}", name)
                self.note(boff, "vfio", "VFIO config record: its contents are not checked "
                          "against the destination device", name, level="unchecked")
                return
            if data == SETUP:
                eoff = src.offset
                nxt = self.be(8, "VFIO marker", name)
                if nxt != END:
                    self.fatal(eoff, "vfio", f"{dev}: SETUP STATE: EOS not found 0x{nxt:x}",
                               name)
                return
            if data == DATA:
                size = self.be(8, "VFIO data size", name)
                if size:
                    left = src.remaining_known()
                    if left is not None and size > left:
                        self.fatal(src.offset, "truncated", f"{self.load_error()} (VFIO data "
                                   f"of {size} bytes, {left} left in the stream)", name)
                    while size:
                        take = min(size, 1 << 20)
                        self.read(take, "VFIO device data", name)
                        size -= take
                    if not self._vfio_noted:
                        self._vfio_noted = True
                        self.note(moff, "vfio", "VFIO device data: whether the device takes "
                                  "it is the device's business", name, level="unchecked")
            else:
                self.fatal(src.offset - 8, "vfio", f"{dev}: Unknown tag 0x{data:x}", name)
            data = self.be(8, "VFIO marker", name)

    _vfio_noted = False

    # -- dirty bitmaps: migration/block-dirty-bitmap.c dirty_bitmap_load ------------------
    def _dirty_bitmap_section(self, ver, name):
        """Only stream violations fail the load; a bitmap the destination cannot take
        cancels the incoming bitmaps (cancel_incoming_locked) and the rest is read and
        ignored."""
        if ver != 1:
            self.fatal(self.src.offset, "version", f"{self.load_error()} (dirty_bitmap_load "
                       f"takes only version 1)", name)
        st = self._dbm
        nodes = self.dest.bitmap_nodes
        while True:
            off = self.src.offset
            # qemu_get_bitmap_flags keeps the flags in a uint8_t: only the last byte counts
            flags = self.be(1, "dirty-bitmap flags", name)
            if flags & 0x80:
                flags = self.be(1, "dirty-bitmap flags", name)
                if flags & 0x80:
                    flags = self.be(2, "dirty-bitmap flags", name) & 0xFF
            nothing = flags == (flags & 0x01)
            if flags & 0x08:                                   # DEVICE_NAME
                node = self._counted(off, "Unable to read node alias string", name)
                if not st["cancelled"]:
                    if nodes is not None and node not in nodes:
                        self._dbm_cancel(off, f"node '{node}' not found", name)
                    else:
                        st["bs"] = node
                        if nodes is None:
                            self.note(off, "dirty-bitmap", f"node {node!r}: whether the "
                                      f"destination has it is not known", name,
                                      level="unchecked")
            elif st["bs"] is None and not nothing and not st["cancelled"]:
                self._dbm_cancel(off, "Error: block device name is not set", name)
            if flags & 0x04:                                   # BITMAP_NAME
                bname = self._counted(off, "Unable to read bitmap alias string", name)
                if not st["cancelled"]:
                    key = (st["bs"], bname)
                    st["bitmap"] = key if key in st["bitmaps"] else None
                    if st["bitmap"] is None and not flags & 0x10:
                        self._dbm_cancel(off, f"Error: unknown dirty bitmap '{bname}' for "
                                         f"block device '{st['bs']}'", name)
                    st["name"] = key
            elif st["bitmap"] is None and not nothing and not st["cancelled"]:
                self._dbm_cancel(off, "Error: block device name is not set", name)
            if flags & 0x10:                                   # START
                goff = self.src.offset
                gran = self.be(4, "dirty-bitmap granularity", name)
                sflags = self.be(1, "dirty-bitmap start flags", name)
                if not st["cancelled"]:
                    if st["bitmap"] is not None:
                        self.fatal(off, "dirty-bitmap", f"Bitmap with the same name "
                                   f"('{st['bitmap'][1]}') already exists on destination",
                                   name)
                    if gran < 512 or gran & (gran - 1):
                        self.fatal(goff, "dirty-bitmap", f"../../block/dirty-bitmap.c:105: "
                                   f"bdrv_create_dirty_bitmap: Assertion `is_power_of_2("
                                   f"granularity) && granularity >= BDRV_SECTOR_SIZE' failed. "
                                   f"(granularity {gran}: QEMU aborts)", name)
                    st["bitmaps"].add(st["name"])
                    st["bitmap"] = st["name"]
                    if sflags & 0xF8:
                        self.fatal(goff + 4, "dirty-bitmap", f"Unknown flags in migrated "
                                   f"dirty bitmap header: {sflags:x}", name)
            elif flags & 0x20:                                 # COMPLETE
                pass
            elif flags & 0x40:                                 # BITS
                self.read(12, "dirty-bitmap BITS header", name)
                if not flags & 0x02:                           # not ZEROES
                    boff = self.src.offset
                    size = self.be(8, "dirty-bitmap buffer size", name)
                    if size > 10 * 1024:
                        self.fatal(boff, "dirty-bitmap", "Bitmap migration stream buffer "
                                   "allocation request is too large", name)
                    self.read(size, "dirty-bitmap bits", name,
                              qemu="Failed to read bitmap bits")
                    if not st["cancelled"]:
                        self.note(boff, "dirty-bitmap", "dirty-bitmap BITS: the buffer size "
                                  "the destination's bitmap needs is not checked", name,
                                  level="unchecked")
            if flags & 0x01:
                return

    def _counted(self, off, qemu, name):
        """qemu_get_counted_string: an empty or cut string is a failure."""
        n = self.be(1, "counted string length", name)
        if n == 0:
            self.fatal(off, "dirty-bitmap", qemu, name)
        return _c_str(self.read(n, "counted string", name, qemu=qemu))

    def _dbm_cancel(self, off, why, name):
        st = self._dbm
        st["cancelled"] = True
        st["bs"] = st["bitmap"] = None
        self.note(off, "dirty-bitmap", f"{why}: QEMU cancels the incoming dirty bitmaps "
                  f"and still loads the rest", name)

    @property
    def _dbm(self):
        if self.__dict__.get("_dbm_state") is None:
            self._dbm_state = {"cancelled": False, "bs": None, "bitmap": None, "name": None,
                               "bitmaps": set()}
        return self._dbm_state

    # -- RAM: ram_load_precopy -------------------------------------------------------------
    def _ram(self, name):
        self._in_ram = True
        try:
            self._ram_records(name)
        finally:
            self._in_ram = False

    def _ram_records(self, name):
        src = self.src
        invalid = 0 if self.caps is None or "compress" in self.caps else F_COMP
        if not self.prof.compress:
            invalid = F_COMP
        while True:
            off = src.offset
            word = self.be(8, "RAM record word", name)
            flags = word & (PAGE - 1)
            addr = word & ~(PAGE - 1)
            if not self.prof.compress and flags & F_COMP:
                # 9.1 removed compress: 0x100 is no page kind any more, no case takes it
                self.fatal(off, "ram-flags", f"Unknown combination of migration flags: "
                           f"0x{flags:x} (COMPRESS_PAGE: compress was removed in 9.1)", name)
            if flags & F_COMP and self.caps is None:
                self.cap("compress", off, "COMPRESS_PAGE records")
            if flags & invalid:
                self.fatal(off, "ram-flags", "Received an unexpected compressed page "
                           "(the destination does not have the compress capability)", name)
            block = None
            if flags & PAGE_KINDS:
                block = self._ram_block(flags, off, name)
                size = self._block_len(block)
                if size is None or addr >= size:
                    self.fatal(off, "ram-offset", f"Illegal RAM offset {addr:x} (RAM block "
                               f"{block!r} is 0x{size or 0:x} bytes)", name)
            kind = flags & ~F_CONT
            if kind == F_MEM:
                self._mem_size(addr, name)
            elif kind == F_ZERO:
                foff = src.offset
                ch = self.be(1, "zero page fill byte", name)
                if ch and self.prof.zero_fill_fatal:
                    self.fatal(foff, "zero-fill", f"Found a zero page with value {ch}", name)
                if ch:
                    self.note(foff, "zero-fill", f"ZERO page with fill byte 0x{ch:02x}: QEMU "
                              f"{self.prof.release} fills the page with it (ram_handle_compressed)", name)
            elif kind == F_PAGE:
                self.read(PAGE, "RAM page", name)
            elif kind == F_COMP:
                loff = src.offset
                ln = struct.unpack(">i", self.read(4, "compressed page length", name))[0]
                bound = PAGE + (PAGE >> 12) + (PAGE >> 14) + (PAGE >> 25) + 13
                if ln < 0 or ln > bound:
                    self.fatal(loff, "compress", f"Invalid compressed data length: {ln}", name)
                data = self.read(ln, "compressed page", name)
                if not _inflates(data):
                    self.fatal(loff + 4, "compress", "decompress data failed", name)
            elif kind == F_XBZRLE:
                self._xbzrle(addr, name)
            elif kind == F_EOS:
                return
            elif kind == F_FLUSH and self.prof.multifd_flush:
                pass        # multifd_recv_sync_main(): nothing in this stream to check
            elif kind == F_HOOK and self.prof.hook_ignored:
                pass        # rdma_registration_handle(): nothing to do outside RDMA
            elif flags & F_HOOK:
                self.fatal(off, "ram-hook", f"{self.load_error()} (RAM_SAVE_FLAG_HOOK, flags "
                           f"0x{flags:x}, outside RDMA: ram_control_load_hook fails)", name)
            else:
                self.fatal(off, "ram-flags", f"Unknown combination of migration flags: "
                           f"0x{flags:x}", name)
            if kind & F_EOS:
                return

    def _block_len(self, block):
        if self.blocks is None:
            return None
        return self.blocks.get(block)

    def _ram_block(self, flags, off, name):
        if flags & F_CONT:
            if self.last_block is None:
                self.fatal(off, "ram-block", "Ack, bad migration stream! (CONTINUE with no "
                           "previous RAM block)", name)
            return self.last_block
        noff = self.src.offset
        ln = self.be(1, "RAM block name length", name)
        bname = _c_str(self.read(ln, "RAM block name", name))
        if self.blocks is None or bname not in self.blocks:
            self.fatal(noff, "ram-block", f"Can't find block {bname}", name)
        ign = self.dest.ignored_blocks
        if ign is not None and bname in ign and self.cap("x-ignore-shared"):
            self.fatal(noff, "ram-block", f"block {bname} should not be migrated !", name)
        self.last_block = bname
        return bname

    def _mapped_ram(self) -> bool:
        """mapped-ram on at the destination (the source's setting unless --capability)."""
        return "mapped-ram" in (self.caps if self.caps is not None else self.stream_caps)

    def _mapped_area(self, bname, length, name):
        """The mapped-ram header after a block-list entry (parse_ramblock_mapped_ram):
        version 1, the target page size; the bitmap and pages are read at their file
        offsets and the stream goes on after the block's page area."""
        hoff = self.src.offset
        ver = self.be(4, "mapped-ram header version", name)
        ps = self.be(8, "mapped-ram page size", name)
        boff = self.be(8, "mapped-ram bitmap offset", name)
        poff = self.be(8, "mapped-ram pages offset", name)
        if ver > 1:
            self.fatal(hoff, "mapped-ram", f"Migration mapped-ram capability version not "
                       f"supported (expected <= 1, got {ver})", name)
        if ps != PAGE and not self.prof.mapped_ram_page_size:
            self.note(hoff + 4, "mapped-ram", f"mapped-ram header's page_size {ps} is not "
                      f"{PAGE}: QEMU {self.prof.release} does not check it", name)
        elif ps != PAGE:
            self.fatal(hoff + 4, "mapped-ram", f"Migration mapped-ram header has invalid "
                       f"page_size {ps} (expected {PAGE})", name)
        if boff == 0 and poff == 0:
            return None     # a block left out (x-ignore-shared) has no area
        end = poff + length
        left = self.src.remaining_known()
        here = self.src.offset
        if end < here:
            self.fatal(hoff + 12, "mapped-ram", f"mapped-ram area of block {bname} lies "
                       f"before its header (pages at 0x{poff:x})", name)
        if left is not None and end > here + left:
            # QEMU reads the pages with pread and seeks past them; what it reads next
            # from beyond the end is zeros
            self.src.skip(left, f"mapped-ram area of block {bname}")
            return end
        self.src.skip(end - here, f"mapped-ram area of block {bname}")
        return None

    def _mem_size(self, total, name):
        dest = self.dest.blocks
        mapped = self._mapped_ram()
        if dest is None and mapped:
            # the entries are spread over the file: learn each as it comes
            self.note(self.src.offset - 8, "assumed-blocks", "the destination's RAM blocks "
                      "are assumed to be the ones this MEM_SIZE lists (no --reference)",
                      name, level="unchecked")
            dest = self.dest.blocks = {}
            self._learn_blocks = True
        if dest is None:
            # no reference: the stream's first block list stands for the destination's
            dest = self._peek_block_list(total)
            self.note(self.src.offset - 8, "assumed-blocks", "the destination's RAM blocks "
                      "are assumed to be the ones this MEM_SIZE lists (no --reference)",
                      name, level="unchecked")
            self.dest.blocks = dest
        if self.blocks is None:
            self.blocks = dict(dest)
        mask = (1 << 64) - 1
        while total:
            boff = self.src.offset
            ln = self.be(1, "RAM block name length", name)
            bname = _c_str(self.read(ln, "RAM block name", name))
            length = self.be(8, "RAM block length", name)
            if getattr(self, "_learn_blocks", False):
                self.blocks.setdefault(bname, length)
                self.dest.blocks.setdefault(bname, length)
            if bname not in self.blocks:
                self.fatal(boff, "ram-block", f'Unknown ramblock "{bname}", cannot accept '
                           f'migration', name)
            have = self.blocks[bname]
            if length != have:
                new = (length + PAGE - 1) // PAGE * PAGE
                if new != have:
                    mx = self.prof.resizeable.get(bname)
                    if mx is None:
                        self.fatal(boff + 1 + ln, "ram-block", f"Size mismatch: {bname}: "
                                   f"0x{new:x} != 0x{have:x}: Invalid argument", name)
                    if mx < new:
                        self.fatal(boff + 1 + ln, "ram-block", f"Size too large: {bname}: "
                                   f"0x{new:x} > 0x{mx:x}: Invalid argument", name)
                    self.blocks[bname] = new
                    self.note(boff + 1 + ln, "ram-resize", f"RAM block {bname} resized from "
                              f"0x{have:x} to 0x{new:x} (resizeable, max 0x{mx:x})", name)
            # (postcopy: a be64 page size follows only for blocks whose page size is not
            # the host's; x86 RAM blocks here all have the host's 4 KiB pages)
            if self.cap("x-ignore-shared"):
                aoff = self.src.offset
                gpa = self.be(8, "RAM block address", name)
                ign = self.dest.ignored_blocks
                want = self.dest.block_addrs.get(bname)
                if ign is not None and bname in ign and want is not None and gpa != want:
                    self.fatal(aoff, "ram-block", f"Mismatched GPAs for block {bname} "
                               f"{_signed64(gpa)}!= {_signed64(want)}", name)
            past = self._mapped_area(bname, length, name) if mapped else None
            total = (total - length) & mask
            if past is not None:
                if total:
                    self.fatal(self.src.offset, "truncated", 'Unknown ramblock "", cannot '
                               f'accept migration (the stream ends inside the mapped-ram '
                               f'area of block {bname}, which ends at 0x{past:x}; the next '
                               f'entry is read as zeros)', name)
                self.fatal(self.src.offset, "truncated", f"{self.load_error()} (the stream "
                           f"ends inside the mapped-ram area of block {bname}, which ends "
                           f"at 0x{past:x})", name)

    def _peek_block_list(self, total):
        src = self.src
        buf = src.peek(1 << 16)
        p, out, acc = 0, {}, 0
        ignore = "x-ignore-shared" in self.stream_caps
        while acc < total and p < len(buf):
            ln = buf[p]
            nm = _c_str(buf[p + 1:p + 1 + ln])
            if p + 9 + ln > len(buf):
                break
            length = _U64.unpack_from(buf, p + 1 + ln)[0]
            out[nm] = length
            acc += length
            p += 9 + ln + (8 if ignore else 0)
        return out

    def _xbzrle(self, addr, name):
        src = self.src
        hoff = src.offset
        enc = self.be(1, "XBZRLE encoding flag", name)
        ln = self.be(2, "XBZRLE length", name)
        if enc != 1:
            self.fatal(hoff, "xbzrle", "Failed to load XBZRLE page - wrong compression!", name)
        if ln > PAGE:
            self.fatal(hoff + 1, "xbzrle", f"Failed to load XBZRLE page - len overflow! "
                       f"({ln} > {PAGE})", name)
        data = self.read(ln, "XBZRLE data", name)
        try:
            X.decode(data, bytes(PAGE), offset=hoff + 3)
        except StreamError as e:
            self.fatal(e.offset, "xbzrle", f"Failed to load XBZRLE page - decode error! "
                       f"({e.message})", name)

    # -- commands ------------------------------------------------------------------------
    def _command(self, off, depth):
        cmd = self.be(2, "command number")
        ln = self.be(2, "command length")
        row = self.prof.commands.get(cmd)
        if row is None:
            self.fatal(off + 1, "command", f"MIG_CMD 0x{cmd:x} unknown (len 0x{ln:x})")
        cname, fixed = row
        if fixed is not None and fixed != ln:
            self.fatal(off + 3, "command", f"{cname} received with bad length - expecting "
                       f"{fixed}, got {ln}")
        if cname == "OPEN_RETURN_PATH":
            if getattr(self, "return_path", False):
                self.note(off, "command", "CMD_OPEN_RETURN_PATH called when RP already open "
                          "(QEMU goes on)")
            self.return_path = True
        elif cname == "PING":
            v = self.be(4, "PING value")
            if not getattr(self, "return_path", False):
                self.fatal(off, "command", f"CMD_PING (0x{v:x}) received with no return path")
        elif cname == "POSTCOPY_ADVISE":
            ps, self.ps = self.ps, PS_ADVISE
            if ps != PS_NONE:
                self.fatal(off, "command", f"CMD_POSTCOPY_ADVISE in wrong postcopy state ({ps})")
            self.postcopy_advised = True
            if ln == 0:
                if self.caps is not None and "postcopy-ram" in self.caps:
                    self.fatal(off, "command", "RAM postcopy is enabled but have 0 byte advise")
            elif ln == 16:
                if not self.cap("postcopy-ram", off, "a 16-byte POSTCOPY_ADVISE"):
                    self.fatal(off, "command", "RAM postcopy is disabled but have 16 byte "
                               "advise")
                summary = self.be(8, "host page size summary")
                tps = self.be(8, "target page size")
                if summary != PAGE:
                    self.fatal(off + 5, "command", f"Postcopy needs matching RAM page sizes "
                               f"(s={summary:x} d={PAGE:x})")
                if tps != PAGE:
                    self.fatal(off + 13, "command", f"Postcopy needs matching target page "
                               f"sizes (s={tps} d={PAGE})")
                self.note(off, "postcopy", "POSTCOPY_ADVISE also needs userfaultfd on the "
                          "destination host", level="unchecked")
            else:
                self.fatal(off + 3, "command", f"CMD_POSTCOPY_ADVISE invalid length ({ln})")
        elif cname == "POSTCOPY_LISTEN":
            ps, self.ps = self.ps, PS_LISTENING
            if ps not in (PS_ADVISE, PS_DISCARD):
                self.fatal(off, "command", f"CMD_POSTCOPY_LISTEN in wrong postcopy state ({ps})")
            self.note(off, "postcopy", "POSTCOPY_LISTEN: QEMU goes on in a listen thread; "
                      "check walks the rest of the stream as precopy", level="unchecked")
        elif cname == "POSTCOPY_RUN":
            if self.ps != PS_LISTENING:
                self.fatal(off, "command", f"CMD_POSTCOPY_RUN in wrong postcopy state "
                           f"({self.ps})")
            self.ps = PS_RUNNING
            self.note(off, "postcopy", "POSTCOPY_RUN: not modelled further", level="unchecked")
        elif cname == "POSTCOPY_RAM_DISCARD":
            if self.ps not in (PS_ADVISE, PS_DISCARD):
                self.fatal(off, "command", f"CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state "
                           f"({self.ps})")
            self.ps = PS_DISCARD
            if ln < 1 + 1 + 1 + 1 + 2 * 8:
                self.fatal(off + 3, "command", f"CMD_POSTCOPY_RAM_DISCARD invalid length ({ln})")
            body = self.read(ln, "POSTCOPY_RAM_DISCARD payload")
            if body[0] != 0:
                self.fatal(off + 5, "command", f"CMD_POSTCOPY_RAM_DISCARD invalid version "
                           f"({body[0]})")
            self.note(off, "postcopy", "POSTCOPY_RAM_DISCARD ranges not checked",
                      level="unchecked")
        elif cname == "POSTCOPY_RESUME":
            # loadvm_postcopy_handle_resume: outside POSTCOPY_RECOVER it complains, goes on
            self.note(off, "command", "loadvm_postcopy_handle_resume: illegal resume received "
                      "(QEMU goes on)")
        elif cname == "PACKAGED":
            n = self.be(4, "PACKAGED length")
            start = self.src.offset
            self.note(off, "packaged", "PACKAGED: the nested stream is checked as a main loop",
                      level="unchecked")
            self._main(depth + 1, start + n)
        else:
            self.read(ln, f"{cname} payload")
            self.note(off, "command", f"{cname}: not modelled by check", level="unchecked")

    # -- after QEMU_VM_EOF -------------------------------------------------------------
    def _after_eof(self):
        src = self.src
        off = src.offset
        b = src.peek(5)
        if not b:
            self.note(off, "trailer", "no VMDESCRIPTION after QEMU_VM_EOF (QEMU only drains "
                      "it when it expects one, and never fails on it)")
            return
        if b[0] != 6:
            self.note(off, "trailer", f"byte 0x{b[0]:02x} after QEMU_VM_EOF where a "
                      f"VMDESCRIPTION may be: QEMU says 'Expected vmdescription section, "
                      f"but got {b[0]}' and still loads")
            return
        if len(b) < 5:
            self.note(off, "trailer", "VMDESCRIPTION header cut short: ignored by QEMU "
                      "(read after the load succeeded)")
            return
        n = struct.unpack(">I", b[1:5])[0]
        left = src.remaining_known() or 0
        if 5 + n > left:
            self.note(off, "trailer", f"VMDESCRIPTION of {n} bytes, {left - 5} present: "
                      f"QEMU drains what is there and still loads")
            return
        src.read(5)
        raw = src.read(n)
        try:
            json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            self.note(off + 5, "trailer", "VMDESCRIPTION is not valid JSON: QEMU never parses "
                      "it")
        rest = src.remaining_known()
        if rest:
            self.note(src.offset, "trailing-bytes", f"{rest} bytes after the end of the "
                      f"stream: QEMU never reads them")


def _pci_fixed_bytes(config: bytes):
    """(index, cmask) of the config bytes every PCI device's loader compares."""
    out = [(0, 0xFF), (1, 0xFF), (2, 0xFF), (3, 0xFF), (6, 0x10), (8, 0xFF), (9, 0xFF),
           (0x0A, 0xFF), (0x0B, 0xFF), (0x0E, 0xFF), (0x34, 0xFF)]
    if len(config) < 0x40 or not config[6] & 0x10:
        return out
    p, seen = config[0x34], set()
    while 0x40 <= p < len(config) - 1 and p not in seen:
        seen.add(p)
        out += [(p, 0xFF), (p + 1, 0xFF)]
        p = config[p + 1]
    return out


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _uuid(b: bytes) -> str:
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


#: The post_load hooks modelled, by vmsd name (run on a section's vmsd and every
#: vmsd nested in it, in wire order).
_POST_LOADS = {"globalstate": Checker._global_state, "ahci": Checker._ahci}


def _vmsds(tree):
    """``tree`` and every vmsd its fields hold, at any depth."""
    yield tree
    for f in tree.walk():
        yield from f.nested()


#: hw/ide/ahci_internal.h: PORT_CMD_START, _FIS_RX, _FIS_ON, _LIST_ON; AHCI_MAX_CMDS.
_AHCI_CMD_START, _AHCI_CMD_FIS_RX, _AHCI_CMD_FIS_ON, _AHCI_CMD_LIST_ON = 1, 1 << 4, 1 << 14, 1 << 15
_AHCI_MAX_CMDS = 32
#: is_ncq() (hw/ide/ahci.c): READ/WRITE_FPDMA_QUEUED, NCQ_NON_DATA, SEND/RECEIVE_FPDMA_QUEUED.
_NCQ_COMMANDS = frozenset((0x60, 0x61, 0x63, 0x64, 0x65))


def _machine_names(release: str) -> list:
    """A superset of the x86 machine type names (``MachineClass::name``) QEMU
    ``release`` has: ``pc-i440fx-X.Y``/``pc-q35-X.Y`` (and the old ``pc-X.Y``) for
    every version up to the release (releases drop old ones; a superset only
    leaves a removed name unflagged), ``pc-q35-4.0.1``, and the unversioned ones."""
    major, minor = (int(x) for x in release.split(".")[:2])
    out = ["isapc", "microvm", "none", "x-remote", "xenfv", "xenfv-3.1", "xenfv-4.2", "xenpv",
           "pc", "q35", "pc-q35-4.0.1", "pc-i440fx-4.0.1"]
    for x in range(0, major + 1):
        for y in range(0, 16):
            if (x, y) > (major, minor):
                break
            out += [f"pc-i440fx-{x}.{y}", f"pc-q35-{x}.{y}", f"pc-{x}.{y}"]
    return out


def _strncmp(a: bytes, b: bytes, n: int) -> int:
    """C strncmp over at most n bytes, both strings ending at their first NUL."""
    for i in range(n):
        ca = a[i] if i < len(a) else 0
        cb = b[i] if i < len(b) else 0
        if ca != cb:
            return ca - cb
        if ca == 0:
            return 0
    return 0


def _c_str(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("latin-1")


def _unsigned(v, typ):
    bits = {"uint8 equal": 8, "uint16 equal": 16, "int32 equal": 32, "uint32 equal": 32,
            "int64 equal": 64}.get(typ, 64)
    return v & ((1 << bits) - 1)


_CHECKED_TYPES = ("uint8 equal", "uint16 equal", "int32 equal", "uint32 equal",
                  "int64 equal", "int32 le", "pci config", "virtio", "pci irq state")


def _typed_fields(tree):
    """path -> (type, value, offset) of every equal/le field of a decoded section."""
    out = {}

    def walk(node, path):
        for f in node.fields:
            p = f"{path}.{f.name}"
            if f.type in _CHECKED_TYPES and f.array_len is None and \
                    isinstance(f.value, (int, bytes)):
                out[p] = (f.type, f.value, f.offset)
            for i, sub in enumerate(f.nested()):
                walk(sub, f"{p}[{i}]")
        for s in node.subsections:
            walk(s, f"{path}/{s.vmsd_name}")
    walk(tree, tree.vmsd_name or "?")
    return out


def _subsections_at(desc, pos, depth):
    """(offset of the be32 version, description) of every subsection in ``desc``'s bytes
    starting at ``pos``, nested ones included, in wire order."""
    if depth > 64:
        return
    for f in desc.get("fields", ()):
        n = f.get("array_len", 1)
        size = f["size"]
        sub = f.get("struct")
        if isinstance(sub, dict) and sub.get("fields") is not None and size:
            for k in range(n):
                yield from _subsections_at(sub, pos + k * size, depth + 1)
        pos += n * size
    for sub in desc.get("subsections", ()):
        name = sub["vmsd_name"].encode()
        yield pos + 2 + len(name), sub
        yield from _subsections_at(sub, pos + 6 + len(name), depth + 1)
        pos += 6 + len(name) + vmstate.payload_size(sub)


def _locate_field(desc, target, vmsd_name, depth):
    """(vmsd name, field name) of the innermost field of the description ``desc``
    holding byte ``target`` (relative to the start of ``desc``'s bytes); None when
    ``target`` falls in a subsection header or past the described bytes."""
    if depth > 64:
        return None
    pos = 0
    for f in desc.get("fields", ()):
        n = f.get("array_len", 1)
        size = f["size"]
        if pos <= target < pos + n * size:
            sub = f.get("struct")
            if isinstance(sub, dict) and sub.get("fields") is not None and size:
                hit = _locate_field(sub, (target - pos) % size, sub.get("vmsd_name"),
                                    depth + 1)
                if hit is not None:
                    return hit
            return vmsd_name, f["name"]
        pos += n * size
    for sub in desc.get("subsections", ()):
        head = 6 + len(sub["vmsd_name"].encode())
        if target < pos + head:
            return None
        body = vmstate.payload_size(sub)
        if target < pos + head + body:
            return _locate_field(sub, target - pos - head, sub["vmsd_name"], depth + 1)
        pos += head + body
    return None


def _inflates(data: bytes) -> bool:
    """Does QEMU's loader inflate this COMPRESS_PAGE data?  (:meth:`RamCompressed.inflate`:
    one ``inflate(Z_NO_FLUSH)`` into a page must return Z_STREAM_END.)"""
    try:
        RamCompressed(None, 0, data).inflate(PAGE)
    except CompressedPageError:
        return False
    return True


#: machine types a profile is picked for when the user names none (cmd_check)
#: machine types whose stream gets that release's profile when none is asked for: those
#: of 10.0 and later, which QEMU 7.2 cannot load anyway.  An older machine type (a 7.2
#: QEMU writes pc-i440fx-5.2 streams too) keeps the 7.2 default; --profile qemu-5.2 asks.
_MACHINE_PROFILES = {f"{kind}-{rel}": f"qemu-{rel}" for rel in _RELEASES
                     if tuple(map(int, rel.split("."))) >= (10, 0)
                     for kind in ("pc-i440fx", "pc-q35")}


def profile_for_stream(path) -> tuple:
    """(profile name, machine type) for a stream file whose configuration record names
    a machine of a release that has a profile (pc-i440fx-11.1 -> qemu-11.1);
    (None, machine or None) otherwise.  Reads only the first bytes of the file."""
    if not isinstance(path, (str, os.PathLike)) or str(path) == "-":
        return None, None
    try:
        with open(path, "rb") as f:
            head = f.read(9 + 4 + 256)
    except OSError:
        return None, None
    if head[:8] != b"QEVM\0\0\0\x03" or head[8:9] != b"\x07" or len(head) < 13:
        return None, None
    n = struct.unpack(">I", head[9:13])[0]
    name = head[13:13 + n]
    if n > 256 or len(name) != n:
        return None, None
    machine = _c_str(name)
    return _MACHINE_PROFILES.get(machine), machine


def check(source, *, profile_name="qemu-7.2", expect_machine=None, reference=None,
          capabilities=None) -> Report:
    """Check a stream (path, ``-``, bytes or file object).  Raises :class:`BadMagic`
    when the input is not a migration stream at all."""
    prof = profile(profile_name)
    dest = Destination()
    if reference:
        try:
            dest = destination_from_reference(reference, prof)
        except StreamError as e:
            raise StreamError(f"the reference {reference} is not a usable stream: "
                              f"{e.one_line()}") from None
    c = Checker(source, prof, dest, expect_machine, capabilities)
    problems = c.run()
    return Report(problems, prof.name, str(reference) if reference else None)
