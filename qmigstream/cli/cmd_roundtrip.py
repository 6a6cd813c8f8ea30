"""``qmigstream roundtrip FILE``: decode, re-encode from the decoded fields, compare."""

from __future__ import annotations

import hashlib
import json

from ..codec.reader import StreamReader
from .progress import Progress, file_size


def register(sub):
    p = sub.add_parser("roundtrip",
                       help="decode and re-encode; exit 0 if byte-identical, 1 if not")
    p.add_argument("file")
    p.add_argument("-o", "--output", help="also write the re-encoded stream here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def roundtrip(path, output=None, progress=None):
    """Return ``(identical, sha_in, sha_out, first_diff_offset, size_in, size_out)``."""
    h_in, h_out = hashlib.sha256(), hashlib.sha256()
    first_diff = None
    n_out = 0
    out = open(output, "wb") if output else None
    reader = StreamReader(path)
    with open(path, "rb") as orig:
        try:
            for rec in reader.records():
                enc = rec.encode()
                if out:
                    out.write(enc)
                h_out.update(enc)
                got = orig.read(len(enc))
                h_in.update(got)
                if first_diff is None and got != enc:
                    first_diff = n_out + _first_mismatch(got, enc)
                n_out += len(enc)
                if progress:
                    progress(n_out)
        finally:
            if out:
                out.close()
        rest = orig.read(1 << 20)
        n_in = n_out
        while rest:
            if first_diff is None:
                first_diff = n_in
            h_in.update(rest)
            n_in += len(rest)
            rest = orig.read(1 << 20)
    return first_diff is None, h_in.hexdigest(), h_out.hexdigest(), first_diff, n_in, n_out


def _first_mismatch(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def run(args) -> int:
    prog = Progress(file_size(args.file), "roundtrip")
    try:
        same, sin, sout, diff, nin, nout = roundtrip(args.file, args.output, prog)
    finally:
        prog.close()
    if args.json:
        print(json.dumps({"identical": same, "input_sha256": sin, "output_sha256": sout,
                          "first_difference": diff, "input_size": nin, "output_size": nout}))
    elif same:
        print(f"identical: {nin} bytes")
        print(f"input  sha256 {sin}")
        print(f"output sha256 {sout}")
    else:
        print(f"DIFFERENT: first difference at offset {diff} (0x{diff:x}); "
              f"input {nin} bytes, output {nout} bytes")
        print(f"input  sha256 {sin}")
        print(f"output sha256 {sout}")
    return 0 if same else 1
