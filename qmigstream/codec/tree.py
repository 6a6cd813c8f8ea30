"""Group the flat record stream into a tree, as events, without buffering.

Events: ``("open", rec, child_key)`` starts a container (a section: its
``payload``; a PACKAGED command: its ``package``), ``("item", rec)`` is a leaf,
``("close", footer_or_None)`` ends the innermost container.
"""

from __future__ import annotations

from .records import (Command, EndOfStream, PackagedEnd, SectionFooter, SectionHeader)
from ..wire.commands import MigCmd

_NOT_PAYLOAD = (SectionHeader, SectionFooter, Command, EndOfStream, PackagedEnd)


def tree_events(records):
    stack = []          # "section" | "package"
    for rec in records:
        in_section = bool(stack) and stack[-1] == "section"
        if isinstance(rec, SectionFooter):
            if in_section:
                stack.pop()
                yield ("close", rec)
            else:
                yield ("item", rec)
            continue
        if in_section and (isinstance(rec, _NOT_PAYLOAD) or getattr(rec, "depth", 0) == 0
                           and not _is_payload(rec)):
            stack.pop()
            yield ("close", None)
        if isinstance(rec, PackagedEnd):
            if stack and stack[-1] == "package":
                stack.pop()
                yield ("close", None)
            continue
        if isinstance(rec, SectionHeader):
            stack.append("section")
            yield ("open", rec, "payload")
        elif isinstance(rec, Command) and rec.cmd == MigCmd.PACKAGED:
            stack.append("package")
            yield ("open", rec, "package")
        else:
            yield ("item", rec)
    while stack:
        stack.pop()
        yield ("close", None)


def _is_payload(rec) -> bool:
    from .records import FileHeader, Configuration, VmDescription, TrailingBytes
    return not isinstance(rec, (FileHeader, Configuration, VmDescription, TrailingBytes))
