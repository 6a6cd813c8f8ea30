"""File header, configuration record, section headers and footers, EOF, VMDESCRIPTION.

Mirrors ``migration/savevm.c`` (``qemu_savevm_state_header``,
``save_section_header``, ``save_section_footer``, ``vmstate_configuration``)
and the constants of ``migration/savevm.h``; unchanged from QEMU 2.4 to 11.x
except where noted.
"""

from enum import IntEnum

from . import schemas_on_first_use

QEMU_VM_FILE_MAGIC = 0x5145564D          # "QEVM"
QEMU_VM_FILE_VERSION = 3
QEMU_VM_FILE_VERSION_COMPAT = 2          # pre-section savevm format, refused by QEMU


class SectionType(IntEnum):
    """The byte that starts every top-level record (``QEMU_VM_*`` in savevm.h)."""
    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


#: Names of the configuration subsections the codec knows, in QEMU's declaration
#: order (their schemas are ``CONFIG_SUBSECTIONS``).
CONFIG_SUBSECTION_NAMES = ("configuration/target-page-bits", "configuration/capabilities",
                           "configuration/uuid")


def _schemas():
    from construct import Bytes, Const, Int8ub, Int32ub, PrefixedArray, Struct
    from .common import CountedString

    #: Magic and version (savevm.c ``qemu_savevm_state_header``).
    FileHeader = Struct(
        "magic" / Int32ub,
        "version" / Int32ub,
    )

    #: START and FULL sections: ``save_section_header`` with the idstr part.
    FullSectionHeader = Struct(
        "section_id" / Int32ub,
        "idstr" / CountedString,
        "instance_id" / Int32ub,
        "version_id" / Int32ub,
    )

    #: PART and END sections: the id only.
    ShortSectionHeader = Struct(
        "section_id" / Int32ub,
    )

    #: ``save_section_footer``: 0x7e then the section id again.
    SectionFooter = Struct(
        "marker" / Const(SectionType.SECTION_FOOTER.value, Int8ub),
        "section_id" / Int32ub,
    )

    #: QEMU_VM_VMDESCRIPTION trailer: be32 length + JSON bytes (after EOF).
    VmDescriptionRecord = Struct(
        "marker" / Const(SectionType.VMDESCRIPTION.value, Int8ub),
        "json" / PrefixedArray(Int32ub, Int8ub),
    )

    # --- the configuration record -------------------------------------------------
    # vmstate "configuration" (savevm.c).  Not a section: no id, no version on the
    # wire, no footer.  Fields: be32 len + machine name; then optional subsections
    # (each: 0x05, counted name, be32 version, fields) in declaration order.

    #: The machine-name part.
    ConfigurationName = Struct(
        "name" / PrefixedArray(Int32ub, Int8ub),
    )

    #: A subsection header (vmstate.c ``vmstate_subsection_save``).
    SubsectionHeader = Struct(
        "marker" / Const(SectionType.SUBSECTION.value, Int8ub),
        "name" / CountedString,
        "version_id" / Int32ub,
    )

    #: ``configuration/target-page-bits`` (v1): be32.
    TargetPageBits = Struct("target_page_bits" / Int32ub)

    #: ``configuration/capabilities`` (v1): be32 count, then counted names.
    Capabilities = Struct("capabilities" / PrefixedArray(Int32ub, CountedString))

    #: ``configuration/uuid`` (v1): 16 raw bytes (QemuUUID).
    Uuid = Struct("uuid" / Bytes(16))

    #: Known configuration subsections, in QEMU's declaration order.
    CONFIG_SUBSECTIONS = {
        "configuration/target-page-bits": TargetPageBits,
        "configuration/capabilities": Capabilities,
        "configuration/uuid": Uuid,
    }
    assert tuple(CONFIG_SUBSECTIONS) == CONFIG_SUBSECTION_NAMES
    return locals()


__getattr__ = schemas_on_first_use(__name__, _schemas)
