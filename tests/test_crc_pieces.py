"""CRC-32 arithmetic, Pieces, and the places that use them instead of reading or
copying bytes: the device image digest, blobs made of pieces, FULL payloads kept
as views, and the RAM model's CRCs of pages on an indexed backing."""

import mmap
import os
import random
import zlib

import pytest

from qmigstream import crc32 as C
from qmigstream.codec.source import open_mapped
from qmigstream.device.blob import (KIND_FULL, BlobAssembler, blob_parts, build_blob,
                                    stable)
from qmigstream.device.image import ImageBuffer
from qmigstream.device.pci_device import (EmulatedPciDevice, SizedProfile,
                                          sized_state_crc32, sized_state_pieces)
from qmigstream.errors import DeviceError
from qmigstream.pieces import Pieces
from qmigstream.pipeline.guest import GuestRam, SliceCrc, fill_initial


def test_combine_remove_prefix_and_repeat_equal_zlib():
    r = random.Random(5)
    for _ in range(400):
        a = r.randbytes(r.randrange(0, 2000))
        b = r.randbytes(r.choice([0, 1, 7, 64, r.randrange(0, 5000)]))
        assert C.combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
        assert C.remove_prefix(zlib.crc32(a + b), zlib.crc32(a), len(b)) == zlib.crc32(b)
        k = r.randrange(0, 70)
        assert C.repeat(zlib.crc32(a), len(a), k) == zlib.crc32(a * k)


def test_shift_by_tables_equals_the_multiply():
    # a length used often gets byte tables; both ways give the same shift
    for n in (1, 4096, 65536, 12345):
        for crc in (1, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF):
            assert C.shift(crc, n) == C.mulmod(C.x8n(n), crc)
    for _ in range(20):
        C.shift(0x1234, 999)
    assert 999 in C._tables
    assert C.shift(0xCAFEBABE, 999) == C.mulmod(C.x8n(999), 0xCAFEBABE)


@pytest.mark.parametrize("n", [0, 1, 100, (1 << 20) - 1, 1 << 20, (1 << 20) + 1,
                               (3 << 20) + 4097, (513 << 20) + 5])
def test_sized_state_crc_from_the_seed_equals_the_bytes(n):
    crc = 0
    for p in sized_state_pieces(9, n):
        crc = zlib.crc32(p, crc)
    assert sized_state_crc32(9, n) == crc


def test_pieces_behave_as_their_bytes():
    parts = [b"abc", memoryview(b"defgh")[1:4], bytearray(b"XYZ"), b""]
    p = Pieces(parts)
    whole = b"abcefgXYZ"
    assert len(p) == len(whole) and bytes(p) == whole and p == whole and p != b"x"
    assert p[2:7] == whole[2:7] and p[-1] == whole[-1] and p[4] == whole[4]
    assert p[::2] == whole[::2] and p[5:] == whole[5:]
    assert p.crc32() == zlib.crc32(whole)
    out = bytearray(len(whole) + 2)
    p.copy_into(out, 1)
    assert out[1:-1] == whole
    with pytest.raises(IndexError):
        p[len(whole)]


def test_a_blob_of_pieces_equals_the_built_blob_and_views_spanning_parts():
    data = os.urandom(3 * 4096 + 77)
    pieces = [data[:100], data[100:5000], data[5000:]]
    want = build_blob(KIND_FULL, data, profile=7, seq=0, last=True)
    for crc in (None, zlib.crc32(data)):
        b = blob_parts(KIND_FULL, pieces, profile=7, seq=0, last=True, payload_crc=crc)
        assert b.tobytes() == want
        v = b.view(50, 200, gather=True)            # spans the header and two parts
        assert type(v) is Pieces and bytes(v) == want[50:250]
        assert b.view(50, 200) == want[50:250]
        assert type(b.view(30, 50, gather=True)) is memoryview   # inside one part


def test_device_image_digest_is_crc32_and_save_hands_it_to_the_blob():
    dev = EmulatedPciDevice("sized:2M", seed=3)
    assert dev._img is None
    session = dev.open_save(precopy=False)
    assert dev._img is None                          # the seed's pieces went out
    out = bytearray()
    while True:
        got = session.read(1 << 20, gather=True)
        if not got:
            break
        out += bytes(got)
    dst = EmulatedPciDevice("sized:2M", seed=4)
    asm = dst.open_resume()
    asm.write(bytes(out))
    image = asm.finish()
    assert type(image) is Pieces                     # bytes written were stable: kept
    assert asm.image_crc == zlib.crc32(dev.image())
    dst.apply_image(image, crc=asm.image_crc)
    assert dst.image_digest() == f"{zlib.crc32(dev.image()):08x}" == dev.image_digest()
    assert dst.state_digest() == dev.state_digest() and dst == dev
    dst._poke(64, b"\x01")                           # a write makes the image writable
    assert isinstance(dst._img, ImageBuffer) and dst.image()[64] == 1


