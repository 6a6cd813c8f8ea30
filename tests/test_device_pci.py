"""The emulated PCI device, its blob format, the v2 data file, PRECOPY_INFO, DMA logging."""

import errno
import struct
import zlib

import pytest

from qmigstream.device.blob import (BLOB_OVERHEAD, HEADER_SIZE, KIND_FULL, build_blob,
                                    crc32c, parse_blobs)
from qmigstream.device.device_v2 import LOG_MAX_RANGES, VfioDeviceV2, drain
from qmigstream.device.fsm import MigState
from qmigstream.device.pci_device import (MTTY_MAGIC, EmulatedPciDevice, MttyHeader,
                                          MttyPort, SparseGuestMemory)
from qmigstream.errors import DeviceError


def fails(errno_, fn, *a, **kw):
    with pytest.raises(DeviceError) as ei:
        fn(*a, **kw)
    assert ei.value.errno == errno_, (ei.value.errno, str(ei.value))
    return ei.value


def v2(profile="sized:4096", seed=1, features="p2p,pre_copy", **kw):
    return VfioDeviceV2(EmulatedPciDevice(profile, seed=seed, memory=SparseGuestMemory(), **kw),
                        features=features)


def save_stop_copy(dev):
    dev.set_state("STOP")
    f = dev.set_state("STOP_COPY")
    data, end = drain(f)
    assert end == "EOF"
    dev.set_state("STOP")
    return data


# -- config space ------------------------------------------------------------------

def test_mtty_config_space():
    d = EmulatedPciDevice("mtty2")
    cfg = d.config
    assert cfg.read(0, 4) == 0x32534348            # mtty's ID dword
    assert cfg.read(0x08, 4) == 0x07000210         # class 07/00/02, revision 0x10
    assert cfg.read(0x2C, 4) == 0x32534348
    assert cfg.read(0x3D, 1) == 1
    assert cfg.bar_size(0) == 8 and cfg.bar_size(1) == 8 and cfg.bar_size(2) == 0
    assert cfg.read(0x10, 4) & 1 == 1              # I/O BAR
    assert cfg.capabilities() == []
    assert EmulatedPciDevice("mtty").config.bar_size(1) == 0


def test_sized_config_space_bars_and_capabilities():
    cfg = EmulatedPciDevice("sized:0").config
    assert cfg.read(0, 2) == 0x1B36 and cfg.read(2, 2) == 0x11F0
    assert cfg.read(0x09, 1) == 0 and cfg.read(0x0B, 1) == 0x12
    assert cfg.read(0x06, 2) & 0x10                # capability list present
    assert cfg.bar_size(0) == 16 * 1024 and cfg.read(0x10, 4) & 0x6 == 0x4   # 64-bit
    assert cfg.bar_size(2) == 8 * 1024
    caps = cfg.capabilities()
    assert [cid for _, cid in caps] == [0x05, 0x11]
    msi, msix = caps[0][0], caps[1][0]
    assert cfg.read(msi + 2, 2) & 0x80             # 64-bit MSI
    assert (cfg.read(msi + 2, 2) >> 1) & 7 == 2    # 4 vectors requested
    assert cfg.read(msix + 2, 2) & 0x7FF == 7      # 8 vectors
    assert cfg.read(msix + 4, 4) & 7 == 2          # table in BAR2


def test_config_write_masks():
    cfg = EmulatedPciDevice("sized:0").config
    cfg.write(0, 2, 0xFFFF)                        # vendor ID is read-only
    assert cfg.read(0, 2) == 0x1B36
    cfg.write(0x10, 4, 0xFEDC0000)                 # BAR address
    assert cfg.read(0x10, 4) == 0xFEDC0004
    cfg.write(0x3C, 1, 0x0B)
    assert cfg.read(0x3C, 1) == 0x0B
    fails(errno.EINVAL, cfg.read, 0xFE, 4)


# -- profiles and images -----------------------------------------------------------

def test_mtty_image_layout_and_size():
    for ports, size in ((1, 60), (2, 96)):
        d = EmulatedPciDevice(f"mtty{ports}", seed=7)
        img = d.image()
        assert len(img) == size == MttyHeader.sizeof() + ports * MttyPort.sizeof()
        h = MttyHeader.parse(img[:24])
        assert (h.magic, h.major_ver, h.minor_ver, h.nr_ports, h.flags) == (
            MTTY_MAGIC, 1, 0, ports, 0)
        p = MttyPort.parse(img[24:60])
        assert p.max_fifo_size == 16 and p.count == 0


