"""Structure-aware generators of migration streams, and mutations of them.

Every generator takes a *draw source* ``d`` with four methods (``int(lo, hi)``,
``bool()``, ``bytes(lo, hi)``, ``choice(seq)``), so the same code serves

* hypothesis (:class:`HypothesisDraw`, through the ``st.composite`` strategies
  at the bottom: ``streams()``, ``mutated_streams()``, ...), and
* the coverage-guided and mutation fuzzers in ``tools/fuzz`` (:class:`RandomDraw`
  over a ``random.Random``, or over the fuzzer's bytes).

What is generated is valid-looking on purpose: a header, a configuration with
subsections, a RAM section set with every record kind (PAGE, ZERO, XBZRLE,
COMPRESS, MULTIFD_FLUSH, HOOK, CONTINUE carried across sections), device
sections whose bytes follow a generated VMDESCRIPTION description (nested
structs, arrays, qtailq lists, bitmaps, NULL pointers, subsections), VFIO
sections of every release family, commands including nested PACKAGED blobs,
and qcow2 images holding a stream as a ``savevm`` snapshot.  The mutators then
break them: byte flips, truncation, length fields set to hostile values,
splices.  :func:`fixture_seeds` cuts the committed real captures down to small
seeds (a few pages per RAM section, a few devices, their description).
"""

from __future__ import annotations

import json
import lzma
import pathlib
import random
import struct

from qmigstream import vmdesc as VD
from qmigstream.codec.build import StreamBuilder
from qmigstream.codec.ram_records import (RamCompressed, RamEos, RamHook, RamMultifdFlush,
                                          RamZeroRun)
from qmigstream.codec.reader import read_records
from qmigstream.codec.records import (Command, OpaquePayload, SectionFooter, SectionHeader,
                                      VmDescription)
from qmigstream.codec.writer import encode_records
from qmigstream.errors import QmigstreamError
from qmigstream.wire.commands import MigCmd
from qmigstream.wire.header import SectionType as T
from qmigstream.wire.ram import RamFlag

ROOT = pathlib.Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "fixtures" / "captures"
PS = 4096

NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789./-_:"


# -- draw sources ------------------------------------------------------------------

class RandomDraw:
    """Draws from a :class:`random.Random` (seeded, reproducible)."""

    def __init__(self, rng):
        self.r = rng if isinstance(rng, random.Random) else random.Random(rng)

    def int(self, lo, hi):
        return self.r.randint(lo, hi)

    def bool(self):
        return self.r.random() < 0.5

    def bytes(self, lo, hi):
        n = self.r.randint(lo, hi)
        if self.r.random() < 0.3:
            return bytes([self.r.randrange(256)]) * n
        return self.r.randbytes(n)

    def choice(self, seq):
        return seq[self.r.randrange(len(seq))]


class HypothesisDraw:
    """Draws through hypothesis' ``draw`` (so examples shrink)."""

    def __init__(self, draw):
        from hypothesis import strategies as st
        self._d, self._st = draw, st

    def int(self, lo, hi):
        return self._d(self._st.integers(lo, hi))

    def bool(self):
        return self._d(self._st.booleans())

    def bytes(self, lo, hi):
        return self._d(self._st.binary(min_size=lo, max_size=hi))

    def choice(self, seq):
        return seq[self._d(self._st.integers(0, len(seq) - 1))]


def name(d, lo=1, hi=24):
    return "".join(d.choice(NAME_CHARS) for _ in range(d.int(lo, hi)))


# -- vmstate descriptions with matching bytes --------------------------------------------

_PRIMS = [("uint8", ">B"), ("uint16", ">H"), ("uint32", ">I"), ("uint64", ">Q"),
          ("int8", ">b"), ("int16", ">h"), ("int32", ">i"), ("int64", ">q"),
          ("bool", ">B"), ("timer", ">Q"), ("int32 le", ">i"), ("uint32 equal", ">I")]


def _prim_value(d, code):
    width = struct.calcsize(code)
    v = d.int(0, (1 << (8 * width)) - 1)
    if code[1].islower():
        v -= 1 << (8 * width - 1)
    return struct.pack(code, v)


