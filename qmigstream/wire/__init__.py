"""Wire schemas: every on-the-wire structure declared once, with construct.

One module per QEMU area.  The same objects parse and build; the codec's fast
paths are optimisations of these schemas and are tested equal to them.
"""
