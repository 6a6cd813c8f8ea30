"""Recorded QEMU 9.0+/10.x multifd channels read by MultifdChannel (``ram extract
--multifd``, ``diff --multifd-a/-b``): the fixed 128-entry offset array, zero pages,
SYNC packets without RAM fields and device-state packets, which are skipped."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from qmigstream import diff as D
from qmigstream import guestmem
from qmigstream.cli import main
from qmigstream.errors import StreamError, Truncated
from qmigstream.guestmem import MultifdChannel
from qmigstream.pipeline.migrate import DeviceSpec, MigrateConfig, migrate
from qmigstream.vfio import multifd as MF
from qmigstream.wire import vfio as W

from test_guestmem import PS, page, stream, write

PROFILES = ["qemu-10.0", "qemu-10.1", "qemu-11.0"]


# -- real channels: the pipeline and a golden vector -------------------------------------------

@pytest.fixture(scope="module")
def one_channel(tmp_path_factory):
    """One 10.x+ migration per profile on a single multifd channel (with device state)."""
    d = tmp_path_factory.mktemp("mfd1")
    out = {}
    for profile in PROFILES:
        path = d / f"{profile}.mig"
        cfg = MigrateConfig(profile=profile, ram_size=4 << 20, iterations=3, dirty_rate=20000,
                            bandwidth=64 << 20, seed=11, multifd_channels=1, ram_digest="sha256",
                            devices=[DeviceSpec("sized:600K", seed=1, dma_rate=2000,
                                                features="p2p"),
                                     DeviceSpec("mtty", seed=2)])
        out[profile] = (path, migrate(path, cfg))
    return out


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The qemu-10.1 multifd-device-state golden vector: two channels."""
    d = tmp_path_factory.mktemp("golden")
    assert main(["golden", "generate", str(d), "--profiles", "qemu-10.1",
                 "--scenarios", "multifd-device-state"]) == 0
    base = d / "qemu-10.1" / "multifd-device-state"
    state = json.loads((d / "qemu-10.1" / "multifd-device-state.state.json").read_text())
    main_path = str(base) + ".mig"
    chans = [str(d / "qemu-10.1" / c["file"]) for c in state["channels"]]
    assert len(chans) == 2
    return main_path, chans, state


def read_all(path):
    """Every epoch of one channel: [[(block, offsets, bytes), ...], ...], and the channel."""
    ch = MultifdChannel(path)
    epochs = []
    while not ch.done:
        epochs.append([(b, list(o), bytes(d)) for b, o, d, _ in ch.epoch_packets()])
    ch.close()
    return epochs, ch


