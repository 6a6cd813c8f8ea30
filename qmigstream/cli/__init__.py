"""The ``qmigstream`` command.

Each subcommand lives in its own module ``qmigstream.cli.cmd_<name>`` defining
``register(subparsers)`` (adds its parser and sets ``func``) and a ``run(args)``
returning the exit code.

Exit codes (all commands):
  0  success / equal / would load
  1  a negative answer: differs, would not load, check failed
  2  the input is not usable (malformed, truncated, not a stream) or bad usage
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import QmigstreamError
from .. import __version__

EXIT_OK, EXIT_NO, EXIT_BAD_INPUT = 0, 1, 2


def _command_modules():
    pkg = sys.modules[__name__]
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            yield importlib.import_module(f"{__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qmigstream",
        description="Look inside, re-encode, generate and check QEMU migration streams.",
        epilog="exit codes: 0 ok, 1 negative answer (differs / would not load), 2 bad input or usage")
    p.add_argument("--version", action="version", version=f"qmigstream {__version__}")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        mod.register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except QmigstreamError as e:
        if args.debug:
            raise
        print(f"qmigstream {args.command}: error: {e.one_line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): not an error.
        import os
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:
        if args.debug:
            raise
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"qmigstream {args.command}: error:{where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def run():  # pragma: no cover - console entry
    sys.exit(main())
