"""Records: what the reader yields and the writer takes.

Every record carries ``offset`` (absolute byte offset of its first byte in the
stream; ``None`` for a record built by hand and not yet written) and knows its
own wire bytes (``encode()``), built from its fields through the schemas of
:mod:`qmigstream.wire`.  The stream is flat: a section is a ``SectionHeader``,
its payload records, and a ``SectionFooter``; a PACKAGED command is followed by
the records of the nested stream (``depth`` + 1) and a zero-length
``PackagedEnd``.
"""

from __future__ import annotations

import struct

from ..wire import header as H
from ..wire import commands as C

_U8 = struct.Struct(">B")
_BE32 = struct.Struct(">I")
_BE32X2 = struct.Struct(">II")
_U8_BE32 = struct.Struct(">BI")
_U64 = struct.Struct(">Q")
_ZERO_CONT = struct.Struct(">QB")


class Record:
    """Base class.  ``kind`` names the record type in JSON output."""

    __slots__ = ("offset", "depth")
    kind = "record"

    def encode(self) -> bytes:
        raise NotImplementedError(type(self).__name__)

    @property
    def size(self) -> int:
        return len(self.encode())

    def fields(self) -> dict:
        """The decoded fields (JSON-ready), without offset/kind."""
        return {}

    def to_json(self) -> dict:
        d = {"kind": self.kind, "offset": self.offset, "size": self.size}
        d.update(self.fields())
        return d

    def __repr__(self) -> str:
        f = ", ".join(f"{k}={v!r}" for k, v in self.fields().items())
        return f"{type(self).__name__}(@{self.offset}{', ' if f else ''}{f})"

    def __eq__(self, other):
        return type(self) is type(other) and self.encode() == other.encode()

    __hash__ = None


# --- top level -----------------------------------------------------------------

class FileHeader(Record):
    __slots__ = ("magic", "version")
    kind = "file_header"

    def __init__(self, magic=H.QEMU_VM_FILE_MAGIC, version=H.QEMU_VM_FILE_VERSION, offset=None):
        self.magic, self.version, self.offset, self.depth = magic, version, offset, 0

    def encode(self):
        # H.FileHeader's fast form (tests/test_fast_path.py checks them equal)
        if 0 <= self.magic <= 0xFFFFFFFF and 0 <= self.version <= 0xFFFFFFFF:
            return _BE32X2.pack(self.magic, self.version)
        return H.FileHeader.build(dict(magic=self.magic, version=self.version))

    size = 8

    def fields(self):
        return {"magic": f"0x{self.magic:08x}", "version": self.version}


class ConfigSubsection:
    """One subsection of the configuration record (decoded fields in ``value``)."""

    __slots__ = ("name", "version_id", "value", "offset")

    def __init__(self, name, version_id, value, offset=None):
        self.name, self.version_id, self.value, self.offset = name, version_id, value, offset

    def encode(self) -> bytes:
        body = H.CONFIG_SUBSECTIONS[self.name].build(self.value)
        return H.SubsectionHeader.build(dict(name=self.name, version_id=self.version_id)) + body

    @property
    def size(self) -> int:
        """``len(self.encode())`` from the fields (tested equal)."""
        n = 6 + len(self.name.encode("latin-1"))
        v = self.value
        if "capabilities" in v:
            return n + 4 + sum(1 + len(c.encode("latin-1")) for c in v["capabilities"])
        if "uuid" in v:
            return n + 16
        return n + 4                     # target-page-bits

    def to_json(self):
        v = dict(self.value)
        if "uuid" in v:
            import uuid
            v["uuid"] = str(uuid.UUID(bytes=bytes(v["uuid"])))
        if "capabilities" in v:
            v["capabilities"] = list(v["capabilities"])
        return {"name": self.name, "offset": self.offset, "version_id": self.version_id, **v}


