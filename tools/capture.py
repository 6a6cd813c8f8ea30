#!/usr/bin/env python3
"""Make the real QEMU captures committed under fixtures/captures/.

    python3 tools/capture.py [SCENARIO ...] --out fixtures/captures
    python3 tools/capture.py --list

Each capture NAME gives ``NAME.mig.xz`` (the stream, xz-compressed) and
``NAME.json`` (how it was made and what QEMU reported: argv, QMP commands,
``query-version``, the final ``query-migrate``, stream size and sha256, and
the sha256 of ``pmemsave`` dumps of guest memory taken once migration had
completed).  Small memory dumps are committed too (``NAME.mem-0xADDR.xz``),
multifd channels as ``NAME.chN.xz``, the savevm qcow2 image as
``NAME.qcow2.xz``.

Paused captures are byte-reproducible (the guest clock is pinned, see
qmigstream.qemu.runner.BASE_ARGS); the tool makes each of them twice and
records whether both runs gave the same bytes.  Running guests, compression
threads, multifd, block migration (asynchronous disk reads) and dirty bitmaps
(host-timed iterations) are not reproducible; their metadata says why.

Needs Debian's qemu-system-x86 7.2 (qemu-system-x86_64, qemu-img, qemu-io), or
another release through ``$QEMU``, ``$QEMU_IMG`` and ``$QEMU_IO``: ``eval
"$(tools/debian-qemu 11.1)"`` sets them to Debian's QEMU of that release in a
chroot.  Scenario names carry the release (``pc-11.1-paused``); ``--list`` shows
those that apply to the QEMU found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qmigstream.qemu.runner import (Qemu, QemuError, UnixSink, exec_file_uri,  # noqa: E402
                                    qemu_binary, sha256_file, wait_file)

#: qemu-img and qemu-io of the same release as $QEMU (tools/debian-qemu sets all three)
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")

MiB = 1 << 20
PAGE = 4096
LOW_END = 0xA0000            # pc/q35: RAM below the VGA hole ...
HIGH_START = 0x100000        # ... and from 1 MiB to the end of RAM (guests here < 4 GiB)
#: memory dumps whose xz form is at most this big are committed next to the stream
MEM_COMMIT_LIMIT = 64 * 1024
#: multifd channel streams up to this (xz) size are committed
CHANNEL_COMMIT_LIMIT = 512 * 1024
XZ_PRESET = 9 | lzma.PRESET_EXTREME

SCENARIOS = {}


def scenario(name, *, reproducible, exercises, since=None, until=None, only=None):
    """Register a scenario.  ``name`` may hold ``{v}``, the QEMU release (``7.2``);
    ``since``/``until`` bound the releases it applies to (inclusive, ``(major, minor)``),
    ``only`` lists the releases of a scenario whose name is fixed."""
    def deco(fn):
        SCENARIOS[name] = {"fn": fn, "reproducible": reproducible, "exercises": exercises,
                           "doc": (fn.__doc__ or "").strip(), "since": since,
                           "until": until, "only": only}
        return fn
    return deco


def release_of(binary: str) -> str:
    """``major.minor`` of the QEMU that ``binary`` is (``qemu-system-x86_64 --version``)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    if not m:
        raise SystemExit(f"cannot tell the QEMU release from {out!r}")
    return f"{m.group(1)}.{m.group(2)}"


def scenarios_for(release: str) -> dict:
    """Scenario name (for this release) -> template name, for those that apply."""
    key = tuple(int(x) for x in release.split("."))
    out = {}
    for template, sc in SCENARIOS.items():
        if sc["only"] is not None and release not in sc["only"]:
            continue
        if sc["since"] and key < sc["since"] or sc["until"] and key > sc["until"]:
            continue
        out[template.format(v=release)] = template
    return out


# -- guest data ---------------------------------------------------------------------
def loader_pattern(seed: int, pages: int) -> bytes:
    """Deterministic test data, page by page: every 4th page zero, every 4th page one
    repeated non-zero byte, the rest pseudo-random bytes from ``seed``."""
    rng = random.Random(seed)
    out = bytearray()
    for i in range(pages):
        kind = i % 4
        if kind == 0:
            out += bytes(PAGE)
        elif kind == 1:
            out += bytes([rng.randrange(1, 256)]) * PAGE
        else:
            out += rng.randbytes(PAGE)
    return bytes(out)