def test_full_payload_views_kept_only_for_stable_bytes(tmp_path):
    prof = SizedProfile(1 << 20)
    img = prof.initial_image(1)
    blob = build_blob(KIND_FULL, img, profile=prof.profile_id, seq=0, last=True)
    f = tmp_path / "blob"
    f.write_bytes(blob)
    src = open_mapped(str(f))
    mapped = src.read_view(len(blob))
    assert type(mapped) is memoryview
    assert stable(mapped) and stable(memoryview(blob)) and not stable(memoryview(bytearray(3)))
    for data, kept in ((mapped, True), (bytearray(blob), False)):
        asm = BlobAssembler(profile=prof.profile_id, image_size=prof.image_size)
        view = memoryview(data)
        for pos in range(0, len(blob), 300000):      # in pieces of any size
            asm.write(view[pos:pos + 300000])
        got = asm.finish()
        assert (type(got) is Pieces) == kept
        assert got == img and asm.image_crc == zlib.crc32(img)


def test_a_rejected_write_leaves_kept_views_as_they_were():
    prof = SizedProfile(1 << 20)
    img = prof.initial_image(1)
    blob = bytearray(build_blob(KIND_FULL, img, profile=prof.profile_id, seq=0, last=True))
    blob[-1] ^= 0xFF                                 # bad CRC
    blob = bytes(blob)
    asm = BlobAssembler(profile=prof.profile_id, image_size=prof.image_size)
    asm.write(blob[:500000])
    parts_before = len(asm._full)
    with pytest.raises(DeviceError):
        asm.write(blob[500000:])
    assert len(asm._full) == parts_before and asm._pos == 500000 - 24


def test_slice_crc_and_indexed_placement_give_the_bytes_crc():
    buf = os.urandom(300000)
    sc = SliceCrc(memoryview(buf))
    r = random.Random(2)
    for _ in range(200):
        a = r.randrange(0, len(buf))
        b = r.randrange(a, len(buf) + 1)
        assert sc.crc(a, b) == zlib.crc32(buf[a:b])
        assert sc.extend(0x1234, a, b) == zlib.crc32(buf[a:b], 0x1234)
    # a guest whose pages lie on an indexed tape digests as its copied twin
    for seed in (1, 6):
        a = GuestRam([("pc.ram", 96 << 20)])
        b = GuestRam([("pc.ram", 96 << 20)])
        fill_initial(a, seed=seed, fraction=0.5, uniform=0.2)
        fill_initial(b, seed=seed, fraction=0.5, uniform=0.2)
        b.main.materialize()
        assert a.main._slice_crcs and not b.main._slice_crcs
        assert a.digests() == b.digests()
        assert a.main.crc32(100, 9000, 7) == b.main.crc32(100, 9000, 7)


def _reference_pages_crc32(blk):
    """pages-crc32 of a block, straight from its bytes (the definition in
    qmigstream.pipeline.guest's docstring, without its shortcuts)."""
    import hashlib
    import struct
    from qmigstream.pipeline.guest import _PAGES_CRC32_TAG, DIGEST_REGION
    ps = blk.page_size
    mem = bytes(blk.mem)
    per = DIGEST_REGION // ps
    idx, crcs = [], []
    zero = bytes(ps)
    for r in range(-(-blk.npages // per)):
        c = 0
        for i in range(r * per, min(blk.npages, (r + 1) * per)):
            page = mem[i * ps:(i + 1) * ps]
            if page != zero:
                idx.append(i)
                c = zlib.crc32(page, c)
        crcs.append(c)
    h = hashlib.sha256(_PAGES_CRC32_TAG)
    h.update(struct.pack("<QQQQ", ps, blk.used_length, len(idx), len(crcs)))
    h.update(struct.pack(f"<{len(idx)}Q", *idx))
    h.update(struct.pack(f"<{len(crcs)}I", *crcs))
    return h.hexdigest()


def test_pages_crc32_digest_equals_its_definition():
    """The digest made by pieces, threads, prefix CRCs and arithmetic is the one
    its definition gives from the bytes."""
    ram = GuestRam([("pc.ram", 200 << 20)])
    fill_initial(ram, seed=11, fraction=0.3, uniform=0.1)
    blk = ram.main
    blk.write(5 * 4096 + 100, b"\x07" * 9000)            # copied-in pages among placed ones
    blk.write(190 << 20, os.urandom(3 * 4096))
    got = ram.digests()["pc.ram"]
    assert got == _reference_pages_crc32(blk)