class Configuration(Record):
    """``QEMU_VM_CONFIGURATION``: machine type name and subsections (savevm.c)."""

    __slots__ = ("machine", "subsections")
    kind = "configuration"

    def __init__(self, machine: bytes, subsections=(), offset=None):
        self.machine = bytes(machine)
        self.subsections = list(subsections)
        self.offset, self.depth = offset, 0

    def encode(self):
        out = [bytes([H.SectionType.CONFIGURATION]),
               _BE32.pack(len(self.machine)) + self.machine]   # H.ConfigurationName
        out += [s.encode() for s in self.subsections]
        return b"".join(out)

    @property
    def size(self) -> int:
        """``len(self.encode())`` from the fields (tested equal)."""
        return 5 + len(self.machine) + sum(s.size for s in self.subsections)

    def subsection(self, name):
        for s in self.subsections:
            if s.name == name:
                return s
        return None

    @property
    def capabilities(self) -> list:
        s = self.subsection("configuration/capabilities")
        return list(s.value["capabilities"]) if s else []

    def fields(self):
        return {"machine": self.machine.decode("latin-1"),
                "subsections": [s.to_json() for s in self.subsections]}


SECTION_TYPE_NAMES = {
    H.SectionType.SECTION_START: "START",
    H.SectionType.SECTION_PART: "PART",
    H.SectionType.SECTION_END: "END",
    H.SectionType.SECTION_FULL: "FULL",
}


class SectionHeader(Record):
    """START/FULL (full header) or PART/END (section id only)."""

    __slots__ = ("type", "section_id", "idstr", "instance_id", "version_id")
    kind = "section"

    def __init__(self, type, section_id, idstr=None, instance_id=None, version_id=None,
                 offset=None, depth=0):
        self.type = H.SectionType(type)
        self.section_id = section_id
        self.idstr, self.instance_id, self.version_id = idstr, instance_id, version_id
        self.offset, self.depth = offset, depth

    @property
    def full(self) -> bool:
        return self.type in (H.SectionType.SECTION_START, H.SectionType.SECTION_FULL)

    @property
    def type_name(self) -> str:
        return SECTION_TYPE_NAMES[self.type]

    def encode(self):
        # the fast forms of H.FullSectionHeader / H.ShortSectionHeader (tested equal);
        # the schemas for what they would refuse
        try:
            if self.full:
                name = self.idstr.encode("latin-1")
                if len(name) < 256:
                    return (_U8_BE32.pack(self.type, self.section_id) + bytes((len(name),)) +
                            name + _BE32X2.pack(self.instance_id, self.version_id))
            else:
                return _U8_BE32.pack(self.type, self.section_id)
        except (struct.error, UnicodeError, AttributeError, TypeError):
            pass
        if self.full:
            return bytes([self.type]) + H.FullSectionHeader.build(dict(
                section_id=self.section_id, idstr=self.idstr,
                instance_id=self.instance_id, version_id=self.version_id))
        return bytes([self.type]) + H.ShortSectionHeader.build(dict(section_id=self.section_id))

    @property
    def size(self) -> int:
        """``len(self.encode())`` from the fields (tested equal)."""
        if self.full:
            return 14 + len(self.idstr.encode("latin-1"))
        return 5

    def fields(self):
        d = {"type": self.type_name, "section_id": self.section_id}
        if self.full:
            d.update(idstr=self.idstr, instance_id=self.instance_id, version_id=self.version_id)
        return d


class SectionFooter(Record):
    __slots__ = ("section_id",)
    kind = "footer"

    def __init__(self, section_id, offset=None, depth=0):
        self.section_id, self.offset, self.depth = section_id, offset, depth

    def encode(self):
        try:                                  # H.SectionFooter's fast form (tested equal)
            return _U8_BE32.pack(H.SectionType.SECTION_FOOTER, self.section_id)
        except struct.error:
            return H.SectionFooter.build(dict(section_id=self.section_id))

    size = 5

    def fields(self):
        return {"section_id": self.section_id}


