"""VFIO v1 migration region: layouts, access rules, device_state, save/resume, dirty pfns."""

import errno

import pytest

from qmigstream.device.blob import parse_blobs
from qmigstream.device.pci_device import EmulatedPciDevice, SparseGuestMemory
from qmigstream.device.region_v1 import (ALL_ONES, LAYOUT_5_8, LAYOUT_RFC_V4, MigrationRegionV1,
                                         get_dirty_pfns, info_struct, load_all, save_all)
from qmigstream.errors import DeviceError


def einval(fn, *a):
    with pytest.raises(DeviceError) as ei:
        fn(*a)
    assert ei.value.errno == errno.EINVAL
    return ei.value


def region(profile="mtty", seed=1, **kw):
    return MigrationRegionV1(EmulatedPciDevice(profile, seed=seed, memory=SparseGuestMemory()),
                             **kw)


# -- layouts ------------------------------------------------------------------

def test_layout_5_8_offsets():
    assert [(f.name, f.offset, f.size) for f in LAYOUT_5_8] == [
        ("device_state", 0, 4), ("reserved", 4, 4), ("pending_bytes", 8, 8),
        ("data_offset", 16, 8), ("data_size", 24, 8)]
    assert info_struct(LAYOUT_5_8).sizeof() == 32


def test_layout_rfc_offsets():
    extra = [(f.name, f.offset, f.size, f.access) for f in LAYOUT_RFC_V4[5:]]
    assert extra == [("start_pfn", 32, 8, "w"), ("page_size", 40, 8, "w"),
                     ("total_pfns", 48, 8, "w"), ("copied_pfns", 56, 8, "r")]
    assert info_struct(LAYOUT_RFC_V4).sizeof() == 64


def test_native_byte_order_is_explicit():
    le = region(byteorder="little")
    be = region(byteorder="big")
    assert le.read(0, 4) == b"\x01\x00\x00\x00"
    assert be.read(0, 4) == b"\x00\x00\x00\x01"
    for r, order in ((le, "little"), (be, "big")):
        r.write_field("device_state", 2)
        assert r.read(16, 8) == (4096).to_bytes(8, order)
        assert r.snapshot()["device_state"] == 2


def test_data_offset_alignment():
    assert region(mmap=True).data_offset == 4096
    assert region(mmap=False).data_offset == 32
    assert region(mmap=False, layout="rfc").data_offset == 64
    r = region(mmap=True, layout="rfc", window_size=8192)
    assert r.data_offset % 4096 == 0 and r.bitmap_offset % 4096 == 0
    assert r.region_type == 2 and region().region_type == 3
    assert region(mmap=True, window_size=8192).mmap_areas == [(4096, 8192)]
    assert region(mmap=False).mmap_areas == []


# -- access rules ----------------------------------------------------------------

def test_field_access_only_at_native_width_and_alignment():
    r = region(layout="rfc")
    einval(r.read, 0, 2)          # device_state is 4 bytes
    einval(r.read, 0, 8)          # straddles device_state and reserved
    einval(r.read, 2, 4)          # misaligned
    einval(r.read, 8, 4)          # half of pending_bytes
    einval(r.read, 12, 8)         # misaligned u64
    einval(r.write, 0, b"\x01")
    einval(r.read, 32, 8)         # start_pfn is write-only
    einval(r.write, 56, bytes(8))  # copied_pfns is read-only
    einval(r.write, 8, bytes(8))   # pending_bytes is read-only
    einval(r.read, 100, 4)        # gap between the struct and the data section
    einval(r.read, r.size - 2, 4)  # past the end of the region


def test_reserved_reads_zero_and_ignores_writes():
    r = region()
    assert r.read(4, 4) == bytes(4)
    assert r.write(4, b"\xff\xff\xff\xff") == 4
    assert r.read(4, 4) == bytes(4)


