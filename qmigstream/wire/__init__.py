"""Wire schemas: every on-the-wire structure declared once, with construct.

One module per QEMU area.  The same objects parse and build; the codec's fast
paths are optimisations of these schemas and are tested equal to them.
"""

import importlib as _importlib
import sys as _sys
import types as _types


class _OnFirstUse(_types.ModuleType):
    """Stands in ``sys.modules`` for a module until one of its attributes is used.

    construct imports ``pdb`` and ``inspect`` for its ``Debugger``, ``pickle``
    and ``hashlib`` for constructs this package does not use; loading them
    (with ``bdb``, ``cmd``, ``dis``, OpenSSL...) costs more start-up time than
    all of the schemas.  The first attribute asked of
    the stand-in imports the real module, which then replaces it.
    """

    def __getattr__(self, attr):
        name = self.__name__
        if _sys.modules.get(name) is self:
            del _sys.modules[name]
        return getattr(_importlib.import_module(name), attr)


for _name in ("pdb", "inspect", "pickle", "hashlib"):
    if _name not in _sys.modules:
        _sys.modules[_name] = _OnFirstUse(_name)
