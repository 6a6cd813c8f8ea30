"""A minimal QMP client over a unix socket (docs/interop/qmp-spec.txt in QEMU).

>>> c = QMPClient("/tmp/q.sock", timeout=10)     # doctest: +SKIP
>>> c.execute("query-status")                    # doctest: +SKIP
{'status': 'prelaunch', 'singlestep': False, 'running': False}

Asynchronous events are collected in :attr:`QMPClient.events` and otherwise
skipped; ``{"error": ...}`` replies raise :class:`QMPError`.
"""

from __future__ import annotations

import json
import socket
import time

from ..errors import QmigstreamError


class QMPError(QmigstreamError):
    """QEMU answered a command with ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, command: str, error: dict):
        self.command = command
        self.error_class = error.get("class")
        self.desc = error.get("desc")
        super().__init__(f"QMP {command}: {self.error_class}: {self.desc}")


class QMPTimeout(QmigstreamError):
    """QEMU did not answer (or did not reach a state) in time."""


class QMPClient:
    """One QMP connection; negotiates capabilities on connect.

    ``connect_timeout`` bounds the wait for the socket to appear (QEMU creates
    it while starting); ``timeout`` bounds every reply.
    """

    def __init__(self, path: str, timeout: float = 30.0, connect_timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self.events = []
        self.greeting = None
        self._buf = b""
        self.sock = self._connect(connect_timeout)
        try:
            self.greeting = self._recv_message()
            if "QMP" not in self.greeting:
                raise QMPError("greeting", {"class": "Protocol", "desc": "no QMP greeting"})
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _connect(self, connect_timeout):
        deadline = time.monotonic() + connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(self.timeout)
                s.connect(self.path)
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise QMPTimeout(f"QMP socket {self.path} did not accept in "
                                     f"{connect_timeout}s") from None
                time.sleep(0.02)
            except BaseException:
                s.close()
                raise

    def _recv_message(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            if time.monotonic() > deadline:
                raise QMPTimeout("no QMP reply in time")
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise QMPTimeout("no QMP reply in time") from None
            if not chunk:
                raise ConnectionError("QMP connection closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments):
        """Run one command and return its ``return`` value; raise :class:`QMPError`."""
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._recv_message()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(command, reply["error"])
            if "return" in reply:
                return reply["return"]

    def hmp(self, command_line: str) -> str:
        """A human monitor command through ``human-monitor-command``; returns its output."""
        return self.execute("human-monitor-command", **{"command-line": command_line})

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
