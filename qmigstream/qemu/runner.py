"""Run ``qemu-system-x86_64`` for migration: outgoing to a file or socket, incoming from a file.

Every QEMU started here lives inside a :class:`Qemu` object that kills the
process (and removes its scratch directory) when the ``with`` block ends, on
errors and on timeouts alike.  Two one-call helpers cover the common jobs:

>>> r = migrate_to_file(["-machine", "pc", "-m", "32"], "/tmp/g.mig")   # doctest: +SKIP
>>> r.query_migrate["status"], r.size                                    # doctest: +SKIP
('completed', 387381)
>>> res = load_incoming(["-machine", "pc", "-m", "32"], "/tmp/g.mig")    # doctest: +SKIP
>>> res.loaded, res.status                                               # doctest: +SKIP
(True, 'completed')

The machine arguments are what follows the fixed :data:`BASE_ARGS` (paused,
no default devices, no display, TCG, pinned guest clock): a destination must
be started with the same machine arguments as the source.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import hashlib
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import weakref

from ..errors import QmigstreamError
from .qmp import QMPClient, QMPError, QMPTimeout

#: Arguments every QEMU started here gets, before the caller's machine arguments.
BASE_ARGS = ["-S", "-nodefaults", "-display", "none", "-accel", "tcg",
             "-rtc", "base=2020-01-01T00:00:00,clock=vm"]

#: ``query-migrate`` states after which nothing more happens.
FINAL_STATES = ("completed", "failed", "cancelled")


class QemuError(QmigstreamError):
    """QEMU would not start, died, or a migration did not finish as asked."""

    def __init__(self, message: str, stderr: str = "", returncode=None):
        self.stderr = stderr
        self.returncode = returncode
        tail = stderr.strip().splitlines()[-3:] if stderr else []
        super().__init__(message + (": " + " | ".join(tail) if tail else ""))


#: every QEMU still running, killed at interpreter exit whatever happened
_LIVE = weakref.WeakSet()


@atexit.register
def _kill_leftovers():
    for q in list(_LIVE):
        q.kill()


try:        # looked up here, not in the forked child (no dlopen between fork and exec)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None
_PR_SET_PDEATHSIG, _SIGKILL = 1, int(signal.SIGKILL)


def _die_with_parent():
    """In the child before exec: get SIGKILL when the parent dies (Linux
    prctl PR_SET_PDEATHSIG), so even a killed test run leaves no QEMU behind."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, _SIGKILL)


