"""``qmigstream report FILE -o report.html``: a self-contained HTML page of where the bytes go."""

from __future__ import annotations

import os
import sys

from .progress import Progress, file_size


def register(sub):
    p = sub.add_parser("report", help="an HTML page with charts: bytes per phase and section, "
                                      "RAM records per iteration, devices, VFIO chunks")
    p.add_argument("file", help="stream file, or - for stdin")
    p.add_argument("-o", "--output", required=True, help="HTML file to write (- for stdout)")
    p.add_argument("--json", action="store_true",
                   help="also print the gathered numbers as JSON on stdout")
    p.add_argument("--page-size", type=int, default=None,
                   help="target page size when the stream does not say (default 4096)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import collect, render_html
    if args.output == "-" and args.json:
        print("qmigstream report: error: -o - and --json both want stdout", file=sys.stderr)
        return 2
    # Opened first, so a bad output path fails before the input is read.
    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    prog = Progress(file_size(args.file), "report")
    try:
        rep = collect(args.file, progress=prog, page_size=args.page_size)
    except BaseException:
        if out is not sys.stdout:
            out.close()
            os.unlink(args.output)
        raise
    finally:
        prog.close()
    if rep.error and not rep.records:
        # not a stream at all: no page, only the error
        if out is not sys.stdout:
            out.close()
            os.unlink(args.output)
        print(f"qmigstream report: error: {rep.error}", file=sys.stderr)
        return 2
    try:
        out.write(render_html(rep))
    finally:
        if out is not sys.stdout:
            out.close()
    if args.json:
        import json
        print(json.dumps(rep.to_json(), indent=2))
    if rep.error:
        print(f"qmigstream report: error: {rep.error} (the report of what came before it "
              f"is in {args.output})", file=sys.stderr)
        return 2
    return 0
