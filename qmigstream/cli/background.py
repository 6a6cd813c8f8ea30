"""Digests computed in a worker thread while the main thread decodes.

hashlib and zlib release the GIL on large buffers, so a SHA-256 or CRC-32 of
megabyte batches runs on another core.  Batches must not change after they
are handed over (pass ``bytes``, or reuse a buffer only after its ``done``
event is set).
"""

from __future__ import annotations

import queue
import threading
import zlib


class Crc32:
    """zlib.crc32 with the hashlib-style ``update``/``copy`` interface."""

    def __init__(self, value: int = 0):
        self.value = value

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def copy(self) -> "Crc32":
        return Crc32(self.value)


class BackgroundDigest:
    """``digest.update`` in a worker thread; at most two batches wait."""

    def __init__(self, digest):
        self.digest = digest
        self._q = queue.Queue(maxsize=2)
        self._t = threading.Thread(target=self._work, daemon=True)
        self._t.start()

    def _work(self):
        while True:
            item = self._q.get()
            if item is not None:
                data, done = item
                self.digest.update(data)
                if done is not None:
                    done.set()
            self._q.task_done()
            if item is None:
                return

    def update(self, data, done=None) -> None:
        """Hash ``data`` (in the worker); ``done``, a threading.Event, is set once
        it has been hashed, so a caller may then reuse the buffer."""
        if self._t is None:
            self.digest.update(data)
            if done is not None:
                done.set()
        else:
            self._q.put((data, done))

    def fork(self):
        """A copy of the digest of everything given so far."""
        if self._t is not None:
            self._q.join()
        return self.digest.copy()

    def close(self):
        """Wait for the batches given so far; later updates run in the caller."""
        if self._t is not None:
            self._q.put(None)
            self._t.join()
            self._t = None

    def result(self):
        self.close()
        return self.digest