def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64`` (``$QEMU`` overrides), or None."""
    return os.environ.get("QEMU") or shutil.which("qemu-system-x86_64")


class Qemu:
    """One QEMU process with a QMP connection.

    ``machine_args``: the machine command line after :data:`BASE_ARGS`.
    ``incoming``: value for ``-incoming`` (``"defer"``, ``"exec:cat FILE"``...).
    ``timeout``: bound for every QMP reply; waits take their own timeouts.
    ``qmp_log``: every QMP command sent, in order, as ``{"execute", "arguments"}``.

    QEMU is killed when the object is closed, at interpreter exit, and (Linux)
    when the thread that started it dies: start it from a thread that outlives it.
    """

    def __init__(self, machine_args, *, incoming: str | None = None, binary: str | None = None,
                 timeout: float = 30.0, base_args=None, workdir: str | None = None):
        self.binary = binary or qemu_binary()
        if not self.binary:
            raise QemuError("qemu-system-x86_64 not found")
        # A fixed ``workdir`` keeps the command line (QMP socket path) the same run after run.
        self._own_dir = workdir is None
        if workdir is None:
            self.dir = tempfile.mkdtemp(prefix="qmigstream-qemu-")
        else:
            self.dir = workdir
            os.makedirs(workdir, exist_ok=True)
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        base = list(BASE_ARGS if base_args is None else base_args)
        self.argv = [self.binary, *base, *machine_args,
                     "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if incoming is not None:
            self.argv += ["-incoming", incoming]
        self.timeout = timeout
        self.qmp_log = []
        self.qmp = None
        self.proc = None
        self._stderr_path = os.path.join(self.dir, "stderr")

    # -- life cycle -------------------------------------------------------------
    def start(self) -> "Qemu":
        with open(self._stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        _LIVE.add(self)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise QemuError("QEMU exited while starting", self.stderr(),
                                self.proc.returncode)
            try:
                self.qmp = QMPClient(self.qmp_path, timeout=self.timeout, connect_timeout=0.5)
                return self
            except QMPTimeout:
                if time.monotonic() > deadline:
                    raise QemuError("QEMU's QMP socket did not come up", self.stderr()) from None

    def stderr(self) -> str:
        """Everything QEMU wrote to stderr so far."""
        try:
            with open(self._stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    @property
    def returncode(self):
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def quit(self, timeout: float = 10.0) -> int | None:
        """Ask QEMU to quit, wait, kill it if it does not go."""
        if self.alive() and self.qmp is not None:
            try:
                self.execute("quit")
            except (QMPError, QMPTimeout, OSError, ConnectionError):
                pass
        return self._reap(timeout)

    def _reap(self, timeout):
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait(10)

    def close(self):
        """Quit (or kill) QEMU, close QMP, remove the scratch directory."""
        try:
            self.quit()
        finally:
            self.kill()
            if self.qmp is not None:
                self.qmp.close()
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                for leftover in (self.qmp_path, self._stderr_path):
                    try:
                        os.unlink(leftover)
                    except OSError:
                        pass

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc):
        self.close()

    # -- QMP helpers ------------------------------------------------------------
    def execute(self, command: str, **arguments):
        """QMP command, logged in :attr:`qmp_log`."""
        entry = {"execute": command}
        if arguments:
            entry["arguments"] = arguments
        self.qmp_log.append(entry)
        return self.qmp.execute(command, **arguments)

    def hmp(self, command_line: str) -> str:
        return self.execute("human-monitor-command", **{"command-line": command_line})

    def version(self) -> dict:
        return self.qmp.execute("query-version")

    def set_capabilities(self, caps: dict):
        if caps:
            self.execute("migrate-set-capabilities",
                         capabilities=[{"capability": k, "state": bool(v)}
                                       for k, v in caps.items()])

    def set_parameters(self, params: dict):
        if params:
            self.execute("migrate-set-parameters", **params)

    def query_migrate(self) -> dict:
        return self.qmp.execute("query-migrate")

    def wait_migration(self, timeout: float = 120.0, poll: float = 0.05, on_poll=None,
                       states=FINAL_STATES) -> dict:
        """Poll ``query-migrate`` until its status is in ``states``; return that reply.

        ``on_poll(reply)`` is called on each intermediate reply (e.g. to change
        parameters once a number of iterations has passed).
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise QemuError("QEMU exited during migration", self.stderr(), self.returncode)
            q = self.query_migrate()
            if q.get("status") in states:
                return q
            if on_poll is not None:
                on_poll(q)
            if time.monotonic() > deadline:
                raise QemuError(f"migration not finished after {timeout}s "
                                f"(status {q.get('status')})", self.stderr())
            time.sleep(poll)

    def wait_status(self, status: str, timeout: float = 30.0) -> dict:
        """Poll ``query-status`` until the run state is ``status``."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.qmp.execute("query-status")
            if s.get("status") == status:
                return s
            if time.monotonic() > deadline:
                raise QemuError(f"run state {s.get('status')!r}, not {status!r}", self.stderr())
            time.sleep(0.05)

    def pmemsave(self, addr: int, size: int, path: str):
        """Guest-physical memory ``[addr, addr+size)`` to ``path`` (waits for the file)."""
        self.execute("pmemsave", val=addr, size=size, filename=os.path.abspath(path))
        if os.path.getsize(path) != size:
            raise QemuError(f"pmemsave wrote {os.path.getsize(path)} bytes, not {size}")


def exec_file_uri(path: str) -> str:
    """``exec:`` URI writing the stream to ``path``; the file appears only when complete."""
    p = os.path.abspath(path)
    part = shlex.quote(p + ".part")
    return f"exec:cat > {part} && mv {part} {shlex.quote(p)}"


def wait_file(path: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise QemuError(f"{path} did not appear in {timeout}s")
        time.sleep(0.02)


@dataclasses.dataclass
class MigrationResult:
    """What :func:`migrate_to_file` did and saw."""
    argv: list
    qmp_log: list
    version: dict
    query_migrate: dict
    path: str
    size: int
    sha256: str
    memory: list            # [{"addr", "size", "sha256", "path"}] from pmemsave


def migrate_to_file(machine_args, path: str, *, capabilities=None, parameters=None,
                    pmemsave=(), before_migrate=None, on_poll=None, timeout: float = 120.0,
                    binary=None) -> MigrationResult:
    """Start QEMU paused, migrate to ``path`` through ``exec:cat``, and quit.

    ``capabilities``/``parameters``: dicts for ``migrate-set-capabilities`` /
    ``migrate-set-parameters``.  ``before_migrate(qemu)`` may run commands
    first (e.g. ``cont``).  ``pmemsave``: ``[(addr, size, file)]`` dumps taken
    once migration completed (the guest is then stopped in ``postmigrate``).
    """
    if os.path.exists(path):
        os.unlink(path)
    with Qemu(machine_args, binary=binary) as q:
        version = q.version()
        q.set_capabilities(capabilities or {})
        q.set_parameters(parameters or {})
        if before_migrate is not None:
            before_migrate(q)
        q.execute("migrate", uri=exec_file_uri(path))
        final = q.wait_migration(timeout, on_poll=on_poll)
        if final.get("status") != "completed":
            raise QemuError(f"migration {final.get('status')}: {final.get('error-desc')}",
                            q.stderr())
        mem = []
        for addr, size, out in pmemsave:
            q.pmemsave(addr, size, out)
            mem.append({"addr": addr, "size": size, "sha256": sha256_file(out), "path": out})
        wait_file(path)
        q.quit()
        return MigrationResult(q.argv, q.qmp_log, version, final, path,
                               os.path.getsize(path), sha256_file(path), mem)


@dataclasses.dataclass
class IncomingResult:
    """The destination's verdict on a stream.

    ``loaded``: QEMU finished loading (``query-migrate`` status ``completed``).
    ``status``: the last ``query-migrate`` status seen (``"exited"`` when QEMU
    died before answering).  ``stderr``: QEMU's stderr (the load error, if
    any).  ``returncode``: exit status, None if QEMU was still running and was
    quit by us after a successful load.  ``memory``: pmemsave results.
    """
    loaded: bool
    status: str
    stderr: str
    returncode: int | None
    query_migrate: dict = dataclasses.field(default_factory=dict)
    memory: list = dataclasses.field(default_factory=list)


def load_incoming(machine_args, stream_path: str, timeout: float = 60.0, *,
                  capabilities=None, parameters=None, pmemsave=(), after_load=None,
                  binary=None, file_uri=False) -> IncomingResult:
    """Would QEMU load this stream?  Start the machine with ``-incoming defer``
    and feed it ``stream_path`` through ``migrate-incoming exec:cat``
    (``file_uri``: ``file:PATH`` instead, which mapped-ram needs).

    ``capabilities``/``parameters`` are set before the load (a destination
    needs e.g. ``x-ignore-shared`` too).  After a successful load the guest
    stays paused (``-S``): ``pmemsave=[(addr, size, file)]`` dumps memory, and
    ``after_load(qemu)`` may look further.  Never raises for a stream QEMU
    refuses; raises :class:`QemuError` only if QEMU cannot be run at all.
    """
    uri = "exec:cat " + shlex.quote(os.path.abspath(stream_path))
    if file_uri:
        uri = "file:" + os.path.abspath(stream_path)
    with Qemu(machine_args, incoming="defer", binary=binary) as q:
        q.set_capabilities(capabilities or {})
        q.set_parameters(parameters or {})
        q.execute("migrate-incoming", uri=uri)
        return _await_load(q, timeout, pmemsave, after_load)


def load_incoming_channels(machine_args, stream_paths, timeout: float = 60.0, *,
                           capabilities=None, parameters=None, pmemsave=(), after_load=None,
                           binary=None) -> IncomingResult:
    """Like :func:`load_incoming`, over a unix socket with one connection per file:
    the main stream first, then each multifd channel recording (for QEMU 7.2,
    which takes the first connection as the main channel).  Give the
    destination the same ``multifd`` capability and ``multifd-channels`` as the
    source.  Each file is sent from its own thread, since QEMU reads the
    channels in parallel."""
    with Qemu(machine_args, incoming="defer", binary=binary) as q:
        q.set_capabilities(capabilities or {})
        q.set_parameters(parameters or {})
        sock = os.path.join(q.dir, "incoming.sock")
        q.execute("migrate-incoming", uri=f"unix:{sock}")
        feeders = []
        try:
            for i, path in enumerate(stream_paths):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.settimeout(timeout)
                c.connect(sock)
                t = threading.Thread(target=_feed, args=(c, path), daemon=True)
                feeders.append((c, t))
                if i == 0:
                    time.sleep(0.1)     # let QEMU take the first connection as the main one
            for _, t in feeders:
                t.start()
            return _await_load(q, timeout, pmemsave, after_load)
        finally:
            for c, t in feeders:
                try:
                    c.close()
                except OSError:
                    pass
                if t.ident is not None:
                    t.join(5)


def _feed(conn, path):
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass                        # QEMU gave up on the stream; its verdict says why


def _await_load(q, timeout, pmemsave, after_load) -> IncomingResult:
    deadline = time.monotonic() + timeout
    status, last = "setup", {}
    while True:
        try:
            last = q.query_migrate()
            status = last.get("status", status)
        except (QMPTimeout, ConnectionError, OSError):
            status = "exited"
        if status in FINAL_STATES or not q.alive():
            break
        if time.monotonic() > deadline:
            status = "timeout"
            break
        time.sleep(0.05)
    if status != "completed":
        if status == "timeout":
            q.kill()
        else:
            q._reap(10)             # a failed load makes QEMU 7.2 exit(1)
        if status not in FINAL_STATES and status != "timeout":
            status = "exited"
        return IncomingResult(False, status, q.stderr(), q.returncode, last)
    mem = []
    for addr, size, out in pmemsave:
        q.pmemsave(addr, size, out)
        mem.append({"addr": addr, "size": size, "sha256": sha256_file(out), "path": out})
    if after_load is not None:
        after_load(q)
    q.quit()
    return IncomingResult(True, status, q.stderr(), None, last, mem)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- a unix-socket sink for socket migrations ------------------------------------
MIG_RP_MSG_SHUT = 1
MIG_RP_MSG_PONG = 2


class UnixSink:
    """Accept every connection on a unix socket and record each one.

    Stands in for a destination QEMU where ``exec:`` will not do: multifd
    (one connection per channel, all recorded) and a return path (postcopy
    advised): with ``return_path=True`` the main connection (the one starting
    with ``QEVM``) gets ``MIG_RP_MSG_SHUT(0)`` once its VMDESCRIPTION trailer
    has fully arrived, which lets the source finish (migration/migration.c,
    ``source_return_path_thread``).
    """

    def __init__(self, path: str, *, return_path: bool = False):
        self.path = path
        self.return_path = return_path
        self.streams = []          # bytearray per connection, in accept order
        self.shut_sent = False
        self._lock = threading.Lock()
        self._threads = []
        self._conns = []
        self._closing = False
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"

    def _accept_loop(self):
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            buf = bytearray()
            with self._lock:
                self.streams.append(buf)
                self._conns.append(conn)
            t = threading.Thread(target=self._recv_loop, args=(conn, buf), daemon=True)
            t.start()
            self._threads.append(t)

    def _recv_loop(self, conn, buf):
        conn.settimeout(0.2)
        pongs = []
        resolved = 0           # the stream is parsed up to here (PINGs before it answered)
        while True:
            idle = False
            try:
                chunk = conn.recv(1 << 20)
            except socket.timeout:
                if self._closing:
                    return
                idle, chunk = True, None
            except OSError:
                return
            if chunk is not None:
                if not chunk:
                    return
                buf += chunk
            if not self.return_path or buf[:4] != b"QEVM":
                continue
            # a destination answers each PING with a PONG of the same value (10.x
            # waits for the first before it completes, 11.x for those of the
            # postcopy package before it runs).  The stream is parsed again only
            # when a PING's bytes appear past where the last parse got to.
            if buf.find(_PING_BYTES, resolved) >= 0:
                values, resolved = stream_pings(buf, with_end=True)
                for value in values[len(pongs):]:
                    conn.sendall(struct.pack(">HHI", MIG_RP_MSG_PONG, 4, value))
                    pongs.append(value)
            # the end: a whole trailer, or (looked for when the sender pauses or
            # sends little: it parses the whole stream) a stream ending at its EOF
            if not self.shut_sent and (
                    trailer_complete(buf) or
                    ((idle or len(chunk) < 65536) and ends_at_eof(buf))):
                conn.sendall(struct.pack(">HHI", MIG_RP_MSG_SHUT, 4, 0))
                self.shut_sent = True

    def wait_idle(self, timeout: float = 30.0, connections: int = 1):
        """Wait until ``connections`` connections were accepted and every connection
        has been closed by its peer."""
        deadline = time.monotonic() + timeout
        while len(self._threads) < connections and time.monotonic() < deadline:
            time.sleep(0.01)
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))

    def close(self):
        self._closing = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        self._accepter.join(5)
        for t in self._threads:
            t.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


#: A PING command's first bytes: QEMU_VM_COMMAND, be16 MIG_CMD_PING, be16 length 4.
_PING_BYTES = struct.pack(">BHH", 0x08, 2, 4)


def stream_pings(buf, *, with_end: bool = False):
    """Values of the PING commands in a (partial) stream, nested ones (PACKAGED)
    included, in stream order.  ``with_end``: also where the last top-level record
    parsed starts (every PING before it is in the list)."""
    from ..codec.reader import read_records
    from ..errors import QmigstreamError
    values = []
    end = 0
    try:
        for rec in read_records(bytes(buf)):
            if rec.depth == 0 and rec.offset is not None:
                end = rec.offset
            if rec.kind == "command" and rec.name == "PING":
                values.append(rec.args["value"])
    except QmigstreamError:
        pass
    return (values, end) if with_end else values


def trailer_complete(buf) -> bool:
    """Does ``buf`` end with a whole VMDESCRIPTION record (EOF, ``0x06``, be32 length,
    a JSON object)?  (The JSON starts with ``page_size`` up to 8.1 and with
    ``configuration`` from 8.2.)"""
    from ..vmdesc import locate_trailer
    if not buf.endswith(b"}"):
        return False
    return locate_trailer(bytes(buf[-(4 << 20):]), 0) is not None


def ends_at_eof(buf) -> bool:
    """Is ``buf`` a whole stream that ends at its QEMU_VM_EOF (no trailer follows: a
    stream that switched to postcopy has none)?"""
    if not buf.endswith(b"\x00"):
        return False
    from ..codec.reader import read_records
    from ..errors import QmigstreamError
    last = None
    try:
        for rec in read_records(bytes(buf)):
            last = rec
    except QmigstreamError:
        return False
    return last is not None and last.kind == "eof" and last.depth == 0
