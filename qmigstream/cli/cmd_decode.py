"""``qmigstream decode FILE [--json]``: every record with its offset.

The JSON form (documented in docs/decode-json.md) is written as it is decoded,
so a stream of any size can be decoded with bounded memory.
"""

from __future__ import annotations

import json
import sys

from ..codec.ram_records import RamZeroRun
from ..codec.reader import StreamReader
from ..codec.records import OpaquePayload
from ..codec.sections.device import DeviceState
from ..codec.tree import tree_events
from .progress import Progress, file_size

FORMAT = "qmigstream-decode"
FORMAT_VERSION = 1


def register(sub):
    p = sub.add_parser("decode", help="record tree with byte offsets (text or --json)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="JSON tree (docs/decode-json.md)")
    p.add_argument("--expand-runs", action="store_true",
                   help="list each ZERO record of a run separately")
    p.add_argument("--data", action="store_true",
                   help="include payload bytes as hex (pages, device payloads, chunks)")
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--verify", action="store_true",
                   help="no tree: decode every record, read every byte of the input and "
                        "check that the records cover it exactly once")
    p.add_argument("--crc", action="store_true",
                   help="with --verify: also a CRC-32 of every payload byte, in stream order")
    p.set_defaults(func=run)


def _records(reader, expand):
    for rec in reader.records():
        if expand and isinstance(rec, RamZeroRun):
            yield from rec.expand()
        else:
            yield rec


def record_json(rec, data=False) -> dict:
    d = rec.to_json()
    if data:
        raw = getattr(rec, "data", None)
        if isinstance(raw, (bytes, bytearray, memoryview)):
            d["data"] = bytes(raw).hex()
    elif isinstance(rec, OpaquePayload) and len(rec.data) <= 64:
        d["data"] = rec.data.hex()
    return d


def run(args) -> int:
    reader = StreamReader(args.file, page_size=args.page_size,
                          compact=not args.expand_runs,
                          page_runs=args.verify and not args.expand_runs)
    prog = Progress(file_size(args.file), "decode")
    out = sys.stdout
    try:
        if args.verify:
            return verify(reader, out, prog, crc=args.crc)
        events = tree_events(_records(reader, args.expand_runs))
        if args.json:
            write_json(out, events, args.file, args.data, prog, reader)
        else:
            write_text(out, events, args.data, prog, reader)
    finally:
        prog.close()
    return 0


def verify(reader, out, prog, crc=False) -> int:
    """``--verify``: the full decode without the tree.

    Every record is decoded (as for the tree; runs of ZERO and of PAGE records
    come as one compact record each) and every byte of the input is read into
    memory.  Each record must start where the previous one ended and the last
    must end at the end of the input.  With ``crc`` the payload bytes (pages,
    XBZRLE and compressed data, device payloads, mapped-ram chunks, trailing
    bytes and the VMDESCRIPTION JSON) also go through one CRC-32 in stream
    order, computed in a worker thread.  Exit 0, or 1 with the offset where the
    records and the input part.
    """
    digest = None
    if crc:
        from .background import BackgroundDigest, Crc32
        digest = BackgroundDigest(Crc32())
    parts, pending = [], 0
    payload = 0
    pos = 0
    counts = {}
    in_runs = {"ram_zero_run": 0, "ram_page_run": 0}
    show = prog.enabled
    for rec in reader.records():
        if rec.offset != pos:
            out.write(f"records do not cover the input: {rec.kind} at offset {rec.offset}, "
                      f"expected {pos}\n")
            return 1
        size = rec.size
        pos += size
        k = rec.kind
        counts[k] = counts.get(k, 0) + 1
        if k in in_runs:
            in_runs[k] += rec.count
            if k == "ram_page_run":
                n = rec.count * rec.page_size
                payload += n
                if digest is not None:
                    parts.append(b"".join(rec.pages()))
                    pending += n
            continue
        data = getattr(rec, "data", None)
        if data is None:
            data = getattr(rec, "json_bytes", None)
        if data is not None:
            payload += len(data)
            if digest is not None:
                parts.append(data)
                pending += len(data)
        if pending >= 4 << 20:
            # One CRC-32 over the joined batch equals the CRC of each part in turn.
            digest.update(b"".join(parts))
            parts, pending = [], 0
        if show:
            prog(pos)
    value = None
    if digest is not None:
        digest.update(b"".join(parts))
        value = digest.result().value
    size = reader.src.size
    if size is not None and pos != size:
        out.write(f"records do not cover the input: they end at {pos}, the input at {size}\n")
        return 1
    total = sum(counts.values())
    out.write(f"verified: {pos:,} bytes in {total:,} records, each byte in exactly one record\n")
    listed = []
    for k, n in counts.items():
        extra = ""
        if k == "ram_zero_run":
            extra = f" ({in_runs[k]:,} ZERO records)"
        elif k == "ram_page_run":
            extra = f" ({in_runs[k]:,} PAGE records)"
        listed.append(f"{k} {n:,}{extra}")
    out.write("records:  " + ", ".join(listed) + "\n")
    line = f"payload:  {payload:,} bytes read"
    if value is not None:
        line += f", CRC-32 0x{value:08x}"
    out.write(line + "\n")
    return 0


