"""Make real captures in a test: QEMU 7.2, paused, RAM seeded with loader blobs.

Runs QEMU through :mod:`qmigstream.qemu.runner` (no mocks): start paused with
``-device loader`` blobs, migrate to ``exec:cat > FILE``, and ``pmemsave`` guest
memory, which is what QEMU itself says the guest holds.
"""

from __future__ import annotations

import os
import random

from qmigstream.qemu.runner import migrate_to_file


def seeded_blob(path, size, seed):
    """``size`` bytes of seeded random data, every 7th page zero; written to ``path``."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    for k in range(0, size, 4096 * 7):
        data[k:k + 4096] = bytes(min(4096, size - k))
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


def capture(workdir, name, ram_mib=32, blobs=(), machine="pc"):
    """Migrate a paused guest with ``blobs`` [(addr, data)] loaded.

    Returns ``(stream path, low, high)``: ``low``/``high`` are ``pmemsave`` of
    ``[0, 0xA0000)`` and ``[0x100000, RAM end)``.
    """
    workdir = str(workdir)
    args = ["-machine", machine, "-m", str(ram_mib)]
    for i, (addr, data) in enumerate(blobs):
        p = os.path.join(workdir, f"{name}-blob{i}.bin")
        with open(p, "wb") as f:
            f.write(data)
        args += ["-device", f"loader,file={p},addr={addr:#x},force-raw=on"]
    stream = os.path.join(workdir, f"{name}.mig")
    low_p = os.path.join(workdir, f"{name}-low.bin")
    high_p = os.path.join(workdir, f"{name}-high.bin")
    migrate_to_file(args, stream, pmemsave=[(0, 0xA0000, low_p),
                                            (0x100000, (ram_mib << 20) - 0x100000, high_p)])
    with open(low_p, "rb") as f:
        low = f.read()
    with open(high_p, "rb") as f:
        high = f.read()
    return stream, low, high
