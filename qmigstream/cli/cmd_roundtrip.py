"""``qmigstream roundtrip FILE``: decode, re-encode from the decoded fields, compare."""

from __future__ import annotations

import hashlib
import json

from ..codec.reader import StreamReader
from ..codec.writer import record_chunks
from .background import BackgroundDigest
from .progress import Progress, file_size


def register(sub):
    p = sub.add_parser("roundtrip",
                       help="decode and re-encode; exit 0 if byte-identical, 1 if not")
    p.add_argument("file")
    p.add_argument("-o", "--output", help="also write the re-encoded stream here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-sha256", action="store_true",
                   help="compare only: no SHA-256 of input and output (it is most of the time)")
    p.set_defaults(func=run)


#: Bytes of re-encoded records gathered before they are compared, hashed, written.
BATCH = 4 << 20


class _NoDigest:
    """The digest interface, computing nothing (``--no-sha256``)."""

    def update(self, data, done=None):
        if done is not None:
            done.set()

    def fork(self):
        return self

    copy = fork

    def close(self):
        pass

    def result(self):
        return self

    def hexdigest(self):
        return None


def roundtrip(path, output=None, progress=None, sha256=True):
    """Return ``(identical, sha_in, sha_out, first_diff_offset, size_in, size_out)``.

    The re-encoded records are gathered into batches of about :data:`BATCH`
    bytes in a reused buffer; each batch is compared with the same span of the
    original file (read into one of two reused buffers) in one comparison.
    While the two are equal one SHA-256 serves both sides (the output hash
    forks from it at the first difference), and it is computed in a worker
    thread, so hashing overlaps decoding.
    """
    import threading
    from ..codec.ram_records import RamPageRun
    hasher = BackgroundDigest(hashlib.sha256()) if sha256 else _NoDigest()
    h_out = None                 # set at the first difference
    first_diff = None
    n_out = 0
    enc = bytearray(BATCH + (2 << 20))
    at = 0                       # bytes of enc in use
    inbufs = [bytearray(len(enc)), bytearray(len(enc))]
    hashed = [threading.Event(), threading.Event()]
    for e in hashed:
        e.set()
    turn = 0
    out = open(output, "wb") if output else None
    reader = StreamReader(path, page_runs=True)

    def put(part):
        nonlocal at, enc
        n = len(part)
        if at + n > len(enc):
            enc += bytes(at + n - len(enc))
        enc[at:at + n] = part
        at += n

    def flush():
        nonlocal at, n_out, first_diff, h_out, turn
        n = at
        at = 0
        if not n:
            return
        mine = memoryview(enc)[:n]
        if out:
            out.write(mine)
        k = turn
        turn ^= 1
        hashed[k].wait()                 # the worker is done with this buffer
        buf = inbufs[k]
        if len(buf) < n:
            buf = inbufs[k] = bytearray(n)
        got = _readinto_exactly(orig, memoryview(buf)[:n])
        theirs = memoryview(buf)[:got]
        hashed[k].clear()
        if h_out is None and got == n and enc.startswith(theirs):
            hasher.update(theirs, hashed[k])
        else:
            if h_out is None:
                h_out = hasher.fork()
            if first_diff is None:
                first_diff = n_out + _first_mismatch(bytes(theirs), bytes(mine))
            hasher.update(theirs, hashed[k])
            h_out.update(bytes(mine))
        n_out += n
        if progress:
            progress(n_out)

    with open(path, "rb", buffering=0) as orig:
        try:
            for rec in reader.records():
                if type(rec) is RamPageRun:
                    n = rec.size
                    if at + n > len(enc):
                        enc += bytes(at + n - len(enc))
                    at += rec.encode_into(enc, at)
                else:
                    for part in record_chunks(rec):
                        put(part)
                if at >= BATCH:
                    flush()
            flush()
        finally:
            if out:
                if at:
                    out.write(memoryview(enc)[:at])
                out.close()
            hasher.close()
        rest = orig.read(1 << 20)
        n_in = n_out
        if rest and h_out is None:
            h_out = hasher.fork()        # the output ends here; the input goes on
        while rest:
            if first_diff is None:
                first_diff = n_in
            hasher.update(rest)
            n_in += len(rest)
            rest = orig.read(1 << 20)
    sha_in = hasher.result().hexdigest()
    sha_out = sha_in if h_out is None else h_out.hexdigest()
    return first_diff is None, sha_in, sha_out, first_diff, n_in, n_out


def _readinto_exactly(f, mv) -> int:
    """Fill ``mv`` from ``f``; the count, less than ``len(mv)`` only at its end."""
    got = 0
    while got < len(mv):
        k = f.readinto(mv[got:])
        if not k:
            break
        got += k
    return got


def _first_mismatch(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    step = 4096
    i = 0
    while i < n and a[i:i + step] == b[i:i + step]:
        i += step
    for j in range(i, min(i + step, n)):
        if a[j] != b[j]:
            return j
    return n


def run(args) -> int:
    prog = Progress(file_size(args.file), "roundtrip")
    try:
        same, sin, sout, diff, nin, nout = roundtrip(args.file, args.output, prog,
                                                     sha256=not args.no_sha256)
    finally:
        prog.close()
    if args.json:
        print(json.dumps({"identical": same, "input_sha256": sin, "output_sha256": sout,
                          "first_difference": diff, "input_size": nin, "output_size": nout}))
    else:
        if same:
            print(f"identical: {nin} bytes")
        else:
            print(f"DIFFERENT: first difference at offset {diff} (0x{diff:x}); "
                  f"input {nin} bytes, output {nout} bytes")
        if sin is not None:
            print(f"input  sha256 {sin}")
            print(f"output sha256 {sout}")
    return 0 if same else 1
