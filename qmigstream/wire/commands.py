"""``QEMU_VM_COMMAND`` records: be16 command, be16 length, payload.

Mirrors ``enum qemu_vm_cmd``, ``mig_cmd_args[]`` and the ``qemu_savevm_send_*``
helpers of ``migration/savevm.c`` (QEMU 2.5 .. 11.x; SWITCHOVER_START since 10.0).
"""

from enum import IntEnum

from . import schemas_on_first_use


class MigCmd(IntEnum):
    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


#: Fixed payload lengths the loader enforces (``mig_cmd_args[].len``); None = variable.
#: ENABLE_COLO has no row in QEMU's table, so its length is checked against 0.
FIXED_LENGTH = {
    MigCmd.OPEN_RETURN_PATH: 0,
    MigCmd.PING: 4,
    MigCmd.POSTCOPY_ADVISE: None,
    MigCmd.POSTCOPY_LISTEN: 0,
    MigCmd.POSTCOPY_RUN: 0,
    MigCmd.POSTCOPY_RAM_DISCARD: None,
    MigCmd.PACKAGED: 4,
    MigCmd.ENABLE_COLO: 0,
    MigCmd.POSTCOPY_RESUME: 0,
    MigCmd.RECV_BITMAP: None,
    MigCmd.SWITCHOVER_START: 0,
}

#: Largest PACKAGED payload QEMU accepts (``MAX_VM_CMD_PACKAGED_SIZE``).
MAX_PACKAGED_SIZE = 0xFFFFFFFF


def _schemas():
    from construct import (Const, GreedyRange, Int8ub, Int16ub, Int32ub, Int64ub,
                           Struct, Terminated)
    from .common import CountedString

    #: Command header after the 0x08 byte.
    CommandHeader = Struct(
        "cmd" / Int16ub,
        "length" / Int16ub,
    )

    Empty = Struct(Terminated)

    #: PING: a free 32-bit value, echoed as PONG on the return path.
    Ping = Struct("value" / Int32ub, Terminated)

    #: POSTCOPY_ADVISE with postcopy-ram: host page-size summary and target page size.
    #: Length 0 when only dirty-bitmaps postcopy is advised (handled by the codec).
    PostcopyAdvise = Struct(
        "host_page_summary" / Int64ub,
        "target_page_size" / Int64ub,
        Terminated,
    )

    #: POSTCOPY_RAM_DISCARD: version 0, counted block name, a 0 byte, then byte ranges.
    PostcopyRamDiscard = Struct(
        "version" / Const(0, Int8ub),
        "block" / CountedString,
        "terminator" / Const(0, Int8ub),
        "ranges" / GreedyRange(Struct("start" / Int64ub, "length" / Int64ub)),
        Terminated,
    )

    #: PACKAGED: the length of the nested stream that follows the command.
    Packaged = Struct("length" / Int32ub, Terminated)

    #: RECV_BITMAP: counted RAMBlock name.
    RecvBitmap = Struct("block" / CountedString, Terminated)

    PAYLOAD = {
        MigCmd.OPEN_RETURN_PATH: Empty,
        MigCmd.PING: Ping,
        MigCmd.POSTCOPY_ADVISE: PostcopyAdvise,
        MigCmd.POSTCOPY_LISTEN: Empty,
        MigCmd.POSTCOPY_RUN: Empty,
        MigCmd.POSTCOPY_RAM_DISCARD: PostcopyRamDiscard,
        MigCmd.PACKAGED: Packaged,
        MigCmd.ENABLE_COLO: Empty,
        MigCmd.POSTCOPY_RESUME: Empty,
        MigCmd.RECV_BITMAP: RecvBitmap,
        MigCmd.SWITCHOVER_START: Empty,
    }
    return locals()


__getattr__ = schemas_on_first_use(__name__, _schemas)
