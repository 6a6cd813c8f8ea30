"""Building blocks shared by the schemas."""

from . import schemas_on_first_use


def _schemas():
    from construct import Int8ub, PascalString

    #: ``qemu_put_counted_string``: u8 length + bytes, no NUL (migration/qemu-file.c).
    #: latin-1 maps every byte to one character, so any name round-trips.
    CountedString = PascalString(Int8ub, "latin-1")
    return locals()


__getattr__ = schemas_on_first_use(__name__, _schemas)
