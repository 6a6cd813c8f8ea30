"""The VFIO v2 migration interface (Linux 5.18+) over an :class:`EmulatedPciDevice`.

:class:`VfioDeviceV2` is what a VMM sees through ``VFIO_DEVICE_FEATURE``:

=============================  ==================================================
kernel                         model
=============================  ==================================================
FEATURE_MIGRATION (GET)        :attr:`VfioDeviceV2.migration_flags`
MIG_DEVICE_STATE (GET)         :attr:`VfioDeviceV2.state`
MIG_DEVICE_STATE (SET)         :meth:`VfioDeviceV2.set_state` -> :class:`MigrationFile` or None
MIG_DATA_SIZE (GET)            :meth:`VfioDeviceV2.mig_data_size`
DMA_LOGGING_START / STOP       :meth:`VfioDeviceV2.dma_logging_start` / ``_stop``
DMA_LOGGING_REPORT (GET)       :meth:`VfioDeviceV2.dma_logging_report` -> list of u64 words
VFIO_DEVICE_RESET              :meth:`VfioDeviceV2.reset`
data fd read / write           :meth:`MigrationFile.read` / :meth:`MigrationFile.write`
VFIO_MIG_GET_PRECOPY_INFO      :meth:`MigrationFile.precopy_info` -> (initial_bytes, dirty_bytes)
=============================  ==================================================

``set_state`` walks :func:`.fsm.path` one arc at a time, like the in-tree
drivers (mtty, mlx5): on success the device is in the requested state and the
new data file is returned if the request started a saving or resuming session
(RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P, STOP -> STOP_COPY,
STOP -> RESUMING); moving inside the saving group keeps the same file and
returns None.  If an arc fails the device stays in the last state it reached
(RESUMING -> STOP with bad data: stays RESUMING with its previous content),
unless the failure is internal (:meth:`VfioDeviceV2.inject_fault`), which puts
it in ERROR; only :meth:`reset` leaves ERROR.  Every refusal is a
:class:`~qmigstream.errors.DeviceError` whose ``errno`` is the kernel's.

A pipeline drives a source ``RUNNING -> PRE_COPY`` (read until ENOMSG, watch
``precopy_info()``), ``-> STOP_COPY`` (read until ``b""``), ``-> STOP``; and a
destination ``RUNNING -> RESUMING`` (write every chunk in order),
``-> STOP`` (this is where the data is checked and applied) ``-> RUNNING``.
"""

from __future__ import annotations

import errno as _errno

from ..errors import DeviceError
from . import fsm
from .fsm import MigState
from .pci_device import PAGE, EmulatedPciDevice

S = MigState

#: ``LOG_MAX_RANGES``: ranges that fit in one kernel page (4096 / 16).
LOG_MAX_RANGES = 4096 // 16
U64_MAX = (1 << 64) - 1


class MigrationFile:
    """The data "file descriptor" of one session (``mode`` is "save" or "resume")."""

    def __init__(self, owner: "VfioDeviceV2", mode: str, session):
        self.owner = owner
        self.mode = mode
        self.session = session
        self.disabled = False
        self.closed = False

    def _live(self):
        if self.closed:
            raise DeviceError("file is closed", _errno.EBADF)
        if self.disabled:
            raise DeviceError("data session has ended", _errno.ENODEV)

    def read(self, n: int = 1 << 20) -> bytes:
        """At most ``n`` bytes (short reads are normal); ``b""`` = end of data in STOP_COPY.

        In PRE_COPY(_P2P) with nothing to send now: ``DeviceError(ENOMSG)``.
        """
        out = self.read_view(n)
        return out if type(out) is bytes else bytes(out)

    def read_view(self, n: int = 1 << 20):
        """:meth:`read`, as a read-only ``memoryview`` of the device's queued data
        (no copy; the pipeline's source keeps chunks this way), a
        :class:`~qmigstream.pieces.Pieces` of such views when the bytes span two
        parts of it, or ``b""``.

        In PRE_COPY(_P2P) with nothing to send now: ``DeviceError(ENOMSG)``.
        """
        self._live()
        if self.mode != "save":
            raise DeviceError("resuming data file is write-only", _errno.EINVAL)
        if n < 0:
            raise DeviceError("negative read size", _errno.EINVAL)
        if n == 0:
            return b""
        out = self.session.read(n, gather=True)
        if out is None:
            raise DeviceError("no pre-copy data available now", _errno.ENOMSG)
        return out

    def write(self, data) -> int:
        """Feed migration data; returns the count accepted (all of it, or an error)."""
        self._live()
        if self.mode != "resume":
            raise DeviceError("saving data file is read-only", _errno.EINVAL)
        return self.session.write(data)

    def precopy_info(self) -> tuple:
        """``VFIO_MIG_GET_PRECOPY_INFO``: ``(initial_bytes, dirty_bytes)``."""
        if self.closed:
            raise DeviceError("file is closed", _errno.EBADF)
        if self.mode != "save":
            raise DeviceError("no such ioctl on a resuming file", _errno.ENOTTY)
        if self.owner.state not in fsm.PRE_COPY_STATES:
            raise DeviceError(f"PRECOPY_INFO in {self.owner.state.name}", _errno.EINVAL)
        self._live()
        return self.session.initial_bytes(), self.session.dirty_bytes()

    def close(self) -> None:
        self.closed = True