class Command(Record):
    """``QEMU_VM_COMMAND``: command number, length and decoded arguments.

    ``args`` holds the decoded payload fields; ``raw`` the payload bytes when
    they do not follow the command's schema (kept so such input still
    round-trips; the reader only produces that for lenient decoding).
    """

    __slots__ = ("cmd", "args", "raw")
    kind = "command"

    def __init__(self, cmd, args=None, raw=None, offset=None, depth=0):
        self.cmd = C.MigCmd(cmd) if cmd in C.MigCmd._value2member_map_ else cmd
        self.args = dict(args or {})
        self.raw = raw
        self.offset, self.depth = offset, depth

    @property
    def name(self) -> str:
        return self.cmd.name if isinstance(self.cmd, C.MigCmd) else f"CMD_{self.cmd}"

    def payload(self) -> bytes:
        if self.raw is not None:
            return bytes(self.raw)
        if self.cmd == C.MigCmd.POSTCOPY_ADVISE and not self.args:
            return b""
        schema = C.PAYLOAD[self.cmd]
        return schema.build(self.args)

    def encode(self):
        p = self.payload()
        return bytes([H.SectionType.COMMAND]) + C.CommandHeader.build(
            dict(cmd=int(self.cmd), length=len(p))) + p

    def fields(self):
        d = {"command": self.name, "cmd": int(self.cmd)}
        args = {}
        for k, v in self.args.items():
            if k.startswith("_"):
                continue
            if isinstance(v, list):
                v = [dict((kk, vv) for kk, vv in dict(x).items() if not kk.startswith("_"))
                     if hasattr(x, "items") else x for x in v]
            args[k] = v
        if args:
            d["args"] = args
        if self.raw is not None:
            d["raw"] = bytes(self.raw).hex()
        return d


class PackagedEnd(Record):
    """Zero-length marker: the nested stream of a PACKAGED command ends here."""

    __slots__ = ()
    kind = "packaged_end"

    def __init__(self, offset=None, depth=0):
        self.offset, self.depth = offset, depth

    def encode(self):
        return b""

    size = 0


class EndOfStream(Record):
    """``QEMU_VM_EOF``: the end of device data."""

    __slots__ = ()
    kind = "eof"

    def __init__(self, offset=None, depth=0):
        self.offset, self.depth = offset, depth

    def encode(self):
        return b"\x00"

    size = 1


class VmDescription(Record):
    """``QEMU_VM_VMDESCRIPTION``: the JSON trailer after EOF (bytes kept exactly)."""

    __slots__ = ("json_bytes", "_parsed")
    kind = "vmdescription"

    def __init__(self, json_bytes: bytes, offset=None):
        self.json_bytes = bytes(json_bytes)
        self._parsed = None
        self.offset, self.depth = offset, 0

    def encode(self):
        return bytes([H.SectionType.VMDESCRIPTION]) + struct.pack(">I", len(self.json_bytes)) \
            + self.json_bytes

    @property
    def size(self):
        return 5 + len(self.json_bytes)

    @property
    def obj(self):
        if self._parsed is None:
            import json
            try:
                self._parsed = json.loads(self.json_bytes.decode("utf-8", "surrogateescape"))
            except RecursionError:
                raise ValueError("VMDESCRIPTION JSON nested too deeply") from None
        return self._parsed

    def fields(self):
        return {"json_length": len(self.json_bytes)}


class TrailingBytes(Record):
    """Bytes after the end of the stream (after EOF/trailer).  QEMU ignores them."""

    __slots__ = ("data",)
    kind = "trailing_bytes"

    def __init__(self, data, offset=None):
        self.data, self.offset, self.depth = bytes(data), offset, 0

    def encode(self):
        return self.data

    @property
    def size(self):
        return len(self.data)

    def fields(self):
        return {"length": len(self.data)}


# --- section payloads that the codec does not split further -------------------

class OpaquePayload(Record):
    """A section payload kept as bytes (device state before vmstate decoding).

    ``how`` says how its end was found: ``description`` (VMDESCRIPTION JSON),
    ``footer`` (scan for the section footer), ``next-header`` (scan for the
    next section header; streams without footers or trailer).
    """

    __slots__ = ("data", "how", "section", "reason")
    kind = "payload"

    def __init__(self, data, how=None, offset=None, depth=0, section=None, reason=None):
        self.data, self.how, self.offset, self.depth = bytes(data), how, offset, depth
        self.section = section
        self.reason = reason      # why the payload was not decoded further

    def encode(self):
        return self.data

    @property
    def size(self):
        return len(self.data)

    def fields(self):
        d = {"length": len(self.data), "bounded_by": self.how}
        if self.reason:
            d["opaque_because"] = self.reason
        return d