def test_sized_profile_sizes():
    assert len(EmulatedPciDevice("sized:0").image()) == 64
    assert len(EmulatedPciDevice("sized:1000").image()) == 1064


@pytest.mark.slow
def test_sized_profile_64_mib_is_cheap_and_roundtrips():
    src = v2("sized:64m", seed=3, features="none")
    dst = v2("sized:64m", seed=4, features="none")
    assert len(src.device.image()) == 64 * 2**20 + 64
    data = save_stop_copy(src)
    assert len(data) == 64 * 2**20 + 64 + BLOB_OVERHEAD
    dst.set_state("STOP")
    g = dst.set_state("RESUMING")
    for i in range(0, len(data), 1 << 20):
        g.write(data[i:i + (1 << 20)])
    dst.set_state("STOP")
    assert dst.device.image_digest() == src.device.image_digest()


def test_determinism():
    def make(seed):
        d = EmulatedPciDevice("sized:20000", seed=seed, memory=SparseGuestMemory(),
                              dma_pages_per_tick=3, dma_pages=32)
        gpas = d.run(20)
        return d, gpas
    a, ga = make(42)
    b, gb = make(42)
    c, gc = make(43)
    assert ga == gb and a.image() == b.image() and a.memory.pages == b.memory.pages
    assert a.written_pages == b.written_pages and a.state_digest() == b.state_digest()
    assert a == b
    assert ga != gc and a.image() != c.image() and a != c
    # the saved streams are identical byte for byte
    assert save_stop_copy(VfioDeviceV2(a, features="none")) == \
        save_stop_copy(VfioDeviceV2(b, features="none"))


