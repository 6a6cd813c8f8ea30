"""Section payload handlers, dispatched by idstr.

A handler is registered with :func:`register` and a predicate on the idstr.
Adding a section kind is adding one entry here, not editing the reader loop.
A handler's ``read(reader, src, header)`` yields the payload records and stops
right before the footer (or the next record when footers are off).
"""

from __future__ import annotations

_HANDLERS = []


def register(match):
    """Class decorator: ``match`` is an idstr or a predicate on the idstr."""
    pred = (lambda idstr: idstr == match) if isinstance(match, str) else match

    def deco(cls):
        _HANDLERS.append((pred, cls))
        return cls
    return deco


def handler_for(idstr: str):
    for pred, cls in _HANDLERS:
        if pred(idstr):
            return cls
    from .device import DeviceSection
    return DeviceSection


def _load():
    import importlib
    # they register (the device fallback, vmstate decoding, loads in handler_for)
    for name in ("ram", "block", "dirty_bitmap", "vfio"):
        importlib.import_module(f"{__name__}.{name}")


_load()
