"""A progress bar on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    def __init__(self, total: int | None, label: str, *, stream=None, force=None):
        self.stream = stream or sys.stderr
        tty = self.stream.isatty() if force is None else force
        self.enabled = bool(tty and total and total > (8 << 20)
                            and not os.environ.get("QMIGSTREAM_NO_PROGRESS"))
        self.total, self.label = total, label
        self._next = 0.0

    def __call__(self, done: int):
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 0.2
        frac = min(1.0, done / self.total)
        width = 30
        bar = "#" * int(frac * width)
        self.stream.write(f"\r{self.label} [{bar:<{width}}] {frac * 100:5.1f}% "
                          f"{done >> 20}/{self.total >> 20} MiB")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()


def file_size(path) -> int | None:
    try:
        return os.stat(path).st_size if path != "-" else None
    except OSError:
        return None
