"""The migration pipeline: emulated source, replay into resuming devices, golden vectors.

* :mod:`.profiles` - what each QEMU release family writes, as data
* :mod:`.guest`    - the guest RAM model, CPU workload, loading RAM records
* :mod:`.ramsave`  - which record QEMU writes for each dirty page (ZERO/PAGE/XBZRLE)
* :mod:`.template` - the non-VFIO part of a machine, from a real capture
* :mod:`.vfiodev`  - QEMU's side of the v1 and v2 VFIO interfaces, source and destination
* :mod:`.migrate`  - the source: devices + RAM -> the stream
* :mod:`.replay`   - the destination: a stream -> resuming devices + RAM, atomically
* :mod:`.golden`   - deterministic vector sets
"""