def test_dma_writes_guest_memory_and_only_while_running():
    d = EmulatedPciDevice("mtty", seed=5, memory=SparseGuestMemory(), dma_pages=4)
    (gpa,) = d.run(1)
    assert d.dma_base <= gpa < d.dma_base + 4 * 4096 and gpa % 4096 == 0
    page = d.memory.read(gpa, 4096)
    assert page[:8] == struct.pack("<Q", 5) and page[:16] * 256 == page
    assert d.written_pages == {gpa // 4096}
    d.running = False
    assert d.run(3) == []
    fails(errno.EBUSY, d.dma_write, 0, b"x")


# -- the blob --------------------------------------------------------------------

def test_blob_format():
    d = EmulatedPciDevice("mtty", seed=1)
    data = save_stop_copy(VfioDeviceV2(d, features="none"))
    assert len(data) == HEADER_SIZE + 60 + 4
    assert data[:4] == b"QMDV" and struct.unpack_from("<HBB", data, 4) == (2, KIND_FULL, 1)
    assert struct.unpack_from("<Q", data, 16)[0] == 60
    assert data[24:84] == d.image()
    assert struct.unpack_from("<I", data, 84)[0] == zlib.crc32(data[:84])
    assert zlib.crc32(b"123456789") == 0xCBF43926   # CRC-32 (ISO-HDLC) check value
    assert crc32c(b"123456789") == 0xE3069283       # CRC-32C check value (version 1)


@pytest.mark.parametrize("profile", ["mtty", "sized:3000"])
def test_version_1_blobs_still_load(profile):
    """Version 1 (CRC-32C) data, as earlier releases of the device wrote it, loads."""
    src = EmulatedPciDevice(profile, seed=4)
    pid = src.profile.profile_id
    img = src.image()
    blob = build_blob(KIND_FULL, img, profile=pid, seq=0, last=True, version=1)
    assert struct.unpack_from("<H", blob, 4)[0] == 1
    assert struct.unpack_from("<I", blob, len(blob) - 4)[0] == crc32c(blob[:-4])
    dst, g, before = resume_with(profile, blob)
    bad = bytearray(blob)
    bad[-4:] = struct.pack("<I", zlib.crc32(blob[:-4]))      # a version 2 CRC: wrong
    fails(errno.EINVAL, g.write, bytes(bad))
    assert dst.device.state_digest() == before
    assert g.write(blob) == len(blob)
    dst.set_state("RUNNING")
    assert dst.device.image() == img


@pytest.mark.parametrize("step", [1, 7, 24, 25, 3000, 3024, 3027, 3028])
def test_full_blob_staged_in_pieces(step):
    """A FULL blob written in pieces of any size (its payload is staged as it comes):
    a bad CRC rejects the write that completes it and leaves everything as it was;
    the right bytes then load on the same file."""
    src = v2("sized:2960", seed=2)
    good = save_stop_copy(src)
    bad = bytearray(good)
    bad[100] ^= 0x40
    dst, g, before = resume_with("sized:2960", bytes(bad))
    pieces = [bytes(bad[i:i + step]) for i in range(0, len(bad), step)]
    for p in pieces[:-1]:
        assert g.write(p) == len(p)
    fails(errno.EINVAL, g.write, pieces[-1])
    assert dst.device.state_digest() == before
    # the last piece again, with the bad byte fixed when it is in that piece
    last = bytearray(pieces[-1])
    start = len(bad) - len(last)
    if start <= 100:
        last[100 - start] ^= 0x40
        assert g.write(bytes(last)) == len(last)
        dst.set_state("RUNNING")
        assert dst.device.image() == src.device.image()
    else:
        fails(errno.EINVAL, g.write, bytes(last))   # the bad byte is staged already
        fails(errno.EINVAL, dst.set_state, "STOP")  # short: the blob never completed
        assert dst.device.state_digest() == before


def resume_with(profile, data, seed=9, **kw):
    """A destination that gets ``data``: returns (device, file, digest before)."""
    dst = v2(profile, seed=seed, **kw)
    before = dst.device.state_digest()
    dst.set_state("STOP")
    g = dst.set_state("RESUMING")
    return dst, g, before


@pytest.mark.parametrize("profile,bad_header", [("mtty", errno.EFAULT),
                                                ("sized:3000", errno.EINVAL)])
def test_rejections_keep_previous_state(profile, bad_header):
    src = v2(profile, seed=2)
    good = save_stop_copy(src)

    def check(mutated, err_write=None, err_leave=None):
        dst, g, before = resume_with(profile, mutated)
        if err_write is not None:
            fails(err_write, g.write, mutated)
        else:
            assert g.write(mutated) == len(mutated)
        if err_leave is not None:
            fails(err_leave, dst.set_state, "STOP")
        assert dst.state == MigState.RESUMING
        assert dst.device.state_digest() == before           # exactly as before
        # still usable: the good data loads on the same file afterwards
        if err_write is not None:
            g.write(good)
            dst.set_state("RUNNING")
            assert dst.device.image() == src.device.image()

    bad = bytearray(good)
    bad[0:4] = b"XXXX"
    check(bytes(bad), err_write=bad_header)                   # wrong magic
    bad = bytearray(good)
    bad[4:6] = struct.pack("<H", 3)
    check(bytes(bad), err_write=bad_header)                   # wrong version
    bad = bytearray(good)
    bad[30] ^= 1
    check(bytes(bad), err_write=errno.EINVAL)                 # corrupt payload (CRC)
    bad = bytearray(good)
    bad[16:24] = struct.pack("<Q", 1 << 40)
    check(bytes(bad), err_write=errno.ENOMEM)                 # oversized
    check(good[:-1], err_leave=errno.EINVAL)                  # short (CRC byte missing)
    check(good[:10], err_leave=errno.EINVAL)                  # short (header only)
    check(good + good[:HEADER_SIZE], err_write=errno.EINVAL)  # data after the LAST blob


def test_full_image_of_wrong_size_is_rejected():
    img = EmulatedPciDevice("sized:100").image()
    blob = build_blob(KIND_FULL, img, profile=0x535A4431, seq=0, last=True)
    dst, g, before = resume_with("sized:200", blob)
    fails(errno.EINVAL, g.write, blob)
    assert dst.device.state_digest() == before


def test_mtty_payload_header_mismatch_is_efault():
    img = bytearray(EmulatedPciDevice("mtty2", seed=1).image())
    img[16:20] = struct.pack("<I", 1)                         # nr_ports = 1 in a 2-port image
    blob = build_blob(KIND_FULL, img, profile=0x6D747402, seq=0, last=True)
    dst, g, before = resume_with("mtty2", blob)
    fails(errno.EFAULT, g.write, blob)
    assert dst.device.state_digest() == before


def test_internal_failure_goes_to_error_until_reset():
    dev = v2("mtty")
    before = dev.device.state_digest()
    dev.inject_fault(errno.EIO)
    fails(errno.EIO, dev.set_state, "STOP")
    assert dev.state == MigState.ERROR
    for s in ("STOP", "RUNNING", "RESUMING", "STOP_COPY"):
        fails(errno.EINVAL, dev.set_state, s)
    assert dev.set_state("ERROR") is None                     # same state: no arc
    dev.reset()
    assert dev.state == MigState.RUNNING and dev.device.state_digest() == before


# -- the data file ----------------------------------------------------------------------

def test_precopy_initial_then_dirty_then_stop_copy():
    src = v2("sized:10000", seed=4)
    dst = v2("sized:10000", seed=5)
    f = src.set_state("PRE_COPY")
    assert f is not None and src.state == MigState.PRE_COPY
    full = HEADER_SIZE + 10064 + 4
    assert f.precopy_info() == (full, 0)
    chunk = f.read(1000)
    assert len(chunk) == 1000                                 # short read of the buffer size
    assert f.precopy_info() == (full - 1000, 0)
    rest, end = drain(f)
    assert end == "ENOMSG"                                    # temporary end of data
    assert f.precopy_info() == (0, 0)                         # initial data sent
    src.device.run(2)
    initial, dirty = f.precopy_info()
    assert initial == 0 and dirty > 0
    more, end = drain(f)
    assert end == "ENOMSG" and len(more) == dirty
    src.device.run(1)
    assert src.set_state("STOP_COPY") is None                 # same file goes on
    fails(errno.EINVAL, f.precopy_info)                       # only in PRE_COPY states
    final, end = drain(f, 100)
    assert end == "EOF" and f.read(10) == b""
    stream = chunk + rest + more + final
    kinds = [(b["kind"], b["flags"]) for b in parse_blobs(stream)]
    assert kinds == [(1, 0), (2, 0), (2, 1)]
    src.set_state("STOP")
    fails(errno.ENODEV, f.read, 10)                           # session ended
    dst.set_state("STOP")
    g = dst.set_state("RESUMING")
    for i in range(0, len(stream), 333):
        g.write(stream[i:i + 333])
    dst.set_state("RUNNING")
    dst.device.load_config_space(src.device.config_space())
    assert dst.device == src.device


def test_reads_are_bounded_by_device_chunking():
    src = v2("sized:100000", seed=1, features="none", chunk_size=4096)
    src.set_state("STOP")
    f = src.set_state("STOP_COPY")
    sizes = []
    while True:
        b = f.read(1 << 20)
        if not b:
            break
        sizes.append(len(b))
    assert max(sizes) == 4096 and sum(sizes) == 100064 + BLOB_OVERHEAD


def test_file_direction_and_ioctl_errors():
    dev = v2("mtty")
    dev.set_state("STOP")
    g = dev.set_state("RESUMING")
    fails(errno.EINVAL, g.read, 10)
    fails(errno.ENOTTY, g.precopy_info)
    src = v2("mtty")
    f = src.set_state("PRE_COPY")
    fails(errno.EINVAL, f.write, b"x")


def test_mig_data_size():
    assert v2("mtty").mig_data_size() == 60 + BLOB_OVERHEAD
    assert v2("sized:5000").mig_data_size() == 5064 + BLOB_OVERHEAD


def test_new_file_only_when_a_session_starts():
    dev = v2("mtty", features="none")
    assert dev.set_state("STOP") is None
    assert dev.set_state("STOP_COPY") is not None
    assert dev.set_state("RUNNING") is None
    dev2 = v2("mtty")
    f = dev2.set_state("PRE_COPY_P2P")
    assert f is not None and [b.name for _, b in dev2.arcs] == ["RUNNING_P2P", "PRE_COPY_P2P"]
    assert dev2.set_state("PRE_COPY") is None
    assert dev2.set_state("RUNNING") is None
    fails(errno.ENODEV, f.read, 1)


# -- DMA logging -------------------------------------------------------------------------

def test_dma_logging_start_validation():
    dev = v2("mtty")
    fails(errno.EINVAL, dev.dma_logging_start, [], 4096)
    fails(errno.E2BIG, dev.dma_logging_start,
          [(i * 8192, 4096) for i in range(LOG_MAX_RANGES + 1)], 4096)
    fails(errno.EINVAL, dev.dma_logging_start, [(4096 + 1, 4096)], 4096)      # iova
    fails(errno.EINVAL, dev.dma_logging_start, [(0, 4096 + 512)], 4096)       # length
    fails(errno.EINVAL, dev.dma_logging_start, [(0, 8192), (4096, 4096)], 4096)  # overlap
    fails(errno.EOVERFLOW, dev.dma_logging_start, [(2**64 - 4096, 8192)], 4096)
    fails(errno.EINVAL, dev.dma_logging_report, 0, 4096, 4096)                 # not started
    assert dev.dma_logging_start([(i * 8192, 4096) for i in range(LOG_MAX_RANGES)],
                                 4096) == 4096
    fails(errno.EINVAL, dev.dma_logging_start, [(0, 4096)], 4096)             # twice
    dev.dma_logging_stop()


def test_dma_logging_report_bitmap_and_clear():
    dev = v2("mtty")
    d = dev.device
    dev.dma_logging_start([(0x100000, 0x100000), (0x400000, 0x10000)], 4096)
    for gpa in (0x100000, 0x103000, 0x1FF000, 0x400000 + 0x4000, 0x300000):
        d.dma_write(gpa, b"z" * 16)
    words = dev.dma_logging_report(0x100000, 0x100000, 4096)
    assert len(words) == 4                                     # 256 pages = 4 u64
    assert words[0] == 0b1001 and words[3] == 1 << 63 and words[1] == words[2] == 0
    assert dev.dma_logging_report(0x100000, 0x100000, 4096) == [0, 0, 0, 0]   # cleared
    # a report page size larger than the logging one: bits are merged
    assert dev.bitmap_pages(dev.dma_logging_report(0x400000, 0x10000, 0x8000),
                            0x400000, 0x8000) == {0x400000}
    # 0x300000 was outside every range: never logged
    assert dev.dma_logging_report(0x300000, 0x1000, 4096) == [0]
    fails(errno.EINVAL, dev.dma_logging_report, 0x100000, 4096, 2048)
    fails(errno.EINVAL, dev.dma_logging_report, 0x100000, 4096, 12288)
    fails(errno.EOVERFLOW, dev.dma_logging_report, 2**64 - 4096, 8192, 4096)
    dev.dma_logging_stop()
    fails(errno.EINVAL, dev.dma_logging_report, 0x100000, 4096, 4096)


def test_dma_logging_sees_the_engine():
    dev = v2("sized:64", seed=9)
    d = dev.device
    base, n = d.dma_base, d.dma_pages
    dev.dma_logging_start([(base, n * 4096)], 4096)
    gpas = d.run(10)
    words = dev.dma_logging_report(base, n * 4096, 4096)
    assert dev.bitmap_pages(words, base, 4096) == set(gpas)


def test_full_blob_keeps_the_image_of_its_session_start():
    """The FULL blob holds the device image itself (no copy); a change of the image
    while the blob is still being read copies the image first, so the blob stays the
    image as it was when PRE_COPY began, and its CRC holds."""
    src = v2("sized:20000", seed=3)
    before = src.device.image()
    f = src.set_state("PRE_COPY")
    first = f.read(5000)
    src.device.run(3)                                   # DMA ticks change the image
    assert src.device.image() != before
    rest, end = drain(f)                                # the FULL blob, then a DELTA
    assert end == "ENOMSG"
    full = parse_blobs(first + rest)[0]
    assert full["kind"] == KIND_FULL and full["payload"] == before
    src.device.run(2)
    more, _ = drain(f)
    src.set_state("STOP_COPY")
    final, end = drain(f)
    dst, g, _ = resume_with("sized:20000", b"")
    for piece in (first, rest, more, final):
        if piece:
            g.write(piece)
    dst.set_state("RUNNING")
    assert dst.device.image() == src.device.image()


def test_state_digest_later_is_the_state_when_asked():
    d = EmulatedPciDevice("sized:3M", seed=7, memory=SparseGuestMemory())
    now = d.state_digest()
    d2 = EmulatedPciDevice("sized:3M", seed=7, memory=SparseGuestMemory())
    later = d2.state_digest_later()                     # hashed on another thread
    d2.run(5)                                           # the image changes meanwhile
    d2.load_config_space(bytes(256))
    assert later() == now and later() == now
    assert d2.state_digest() != now
    fresh = EmulatedPciDevice("sized:3M", seed=7)
    f = fresh.state_digest_later()
    assert f() == now and fresh.state_digest() == now  # and cached for the device


def test_initial_image_is_made_only_when_needed_and_digests_the_same():
    """A device's initial image is made from its seed when first used; its digest
    from the seed alone (no image made) is the digest of the image once made, and
    going back to the initial image gives the same state again."""
    import zlib
    from qmigstream.device.pci_device import EmulatedPciDevice
    for spec in ("sized:3M", "sized:100", "mtty", "sized:1025K"):
        a, b = EmulatedPciDevice(spec, seed=7), EmulatedPciDevice(spec, seed=7)
        before = a.state_digest()                    # from the seed
        assert a._img is None                         # not made for that
        assert b.profile.initial_crc32(7) == zlib.crc32(b.image())
        assert a.image_digest() == f"{zlib.crc32(b.image()):08x}"
        assert b.state_digest() == before and b._img is not None
        b._poke(64, b"\x01" * 8)
        assert b.state_digest() != before
        b.restore_initial_image()
        assert b.state_digest() == before
        assert b.image() == a.image()


def test_fast_forms_of_the_device_schemas_equal_the_schemas():
    """The blob header's and the sized registers' struct forms (used so that a sized
    device never needs construct) build and parse what their construct schemas do."""
    import struct
    from qmigstream.device import blob as B
    from qmigstream.device import pci_device as PD
    from qmigstream.wire import vfio as WV
    assert B.HEADER_SIZE == B.BlobHeader.sizeof() and PD.REGS_SIZE == PD.SizedRegs.sizeof()
    for fields in (dict(version=2, kind=1, flags=1, profile=0x535A4431, seq=0, length=64),
                   dict(version=1, kind=2, flags=0, profile=7, seq=2**32 - 1, length=2**63),
                   dict(magic=b"XXXX", version=65535, kind=255, flags=255, profile=0, seq=9,
                        length=0)):
        raw = B.pack_header(**fields)
        assert raw == B.BlobHeader.build(dict(dict(magic=B.MAGIC), **fields))
        fast, slow = B.parse_header(raw + b"tail"), B.BlobHeader.parse(raw)
        assert all(getattr(fast, k) == slow[k] for k in B.BlobHead._fields)
    for seed, size in ((0, 0), (2**64 - 1, 64 << 20), (12345, 7)):
        regs = PD.SizedProfile(size)._regs(seed)
        assert regs == PD.SizedRegs.build(dict(dma_count=0, last_gpa=0, seed=seed, ctrl=1,
                                               state_size=size, status=0))
    assert WV.DISPLAY_HEADER == WV.SubsectionHeader.build(
        dict(name=WV.VFIO_DISPLAY_SUBSECTION, version_id=WV.VFIO_DISPLAY_VERSION))
    assert struct.unpack_from("<Q", PD.SizedProfile(8).initial_image(3), 16)[0] == 3


def test_replay_of_a_sized_device_needs_no_construct(tmp_path):
    """Loading a stream with a sized VFIO device imports no construct (its import is
    20 ms of every start)."""
    import subprocess
    import sys
    out = tmp_path / "s.mig"
    res = migrate_for_test(out)
    code = ("import sys, json\n"
            "from qmigstream.pipeline.replay import replay\n"
            f"r = replay({str(out)!r}, expect=json.load(open({str(out) + '.json'!r})))\n"
            "assert r.ok and r.verified, r\n"
            "print('construct' in sys.modules)\n")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "False"
    assert res.devices[0]["profile"].startswith("sized")


def migrate_for_test(out):
    from qmigstream.pipeline.migrate import DeviceSpec, MigrateConfig, migrate, write_manifest
    res = migrate(out, MigrateConfig(profile="qemu-8.2", ram_size=4 << 20, iterations=1,
                                     devices=[DeviceSpec("sized:2M", seed=1)]))
    write_manifest(res, str(out) + ".json")
    return res
