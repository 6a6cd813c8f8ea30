"""``qmigstream report FILE -o report.html``: a self-contained HTML page of where the bytes go."""

from __future__ import annotations

import sys

from .progress import Progress, file_size


def register(sub):
    p = sub.add_parser("report", help="an HTML page with charts: bytes per phase and section, "
                                      "RAM records per iteration, devices, VFIO chunks")
    p.add_argument("file", help="stream file, or - for stdin")
    p.add_argument("-o", "--output", required=True, help="HTML file to write")
    p.add_argument("--json", action="store_true",
                   help="also print the gathered numbers as JSON on stdout")
    p.add_argument("--page-size", type=int, default=None,
                   help="target page size when the stream does not say (default 4096)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import collect, render_html
    prog = Progress(file_size(args.file), "report")
    try:
        rep = collect(args.file, progress=prog, page_size=args.page_size)
    finally:
        prog.close()
    with open(args.output, "w", encoding="utf-8") as out:
        out.write(render_html(rep))
    if args.json:
        import json
        print(json.dumps(rep.to_json(), indent=2))
    if rep.error:
        print(f"qmigstream report: error: {rep.error} (report of the part before it written "
              f"to {args.output})", file=sys.stderr)
        return 2
    return 0