def vmsd(d, depth=0, max_depth=3, prefix="v"):
    """A vmsd description ``{"vmsd_name", "version", "fields", ["subsections"]}``
    and the bytes ``vmstate_save_state`` would write for it."""
    desc = {"vmsd_name": f"{prefix}{depth}-{name(d, 1, 8)}", "version": d.int(0, 12),
            "fields": []}
    out = bytearray()
    for i in range(d.int(0, 5)):
        f, data = field(d, depth, max_depth, f"f{i}")
        desc["fields"].append(f)
        out += data
    if depth < max_depth and d.int(0, 3) == 0:
        desc["subsections"] = []
        for k in range(d.int(1, 2)):
            sub, data = vmsd(d, depth + 1, max_depth, prefix=f"{desc['vmsd_name']}/s{k}")
            nm = sub["vmsd_name"].encode()
            desc["subsections"].append(sub)
            out += bytes([0x05, len(nm)]) + nm + struct.pack(">I", sub["version"]) + data
    return desc, bytes(out)


def field(d, depth, max_depth, fname):
    kinds = ["prim", "prim", "prim", "array", "buffer", "bitmap", "nullptr"]
    if depth < max_depth:
        kinds += ["struct", "struct", "vstruct", "qtailq"]
    kind = d.choice(kinds)
    if kind == "prim":
        t, code = d.choice(_PRIMS)
        return {"name": fname, "type": t, "size": struct.calcsize(code)}, _prim_value(d, code)
    if kind == "array":
        t, code = d.choice(_PRIMS)
        n = d.int(0, 6)
        return ({"name": fname, "array_len": n, "type": t, "size": struct.calcsize(code)},
                b"".join(_prim_value(d, code) for _ in range(n)))
    if kind == "buffer":
        data = d.bytes(0, 40)
        return {"name": fname, "type": "buffer", "size": len(data)}, data
    if kind == "bitmap":
        words = d.int(1, 3)
        return ({"name": fname, "type": "bitmap", "size": 8 * words},
                b"".join(_prim_value(d, ">Q") for _ in range(words)))
    if kind == "nullptr":
        n = d.int(1, 3)
        return {"name": fname, "array_len": n, "type": "nullptr", "size": 1}, b"0" * n
    if kind == "struct":
        body, data = vmsd(d, depth + 1, max_depth, prefix="st")
        body.pop("subsections", None)
        data = _without_subsections(d, body, depth + 1, max_depth, data)
        n = d.int(1, 3)
        # every element of an array of structs has the same size: repeat the bytes
        f = {"name": fname, "type": "struct", "struct": body, "size": len(data)}
        if n > 1:
            f = {"name": fname, "array_len": n, "type": "struct", "struct": body,
                 "size": len(data)}
            data = data * n
        return f, data
    if kind == "vstruct":
        body, data = vmsd(d, depth + 1, max_depth, prefix="vs")
        body.pop("subsections", None)
        data = _without_subsections(d, body, depth + 1, max_depth, data)
        f = {"name": fname, "type": "vstruct", "vmsd_name": body["vmsd_name"],
             "version": body["version"], "fields": body["fields"], "size": len(data)}
        return f, data
    # qtailq: u8 1 + element per item, u8 0; the description repeats per element
    pairs = [("name", fname), ("type", "qtailq")]
    out = bytearray()
    for _ in range(d.int(0, 2)):
        body, data = vmsd(d, depth + 1, max_depth, prefix="q")
        body.pop("subsections", None)
        data = _without_subsections(d, body, depth + 1, max_depth, data)
        pairs += [("vmsd_name", body["vmsd_name"]), ("version", body["version"]),
                  ("fields", body["fields"])]
        out += b"\x01" + data
    out += b"\x00"
    pairs.append(("size", len(out)))
    obj = VD.JsonObject(pairs)
    return obj, bytes(out)


def _without_subsections(d, body, depth, max_depth, data):
    """Regenerate bytes for a body whose subsections were dropped."""
    # The subsections are at the end of ``data``: recompute the fields' bytes.
    n = 0
    for f in body["fields"]:
        n += f["size"] * (f.get("array_len", 1) if "array_len" in f else 1)
    return data[:n]


def device_entry(d, idstr, instance_id, max_depth=3):
    """A ``devices[]`` entry of the trailer with its payload."""
    desc, data = vmsd(d, 0, max_depth, prefix=idstr[:8])
    entry = {"name": idstr, "instance_id": instance_id, "vmsd_name": desc["vmsd_name"],
             "version": desc["version"], "fields": desc["fields"]}
    if "subsections" in desc:
        entry["subsections"] = desc["subsections"]
    return entry, data