def test_data_section_takes_any_access_inside():
    r = region(window_size=64)
    assert r.read(r.data_offset + 3, 5) == bytes(5)
    einval(r.read, r.data_offset + 60, 8)


# -- device_state -------------------------------------------------------------------

def test_default_state_and_legal_values():
    r = region()
    assert r.read_field("device_state") == 1
    for v in (0, 1, 3, 2, 0, 4):
        r.write_field("device_state", v)
        assert r.read_field("device_state") == v


@pytest.mark.parametrize("bad", [5, 6, 7])
def test_invalid_states_cannot_be_written(bad):
    r = region()
    einval(r.write_field, "device_state", bad)
    assert r.read_field("device_state") == 1


def test_reserved_bits_preserved_and_kept_in_error_state():
    r = region(reserved_bits=0x80000000)
    assert r.read_field("device_state") == 0x80000001
    r.write_field("device_state", 0x80000003)
    assert r.read_field("device_state") == 0x80000003
    r.inject_fault(errno.EIO)
    with pytest.raises(DeviceError) as ei:
        r.write_field("device_state", 0x80000002)
    assert ei.value.errno == errno.EIO
    assert r.read_field("device_state") == 0x80000006     # SET_ERROR keeps bit 31


def test_error_state_left_only_by_reset():
    r = region()
    r.inject_fault(errno.EIO)
    with pytest.raises(DeviceError):
        r.write_field("device_state", 0)
    assert r.read_field("device_state") & 7 == 6
    for v in (0, 1, 2, 3, 4):
        einval(r.write_field, "device_state", v)
    einval(r.read_field, "pending_bytes")
    assert r.read_field("device_state") & 7 == 6
    r.reset()
    assert r.read_field("device_state") == 1
    r.write_field("device_state", 0)
    assert r.read_field("device_state") == 0


def test_stop_and_copy_cannot_return_to_pre_copy():
    r = region()
    r.write_field("device_state", 3)
    r.write_field("device_state", 2)
    einval(r.write_field, "device_state", 3)
    assert r.read_field("device_state") == 2


def test_saving_fields_only_in_their_states():
    r = region()
    einval(r.read_field, "pending_bytes")
    einval(r.read_field, "data_size")
    einval(r.write_field, "data_size", 0)
    einval(r.write, r.data_offset, b"x")        # data section written only in _RESUMING
    r.write_field("device_state", 4)
    einval(r.read_field, "pending_bytes")
    assert r.read_field("data_offset") == r.data_offset


# -- the save / resume dialogue ----------------------------------------------------

def test_save_sequence_qemu_order():
    r = region("mtty", window_size=40)           # the 88-byte FULL blob takes 3 windows
    r.write_field("device_state", 2)             # stop-and-copy, no pre-copy
    assert r.read_field("pending_bytes") == 24 + 60 + 4
    off = r.read_field("data_offset")
    n = r.read_field("data_size")
    assert (off, n) == (4096, 40)
    # repeated reads return the same buffer
    assert r.read_field("data_offset") == off and r.read_field("data_size") == 40
    first = r.read(off, n)
    assert first[:4] == b"QMDV"
    assert r.read_field("pending_bytes") == 48   # previous chunk consumed
    rest = save_all(r)
    assert len(first + rest) == 88
    assert r.read_field("pending_bytes") == 0
    (blob,) = parse_blobs(first + rest)
    assert blob["kind"] == 1 and blob["flags"] == 1 and blob["length"] == 60


def test_precopy_then_stop_copy_roundtrip():
    src = region("mtty2", seed=3, window_size=50)
    dst = region("mtty2", seed=4, window_size=50)
    src.write_field("device_state", 3)
    src.device.run(4)
    data = save_all(src)
    src.device.run(3)                        # more changes: dirty bytes
    assert src.read_field("pending_bytes") > 0
    data += save_all(src)
    src.device.run(2)
    src.write_field("device_state", 2)
    data += save_all(src)
    src.write_field("device_state", 0)
    kinds = [(b["kind"], b["flags"]) for b in parse_blobs(data)]
    assert kinds[0] == (1, 0) and kinds[-1] == (2, 1) and (2, 0) in kinds
    assert src.device != dst.device
    dst.write_field("device_state", 4)
    load_all(dst, data, chunk=17)
    dst.write_field("device_state", 1)
    dst.device.load_config_space(src.device.config_space())
    assert dst.device == src.device
    assert dst.device.state_digest() == src.device.state_digest()


