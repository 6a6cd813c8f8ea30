"""Building blocks shared by the schemas."""

from construct import Int8ub, PascalString

#: ``qemu_put_counted_string``: u8 length + bytes, no NUL (migration/qemu-file.c).
#: latin-1 maps every byte to one character, so any name round-trips.
CountedString = PascalString(Int8ub, "latin-1")