def deep_vmsd(depth, kind="struct"):
    """A description nested ``depth`` deep (structs or subsections) and its bytes."""
    if kind == "struct":
        desc = {"vmsd_name": "leaf", "version": 1,
                "fields": [{"name": "x", "type": "uint8", "size": 1}]}
        data = b"\x07"
        for i in range(depth):
            desc = {"vmsd_name": f"n{i}", "version": 1,
                    "fields": [{"name": "s", "type": "struct", "struct": desc, "size": 1}]}
        return {"name": "deep", "instance_id": 0, **desc}, data
    desc = {"vmsd_name": "leaf", "version": 1, "fields": []}
    data = b""
    for i in range(depth):
        nm = desc["vmsd_name"].encode()
        data = bytes([5, len(nm)]) + nm + struct.pack(">I", 1) + data
        desc = {"vmsd_name": f"n{i}", "version": 1, "fields": [], "subsections": [desc]}
    return {"name": "deep", "instance_id": 0, **desc}, data


# -- streams -----------------------------------------------------------------------------

def _config(d, b):
    # (x-ignore-shared and mapped-ram change the RAM layout: not generated here)
    caps = ["validate-uuid"] if d.bool() else None
    uuid = d.bytes(16, 16) if d.int(0, 3) == 0 else None
    tpb = 12 if d.int(0, 3) == 0 else None
    b.configuration(d.choice(["pc-i440fx-7.2", "pc-q35-8.2", name(d, 1, 30)]),
                    capabilities=caps, uuid=uuid, target_page_bits=tpb)


def _ram_ops(d, b, blocks, n):
    recs = []
    for _ in range(n):
        blk = d.choice(blocks)
        addr = d.int(0, 15) * PS
        k = d.int(0, 9)
        if k <= 2:
            recs.append(b.ram_page_record(blk, addr, zero=True))
        elif k <= 4:
            recs.append(b.ram_page_record(blk, addr, (d.bytes(1, 8) * PS)[:PS]))
        elif k <= 6:
            recs.append(b.ram_page_record(blk, addr, xbzrle=d.bytes(0, 60)))
        elif k == 7:
            cont = RamFlag.CONTINUE if b.last_block == blk else 0
            b.last_block = blk
            recs.append(RamCompressed(blk, addr, d.bytes(1, 60), RamFlag.COMPRESS_PAGE | cont))
        elif k == 8:
            recs.append(RamMultifdFlush())
        else:
            recs.append(RamHook())
    recs.append(RamEos())
    return recs


def _command(d, b, depth, max_depth):
    k = d.int(0, 5 if depth < max_depth else 4)
    if k == 0:
        b.command(MigCmd.PING, value=d.int(0, 2**32 - 1))
    elif k == 1:
        b.command(MigCmd.OPEN_RETURN_PATH)
    elif k == 2:
        b.command(MigCmd.RECV_BITMAP, block=name(d))
    elif k == 3:
        b.command(MigCmd.POSTCOPY_RAM_DISCARD, version=0, block=name(d), terminator=0,
                  ranges=[{"start": d.int(0, 2**40), "length": d.int(0, 2**40)}
                          for _ in range(d.int(0, 3))])
    elif k == 4:
        b.command(MigCmd.POSTCOPY_ADVISE)
    else:
        inner = packaged_blob(d, depth + 1, max_depth, footers=b.footers)
        b.command(MigCmd.PACKAGED, length=len(inner))
        b.add(OpaquePayload(inner))       # raw bytes: the nested stream


def packaged_blob(d, depth=1, max_depth=3, footers=True):
    """The nested stream a PACKAGED command carries (sections, commands, EOF)."""
    b = StreamBuilder(footers=footers)
    for _ in range(d.int(0, 2)):
        _command(d, b, depth, max_depth)
    if footers and d.bool():       # (footerless machine types predate postcopy)
        b.section(T.SECTION_FULL, f"pk{depth}", [OpaquePayload(d.bytes(0, 16))],
                  section_id=900 + depth)
    b.eof()
    return b.encode()