def test_resume_rejects_corrupt_chunk_and_keeps_state():
    src = region("sized:1000", seed=3)
    src.write_field("device_state", 2)
    data = bytearray(save_all(src))
    data[100] ^= 0xFF                                # corrupt the payload
    dst = region("sized:1000", seed=9)
    before = dst.device.state_digest()
    dst.write_field("device_state", 4)
    off = dst.read_field("data_offset")
    dst.write(off, bytes(data))
    einval(dst.write_field, "data_size", len(data))  # CRC mismatch: the write fails
    # leaving _RESUMING now: the data is incomplete -> EINVAL, still _RESUMING, unchanged
    einval(dst.write_field, "device_state", 1)
    assert dst.read_field("device_state") == 4
    assert dst.device.state_digest() == before


def test_resume_short_data_fails_leaving_resuming():
    src = region("sized:1000", seed=3)
    src.write_field("device_state", 2)
    data = save_all(src)
    dst = region("sized:1000", seed=9)
    before = dst.device.image()
    dst.write_field("device_state", 4)
    load_all(dst, data[:-10])
    einval(dst.write_field, "device_state", 0)
    assert dst.read_field("device_state") == 4 and dst.device.image() == before
    load_all(dst, data[-10:])                        # the rest arrives: now it loads
    dst.write_field("device_state", 0)
    assert dst.device.image() == src.device.image()


def test_data_size_larger_than_window_is_einval():
    r = region(window_size=64)
    r.write_field("device_state", 4)
    einval(r.write_field, "data_size", 65)


# -- the dirty-pfn dialogue (RFC v4 thread) -----------------------------------------

def rfc(bitmap_bits=1, **kw):
    return region("sized:64", layout="rfc", bitmap_bits=bitmap_bits, **kw)


def test_thread_worked_example_one_bit_buffer_three_pfns():
    """Alex's proof of concept: a 1-bit buffer, start_pfn 0, total_pfns 3."""
    r = rfc(1)
    r.device.dma_write(0 * 4096, b"a")         # pfn 0 dirty
    r.device.dma_write(2 * 4096 + 5, b"b")     # pfn 2 dirty, pfn 1 clean
    r.write_field("total_pfns", 3)             # any order
    r.write_field("page_size", 4096)
    r.write_field("start_pfn", 0)
    got = []
    count = 0
    for _ in range(3):
        copied = r.read_field("copied_pfns")
        assert copied == 1                      # "It should report 1"
        off = r.read_field("data_offset")
        got.append((0 + count, r.read(off, 1)[0] & 1))   # bit for start_pfn + count
        count += copied
    assert got == [(0, 1), (1, 0), (2, 1)]
    assert r.read_field("copied_pfns") == 0     # whole range done: 0


def test_sticky_fields_refresh_by_rereading():
    r = rfc(1)
    for f, v in (("start_pfn", 0), ("page_size", 4096), ("total_pfns", 3)):
        r.write_field(f, v)
    r.device.dma_write(0, b"a")
    assert [r.read_field("copied_pfns") for _ in range(2)] == [1, 0]   # rest clean -> 0
    # new DMA, no new writes of the sticky fields: re-reading refreshes
    r.device.dma_write(1 * 4096, b"b")
    assert r.read_field("copied_pfns") == 1
    assert r.read(r.read_field("data_offset"), 1)[0] & 1 == 0        # pfn 0: reported already
    assert r.read_field("copied_pfns") == 1
    assert r.read(r.read_field("data_offset"), 1)[0] & 1 == 1        # pfn 1
    assert r.read_field("copied_pfns") == 0
    assert r.read_field("copied_pfns") == 0                            # nothing new


