"""``qmigstream analyze -f FILE [-d state|desc] [-m] [-x]``: analyze-migration.py's output.

Takes the options of QEMU's ``scripts/analyze-migration.py`` so existing
commands keep working, and prints the same JSON (see qmigstream/analyze.py and
docs/analyze.md).  ``-x`` writes ``desc.json``, ``state.json`` and one file per
RAM block into the current directory (or ``--output-dir``), never outside it.
"""

from __future__ import annotations

import os
import sys

from .. import analyze as A


def register(sub):
    p = sub.add_parser("analyze", help="analyze-migration.py-compatible JSON (-f FILE -d state|desc)")
    p.add_argument("-f", "--file", required=True, help="migration dump to read from")
    p.add_argument("-m", "--memory", action="store_true", help="dump RAM contents as well")
    p.add_argument("-d", "--dump", default="state", help='what to dump ("state" or "desc")')
    p.add_argument("-x", "--extract", action="store_true",
                   help="extract contents into individual files")
    p.add_argument("--output-dir", default=".", help="where -x writes (default: .)")
    p.add_argument("--page-size", type=int, default=None,
                   help="target page size when the stream has no trailer (default 4096)")
    p.add_argument("--script", choices=A.SCRIPTS, default=None,
                   help="print as analyze-migration.py of this generation does (7.2: up to "
                        "9.2, 10.0: 10.0 and later; default: that of the QEMU that wrote "
                        "the stream)")
    p.set_defaults(func=run)


def run(args) -> int:
    out = sys.stdout
    if args.extract:
        os.makedirs(args.output_dir, exist_ok=True)
        desc = _desc_or_none(args.file)
        if desc is not None:
            print("desc.json")
            _write(os.path.join(args.output_dir, "desc.json"), A.dumps(desc))
        files = A.MemoryFiles(args.output_dir)
        try:
            state = A.analyze_state(args.file, memory_writer=files, page_size=args.page_size,
                                    script=args.script)
        finally:
            files.close()
        print("state.json")
        _write(os.path.join(args.output_dir, "state.json"), A.dumps(state))
        return 0
    if args.dump == "state":
        state = A.analyze_state(args.file, dump_memory=args.memory, page_size=args.page_size,
                                script=args.script)
        out.write(A.dumps(state) + "\n")
        return 0
    if args.dump == "desc":
        out.write(A.dumps(A.analyze_desc(args.file)) + "\n")
        return 0
    print('qmigstream analyze: error: please specify either -x, -d state or -d desc',
          file=sys.stderr)
    return 2


def _desc_or_none(path):
    from ..errors import DescriptionError
    try:
        return A.analyze_desc(path)
    except DescriptionError:
        return None


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