def deep_packaged(depth):
    """A stream whose PACKAGED commands nest ``depth`` deep."""
    inner = b"\x00"                                      # innermost: EOF
    for _ in range(depth):
        inner = b"\x08" + struct.pack(">HHI", int(MigCmd.PACKAGED), 4, len(inner)) + inner
    return b"QEVM\x00\x00\x00\x03" + inner + b"\x00"


def stream(d, *, max_depth=3):
    """A whole stream; returns its bytes."""
    b = StreamBuilder(footers=d.int(0, 4) != 0)
    b.header()
    if d.int(0, 4) != 0:
        _config(d, b)
    for _ in range(d.int(0, 2)):
        _command(d, b, 0, max_depth)
    blocks = list(dict.fromkeys(name(d) for _ in range(d.int(1, 3))))
    lengths = [16 * PS] * len(blocks)
    if d.int(0, 7) == 0:
        # A block no host can map or give a file (beyond off_t and ssize_t on every
        # host, so the outcome does not depend on the machine); MEM_SIZE stays the
        # exact sum, as QEMU writes it.
        k = d.int(0, len(blocks) - 1)
        lengths[k] = (1 << 64) - PS * (1 + 16 * (len(blocks) - 1)) - PS * d.int(0, 3)
    b.section(T.SECTION_START, "ram", b.ram_setup_records(list(zip(blocks, lengths))),
              version_id=4, section_id=1000)
    for _ in range(d.int(0, 3)):
        b.section(T.SECTION_PART, "ram", _ram_ops(d, b, blocks, d.int(0, 8)),
                  section_id=1000)
    if d.int(0, 3) == 0:
        _command(d, b, 0, max_depth)
    b.section(T.SECTION_END, "ram", _ram_ops(d, b, blocks, d.int(0, 2)), section_id=1000)
    entries = []
    seen = set()
    for i in range(d.int(0, 4)):
        idstr = d.choice(["timer", "cpu", "apic", "kvm-tpr-opt", "0000:00:02.0/e1000",
                          name(d, 1, 12)])
        inst = d.int(0, 2)
        if (idstr, inst) in seen or idstr in ("ram", "block", "dirty-bitmap") or \
                idstr.endswith("/vfio"):
            continue
        seen.add((idstr, inst))
        if d.int(0, 4) == 0:
            # an old-style entry: one buffer of ``size`` bytes
            data = d.bytes(0, 64)
            entry = {"name": idstr, "instance_id": inst, "size": len(data),
                     "fields": [{"name": "data", "type": "buffer", "size": len(data)}]}
        else:
            entry, data = device_entry(d, idstr, inst)
        b.section(T.SECTION_FULL, idstr, [OpaquePayload(data)], instance_id=inst,
                  version_id=entry.get("version", 1), section_id=i)
        entries.append(entry)
    b.eof()
    if entries or d.int(0, 2):
        style = d.choice(VD.STYLES)
        obj = {"page_size": PS, "devices": entries}
        if style == VD.JSONWRITER and d.bool():
            obj = {"configuration": {"vmsd_name": "configuration", "version": 1,
                                     "fields": []}, **obj}
        b.vmdescription(VD.dump(obj, style))
    return b.encode()