def test_zero_when_no_page_dirty_in_range():
    r = rfc(8)
    r.device.dma_write(50 * 4096, b"x")        # outside the range
    assert get_dirty_pfns(r, 0, 20) == set()
    assert get_dirty_pfns(r, 40, 20) == {50}


def test_writing_sticky_field_mid_pass_restarts_without_losing_pages():
    r = rfc(1)
    r.device.dma_write(0, b"a")
    r.device.dma_write(2 * 4096, b"c")
    for f, v in (("start_pfn", 0), ("page_size", 4096), ("total_pfns", 3)):
        r.write_field(f, v)
    assert r.read_field("copied_pfns") == 1      # pfn 0 delivered
    r.write_field("start_pfn", 0)                # new update before the pass finished
    assert get_dirty_pfns(r, 0, 3) == {2}        # pfn 2 not lost, pfn 0 not repeated


def test_bitmap_bounded_by_device_buffer():
    r = rfc(8)
    for p in (0, 9, 19):
        r.device.dma_write(p * 4096, b"x")
    for f, v in (("start_pfn", 0), ("page_size", 4096), ("total_pfns", 20)):
        r.write_field(f, v)
    pieces = []
    while True:
        n = r.read_field("copied_pfns")
        if n == 0:
            break
        pieces.append((n, r.read(r.read_field("data_offset"), 1)[0]))
    assert pieces == [(8, 0b1), (8, 0b10), (4, 0b1000)]


def test_all_ones_means_whole_range_dirty():
    r = rfc(8, dirty_tracking=False)
    for f, v in (("start_pfn", 10), ("page_size", 4096), ("total_pfns", 5)):
        r.write_field(f, v)
    assert r.read_field("copied_pfns") == ALL_ONES
    assert get_dirty_pfns(r, 10, 5) == {10, 11, 12, 13, 14}


def test_copied_pfns_needs_a_page_size():
    r = rfc(8)
    einval(r.read_field, "copied_pfns")
    r.write_field("page_size", 3000)
    einval(r.read_field, "copied_pfns")


def test_helper_finds_what_the_dma_engine_wrote():
    r = region("sized:4096", layout="rfc", bitmap_bits=16, seed=11)
    r.device.dma_pages = 64
    r.device.dma_pages_per_tick = 3
    written = r.device.run(10)
    base = r.device.dma_base // 4096
    want = {g // 4096 for g in written}
    assert get_dirty_pfns(r, base, 64) == want
    assert get_dirty_pfns(r, base, 64) == set()          # reporting cleared them
    written = r.device.run(5)
    want2 = {g // 8192 for g in written}                  # 8 KiB pfns
    assert get_dirty_pfns(r, base // 2, 32, page_size=8192) == want2


def test_dirty_queries_interleaved_with_saving_keep_the_stream_intact():
    src = region("sized:20000", layout="rfc", bitmap_bits=32, seed=2, window_size=4096)
    dst = region("sized:20000", layout="rfc", seed=8, window_size=4096)
    src.write_field("device_state", 3)
    data = bytearray()
    base = src.device.dma_base // 4096
    while src.read_field("pending_bytes") > 0:
        off = src.read_field("data_offset")
        n = src.read_field("data_size")
        get_dirty_pfns(src, base, 256)                     # bitmap goes elsewhere
        assert src.read_field("data_size") == n            # chunk still there
        assert src.read_field("data_offset") == off        # data semantics again
        data += src.read(off, n)
        if len(data) < 30000:
            src.device.run(1)                              # dirty pages while it runs
    src.write_field("device_state", 2)
    data += save_all(src)
    dst.write_field("device_state", 4)
    load_all(dst, data)
    dst.write_field("device_state", 1)
    assert dst.device.image() == src.device.image()
