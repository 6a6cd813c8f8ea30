"""The stream reader: bytes in, records with offsets out, nothing held whole.

>>> from qmigstream.codec.reader import read_records
>>> for rec in read_records("fixtures/captures/pc-7.2-paused.mig"):   # doctest: +SKIP
...     print(rec.offset, rec.kind)

Mirrors the loader loop of ``migration/savevm.c`` (``qemu_loadvm_state``,
``qemu_loadvm_state_header``, ``qemu_loadvm_state_main``,
``qemu_loadvm_section_start_full``/``part_end``, ``check_section_footer``,
``loadvm_process_command``).
"""

from __future__ import annotations

import struct

from ..errors import (BadMagic, LimitExceeded, StreamError, Truncated,
                      UnsupportedVersion)
from ..wire import commands as C
from ..wire import header as H
from ..wire.header import SectionType as T
from .records import (Command, ConfigSubsection, Configuration, EndOfStream, FileHeader,
                      PackagedEnd, SectionFooter, SectionHeader, TrailingBytes,
                      VmDescription)
from .boundary import MAX_SCAN, SectionIds
from .sections import handler_for
from .sections.ram import RamState
from .source import Source, open_source
from .trailer import TAIL_BYTES, locate_trailer
from ..vmdesc import locate_trailer_before_trailing_bytes

_FILE_HEADER = struct.Struct(">II")


class _Header:
    __slots__ = ("magic", "version")

    def __init__(self, magic, version):
        self.magic, self.version = magic, version


#: PACKAGED commands nest streams; QEMU recurses without a limit, we stop here.
MAX_PACKAGED_DEPTH = 8
DEFAULT_PAGE_SIZE = 4096


class SectionInfo:
    __slots__ = ("section_id", "idstr", "instance_id", "version_id", "handler")

    def __init__(self, section_id, idstr, instance_id, version_id, handler):
        self.section_id, self.idstr = section_id, idstr
        self.instance_id, self.version_id, self.handler = instance_id, version_id, handler

    @property
    def name(self):
        return f"{self.idstr}({self.instance_id})" if self.instance_id else self.idstr