def mapped_ram_stream(d):
    """A ``file:`` migration with mapped-ram: block areas with bitmaps at fixed offsets."""
    from qmigstream.codec.build import mapped_ram_fill
    b = StreamBuilder()
    b.header()
    b.configuration("pc-q35-9.0", capabilities=["mapped-ram"])
    blocks = [(n, PS * d.int(1, 40)) for n in dict.fromkeys(name(d) for _ in range(d.int(1, 3)))]
    recs = b.ram_setup_records(blocks, mapped_ram=True, multifd_flush=d.bool())
    for _ in range(d.int(0, 6)):
        blk, length = d.choice(blocks)
        mapped_ram_fill(recs, blk, d.int(0, length // PS - 1), (d.bytes(1, 8) * PS)[:PS])
    b.section(T.SECTION_START, "ram", recs, version_id=4)
    b.section(T.SECTION_END, "ram", [RamEos()])
    if d.bool():
        entry, data = device_entry(d, "timer", 0)
        b.section(T.SECTION_FULL, "timer", [OpaquePayload(data)], version_id=2)
        b.eof()
        b.vmdescription(VD.dump({"page_size": PS, "devices": [entry]}, VD.JSONWRITER))
    else:
        b.eof()
    return b.encode()


def vfio_stream(d):
    """A stream with RAM and one or two VFIO devices of one release family."""
    from qmigstream.vfio.builder import plan
    from qmigstream.vfio.family import FAMILY_ORDER
    from qmigstream.wire.vfio import PciConfigState
    fam = d.choice(FAMILY_ORDER)
    b = StreamBuilder(footers=True)
    b.header()
    b.configuration("pc-i440fx-7.2")
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 16 * PS)]),
              version_id=4, section_id=2)
    plans = []
    for k in range(d.int(1, 2)):
        cfg = bytearray(d.choice([256, 4096]))
        struct.pack_into("<HH", cfg, 0, 0x10DE, d.int(0, 0xFFFF))
        st = PciConfigState.make(bytes(cfg))
        n_pre = d.int(0, 3) if fam != "8.0" else 0
        pre = [d.choice([None, d.bytes(1, 300)]) for _ in range(n_pre)]
        stop = [d.bytes(1, 200) for _ in range(d.int(1 if fam != "5.2" else 0, 2))]
        kw = {}
        if fam == "5.2" and d.bool():
            kw["zero_terminator"] = True
        if fam in ("8.1-9.x", "10.x", "10.1+") and n_pre and d.bool():
            kw["switchover_ack"] = True
        idstr = f"0000:00:0{5 + k}.0/vfio"
        p = plan(fam, idstr, precopy=pre, stop_copy=stop, config=st, **kw)
        plans.append((p, 40 + k))
        b.section(T.SECTION_START, idstr, p.start, section_id=40 + k)
    rounds = max([len(p.parts) for p, _ in plans])
    for i in range(rounds):
        b.section(T.SECTION_PART, "ram",
                  [b.ram_page_record("pc.ram", i * PS, bytes([i + 1]) * PS), RamEos()],
                  section_id=2)
        for p, sid in plans:
            if i < len(p.parts):
                b.section(T.SECTION_PART, p.idstr, p.parts[i], section_id=sid)
    if d.bool():
        b.command(MigCmd.SWITCHOVER_START)
    b.section(T.SECTION_END, "ram", [RamEos()], section_id=2)
    for p, sid in plans:
        b.section(T.SECTION_END, p.idstr, p.end, section_id=sid)
    entries = []
    for p, sid in plans:
        if p.full is not None:
            b.section(T.SECTION_FULL, p.idstr, p.full, section_id=sid)
            entries.append(p.vmdesc_entry())
    b.eof()
    b.vmdescription(VD.dump({"page_size": PS, "devices": entries},
                            VD.QJSON if fam == "5.2" else VD.JSONWRITER))
    return b.encode()


# -- qcow2 -------------------------------------------------------------------------------

