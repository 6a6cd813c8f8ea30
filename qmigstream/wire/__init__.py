"""Wire schemas: every on-the-wire structure declared once, with construct.

One module per QEMU area.  The same objects parse and build; the codec's fast
paths are optimisations of these schemas and are tested equal to them.
"""

import importlib.util as _util
import sys as _sys


def _defer(name):
    """Load module ``name`` on first use instead of now (importlib's LazyLoader).

    construct imports ``pdb`` and ``inspect`` for its ``Debugger``, which this
    package never uses; loading them costs more start-up time than all of the
    schemas.  A module already loaded is left as it is.
    """
    if name in _sys.modules:
        return
    spec = _util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    spec.loader = _util.LazyLoader(spec.loader)
    module = _util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


for _name in ("pdb", "inspect"):
    _defer(_name)