class VfioDeviceV2:
    """A v2 migration-capable device.  ``features``: see :func:`.fsm.parse_features`."""

    def __init__(self, device=None, *, features="p2p,pre_copy", dma_logging: bool = True,
                 **device_kwargs):
        if device is None or not isinstance(device, EmulatedPciDevice):
            device = EmulatedPciDevice(device if device is not None else "sized",
                                       **device_kwargs)
        self.device = device
        self.migration_flags = fsm.parse_features(features)
        self.dma_logging = dma_logging
        self.state = S.RUNNING
        self.device.running = True
        self._save = None          # (SaveSession, MigrationFile)
        self._resume = None        # (BlobAssembler, MigrationFile)
        self._fault = None
        self._log = None           # dict(ranges, page_size, pages)
        self.arcs = []             # every arc executed, for inspection

    # -- state machine -------------------------------------------------------
    def inject_fault(self, errno: int = _errno.EIO, *, arc=None) -> None:
        """Make the next arc (or the next arc ``(cur, new)``) fail inside the driver.

        The failing request raises DeviceError(errno) and leaves the device in ERROR.
        """
        self._fault = (errno, None if arc is None else (fsm.parse_state(arc[0]),
                                                        fsm.parse_state(arc[1])))

    def set_state(self, new) -> MigrationFile | None:
        new = fsm.parse_state(new)
        result = None
        while self.state != new:
            nxt = fsm.next_state(self.state, new, self.migration_flags)
            if self._fault and (self._fault[1] is None or self._fault[1] == (self.state, nxt)):
                err, cur = self._fault[0], self.state
                self._fault = None
                self._drop_sessions()
                self.state = S.ERROR
                self.device.running = False
                raise DeviceError(f"arc {cur.name} -> {nxt.name} failed in the device; "
                                  f"device is in ERROR", err)
            result = self._step(self.state, nxt)
            self.arcs.append((self.state, nxt))
            self.state = nxt
        return result

    def _step(self, cur: MigState, nxt: MigState):
        dev = self.device
        dev.running = nxt in fsm.RUNNING_STATES
        if nxt in (S.PRE_COPY, S.PRE_COPY_P2P) and cur not in fsm.SAVING_GROUP:
            sess = dev.open_save(precopy=True)
            f = MigrationFile(self, "save", sess)
            self._save = (sess, f)
            return f
        if nxt == S.STOP_COPY:
            if cur == S.STOP:
                sess = dev.open_save(precopy=False)
                f = MigrationFile(self, "save", sess)
                self._save = (sess, f)
                return f
            self._save[0].stop_copy()          # from PRE_COPY(_P2P): same file
            return None
        if cur in fsm.SAVING_GROUP and nxt not in fsm.SAVING_GROUP:
            self._end_save()
            return None
        if nxt == S.RESUMING:
            asm = dev.open_resume()
            f = MigrationFile(self, "resume", asm)
            self._resume = (asm, f)
            return f
        if cur == S.RESUMING:
            asm, f = self._resume
            try:
                image = asm.finish()
                dev.apply_image(image, crc=asm.image_crc)
            except DeviceError:
                dev.running = False            # still RESUMING: stopped
                raise
            f.disabled = True
            self._resume = None
            return None
        return None

    def _end_save(self):
        if self._save:
            sess, f = self._save
            sess.close()
            f.disabled = True
            self._save = None

    def _drop_sessions(self):
        self._end_save()
        if self._resume:
            self._resume[1].disabled = True
            self._resume = None

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: back to RUNNING, data sessions ended."""
        self._drop_sessions()
        self._fault = None
        self.state = S.RUNNING
        self.device.running = True

    def mig_data_size(self) -> int:
        """``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``: stop_copy_length (any state)."""
        if self._save and not self._save[0].final:
            return self._save[0].pending()
        return self.device.stop_copy_length()

    # -- DMA logging ---------------------------------------------------------
    def dma_logging_start(self, ranges, page_size: int = PAGE) -> int:
        """``DMA_LOGGING_START``; ``ranges`` = [(iova, length)]; returns the page size used."""
        if not self.dma_logging:
            raise DeviceError("device has no DMA logging", _errno.ENOTTY)
        ranges = [(int(i), int(n)) for i, n in ranges]
        if not ranges:
            raise DeviceError("no ranges", _errno.EINVAL)
        if len(ranges) > LOG_MAX_RANGES:
            raise DeviceError(f"{len(ranges)} ranges, at most {LOG_MAX_RANGES}", _errno.E2BIG)
        align = (int(page_size) - 1) & U64_MAX
        spans = []
        for iova, length in ranges:
            if iova & align or length & align:
                raise DeviceError(f"range 0x{iova:x}+0x{length:x} not aligned to "
                                  f"page size 0x{page_size:x}", _errno.EINVAL)
            if iova + length > U64_MAX:
                raise DeviceError("range overflows the IOVA space", _errno.EOVERFLOW)
            first, last = iova, iova + length - 1
            for a, b in spans:
                if first <= b and a <= last:
                    raise DeviceError(f"range 0x{iova:x}+0x{length:x} overlaps another",
                                      _errno.EINVAL)
            spans.append((first, last))
        # Driver part (as mlx5): one session at a time; 4 KiB tracking granularity.
        if self._log is not None:
            raise DeviceError("DMA logging already started", _errno.EINVAL)
        chosen = page_size if page_size >= PAGE and not page_size & (page_size - 1) else PAGE
        log = {"ranges": spans, "page_size": chosen, "pages": set()}

        def listener(gpa, n, log=log):
            if not n:
                return
            for p in range(gpa // PAGE, (gpa + n - 1) // PAGE + 1):
                a = p * PAGE
                if any(lo <= a + PAGE - 1 and a <= hi for lo, hi in log["ranges"]):
                    log["pages"].add(p)

        log["listener"] = listener
        self.device.add_dma_listener(listener)
        self._log = log
        return chosen

    def dma_logging_stop(self) -> None:
        if not self.dma_logging:
            raise DeviceError("device has no DMA logging", _errno.ENOTTY)
        if self._log is not None:
            self.device.remove_dma_listener(self._log["listener"])
            self._log = None

    def dma_logging_report(self, iova: int, length: int, page_size: int) -> list:
        """``DMA_LOGGING_REPORT``: u64 words, bit ``k`` = page ``iova + k*page_size`` written.

        Reported pages are cleared from the log.
        """
        if not self.dma_logging:
            raise DeviceError("device has no DMA logging", _errno.ENOTTY)
        if page_size < PAGE or page_size & (page_size - 1):
            raise DeviceError(f"report page size {page_size}", _errno.EINVAL)
        if iova + length > U64_MAX:
            raise DeviceError("report range overflows the IOVA space", _errno.EOVERFLOW)
        if self._log is None:
            raise DeviceError("DMA logging is not started", _errno.EINVAL)
        nbits = -(-length // page_size)
        words = [0] * (-(-nbits // 64))
        end = iova + length
        taken = []
        for p in self._log["pages"]:
            a = p * PAGE
            if a + PAGE <= iova or a >= end:
                continue
            lo, hi = max(a, iova), min(a + PAGE, end) - 1
            for k in range((lo - iova) // page_size, (hi - iova) // page_size + 1):
                words[k // 64] |= 1 << (k % 64)
            taken.append(p)
        self._log["pages"].difference_update(taken)
        return words

    @staticmethod
    def bitmap_pages(words, iova: int, page_size: int) -> set:
        """The addresses a report bitmap marks (helper for users of the report)."""
        out = set()
        for w, word in enumerate(words):
            while word:
                b = (word & -word).bit_length() - 1
                out.add(iova + (w * 64 + b) * page_size)
                word &= word - 1
        return out


def drain(f: MigrationFile, n: int = 1 << 20) -> tuple:
    """Read a saving file until it has nothing more now: ``(data, "ENOMSG" | "EOF")``.

    "ENOMSG" is pre-copy's temporary end, "EOF" the end of a STOP_COPY session.
    """
    out = bytearray()
    while True:
        try:
            b = f.read(n)
        except DeviceError as e:
            if e.errno != _errno.ENOMSG:
                raise
            return bytes(out), "ENOMSG"
        if not b:
            return bytes(out), "EOF"
        out += b