def qcow2_image(vmstate: bytes, *, cluster_bits=9, name_="snap1", version=2,
                compressed=False) -> bytes:
    """A minimal qcow2 image (no guest disk) whose one snapshot holds ``vmstate``."""
    import zlib
    cs = 1 << cluster_bits
    entries_per_l2 = cs // 8
    nclusters = max(1, -(-len(vmstate) // cs))
    l2_tables = -(-nclusters // entries_per_l2)
    snap_c, l1_c = 1, 2
    l2_c = 3
    data_c = l2_c + l2_tables
    img = bytearray(cs * (data_c + nclusters))
    hdr_len = 72 if version == 2 else 104
    struct.pack_into(">4sIQIIQIIQQIIQ", img, 0, b"QFI\xfb", version, 0, 0, cluster_bits, 0,
                     0, 0, 0, 0, 0, 1, snap_c * cs)
    if version == 3:
        struct.pack_into(">QQQII", img, 72, 0, 0, 0, 4, hdr_len)
    # snapshot entry: L1 at l1_c with l2_tables entries; extra: vm_state_size_large, disk size
    ent = struct.pack(">QIHHIIQII", l1_c * cs, l2_tables, 1, len(name_), 0, 0, 0,
                      len(vmstate) & 0xFFFFFFFF, 16)
    ent += struct.pack(">QQ", len(vmstate), 0) + b"1" + name_.encode()
    img[snap_c * cs:snap_c * cs + len(ent)] = ent
    for t in range(l2_tables):
        struct.pack_into(">Q", img, l1_c * cs + 8 * t, (l2_c + t) * cs | (1 << 63))
    extra = bytearray()
    for k in range(nclusters):
        piece = vmstate[k * cs:(k + 1) * cs].ljust(cs, b"\x00")
        l2 = (l2_c + k // entries_per_l2) * cs + 8 * (k % entries_per_l2)
        if compressed and k % 2:
            co = zlib.compressobj(6, zlib.DEFLATED, -12)
            z = co.compress(piece) + co.flush()
            host = len(img) + len(extra)
            extra += z + bytes(-len(z) % 512)
            x = 62 - (cluster_bits - 8)
            sectors = -(-len(z) // 512) - 1
            struct.pack_into(">Q", img, l2, (1 << 62) | (sectors << x) | host)
        else:
            host = (data_c + k) * cs
            img[host:host + cs] = piece
            struct.pack_into(">Q", img, l2, host | (1 << 63))
    return bytes(img + extra)


# -- mutations ---------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000000, 0x7FFFFFFFFFFFFFFF,
               0xFFFFFFFFFFFFFFFF]


#: (width, value): VFIO markers, section/command type bytes, RAM flags, QEVM, footer.
MAGICS = [(8, 0xFFFFFFFFEF100000 + k) for k in range(1, 7)] + \
    [(1, t) for t in (0, 1, 2, 3, 4, 5, 6, 7, 8, 0x7E)] + \
    [(8, f) for f in (0x02, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100, 0x200, 0x22, 0x28)] + \
    [(4, 0x5145564D), (4, 0x11223344), (2, 7)]


def record_starts(data: bytes, limit=400):
    """Offsets where records start (as far as the input decodes): length fields sit there."""
    out = []
    try:
        for r in read_records(data):
            if r.offset is not None:
                out.append(r.offset)
            if len(out) >= limit:
                break
    except QmigstreamError:
        pass
    except Exception:     # a bug: the fuzz targets report it, here it only ends the walk
        pass
    return out


def mutate(d, data: bytes, others=(), starts=None) -> bytes:
    """One to four mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(d.int(1, 4)):
        if not buf:
            buf += d.bytes(1, 16)
            continue
        op = d.int(0, 11)
        if op >= 10:                                 # a value in the trailer's JSON
            buf = bytearray(mutate_description(d, bytes(buf)))
        elif op <= 2:                                # byte flips
            for _ in range(d.int(1, 4)):
                i = d.int(0, len(buf) - 1)
                buf[i] ^= 1 << d.int(0, 7) if d.bool() else d.int(1, 255)
        elif op == 3:                                # truncation
            del buf[d.int(0, len(buf) - 1):]
        elif op <= 6:                                # a length field set to a hostile value
            if starts is None:
                starts = record_starts(bytes(data))
            base = d.choice(starts) if starts and d.int(0, 3) else d.int(0, len(buf) - 1)
            pos = min(len(buf) - 1, base + d.int(0, 24))
            width = d.choice([1, 2, 4, 8])
            v = d.choice(INTERESTING)
            if d.bool():
                v = v + d.int(-2, 2)
            if d.int(0, 3) == 0:                     # another record's magic number
                width, v = d.choice(MAGICS)
            v &= (1 << (8 * width)) - 1
            buf[pos:pos + width] = v.to_bytes(width, "big")
        elif op == 7:                                # delete or duplicate a slice
            i = d.int(0, len(buf) - 1)
            n = d.int(1, min(64, len(buf) - i))
            if d.bool():
                del buf[i:i + n]
            else:
                buf[i:i] = buf[i:i + n]
        else:                                        # splice from another input
            src = d.choice(others) if others else bytes(buf)
            if not src:
                continue
            i = d.int(0, len(src) - 1)
            piece = src[i:i + d.int(1, 256)]
            j = d.int(0, len(buf))
            if d.bool():
                buf[j:j + len(piece)] = piece
            else:
                buf[j:j] = piece
    return bytes(buf)


HOSTILE_JSON = [None, True, False, 0, -1, 1.5, float("inf"), 2 ** 64, 10 ** 30, "", "x",
                "\ud800", "\udcff", "\u00e9" * 3, [], {}, [1], ["x"], {"a": 1}, [{}],
                {"vmsd_name": "v", "version": 1, "fields": []}]


def find_trailer(data: bytes):
    """(offset, parsed JSON) of a VMDESCRIPTION trailer that runs to the end, or None."""
    pos = len(data)
    for _ in range(8):
        pos = data.rfind(b"\x06", 0, pos)
        if pos < 0:
            return None
        if data[pos + 5:pos + 6] == b"{" and \
                struct.unpack(">I", data[pos + 1:pos + 5].rjust(4, b"\0"))[0] == len(data) - pos - 5:
            try:
                return pos, json.loads(data[pos + 5:].decode("utf-8", "surrogateescape"))
            except (ValueError, RecursionError):
                return None
    return None


def mutate_description(d, data: bytes) -> bytes:
    """Replace, drop or repeat one value of the trailer's JSON (types the writer never emits)."""
    found = find_trailer(data)
    if found is None:
        return data
    pos, obj = found
    slots = []

    def walk(node, depth):
        if len(slots) > 3000 or depth > 60:
            return
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            slots.append((node, k))
            if isinstance(v, (dict, list)):
                walk(v, depth + 1)
    if isinstance(obj, (dict, list)):
        walk(obj, 0)
    if not slots:
        return data
    node, k = d.choice(slots)
    how = d.int(0, 5)
    if how == 0 and isinstance(node, dict):
        del node[k]
    elif how == 1 and isinstance(node, list):
        node.insert(k, node[k])
    elif how == 2 and isinstance(node[k], int) and not isinstance(node[k], bool):
        node[k] = node[k] + d.choice([-1, 1, 8, 1 << 32])
    else:
        node[k] = d.choice(HOSTILE_JSON)
    js = json.dumps(obj).encode("utf-8", "surrogateescape")
    return data[:pos] + b"\x06" + struct.pack(">I", len(js)) + js


# -- seeds from the real captures ------------------------------------------------------------

def _cut(recs, keep_payload=3, keep_parts=2, max_devices=4, rng=None):
    """A small stream from a real one: first records of each section payload, the
    first ``keep_parts`` PART sections of each id, up to ``max_devices`` FULL
    sections (at random when ``rng`` is given) and their trailer entries.
    ``recs``: the decoded records of the real stream."""
    units, cur = [], None
    for r in recs:
        if r.depth:
            if cur is not None:
                cur.append(r)
            else:
                units.append([r])
            continue
        if isinstance(r, SectionHeader):
            cur = [r]
            units.append(cur)
        elif isinstance(r, SectionFooter) and cur is not None:
            cur.append(r)
            cur = None
        elif cur is not None and not isinstance(r, (Command, VmDescription)) and \
                r.kind not in ("eof", "trailing"):
            cur.append(r)
        else:
            cur = None
            units.append([r])
    names = {}
    parts = {}
    fulls = [i for i, u in enumerate(units)
             if isinstance(u[0], SectionHeader) and u[0].type_name == "FULL"]
    if rng is not None:
        chosen = set(rng.sample(fulls, min(max_devices, len(fulls))))
    else:
        chosen = set(fulls[:max_devices])
    out, kept_devices = [], set()
    for i, u in enumerate(units):
        h = u[0]
        if isinstance(h, SectionHeader) and h.depth == 0:
            if h.type_name in ("START", "FULL"):
                names[h.section_id] = (h.idstr, h.instance_id)
            if h.type_name == "PART":
                parts[h.section_id] = parts.get(h.section_id, 0) + 1
                if parts[h.section_id] > keep_parts:
                    continue
            if h.type_name == "FULL":
                if i not in chosen:
                    continue
                kept_devices.add((h.idstr, h.instance_id))
                out.extend(u)
                continue
            body = [_shorter(r) for r in u[1:] if not isinstance(r, SectionFooter)
                    and r.size <= 16 << 10]
            foot = [r for r in u[1:] if isinstance(r, SectionFooter)]
            if len(body) > keep_payload + 1:
                body = body[:keep_payload] + body[-1:]
            out.extend([h] + body + foot)
            continue
        if isinstance(h, VmDescription):
            try:
                desc = VD.parse(h.json_bytes)
            except QmigstreamError:
                out.append(h)
                continue
            obj = desc.obj
            devs = [e for e in obj.get("devices", [])
                    if (e.get("name"), e.get("instance_id")) in kept_devices]
            new = dict(obj)
            new["devices"] = devs
            out.append(VmDescription(VD.dump(new, desc.style)))
            continue
        out.extend(u)
    return encode_records(out)


def _shorter(r):
    if isinstance(r, RamZeroRun) and r.count > 3:
        return RamZeroRun(r.block, r.addr, 3, r.page_size, r.flags)
    return r


_SEEDS = None
SEED_DIR = ROOT / "tests" / "fuzz_seeds"


#: the seeds kept of the 5.2, 10.0 and 11.1 captures (the 7.2 ones are all kept):
#: one per shape those releases add (qjson trailer, 10.x commands and multifd
#: layout, 11.1's repeated array entries, zlib channels' main stream)
OTHER_RELEASE_SEEDS = {
    "pc-5.2-devices.0", "pc-5.2-ignore-shared-uuid.0", "pc-10.0-multifd.1",
    "pc-10.0-running-xbzrle.0", "pc-11.1-devices.2", "pc-11.1-paused.0",
    "pc-11.1-multifd-zlib.0", "pc-11.1-postcopy-advised.0",
}


def make_fixture_seeds(variants=3, max_size=64 << 10):
    """Cut the committed captures into ``variants`` small seeds each: {name: bytes}
    (of the other releases' captures only :data:`OTHER_RELEASE_SEEDS`)."""
    seeds = {}
    for p in sorted(CAPTURES.glob("*.mig.xz")):
        stem = p.name[:-len(".mig.xz")]
        other = not ("-7.2-" in stem or stem.startswith("pc-i440fx-2.2"))
        if other and not any(s.startswith(stem + ".") for s in OTHER_RELEASE_SEEDS):
            continue
        recs = list(read_records(lzma.open(p).read()))
        rng = random.Random(stem)
        for v in range(variants):
            try:
                cut = _cut(recs, max_devices=3 if v else 2, rng=rng if v else None)
                list(read_records(cut))
            except QmigstreamError:
                continue
            if other and f"{stem}.{v}" not in OTHER_RELEASE_SEEDS:
                continue
            if len(cut) <= max_size and cut not in seeds.values():
                seeds[f"{stem}.{v}"] = cut
    return seeds


def fixture_seeds():
    """The seeds cut from the real captures: ``tests/fuzz_seeds/*.mig`` (made by
    ``tools/fuzz/make-seeds``), or cut now when that directory is missing."""
    global _SEEDS
    if _SEEDS is None:
        files = sorted(SEED_DIR.glob("*.mig")) if SEED_DIR.is_dir() else []
        if files:
            _SEEDS = {f.name[:-4]: f.read_bytes() for f in files}
        else:
            _SEEDS = make_fixture_seeds()
    return _SEEDS


def multifd_channel_seeds():
    """The committed multifd channel recordings (first 64 KiB of each)."""
    out = {}
    for p in sorted(CAPTURES.glob("*.ch*.xz")):
        out[p.name[:-3]] = lzma.open(p).read()[:64 << 10]
    return out


# -- hypothesis strategies -------------------------------------------------------------------

def _strategies():
    from hypothesis import strategies as st

    @st.composite
    def streams(draw):
        return stream(HypothesisDraw(draw))

    @st.composite
    def vfio_streams(draw):
        return vfio_stream(HypothesisDraw(draw))

    @st.composite
    def device_payloads(draw):
        d = HypothesisDraw(draw)
        return device_entry(d, name(d, 1, 12), d.int(0, 3))

    @st.composite
    def mutated(draw, base):
        d = HypothesisDraw(draw)
        data = draw(base)
        seeds = list(fixture_seeds().values())
        return mutate(d, data, others=seeds[:4])

    @st.composite
    def seed_streams(draw):
        seeds = fixture_seeds()
        keys = sorted(seeds)
        return seeds[keys[draw(st.integers(0, len(keys) - 1))]]

    @st.composite
    def mapped_ram_streams(draw):
        return mapped_ram_stream(HypothesisDraw(draw))

    any_stream = st.one_of(streams(), vfio_streams(), mapped_ram_streams(), seed_streams())
    return {
        "streams": streams, "vfio_streams": vfio_streams, "device_payloads": device_payloads,
        "seed_streams": seed_streams, "mapped_ram_streams": mapped_ram_streams,
        "any_stream": any_stream,
        "mutated_streams": mutated(any_stream),
        "mutated": mutated,
    }


def __getattr__(attr):
    s = _strategies()
    if attr in s:
        return s[attr]
    raise AttributeError(attr)
