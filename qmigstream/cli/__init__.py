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
import os
import sys

from ..errors import QmigstreamError
from .. import __version__

EXIT_OK, EXIT_NO, EXIT_BAD_INPUT = 0, 1, 2


def _command_names():
    names = set()
    for d in sys.modules[__name__].__path__:
        for f in os.listdir(d):
            if f.startswith("cmd_") and f.endswith(".py"):
                names.add(f[4:-3])
    return sorted(names)


def _command_modules(only=None):
    """The command modules (``only``: just that command's, so a command imports
    only what it needs and starts fast)."""
    for name in _command_names():
        if only is None or name == only:
            yield importlib.import_module(f"{__name__}.cmd_{name}")


def _command_of(argv):
    """The command word in ``argv`` if it names a command module, else None."""
    for a in argv:
        if not a.startswith("-"):
            return a if a in _command_names() else None
    return None


def build_parser(only=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qmigstream",
        description="Look inside, re-encode, generate and check QEMU migration streams.",
        epilog="exit codes: 0 ok, 1 negative answer (differs / would not load), 2 bad input or usage")
    p.add_argument("--version", action="version", version=f"qmigstream {__version__}")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules(only):
        mod.register(sub)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Names from a stream's JSON may hold lone surrogates (\ud800 escapes, or
    # bytes that are not UTF-8): print them escaped instead of failing.
    for out in (sys.stdout, sys.stderr):
        try:
            out.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    only = _command_of(argv)
    if only is None and "--version" in argv:
        only = ""                       # nothing to import to print the version
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    global _fast_exit
    _fast_exit = bool(getattr(args, "fast_exit", False))
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


#: Set by :func:`main` for commands that ask for it (``fast_exit`` in their
#: parser's defaults: commands whose files are all closed when they return).
_fast_exit = False


def _exit_now(code: int) -> None:
    """End the process without tearing the interpreter down (40-60 ms for the
    pipeline's modules on a slow machine, as long as the work itself is small):
    standard streams flushed and ``atexit`` handlers run first, as ``sys.exit``
    does.  Only when the command asked for it and no other thread is alive;
    otherwise (or if a flush fails) the usual way."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    import atexit
    atexit._run_exitfuncs()
    os._exit(code)


def run():  # pragma: no cover - console entry
    code = main()
    if _fast_exit:
        _exit_now(code)
    sys.exit(code)