def _digest(mem: bytes, scheme: str) -> str:
    """The pipeline's RAM digest (``scheme``) of a pc.ram holding ``mem``."""
    from qmigstream.pipeline.guest import GuestRam
    ram = GuestRam([("pc.ram", len(mem))], PS)
    blk = ram.block("pc.ram")
    nz = [i for i in range(len(mem) // PS) if any(mem[i * PS:(i + 1) * PS])]
    for i in nz:
        blk.mem[i * PS:(i + 1) * PS] = mem[i * PS:(i + 1) * PS]
    blk.mark_written(0, len(mem) // PS)
    return ram.digests(scheme)["pc.ram"]


def apply_in_round_order(channel_paths, size):
    """Memory after applying the channels round by round (all channels' epoch k, then
    k + 1), as ``multifd_recv_sync_main`` orders them."""
    mem = bytearray(size)
    per = [read_all(p)[0] for p in channel_paths]
    for k in range(max(len(e) for e in per)):
        for epochs in per:
            for _block, offs, data in (epochs[k] if k < len(epochs) else []):
                for i, a in enumerate(offs):
                    mem[a:a + PS] = data[i * PS:(i + 1) * PS]
    return bytes(mem)


@pytest.mark.parametrize("profile", PROFILES)
def test_extract_with_one_channel_equals_the_source_ram(profile, one_channel, tmp_path):
    path, res = one_channel[profile]
    (entry,) = res.channels
    assert entry["packets"]["device_state"] > 0 and res.pages["zero"] > 0
    out = tmp_path / "out"
    m = guestmem.extract(str(path), str(out), channels=[entry["file"]])
    assert {b["name"]: b["sha256"] for b in m["blocks"]} == res.ram
    (blk,) = m["blocks"]
    # every page, normal or zero, came from the channel
    assert blk["pages"]["multifd"] == res.pages["normal"] + res.pages["zero"]
    assert blk["pages"]["page"] == blk["pages"]["zero"] == 0
    # the channel's packets are the ones the sender wrote
    _, ch = read_all(entry["file"])
    assert ch.packets == entry["packets"] and ch.zero_pages == res.pages["zero"]
    assert ch.offset == entry["size"]


def test_ram_extract_cli_with_a_channel(one_channel, tmp_path, capsys):
    path, res = one_channel["qemu-10.1"]
    out = tmp_path / "cli"
    rc = main(["ram", "extract", str(path), "-o", str(out), "--multifd",
               res.channels[0]["file"], "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert {b["name"]: b["sha256"] for b in m["blocks"]} == res.ram
    assert json.loads((out / "manifest.json").read_text())["blocks"] == m["blocks"]
    # without the channel no page is there: the manifest says why
    rc = main(["ram", "extract", str(path), "-o", str(tmp_path / "bare"), "--json"])
    m0 = json.loads(capsys.readouterr().out)
    assert rc == 0 and m0["blocks"][0]["sha256"] != res.ram["pc.ram"]
    assert any("MULTIFD_FLUSH" in n for n in m0["notes"])


def test_golden_channels_hold_what_the_sender_counted(golden):
    _main, chans, state = golden
    normal = zero = 0
    for path, entry in zip(chans, state["channels"]):
        epochs, ch = read_all(path)
        assert ch.packets == entry["packets"] and ch.offset == entry["size"]
        assert ch.epoch == entry["packets"]["sync"]
        normal += sum(len(o) for e in epochs for _, o, _ in e) - ch.zero_pages
        zero += ch.zero_pages
    assert (normal, zero) == (state["pages"]["normal"], state["pages"]["zero"])


def test_golden_channels_in_round_order_give_the_source_ram(golden):
    _main, chans, state = golden
    mem = apply_in_round_order(chans, 2 << 20)
    from qmigstream.pipeline.golden import CONTENT
    assert _digest(mem, CONTENT["ram_digest"]) == state["ram"]["pc.ram"]
    # one channel after the other is not the same: pages are sent again in later
    # rounds on the other channel, so the order across channels matters
    seq = bytearray(2 << 20)
    for p in chans:
        for e in read_all(p)[0]:
            for _b, offs, data in e:
                for i, a in enumerate(offs):
                    seq[a:a + PS] = data[i * PS:(i + 1) * PS]
    assert bytes(seq) != mem


def test_golden_extract_with_two_channels_equals_the_source_ram(golden, tmp_path):
    path, chans, state = golden
    """The channels are applied round by round (a page sent again in a later round
    may come on the other channel): the extracted memory is the source's."""
    from qmigstream.pipeline.golden import CONTENT
    m = guestmem.extract(path, str(tmp_path / "o"), channels=chans)
    (blk,) = m["blocks"]
    mem = (tmp_path / "o" / blk["file"]).read_bytes()
    assert _digest(mem, CONTENT["ram_digest"]) == state["ram"]["pc.ram"]
    assert blk["sha256"] == hashlib.sha256(mem).hexdigest()


def test_diff_of_a_stream_with_itself_and_its_channels_is_equal(golden, tmp_path, capsys):
    path, chans, _state = golden
    r = D.diff(path, path, channels_a=chans, channels_b=chans, workdir=str(tmp_path))
    assert r.equal
    args = ["diff", path, path, "--json"]
    for c in chans:
        args += ["--multifd-a", c, "--multifd-b", c]
    assert main(args) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["equal"] and j["compared"]["ram_blocks"] == 1
    # the channels carry the pages: leaving them out on one side differs
    r = D.diff(path, path, channels_a=chans, workdir=str(tmp_path))
    assert [d.path for d in r.differences if d.area == "ram"] == ["pc.ram"]


# -- hand-built channels ----------------------------------------------------------------------

def ram_packet(num, normal=(), zero=(), *, flags=0, block="pc.ram", pages=None):
    """A 9.0+ RAM packet: header from qmigstream.vfio.multifd, then the normal pages."""
    head = MF.ram_packet_header(num, ramblock=block, normal=[i * PS for i in normal],
                                zero=[i * PS for i in zero], flags=flags)
    return head + b"".join(pages if pages is not None else (page(i) for i in normal))


def sync(num):
    return MF.ram_packet_header(num, flags=W.MULTIFD_FLAG_SYNC)


def device_packet(size=5000, idx=0):
    return MF.DeviceStatePacket("0000:00:10.0/vfio", 0, MF.vfio_payload(idx, bytes(size))).encode()


def channel_file(tmp_path, *packets, name="c.ch0"):
    p = tmp_path / name
    p.write_bytes(MF.ChannelInit(0).encode() + b"".join(packets))
    return str(p)


def test_layout_of_10x_packets(tmp_path):
    assert len(sync(0)) == 320 + 8 * 128            # SYNC: pages_alloc 0, full array anyway
    path = channel_file(tmp_path,
                        ram_packet(0, normal=[0, 1], zero=[2]), device_packet(), sync(1),
                        device_packet(0, idx=1), ram_packet(2, zero=[0]), sync(3))
    ch = MultifdChannel(path)
    e0 = [(b, list(o), bytes(d)) for b, o, d, _ in ch.epoch_packets()]
    # zero pages first (multifd_recv_zero_page_process), zero-filled, then the normal ones
    assert e0 == [("pc.ram", [2 * PS], bytes(PS)), ("pc.ram", [0, PS], page(0) + page(1))]
    assert ch.epoch == 1
    e1 = [(b, list(o), bytes(d)) for b, o, d, _ in ch.epoch_packets()]
    assert e1 == [("pc.ram", [0], bytes(PS))]
    assert list(ch.epoch_packets()) == [] and ch.done
    assert ch.packets == {"ram": 2, "sync": 2, "device_state": 2} and ch.zero_pages == 2


def test_pre_9_packets_still_read(tmp_path):
    """7.2-8.x: pages_alloc 128 in every packet, a SYNC packet may carry pages, the
    zero_pages word is reserved (0)."""
    def old(num, normal, flags=0):
        raw = bytearray(MF.ram_packet_header(num, ramblock="pc.ram",
                                             normal=[i * PS for i in normal]))
        struct.pack_into(">I", raw, 8, flags)
        return bytes(raw) + b"".join(page(i) for i in normal)
    path = channel_file(tmp_path, old(0, [3]), old(1, [4, 5], W.MULTIFD_FLAG_SYNC), old(2, []))
    epochs, ch = read_all(path)
    assert epochs == [[("pc.ram", [3 * PS], page(3)),
                       ("pc.ram", [4 * PS, 5 * PS], page(4) + page(5))], []]
    assert ch.packets == {"ram": 2, "sync": 1, "device_state": 0}


def test_zero_pages_in_guest_memory(tmp_path):
    """Per-section sync: epoch k is RAM iteration k.  A zero page in a later epoch
    zeroes a page an earlier epoch wrote (and punches it back into a hole)."""
    main_path = write(tmp_path, stream([("pc.ram", 8 * PS)], [[]]))
    path = channel_file(tmp_path, ram_packet(0, normal=[0, 1]), device_packet(), sync(1),
                        ram_packet(2, normal=[2], zero=[0, 5]), sync(3))
    m = guestmem.extract(main_path, str(tmp_path / "all"), channels=[path])
    ram = (tmp_path / "all" / "pc.ram.img").read_bytes()
    assert ram == bytes(PS) + page(1) + page(2) + bytes(5 * PS)
    assert m["blocks"][0]["pages"]["multifd"] == 5 and m["blocks"][0]["data_pages"] == 2
    m0 = guestmem.extract(main_path, str(tmp_path / "i0"), channels=[path], until_iteration=0)
    ram0 = (tmp_path / "i0" / "pc.ram.img").read_bytes()
    assert ram0 == page(0) + page(1) + bytes(6 * PS)
    assert m0["blocks"][0]["pages"]["multifd"] == 2


def test_channel_errors(tmp_path):
    def first_epoch(*packets):
        ch = MultifdChannel(channel_file(tmp_path, *packets))
        return list(ch.epoch_packets())

    # zero pages beyond pages_alloc - normal_pages (multifd_ram_unfill_packet)
    raw = bytearray(ram_packet(0, normal=[0], zero=[1]))
    struct.pack_into(">I", raw, 32, 128)
    with pytest.raises(StreamError, match="page counts out of range") as e:
        first_epoch(bytes(raw))
    assert e.value.offset == 64 + 12
    # a SYNC packet (pages_alloc 0) that claims zero pages
    raw = bytearray(sync(0))
    struct.pack_into(">I", raw, 32, 1)
    with pytest.raises(StreamError, match="page counts out of range"):
        first_epoch(bytes(raw))
    # device state whose payload runs past the end of the channel
    dev = device_packet(5000)
    with pytest.raises(Truncated, match="inside device-state packet data") as e:
        first_epoch(dev[:-1])
    assert e.value.offset == 64 + W.MULTIFD_DEVICE_STATE_HEADER_SIZE
    with pytest.raises(Truncated, match="inside a device-state packet header"):
        first_epoch(dev[:100])
    # the offset array is always 128 entries: a packet cut inside it is truncated
    with pytest.raises(Truncated, match="inside a packet header"):
        first_epoch(sync(0)[:400])
    # a packet header after a device-state packet is checked as usual
    with pytest.raises(StreamError, match="bad multifd packet header") as e:
        first_epoch(dev, b"\0" * 12)
    assert e.value.offset == 64 + len(dev)
    # pages of a block the stream never declared
    main_path = write(tmp_path, stream([("pc.ram", 8 * PS)], [[]]))
    path = channel_file(tmp_path, ram_packet(0, zero=[1], block="nope"), sync(1), name="n.ch")
    with pytest.raises(StreamError, match="unknown RAM block 'nope'"):
        guestmem.extract(main_path, str(tmp_path / "o"), channels=[path])


@pytest.mark.parametrize("profile", PROFILES)
def test_until_iteration_applies_the_epochs_synced_by_then(profile, one_channel, tmp_path):
    """10.x syncs the channels at each MULTIFD_FLUSH record (per round), not at
    each section's EOS: memory as of iteration N holds exactly the channel epochs
    of the MULTIFD_FLUSH records in RAM sections 0..N."""
    from qmigstream.codec.reader import StreamReader
    from qmigstream.codec.ram_records import RamMultifdFlush
    from qmigstream.codec.records import SectionHeader
    path, res = one_channel[profile]
    (entry,) = res.channels
    # MULTIFD_FLUSH records seen by the end of each RAM section (iteration)
    flushes, per_iter, it = 0, [], -1
    rd = StreamReader(str(path))
    for r in rd.records():
        if isinstance(r, SectionHeader) and rd.sections[r.section_id].idstr == "ram":
            if it >= 0:
                per_iter.append(flushes)
            it += 1
        elif isinstance(r, RamMultifdFlush):
            flushes += 1
    per_iter.append(flushes)
    assert flushes > 1 and len(per_iter) >= 3
    epochs, _ = read_all(entry["file"])
    pages_by_epoch = [sum(len(o) for _b, o, _d in e) for e in epochs]
    for n in range(len(per_iter)):
        m = guestmem.extract(str(path), str(tmp_path / f"o{n}"), channels=[entry["file"]],
                             until_iteration=n, hash=False)
        (blk,) = m["blocks"]
        assert blk["pages"]["multifd"] == sum(pages_by_epoch[:per_iter[n]]), n
    full = guestmem.extract(str(path), str(tmp_path / "all"), channels=[entry["file"]])
    assert {b["name"]: b["sha256"] for b in full["blocks"]} == res.ram