def write_json(out, events, name, data, prog, reader):
    w = out.write
    w('{"format": "%s", "version": %d, "file": %s, "records": [' %
      (FORMAT, FORMAT_VERSION, json.dumps(str(name))))
    first = [True]

    def sep():
        if first[-1]:
            first[-1] = False
            w("\n")
        else:
            w(",\n")
    for ev in events:
        if ev[0] == "item":
            sep()
            w(json.dumps(record_json(ev[1], data)))
        elif ev[0] == "open":
            sep()
            d = record_json(ev[1], data)
            s = json.dumps(d)
            w(s[:-1] + ', "%s": [' % ev[2])
            first.append(True)
        else:
            first.pop()
            foot = ev[1]
            if foot is not None:
                w('], "footer": %s}' % json.dumps(foot.to_json()))
            else:
                w("]}")
        prog(reader.src.offset)
    w("\n]}\n")


def write_text(out, events, data, prog, reader):
    level = 0
    w = out.write
    for ev in events:
        if ev[0] == "close":
            level -= 1
            if ev[1] is not None:
                w(_line(ev[1], level + 1, data))
            continue
        w(_line(ev[1], level, data))
        if ev[0] == "open":
            level += 1
        prog(reader.src.offset)


def _line(rec, level, data):
    if isinstance(rec, DeviceState):
        return _device_lines(rec, level, data)
    f = rec.fields()
    parts = " ".join(f"{k}={_fmt(v)}" for k, v in f.items())
    s = f"{rec.offset:>12} {'  ' * level}{rec.kind} {parts}\n"
    if data:
        raw = getattr(rec, "data", None)
        if isinstance(raw, (bytes, bytearray)):
            s += f"{'':>12} {'  ' * level}  data {bytes(raw).hex()}\n"
    return s


def _fmt(v):
    if isinstance(v, str):
        return repr(v) if (" " in v or not v) else v
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _device_lines(rec, level, data):
    """A decoded device section: one line per field, nested vmsds indented."""
    t = rec.tree
    out = [f"{rec.offset:>12} {'  ' * level}device_state vmsd={t.vmsd_name} "
           f"version={t.version} length={len(rec.data)}\n"]
    _vmsd_lines(t, level + 1, out, data)
    return "".join(out)


def _vmsd_lines(node, level, out, data):
    pad = "  " * level
    for f in node.fields:
        shape = f"[{f.array_len}]" if f.array_len is not None else (
            f"#{f.index}" if f.index is not None else "")
        nested = list(f.nested())
        if nested:
            out.append(f"{f.offset:>12} {pad}{f.name}{shape} ({f.type})\n")
            for k, child in enumerate(nested):
                out.append(f"{child.offset:>12} {pad}  [{k}] {child.vmsd_name}\n")
                _vmsd_lines(child, level + 2, out, data)
            continue
        out.append(f"{f.offset:>12} {pad}{f.name}{shape} ({f.type}) = "
                   f"{_value_text(f.value, data)}\n")
    for s in node.subsections:
        out.append(f"{s.offset:>12} {pad}subsection {s.vmsd_name} version={s.version}\n")
        _vmsd_lines(s, level + 1, out, data)


def _value_text(v, data):
    if isinstance(v, (bytes, bytearray)):
        b = bytes(v)
        if data or len(b) <= 32:
            return b.hex() if b else "''"
        return f"{b[:32].hex()}... ({len(b)} bytes)"
    if isinstance(v, list):
        items = [_value_text(x, data) for x in v[:16]]
        more = f", ... ({len(v)} elements)" if len(v) > 16 else ""
        return "[" + ", ".join(items) + more + "]"
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v} (0x{v:x})" if v > 9 else str(v)
    return str(v)
