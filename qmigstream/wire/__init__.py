"""Wire schemas: every on-the-wire structure declared once, with construct.

One module per QEMU area.  The same objects parse and build; the codec's fast
paths are optimisations of these schemas and are tested equal to them.

Each module's constants and enums are plain module attributes; its construct
schemas are declared in one function, ``_schemas``, that runs the first time
one of them is asked for (:func:`schemas_on_first_use`).  A command that
never meets a record needing a schema then never imports construct, which
costs more start-up time than the rest of the codec.
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


def schemas_on_first_use(module_name: str, declare):
    """A module ``__getattr__`` (PEP 562) that builds the module's schemas once.

    ``declare()`` returns its local names (``locals()``); every one that is not
    one of construct's own names becomes a module attribute.
    """
    done = []

    def __getattr__(name):
        mod = _sys.modules[module_name]
        if not done and not name.startswith("__"):
            done.append(True)
            import construct
            for k, v in declare().items():
                if not k.startswith("__") and getattr(construct, k, None) is not v:
                    setattr(mod, k, v)
        try:
            return mod.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}") from None
    return __getattr__