class StreamReader:
    """Decode one stream.  Iterate :meth:`records` once.

    Options: ``page_size`` (target page size; default from the configuration
    or the trailer, else 4096), ``compact`` (collapse ZERO runs into
    ``RamZeroRun``; default True), ``fast`` (use the RAM fast path; default
    True), ``description`` (a parsed VMDESCRIPTION object to bound device
    sections when the stream's own trailer is missing), ``lenient``.
    """

    def __init__(self, source, **options):
        self.src = source if isinstance(source, Source) else open_source(source)
        self.options = options
        self.page_size = options.get("page_size") or None
        self.configuration = None
        self.capabilities = set()
        self.postcopy_advised = False
        self.footers = None            # unknown until the first self-delimited section
        self.sections = {}             # section_id -> SectionInfo
        self.ids = SectionIds()
        self.ram = RamState()
        self.description = None        # VmDescription record found ahead of time
        self._desc_devices = None
        self._desc_cursor = 0
        self._desc_searched = False
        self._states = {}
        self.header = None
        desc = options.get("description")
        if desc is not None:
            self._set_description(desc)

    # -- helpers used by section handlers ------------------------------------
    def section_state(self, name, factory):
        if name not in self._states:
            self._states[name] = factory()
        return self._states[name]

    def check_end_at(self, src, n, section_id) -> bool:
        """Is ``n`` bytes from here a plausible payload end (footer or next record)?"""
        # ``n`` comes from the stream's description: never buffer more than the input
        # holds (or, size unknown, than a payload scan would look at).
        left = src.remaining_known()
        if n < 0 or n > (left if left is not None else MAX_SCAN):
            return False
        buf = src.peek(n + 5)
        if len(buf) < n:
            return False
        if self.footers is not False:
            return buf[n:n + 5] == b"\x7e" + struct.pack(">I", section_id) or \
                (self.footers is None and len(buf) >= n + 1 and buf[n] in (0, 1, 2, 3, 4, 8))
        return len(buf) == n or buf[n] in (0, 1, 2, 3, 4, 8)

    def description_entry(self, header):
        """The trailer's ``devices[]`` entry for a FULL section, if known."""
        if self._desc_devices is None and not self._desc_searched and header.depth == 0:
            self._find_description_ahead()
        devs = self._desc_devices
        if not devs:
            return None
        for i in range(self._desc_cursor, len(devs)):
            e = devs[i]
            if isinstance(e, dict) and e.get("name") == header.idstr and \
                    e.get("instance_id") == header.instance_id:
                self._desc_cursor = i + 1
                return e
        return None

    def _set_description(self, obj):
        if isinstance(obj, VmDescription):
            try:
                parsed = obj.obj
            except ValueError:
                return          # damaged trailer: bytes are kept, nothing learnt
            self.description = obj
            obj = parsed
        devs = obj.get("devices") if isinstance(obj, dict) else None
        self._desc_devices = devs if isinstance(devs, list) else []
        if self.page_size is None and isinstance(obj, dict) and \
                isinstance(obj.get("page_size"), int) and obj["page_size"] > 0:
            self.page_size = obj["page_size"]

    def _find_description_ahead(self):
        """Locate the trailer before reaching it (seek on files, spool pipes)."""
        self._desc_searched = True
        src = self.src
        if not (src.seekable and src.size is not None):
            src.spool()
        end = src.size
        if end is None:
            return
        # Read the end a piece at a time: the JSON holds no NUL byte, so once the
        # piece read holds a NUL with five bytes before it, a trailer would lie
        # wholly inside it (its EOF byte is at most five bytes before that NUL).
        size = 64 << 10
        while True:
            start = max(src.offset, end - size)
            tail = src.read_at(start, end - start)
            if tail is None:
                return
            found = locate_trailer(tail, start)
            if found or start == src.offset or size >= TAIL_BYTES or \
                    tail.rfind(b"\x00") >= 5:
                break
            size = min(size * 16, TAIL_BYTES)
        if not found:
            # Bytes after the trailer (QEMU ignores them): look for a trailer
            # that ends before the end, in the last MiB.
            if size < 1 << 20 and start > src.offset:
                start = max(src.offset, end - (1 << 20))
                tail = src.read_at(start, end - start) or b""
            found = locate_trailer_before_trailing_bytes(tail, start)
        if found:
            off, raw, obj = found
            rec = VmDescription(raw, off)
            rec._parsed = obj
            self._set_description(rec)

    # -- the stream ----------------------------------------------------------
    def records(self):
        """Yield every record of the stream in order."""
        src = self.src
        off = src.offset
        raw = src.peek(8)
        if len(raw) < 4 or raw[:4] != b"QEVM":
            if not raw:
                raise Truncated("the input is empty: no stream header", off,
                                needed=8, available=0)
            if 0 < len(raw) < 4 and b"QEVM".startswith(raw):
                raise Truncated("stream ends inside the file header", off,
                                needed=8, available=len(raw))
            raise BadMagic("not a QEMU migration stream (bad magic)", off,
                           expected=b"QEVM", found=raw[:4])
        # The fast form of H.FileHeader.parse (tested equal): no construct needed
        # for a stream whose records need no schema.
        magic, version = _FILE_HEADER.unpack(src.read(8, "file header"))
        hdr = _Header(magic, version)
        if hdr.version == H.QEMU_VM_FILE_VERSION_COMPAT:
            raise UnsupportedVersion("SaveVM v2 format is obsolete and can't be loaded",
                                     off + 4, expected=3, found=2)
        if hdr.version != H.QEMU_VM_FILE_VERSION:
            raise UnsupportedVersion("unsupported migration stream version", off + 4,
                                     expected=3, found=hdr.version)
        self.header = FileHeader(hdr.magic, hdr.version, off)
        yield self.header
        if src.peek(1) == bytes((T.CONFIGURATION,)):
            yield self._read_configuration()
        if self.page_size is None:
            self.page_size = DEFAULT_PAGE_SIZE
            if not self.options.get("no_lookahead"):
                # The trailer states the target page size; learn it early.
                self._find_description_ahead()
                if self.page_size is None:
                    self.page_size = DEFAULT_PAGE_SIZE
        yield from self._main(0, None)
        yield from self._after_eof()

    def _read_configuration(self):
        src = self.src
        off = src.offset
        src.read(1, "configuration marker")
        noff = src.offset
        n = src.be32("machine name length")
        if n > 255:
            # QEMU reads the name into a 256-byte buffer and fails above that.
            raise LimitExceeded("machine name longer than 255 bytes", noff,
                                section="configuration", found=n)
        name = src.read(n, "machine name")
        subs = []
        while src.peek(1) == bytes((T.SUBSECTION,)):
            soff = src.offset
            head = src.peek(2 + 255)
            ln = head[1] if len(head) > 1 else 0
            sname = head[2:2 + ln].decode("latin-1")
            if not sname.startswith("configuration/"):
                break
            if sname not in H.CONFIG_SUBSECTION_NAMES:
                raise StreamError(f"unknown configuration subsection {sname!r}", soff,
                                  section="configuration")
            src.read(2 + ln, "subsection name")
            ver = src.be32("subsection version")
            value = self._parse_config_body(sname, soff)
            subs.append(ConfigSubsection(sname, ver, value, soff))
        rec = Configuration(name, subs, off)
        self.configuration = rec
        self.capabilities = set(rec.capabilities)
        tpb = rec.subsection("configuration/target-page-bits")
        if tpb is not None and self.page_size is None:
            bits = tpb.value["target_page_bits"]
            if not 10 <= bits <= 24:
                raise StreamError("target page bits out of range", tpb.offset,
                                  section="configuration", expected="10..24", found=bits)
            self.page_size = 1 << bits
        return rec

    def _parse_config_body(self, sname, soff):
        src = self.src
        if sname == "configuration/target-page-bits":
            return {"target_page_bits": src.be32("target page bits")}
        if sname == "configuration/uuid":
            return {"uuid": src.read(16, "uuid")}
        coff = src.offset
        count = src.be32("capability count")
        left = src.remaining_known()
        if count > 1024 or (left is not None and count > left):
            raise LimitExceeded("too many capabilities", coff, section="configuration",
                                found=count)
        return {"capabilities": [src.counted_string("capability name") for _ in range(count)]}

    def _main(self, depth, package_end):
        """Records until EOF (depth 0) or the end of a PACKAGED blob."""
        while True:
            src = self.src
            if package_end is not None and src.offset >= package_end:
                if src.offset > package_end:
                    raise StreamError("record runs past the end of its PACKAGED blob",
                                      src.offset, expected=package_end, found=src.offset)
                return
            off = src.offset
            b = src.peek(1)
            if not b:
                raise Truncated("stream ends before QEMU_VM_EOF", off, needed=1, available=0)
            t = b[0]
            if t == T.EOF:
                src.read(1)
                yield EndOfStream(off, depth)
                if depth == 0:
                    return
                continue
            if t in (T.SECTION_START, T.SECTION_FULL, T.SECTION_PART, T.SECTION_END):
                yield from self._section(depth)
                continue
            if t == T.COMMAND:
                yield from self._command(depth)
                continue
            raise StreamError("unknown section type", off, expected="0x00-0x04 or 0x08",
                              found=t)

    def _section(self, depth):
        src = self.src
        off = src.offset
        t = src.u8("section type")
        if t in (T.SECTION_START, T.SECTION_FULL):
            sid = src.be32("section id")
            idstr = src.counted_string("section idstr")
            inst = src.be32("instance id")
            ver = src.be32("version id")
            handler = handler_for(idstr)()
            prev = self.sections.get(sid)
            if prev is not None and (prev.idstr != idstr or prev.instance_id != inst):
                raise StreamError(f"section id {sid} reused for {idstr!r}", off + 1,
                                  expected=prev.idstr, found=idstr)
            info = SectionInfo(sid, idstr, inst, ver, handler)
            self.sections[sid] = info
            hdr = SectionHeader(t, sid, idstr, inst, ver, off, depth)
            self.ids.saw(t, sid, idstr, inst)
        else:
            sid = src.be32("section id")
            info = self.sections.get(sid)
            if info is None:
                raise StreamError(f"unknown section id {sid}", off + 1,
                                  expected="the id of an earlier START section", found=sid)
            hdr = SectionHeader(t, sid, offset=off, depth=depth)
            self.ids.saw(t, sid)
        yield hdr
        name = info.name
        try:
            yield from info.handler.read(self, self.src, hdr)
        except StreamError as e:
            raise e.with_section(name)
        src = self.src
        foff = src.offset
        nxt = src.peek(5)
        if nxt[:1] == bytes((T.SECTION_FOOTER,)):
            if len(nxt) < 5:
                raise Truncated("stream ends inside a section footer", foff, section=name,
                                needed=5, available=len(nxt))
            src.read(5)
            fid = struct.unpack(">I", nxt[1:5])[0]
            if fid != sid:
                raise StreamError("mismatched section id in footer", foff + 1, section=name,
                                  expected=sid, found=fid)
            if self.footers is None:
                self.footers = True
            yield SectionFooter(sid, foff, depth)
        else:
            if self.footers is True and not nxt:
                raise Truncated("stream ends before the section footer", foff, section=name,
                                needed=5, available=0)
            if self.footers is True:
                raise StreamError("missing section footer", foff, section=name,
                                  expected=0x7E, found=nxt[0] if nxt else "end of stream")
            if self.footers is None and info.handler.self_delimiting:
                self.footers = False

    def _command(self, depth):
        src = self.src
        off = src.offset
        src.read(1)
        cmd = src.be16("command number")
        ln = src.be16("command length")
        if cmd == C.MigCmd.INVALID or cmd > max(C.MigCmd):
            raise StreamError("invalid command", off + 1, expected=f"1..{int(max(C.MigCmd))}",
                              found=cmd)
        mc = C.MigCmd(cmd)
        fixed = C.FIXED_LENGTH[mc]
        if fixed is not None and ln != fixed:
            raise StreamError(f"bad length for command {mc.name}", off + 3,
                              expected=fixed, found=ln)
        payload = src.read(ln, f"{mc.name} payload")
        args = self._command_args(mc, payload, off + 5)
        rec = Command(mc, args, None, off, depth)
        if mc == C.MigCmd.POSTCOPY_ADVISE:
            self.postcopy_advised = True
        yield rec
        if mc == C.MigCmd.PACKAGED:
            n = args["length"]
            left = src.remaining_known()
            if left is not None and n > left:
                raise Truncated("stream ends inside a PACKAGED blob", src.offset,
                                needed=n, available=left)
            if depth + 1 > MAX_PACKAGED_DEPTH:
                raise LimitExceeded("PACKAGED commands nested too deeply", off,
                                    found=depth + 1)
            end = src.offset + n
            yield from self._main(depth + 1, end)
            yield PackagedEnd(self.src.offset, depth + 1)

    def _command_args(self, mc, payload, poff):
        if mc == C.MigCmd.POSTCOPY_ADVISE and len(payload) == 0:
            return {}
        if mc == C.MigCmd.POSTCOPY_ADVISE and len(payload) != 16:
            raise StreamError("bad POSTCOPY_ADVISE length", poff - 2, expected="0 or 16",
                              found=len(payload))
        if mc == C.MigCmd.POSTCOPY_RAM_DISCARD:
            if len(payload) < 3 or len(payload) < 3 + payload[1] or \
                    (len(payload) - 3 - payload[1]) % 16:
                raise StreamError("bad POSTCOPY_RAM_DISCARD length", poff - 2,
                                  found=len(payload))
        if mc == C.MigCmd.RECV_BITMAP and (not payload or payload[0] + 1 != len(payload)):
            raise StreamError("bad RECV_BITMAP length", poff - 2, found=len(payload))
        try:
            parsed = C.PAYLOAD[mc].parse(payload)
        except Exception as e:  # construct errors: turn into ours with an offset
            raise StreamError(f"malformed {mc.name} payload: {type(e).__name__}", poff) from None
        return _plain(parsed)

    def _after_eof(self):
        """The VMDESCRIPTION trailer (if any) and anything after it."""
        src = self.src
        off = src.offset
        b = src.peek(5)
        if not b:
            return
        if b[0] == T.VMDESCRIPTION and len(b) == 5:
            n = struct.unpack(">I", b[1:5])[0]
            left = src.remaining_known()
            if left is None or 5 + n <= left:
                try:
                    src.read(5)
                    raw = src.read(n, "VMDESCRIPTION JSON")
                except Truncated:
                    raise
                ahead = self.description
                if ahead is not None and ahead.offset == off and ahead.json_bytes == raw:
                    rec = ahead          # found ahead of time: parsed once
                else:
                    rec = VmDescription(raw, off)
                yield rec
                if self.description is None:
                    self._set_description(rec)
                off = src.offset
        while True:
            chunk = src.peek(1 << 20)
            if not chunk:
                return
            src.read(len(chunk))
            yield TrailingBytes(chunk, off)
            off += len(chunk)


def _plain(c):
    """construct Container -> plain dict/list without private keys."""
    if hasattr(c, "items"):
        return {k: _plain(v) for k, v in c.items() if not k.startswith("_")}
    if isinstance(c, list):
        return [_plain(x) for x in c]
    return c


def read_records(path_or_file, **options):
    """Yield the records of a stream (path, ``-``, file object or bytes)."""
    return StreamReader(path_or_file, **options).records()
