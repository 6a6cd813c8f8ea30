"""Make real captures in a test: QEMU 7.2, paused, RAM seeded with loader blobs.

A few lines of QMP over the socket (no mocks): start QEMU paused with
``-device loader`` blobs, migrate to ``exec:cat > FILE``, and ``pmemsave`` guest
memory, which is what QEMU itself says the guest holds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time

BASE = ["-S", "-nodefaults", "-display", "none", "-accel", "tcg",
        "-rtc", "base=2020-01-01T00:00:00,clock=vm"]


def seeded_blob(path, size, seed):
    """``size`` bytes of seeded random data (a few whole zero pages in between)."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    for k in range(0, size, 4096 * 7):
        data[k:k + 4096] = bytes(min(4096, size - k))
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buf = b""
        self._recv()                          # greeting
        self.execute("qmp_capabilities")

    def _recv(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, **args):
        self.sock.sendall(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._recv()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"{cmd}: {msg['error']}")


class Guest:
    """A paused QEMU; ``with Guest(workdir, machine_args) as g: g.migrate(path)``."""

    def __init__(self, workdir, machine_args):
        self.workdir = str(workdir)
        self.sock = os.path.join(self.workdir, f"qmp-{os.getpid()}-{id(self)}.sock")
        binary = os.environ.get("QEMU") or shutil.which("qemu-system-x86_64")
        self.proc = subprocess.Popen([binary, *BASE, *machine_args,
                                      "-qmp", f"unix:{self.sock},server=on,wait=off"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self.qmp = Qmp(self.sock)
        except Exception:
            self.close()
            raise RuntimeError("QEMU did not start: " + self.proc.stderr.read().decode())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.qmp.execute("quit")
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.sock):
            os.unlink(self.sock)

    def migrate(self, path, timeout=120):
        self.qmp.execute("migrate", uri=f"exec:cat > {path}")
        deadline = time.time() + timeout
        while True:
            st = self.qmp.execute("query-migrate").get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled") or time.time() > deadline:
                raise RuntimeError(f"migration {st}")
            time.sleep(0.05)
        # exec: cat may still be flushing after QEMU reports completion
        for _ in range(200):
            if os.path.exists(path) and _complete(path):
                return
            time.sleep(0.05)

    def pmemsave(self, addr, size, path):
        self.qmp.execute("pmemsave", val=addr, size=size, filename=str(path))
        return open(path, "rb").read()


def _complete(path):
    """The stream ends with the VMDESCRIPTION JSON: the file is whole when it parses."""
    try:
        from qmigstream.codec.reader import read_records
        for _ in read_records(str(path)):
            pass
        return True
    except Exception:
        return False


def capture(workdir, name, ram_mib=32, blobs=(), machine="pc"):
    """Migrate a paused guest with ``blobs`` [(addr, data)] loaded; return (stream, low, high).

    ``low``/``high`` are ``pmemsave`` of ``[0, 0xA0000)`` and ``[0x100000, RAM end)``.
    """
    args = ["-machine", machine, "-m", str(ram_mib)]
    for i, (addr, data) in enumerate(blobs):
        p = os.path.join(str(workdir), f"{name}-blob{i}.bin")
        with open(p, "wb") as f:
            f.write(data)
        args += ["-device", f"loader,file={p},addr={addr:#x},force-raw=on"]
    stream = os.path.join(str(workdir), f"{name}.mig")
    with Guest(workdir, args) as g:
        low = g.pmemsave(0, 0xA0000, os.path.join(str(workdir), f"{name}-low.bin"))
        high = g.pmemsave(0x100000, ram_mib * 2**20 - 0x100000,
                          os.path.join(str(workdir), f"{name}-high.bin"))
        g.migrate(stream)
    return stream, low, high