def compressible_pattern(pages: int) -> bytes:
    """Text-like, non-zero, well-compressible pages (each one different)."""
    out = bytearray()
    for i in range(pages):
        line = f"qmigstream compress page {i:05d} " + "abcdefgh" * 4 + "\n"
        out += (line.encode() * (PAGE // len(line) + 1))[:PAGE]
    return bytes(out)


def mbr_dirty_loop(pages: int = 32, base_segment: int = 0x1000) -> bytes:
    """A 512-byte boot sector (16-bit real mode, loaded at 0x7C00) that keeps
    dirtying ``pages`` 4 KiB pages starting at ``base_segment * 16``: it
    increments one word per page and ``invlpg``s the page after each store, so
    TCG makes a new TLB entry next time and migration sees the page dirty again.
    """
    code = bytearray()
    code += b"\xFA"                                   # cli
    code += b"\x31\xC0"                               # xor ax, ax
    code += b"\x8E\xD8"                               # mov ds, ax
    code += b"\x8E\xD0"                               # mov ss, ax
    code += b"\xBC\x00\x7C"                           # mov sp, 0x7C00
    outer = len(code)
    code += b"\xB8" + struct.pack("<H", base_segment)  # outer: mov ax, base_segment
    code += b"\xB9" + struct.pack("<H", pages)         # mov cx, pages
    page = len(code)
    code += b"\x8E\xC0"                               # page: mov es, ax
    code += b"\x26\xFF\x06\x00\x01"                   # inc word [es:0x0100]
    code += b"\x26\x0F\x01\x3E\x00\x01"               # invlpg [es:0x0100]
    code += b"\x05\x00\x01"                           # add ax, 0x100 (next 4 KiB page)
    code += b"\xE2" + struct.pack("<b", page - (len(code) + 2))   # loop page
    code += b"\xEB" + struct.pack("<b", outer - (len(code) + 2))  # jmp outer
    assert len(code) <= 510
    return bytes(code) + bytes(510 - len(code)) + b"\x55\xAA"


# -- the capture context ---------------------------------------------------------------
class Capture:
    """Work directory, files produced and metadata of one scenario run."""

    def __init__(self, name, work, release=(7, 2)):
        self.name = name
        self.work = work
        self.release = release       # (major, minor) of the QEMU in use
        self.meta = {}
        self.stream = os.path.join(work, f"{name}.mig")
        self.channels = []           # paths of multifd channel recordings
        self.memory = []             # {"addr","size","sha256","path"}
        self.extra_files = {}        # suffix -> path (committed xz-compressed)

    def path(self, fname):
        return os.path.join(self.work, fname)

    def ram_dumps(self, q, ram_bytes, tag=""):
        """pmemsave [0, 0xA0000) and [0x100000, ram end)."""
        for addr, end in ((0, LOW_END), (HIGH_START, ram_bytes)):
            out = self.path(f"{self.name}{tag}.mem-0x{addr:x}")
            q.pmemsave(addr, end - addr, out)
            self.memory.append({"addr": addr, "size": end - addr,
                                "sha256": sha256_file(out), "path": out})

    def record(self, q, version, final):
        self.meta.update({"qemu_argv": q.argv, "qmp_commands": list(q.qmp_log),
                          "qemu_version": version, "query_migrate": final})


def run_exec_migration(c, machine_args, *, ram_bytes, capabilities=None, parameters=None,
                       before=None, on_poll=None, timeout=120):
    """The common outgoing case: QEMU (paused unless ``before`` resumes it) migrates
    to ``exec:cat``; memory dumps after completion."""
    with Qemu(machine_args, workdir=c.path("qemu")) as q:
        version = q.version()
        q.set_capabilities(capabilities or {})
        q.set_parameters(parameters or {})
        if before:
            before(q)
        q.execute("migrate", uri=exec_file_uri(c.stream))
        final = q.wait_migration(timeout, on_poll=(lambda r: on_poll(q, r)) if on_poll else None)
        check_completed(q, final)
        q.wait_status("postmigrate")
        c.ram_dumps(q, ram_bytes)
        wait_file(c.stream)
        c.record(q, version, final)


def check_completed(q, final):
    if final.get("status") != "completed":
        raise QemuError(f"migration {final.get('status')}: {final.get('error-desc')}",
                        q.stderr())


def pc(machine="pc", mem=32, *extra):
    return ["-machine", machine, "-m", str(mem), *extra]


# -- scenarios -------------------------------------------------------------------------
@scenario("pc-{v}-paused", reproducible=True,
          exercises="pc-i440fx-7.2 paused: configuration, footers, RAM START/END with zero "
                    "and normal pages (BIOS/option ROMs), every default pc device section, "
                    "VMDESCRIPTION trailer")
def s_pc_paused(c):
    """Plain pc machine, 32 MiB, never started."""
    run_exec_migration(c, pc(), ram_bytes=32 * MiB)


@scenario("q35-{v}-paused", reproducible=True,
          exercises="pc-q35-7.2 paused: ICH9/LPC/AHCI device sections, more RAM blocks")
def s_q35_paused(c):
    """q35 machine, 32 MiB, never started."""
    run_exec_migration(c, pc("q35"), ram_bytes=32 * MiB)


LOADER_ADDR, LOADER_PAGES, LOADER_SEED = 0x200000, 64, 7202


@scenario("pc-{v}-loader", reproducible=True,
          exercises="known guest data: normal pages with random bytes, pages of one repeated "
                    "non-zero byte (sent as normal pages), zero pages between them")
def s_pc_loader(c):
    """pc, 32 MiB, 64 pages of loader_pattern(seed 7202) at 2 MiB via -device loader."""
    blob = c.path("loader.bin")
    with open(blob, "wb") as f:
        f.write(loader_pattern(LOADER_SEED, LOADER_PAGES))
    c.meta["loader"] = {"addr": LOADER_ADDR, "pages": LOADER_PAGES, "seed": LOADER_SEED,
                        "sha256": sha256_file(blob),
                        "pattern": "tools/capture.py loader_pattern(seed, pages)"}
    run_exec_migration(c, pc("pc", 32, "-device",
                             f"loader,file={blob},addr=0x{LOADER_ADDR:x},force-raw=on"),
                       ram_bytes=32 * MiB)


@scenario("pc-i440fx-2.2-paused", reproducible=True, only=("7.2",),
          exercises="old machine type: no configuration record, no section footers, "
                    "no VMDESCRIPTION trailer (suppress-vmdesc), stream ends at QEMU_VM_EOF")
def s_pc22(c):
    """pc-i440fx-2.2, 32 MiB, never started."""
    run_exec_migration(c, pc("pc-i440fx-2.2"), ram_bytes=32 * MiB)


@scenario("pc-{v}-noconfig", reproducible=True, until=(8, 1),
          exercises="footers and trailer but no configuration record")
def s_noconfig(c):
    """pc with -global migration.send-configuration=off.  Not from 8.2: the
    configuration is then part of the JSON description and leaving it out trips an
    assertion in QEMU's JSON writer (``leave_container: Assertion `depth' failed``,
    seen with 10.0.13 and 11.1.3), so QEMU aborts the migration."""
    run_exec_migration(c, pc("pc", 32, "-global", "migration.send-configuration=off"),
                       ram_bytes=32 * MiB)


@scenario("pc-{v}-devices", reproducible=True,
          exercises="many vmstate shapes: PCI devices (e1000, rtl8139, virtio-net, virtio-blk, "
                    "virtio-serial, virtio-balloon, virtio-rng, virtio-iommu, whose GTREEs "
                    "travel inside the opaque virtio field), USB (UHCI, xHCI, tablet, kbd), "
                    "isa-serial, VGA; subsections, arrays of structs, timers, msix and pci "
                    "config, virtio")
def s_devices(c):
    """pc, 64 MiB, a zoo of devices that 7.2 migrates, with a tiny raw drive
    (virtio-iommu-pci from 6.0: 5.2's pc cannot place it)."""
    disk = c.path("disk.raw")
    with open(disk, "wb") as f:
        f.truncate(MiB)
    args = pc("pc", 64,
              "-device", "VGA",
              "-device", "e1000,romfile=",
              "-device", "rtl8139,romfile=",
              "-device", "virtio-net-pci,romfile=",
              "-drive", f"file={disk},if=none,id=d0,format=raw",
              "-device", "virtio-blk-pci,drive=d0",
              "-device", "virtio-serial-pci",
              "-chardev", "null,id=c0",
              "-device", "virtserialport,chardev=c0,name=org.qmigstream.0",
              "-device", "virtio-balloon-pci",
              "-device", "virtio-rng-pci",
              *(["-device", "virtio-iommu-pci"] if c.release >= (6, 0) else []),
              "-chardev", "null,id=s0",
              "-device", "isa-serial,chardev=s0",
              "-device", "piix3-usb-uhci",
              "-device", "qemu-xhci,id=xhci",
              "-device", "usb-tablet,bus=xhci.0",
              "-device", "usb-kbd,bus=xhci.0")
    run_exec_migration(c, args, ram_bytes=64 * MiB)


@scenario("q35-{v}-devices", reproducible=True,
          exercises="q35 with devices the pc zoo lacks: slirp (user networking, two "
                    "netdevs), e1000e, virtio-gpu, ich9-intel-hda with hda-output, "
                    "usb-storage/usb-mouse/usb-hub on xHCI, virtio-scsi with scsi-hd, "
                    "virtio-keyboard/-mouse, ramfb, pvpanic, i82559er, vmcoreinfo")
def s_q35_devices(c):
    """q35, 64 MiB, paused, a second device zoo on three 1 MiB raw drives."""
    drives = []
    for d in ("d2", "d3"):
        path = c.path(f"{d}.raw")
        with open(path, "wb") as f:
            f.truncate(MiB)
        drives += ["-drive", f"file={path},if=none,id={d},format=raw"]
    args = pc("q35", 64,
              "-netdev", "user,id=n0", "-device", "e1000e,netdev=n0,romfile=",
              "-device", "virtio-gpu-pci",
              "-device", "qemu-xhci,id=x", "-device", "usb-storage,bus=x.0,drive=d2",
              "-device", "ich9-intel-hda", "-device", "hda-output,audiodev=a0",
              "-audiodev", "none,id=a0",
              "-device", "virtio-keyboard-pci",
              "-device", "virtio-scsi-pci,id=s", "-device", "scsi-hd,drive=d3,bus=s.0",
              "-device", "ramfb", "-device", "pvpanic", "-device", "virtio-mouse-pci",
              "-device", "i82559er,romfile=", "-device", "usb-mouse,bus=x.0",
              "-device", "usb-hub,bus=x.0", "-device", "vmcoreinfo",
              "-device", "virtio-net-pci,netdev=n1,romfile=", "-netdev", "user,id=n1",
              *drives)
    run_exec_migration(c, args, ram_bytes=64 * MiB)


OLD_MACHINE_ZOO = [
    "-device", "VGA", "-device", "e1000,romfile=", "-device", "rtl8139,romfile=",
    "-device", "virtio-net-pci,romfile=", "-device", "virtio-blk-pci,drive=d0",
    "-device", "virtio-serial-pci",
    "-device", "virtserialport,chardev=c0,name=org.qmigstream.0",
    "-device", "virtio-balloon-pci", "-device", "virtio-rng-pci",
    "-device", "isa-serial,chardev=s0",
    "-device", "piix3-usb-uhci", "-device", "usb-tablet", "-device", "ich9-usb-ehci1",
    "-device", "es1370", "-device", "AC97", "-device", "intel-hda", "-device", "hda-duplex",
    "-device", "megasas", "-device", "lsi53c895a", "-device", "virtio-scsi-pci",
    "-device", "pvscsi", "-device", "ne2k_pci,romfile=", "-device", "pcnet,romfile=",
    "-device", "vmxnet3,romfile=", "-device", "i6300esb", "-device", "sdhci-pci",
    "-device", "pci-bridge,chassis_nr=1", "-device", "nec-usb-xhci", "-device", "ich9-ahci",
    "-device", "pvpanic", "-device", "ib700",
]


def old_machine_zoo(c, machine):
    disk = c.path("disk.raw")
    with open(disk, "wb") as f:
        f.truncate(MiB)
    return pc(machine, 32, "-drive", f"file={disk},if=none,id=d0,format=raw",
              "-chardev", "null,id=c0", "-chardev", "null,id=s0", *OLD_MACHINE_ZOO)


@scenario("pc-i440fx-2.2-devices", reproducible=True, only=("7.2",),
          exercises="no configuration, footers or trailer, with ~60 device sections (audio, "
                    "SCSI, NICs, USB, AHCI, bridge, watchdogs): every device section must be "
                    "bounded without a description")
def s_pc22_devices(c):
    """pc-i440fx-2.2, 32 MiB, paused, OLD_MACHINE_ZOO (NIC option ROMs off)."""
    run_exec_migration(c, old_machine_zoo(c, "pc-i440fx-2.2"), ram_bytes=32 * MiB)


@scenario("pc-i440fx-2.2-devices-vmdesc", reproducible=True, only=("7.2",),
          exercises="the same machine with suppress-vmdesc=off: byte for byte the stream of "
                    "pc-i440fx-2.2-devices followed by a VMDESCRIPTION trailer, which tells "
                    "where each device section really ends")
def s_pc22_devices_vmdesc(c):
    """pc-i440fx-2.2,suppress-vmdesc=off, otherwise as pc-i440fx-2.2-devices."""
    run_exec_migration(c, old_machine_zoo(c, "pc-i440fx-2.2,suppress-vmdesc=off"),
                       ram_bytes=32 * MiB)


def disk_pattern(size: int = MiB) -> bytes:
    """Block-device test data: 4 KiB runs of one byte each, every 8th run zero."""
    return b"".join(bytes([0 if i % 8 == 7 else (i * 37) % 255 + 1]) * PAGE
                    for i in range(size // PAGE))


@scenario("pc-{v}-block", reproducible=False, until=(9, 0),
          exercises="block migration (the block capability, removed in 9.1): the 'block' "
                    "section with DEVICE_BLOCK records, zero blocks and progress records")
def s_block(c):
    """pc, 32 MiB, paused, a 1 MiB raw virtio-blk disk holding disk_pattern(), block on."""
    disk = c.path("disk.raw")
    with open(disk, "wb") as f:
        f.write(disk_pattern())
    c.meta["disk"] = {"size": MiB, "sha256": sha256_file(disk),
                      "pattern": "tools/capture.py disk_pattern()"}
    run_exec_migration(c, pc("pc", 32, "-drive", f"file={disk},if=none,id=d0,format=raw",
                             "-device", "virtio-blk-pci,drive=d0"),
                       ram_bytes=32 * MiB, capabilities={"block": True})


@scenario("pc-{v}-dirty-bitmaps", reproducible=False,
          exercises="the dirty-bitmaps capability: a 'dirty-bitmap' section carrying two "
                    "block dirty bitmaps (one with set bits), alongside RAM")
def s_dirty_bitmaps(c):
    """pc, 32 MiB, paused, 1 MiB raw virtio-blk disk (node n0) with bitmaps bm0
    (granularity 64 KiB) and bm1 (default), 128 KiB written through HMP qemu-io
    so bm0/bm1 have bits set; dirty-bitmaps on, downtime-limit 10 s, max-bandwidth
    256 KiB/s.  The bitmaps count as pending postcopy data, so without a bandwidth
    figure (the first comes after a 100 ms window) 7.2 iterates as fast as it can:
    unlimited, that is ~20,000 empty RAM and dirty-bitmap PART sections; the
    limit makes the first window end after a few iterations."""
    disk = c.path("disk.raw")
    with open(disk, "wb") as f:
        f.truncate(MiB)

    def before(q):
        q.execute("block-dirty-bitmap-add", node="n0", name="bm0", granularity=65536)
        q.execute("block-dirty-bitmap-add", node="n0", name="bm1")
        q.hmp('qemu-io d0 "write -P 0x55 64k 128k"')
    run_exec_migration(c, pc("pc", 32, "-drive",
                             f"file={disk},if=none,id=d0,format=raw,node-name=n0",
                             "-device", "virtio-blk-pci,drive=d0"),
                       ram_bytes=32 * MiB, capabilities={"dirty-bitmaps": True},
                       parameters={"downtime-limit": 10000, "max-bandwidth": 256 * 1024},
                       before=before)


XBZRLE_PAGES = 32


@scenario("pc-{v}-running-xbzrle", reproducible=False,
          exercises="a running guest dirtying 32 pages: RAM PART iterations, XBZRLE records, "
                    "CONTINUE across sections, bandwidth-limited iteration")
def s_xbzrle(c):
    """pc, 32 MiB, boots a 512-byte MBR (mbr_dirty_loop) from a raw IDE disk; xbzrle on,
    1 MiB/s, downtime-limit 1 ms until 8 dirty syncs happened, then 10 s so it converges."""
    disk = c.path("mbr.img")
    with open(disk, "wb") as f:
        f.write(mbr_dirty_loop(XBZRLE_PAGES))
    c.meta["guest_program"] = {"sha256": sha256_file(disk), "pages": XBZRLE_PAGES,
                               "first_page": 0x10000,
                               "source": "tools/capture.py mbr_dirty_loop()"}
    state = {"raised": False}

    def before(q):
        q.execute("cont")
        wait_guest_word(q, 0x10100)

    def on_poll(q, r):
        if not state["raised"] and r.get("ram", {}).get("dirty-sync-count", 0) >= 8:
            q.set_parameters({"downtime-limit": 10000})
            state["raised"] = True

    run_exec_migration(c, pc("pc", 32, "-drive", f"file={disk},format=raw,if=ide"),
                       ram_bytes=32 * MiB,
                       capabilities={"xbzrle": True},
                       parameters={"max-bandwidth": MiB, "downtime-limit": 1,
                                   "xbzrle-cache-size": 4 * MiB},
                       before=before, on_poll=on_poll)


def wait_guest_word(q, addr, timeout=30):
    """Wait until the guest has started changing the 16-bit word at ``addr``."""
    deadline = time.monotonic() + timeout
    while True:
        out = q.qmp.execute("human-monitor-command", **{"command-line": f"xp /1hx 0x{addr:x}"})
        val = int(out.split(":")[1].split()[0], 16)
        if val:
            return
        if time.monotonic() > deadline:
            raise QemuError("the guest program did not start")
        time.sleep(0.05)


COMPRESS_ADDR, COMPRESS_PAGES = 0x200000, 128


@scenario("pc-{v}-compress", reproducible=False, until=(9, 0),
          exercises="the compress capability: COMPRESS_PAGE records (zlib) for non-zero pages")
def s_compress(c):
    """pc, 32 MiB, 128 text-like pages at 2 MiB via -device loader, compress on
    (2 threads, level 1)."""
    blob = c.path("text.bin")
    with open(blob, "wb") as f:
        f.write(compressible_pattern(COMPRESS_PAGES))
    c.meta["loader"] = {"addr": COMPRESS_ADDR, "pages": COMPRESS_PAGES,
                        "sha256": sha256_file(blob),
                        "pattern": "tools/capture.py compressible_pattern(pages)"}
    run_exec_migration(c, pc("pc", 32, "-device",
                             f"loader,file={blob},addr=0x{COMPRESS_ADDR:x},force-raw=on"),
                       ram_bytes=32 * MiB, capabilities={"compress": True},
                       parameters={"compress-threads": 2, "compress-level": 1})


UUID = "5d1a1b8e-6a3c-4c43-9d6e-2a0e7c1f0a55"


@scenario("pc-{v}-ignore-shared-uuid", reproducible=True,
          exercises="configuration/capabilities (x-ignore-shared) and configuration/uuid "
                    "subsections; MEM_SIZE with per-block mr_addr; shared RAM not sent")
def s_ignore_shared(c):
    """pc, 32 MiB RAM from a shared memfd backend (from 8.0 a shared file backend:
    10.0 and 11.1 send memfd RAM despite x-ignore-shared), -uuid fixed,
    x-ignore-shared and validate-uuid on."""
    if c.release >= (8, 0):
        # newer QEMUs ignore only shared RAM backed by a named file (a memfd is sent)
        backend = f"memory-backend-file,id=mem,size=32M,share=on,mem-path={c.path('ram')}"
    else:
        backend = "memory-backend-memfd,id=mem,size=32M,share=on"
    args = ["-object", backend, "-machine", "pc,memory-backend=mem", "-m", "32", "-uuid", UUID]
    run_exec_migration(c, args, ram_bytes=32 * MiB,
                       capabilities={"x-ignore-shared": True, "validate-uuid": True})


@scenario("pc-{v}-postcopy-advised", reproducible=True,
          exercises="commands: OPEN_RETURN_PATH, PING, POSTCOPY_ADVISE (postcopy-ram on, "
                    "never switched to postcopy)")
def s_postcopy(c):
    """pc, 32 MiB, paused, postcopy-ram on, migrated to a unix socket served by
    UnixSink(return_path=True), which answers MIG_RP_MSG_SHUT(0) after the trailer."""
    _return_path_migration(c, {})


@scenario("pc-{v}-postcopy", reproducible=False,
          exercises="a migration switched to postcopy: POSTCOPY_RAM_DISCARD per block, "
                    "PACKAGED with the nested device stream (POSTCOPY_LISTEN, device "
                    "sections, PING, POSTCOPY_RUN), then the postcopy RAM pages; no trailer")
def s_postcopy_run(c):
    """pc, 32 MiB, paused, postcopy-ram on, max-bandwidth 64 KiB/s so pre-copy is still
    running 0.5 s later, when migrate-start-postcopy switches; UnixSink(return_path=True)
    answers PINGs and sends MIG_RP_MSG_SHUT once the stream has reached its EOF."""
    def switch(q):
        # 7.2 is still in its first pass after 0.5 s; 10.0+ completes sooner
        time.sleep(0.5 if c.release < (8, 0) else 0.05)
        q.execute("migrate-start-postcopy")
    _return_path_migration(c, {"max-bandwidth": 64 << 10}, after_start=switch)


def _return_path_migration(c, parameters, after_start=None):
    """postcopy-ram on, to UnixSink(return_path=True); the main stream is the capture."""
    sock = c.path("mig.sock")
    with UnixSink(sock, return_path=True) as sink, \
            Qemu(pc(), workdir=c.path("qemu")) as q:
        version = q.version()
        q.set_capabilities({"postcopy-ram": True})
        if parameters:
            q.set_parameters(parameters)
        q.execute("migrate", uri=sink.uri)
        if after_start:
            after_start(q)
        final = q.wait_migration(60)
        check_completed(q, final)
        q.wait_status("postmigrate")
        c.ram_dumps(q, 32 * MiB)
        c.record(q, version, final)
        q.quit()
        sink.wait_idle(10)
        main = [s for s in sink.streams if s[:4] == b"QEVM"]
        if len(main) != 1 or not sink.shut_sent:
            raise QemuError("return-path sink did not see exactly one complete stream")
        with open(c.stream, "wb") as f:
            f.write(main[0])
    c.meta["sink"] = "qmigstream.qemu.runner.UnixSink(return_path=True)"


MULTIFD_CHANNELS = 2


@scenario("pc-{v}-multifd", reproducible=False,
          exercises="multifd: the main stream (zero pages, MULTIFD_FLUSH-free 7.2 RAM "
                    "sections) and each channel (MultiFDInit_t, packets, normal pages)")
def s_multifd(c):
    """pc, 32 MiB, 64 loader_pattern pages at 2 MiB, multifd with 2 channels over a unix
    socket served by UnixSink: every connection recorded."""
    _multifd(c, {})


@scenario("pc-{v}-multifd-zlib", reproducible=False,
          exercises="multifd-compression=zlib: each channel's pages as one zlib stream "
                    "running across its packets")
def s_multifd_zlib(c):
    """As pc-{v}-multifd, with multifd-compression zlib (level 1)."""
    _multifd(c, {"multifd-compression": "zlib", "multifd-zlib-level": 1})


def _multifd(c, parameters):
    blob = c.path("loader.bin")
    with open(blob, "wb") as f:
        f.write(loader_pattern(LOADER_SEED, LOADER_PAGES))
    c.meta["loader"] = {"addr": LOADER_ADDR, "pages": LOADER_PAGES, "seed": LOADER_SEED,
                        "sha256": sha256_file(blob)}
    sock = c.path("mig.sock")
    args = pc("pc", 32, "-device", f"loader,file={blob},addr=0x{LOADER_ADDR:x},force-raw=on")
    with UnixSink(sock) as sink, Qemu(args, workdir=c.path("qemu")) as q:
        version = q.version()
        q.set_capabilities({"multifd": True})
        q.set_parameters({"multifd-channels": MULTIFD_CHANNELS, **parameters})
        q.execute("migrate", uri=sink.uri)
        final = q.wait_migration(60)
        check_completed(q, final)
        q.wait_status("postmigrate")
        c.ram_dumps(q, 32 * MiB)
        c.record(q, version, final)
        q.quit()
        sink.wait_idle(10, connections=1 + MULTIFD_CHANNELS)
        main = [s for s in sink.streams if s[:4] == b"QEVM"]
        chans = [s for s in sink.streams if s[:4] == b"\x11\x22\x33\x44"]
        if len(main) != 1 or len(chans) != MULTIFD_CHANNELS:
            raise QemuError(f"sink saw {len(sink.streams)} connections: "
                            f"{[bytes(s[:4]).hex() for s in sink.streams]}")
        with open(c.stream, "wb") as f:
            f.write(main[0])
        # order channels by the id in MultiFDInit_t (be32 magic, be32 version, 16 uuid, u8 id)
        for ch in sorted(chans, key=lambda s: s[24]):
            p = c.path(f"{c.name}.ch{ch[24]}")
            with open(p, "wb") as f:
                f.write(ch)
            c.channels.append(p)


@scenario("pc-{v}-mapped-ram", reproducible=True, since=(9, 0),
          exercises="a mapped-ram file (file: migration, mapped-ram capability): "
                    "configuration/capabilities, MEM_SIZE with each block's MappedRamHeader, "
                    "dirty bitmaps and page areas at fixed file offsets")
def s_mapped_ram(c):
    """pc, 32 MiB, paused, 64 loader_pattern pages at 2 MiB, mapped-ram on,
    migrate to file:."""
    _mapped_ram(c, {"mapped-ram": True}, {})


def _mapped_ram(c, capabilities, parameters):
    blob = c.path("loader.bin")
    with open(blob, "wb") as f:
        f.write(loader_pattern(LOADER_SEED, LOADER_PAGES))
    c.meta["loader"] = {"addr": LOADER_ADDR, "pages": LOADER_PAGES, "seed": LOADER_SEED,
                        "sha256": sha256_file(blob)}
    args = pc("pc", 32, "-device", f"loader,file={blob},addr=0x{LOADER_ADDR:x},force-raw=on")
    with Qemu(args, workdir=c.path("qemu")) as q:
        version = q.version()
        q.set_capabilities(capabilities)
        q.set_parameters(parameters)
        q.execute("migrate", uri=f"file:{c.stream}")
        final = q.wait_migration(60)
        check_completed(q, final)
        q.wait_status("postmigrate")
        c.ram_dumps(q, 32 * MiB)
        c.record(q, version, final)


SNAPSHOT = "snap1"


@scenario("pc-{v}-savevm", reproducible=False,
          exercises="savevm vmstate cut out of a qcow2 image by qmigstream.qcow2 "
                    "(snapshot table, snapshot L1/L2), same records as a migration stream")
def s_savevm(c):
    """pc, 32 MiB, paused, a 1 MiB qcow2 disk on IDE; HMP savevm snap1; the vmstate is
    cut out with qmigstream.qcow2 and checked against qemu-img snapshot -a + qemu-io."""
    from qmigstream import qcow2
    img = c.path("disk.qcow2")
    if os.path.exists(img):
        os.unlink(img)
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", img, "1M"], check=True)
    args = pc("pc", 32, "-drive", f"file={img},format=qcow2,if=ide")
    with Qemu(args, workdir=c.path("qemu")) as q:
        version = q.version()
        out = q.hmp(f"savevm {SNAPSHOT}")
        if out.strip():
            raise QemuError(f"savevm: {out.strip()}")
        info = q.hmp("info snapshots")
        c.ram_dumps(q, 32 * MiB)
        c.record(q, version, None)
        c.meta["hmp_info_snapshots"] = info
        q.quit()
    with open(img, "rb") as f:
        image = qcow2.Qcow2Image(f)
        snap = image.snapshot(SNAPSHOT)
        with open(c.stream, "wb") as out:
            image.copy_vmstate(snap, out)
        c.meta["qcow2"] = {"virtual_size": image.size, "cluster_size": image.cluster_size,
                           "vmstate_offset": image.vmstate_offset(snap),
                           "vm_state_size": snap.vm_state_size,
                           "image_size": os.path.getsize(img),
                           "image_sha256": sha256_file(img)}
    # independent check: revert a copy and read the vmstate area back with qemu-io
    copy = c.path("copy.qcow2")
    shutil.copyfile(img, copy)
    subprocess.run([QEMU_IMG, "snapshot", "-a", SNAPSHOT, copy], check=True)
    back = qemu_io_read_vmstate(copy, c.meta["qcow2"]["vm_state_size"])
    if sha256_file(c.stream) != hashlib.sha256(back).hexdigest():
        raise QemuError("vmstate cut differs from what qemu-io reads back")
    c.meta["qcow2"]["qemu_io_check"] = "equal"
    os.unlink(copy)
    c.extra_files["qcow2"] = img


def qemu_io_read_vmstate(image, size, chunk=64 * 1024):
    """The vmstate area of ``image``'s active state, read with ``qemu-io -c 'read -b -v'``."""
    out = bytearray()
    off = 0
    while off < size:
        n = min(chunk, size - off)
        padded = n + (-n % 512)          # qemu-io wants whole sectors
        r = subprocess.run([QEMU_IO, "-f", "qcow2", "-c", f"read -b -v {off} {padded}", image],
                           check=True, capture_output=True, text=True)
        out += parse_qemu_io_dump(r.stdout, off, padded)[:n]
        off += n
    return bytes(out)


def parse_qemu_io_dump(text, off, n):
    """Bytes from qemu-io's ``read -v`` hex dump (``OFFSET:  xx xx ...  ascii``)."""
    data = bytearray()
    for line in text.splitlines():
        if ":" not in line or not line[:8].strip():
            continue
        head, rest = line.split(":", 1)
        try:
            addr = int(head, 16)
        except ValueError:
            continue
        if addr != off + len(data):
            raise QemuError(f"unexpected qemu-io dump line {line!r}")
        hexpart = rest[:50].split()
        data += bytes(int(h, 16) for h in hexpart[:16])
    if len(data) != n:
        raise QemuError(f"qemu-io gave {len(data)} bytes, not {n}")
    return bytes(data)


# -- writing ---------------------------------------------------------------------------
def xz(src, dst):
    with open(src, "rb") as f, lzma.open(dst, "wb", preset=XZ_PRESET) as g:
        shutil.copyfileobj(f, g)
    return os.path.getsize(dst)


def file_entry(path):
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def run_scenario(name, template, out_dir, work_root, verify, release):
    sc = SCENARIOS[template]
    work = os.path.join(work_root, name)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    key = tuple(int(x) for x in release.split("."))
    c = Capture(name, work, key)
    t0 = time.monotonic()
    sc["fn"](c)
    seconds = time.monotonic() - t0
    made_by = f"python3 tools/capture.py {name} --out fixtures/captures"
    if release != "7.2":
        made_by = (f"eval \"$(tools/debian-qemu {release})\" && " + made_by)
    meta = {"name": name, "release": release, "what": sc["doc"].replace("{v}", release),
            "exercises": sc["exercises"].replace("{v}", release),
            "made_by": made_by, "reproducible": sc["reproducible"]}
    if not sc["reproducible"]:
        meta["not_reproducible_because"] = NOT_REPRODUCIBLE.get(template, "")
    stream = {"file": f"{name}.mig.xz", **file_entry(c.stream)}
    meta["stream"] = stream
    if sc["reproducible"] and verify:
        first = stream["sha256"]
        c2 = Capture(name, work, key)
        os.unlink(c.stream)
        sc["fn"](c2)
        meta["reproducible_checked"] = sha256_file(c2.stream) == first
        if not meta["reproducible_checked"]:
            print(f"{name}: WARNING: second run gave different bytes", file=sys.stderr)
        c = c2
        stream = meta["stream"] = {"file": f"{name}.mig.xz", **file_entry(c.stream)}
    meta.update(c.meta)
    xz_size = xz(c.stream, os.path.join(out_dir, stream["file"]))
    stream["xz_size"] = xz_size
    if c.channels:
        meta["channels"] = []
        for i, p in enumerate(c.channels):
            e = {"file": None, **file_entry(p)}
            dst = os.path.join(out_dir, f"{name}.ch{i}.xz")
            size = xz(p, dst)
            if size <= CHANNEL_COMMIT_LIMIT:
                e["file"] = os.path.basename(dst)
                e["xz_size"] = size
            else:
                os.unlink(dst)
            meta["channels"].append(e)
    meta["memory"] = []
    for m in c.memory:
        e = {"addr": m["addr"], "size": m["size"], "sha256": m["sha256"], "file": None}
        dst = os.path.join(out_dir, f"{name}.mem-0x{m['addr']:x}.xz")
        size = xz(m["path"], dst)
        if size <= MEM_COMMIT_LIMIT:
            e["file"] = os.path.basename(dst)
        else:
            os.unlink(dst)
        meta["memory"].append(e)
    for suffix, p in c.extra_files.items():
        dst = os.path.join(out_dir, f"{name}.{suffix}.xz")
        xz(p, dst)
        meta.setdefault("files", {})[suffix] = {"file": os.path.basename(dst), **file_entry(p)}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=False)
        f.write("\n")
    print(f"{name}: {stream['size']} bytes, xz {xz_size}, {seconds:.1f}s", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)


NOT_REPRODUCIBLE = {
    "pc-{v}-running-xbzrle": "the guest runs: how many iterations and which pages are dirty "
                             "in each depend on host timing",
    "pc-{v}-compress": "compression threads finish in host-dependent order",
    "pc-{v}-multifd": "pages are spread over channels in host-dependent order",
    "pc-{v}-postcopy": "where pre-copy stands when postcopy starts depends on host timing",
    "pc-{v}-multifd-zlib": "pages are spread over channels in host-dependent order",
    "pc-{v}-block": "disk reads complete asynchronously: whether the data block goes out in "
                    "the first or a later iteration depends on host I/O timing",
    "pc-{v}-dirty-bitmaps": "the number of iterations follows the 100 ms bandwidth windows "
                            "(host timing); repeated runs here gave the same bytes",
    "pc-{v}-savevm": "the qcow2 snapshot table records the host date of the savevm; the "
                     "vmstate itself follows the same path as a paused migration",
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenarios", nargs="*", help="names (default: all)")
    ap.add_argument("--out", default="fixtures/captures")
    ap.add_argument("--work", default="/tmp/qmigstream-capture",
                    help="scratch directory (fixed, so the recorded command lines are too)")
    ap.add_argument("--no-verify", action="store_true",
                    help="make reproducible captures once instead of twice")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        release = release_of(qemu_binary() or "qemu-system-x86_64")
        for n, template in scenarios_for(release).items():
            sc = SCENARIOS[template]
            print(f"{n:28} {'reproducible' if sc['reproducible'] else 'not reproducible':17}"
                  f" {sc['exercises']}")
        return 0
    release = release_of(qemu_binary() or "qemu-system-x86_64")
    known = scenarios_for(release)
    names = a.scenarios or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown scenario(s) for QEMU {release}: {', '.join(unknown)}")
    os.makedirs(a.out, exist_ok=True)
    for n in names:
        run_scenario(n, known[n], a.out, a.work, not a.no_verify, release)
    return 0


if __name__ == "__main__":
    sys.exit(main())
