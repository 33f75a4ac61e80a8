"""lctrain: a training platform for long-context language models.

This folder is one package under two names. Installed (`pip install .`), it is `lctrain`: `import lctrain`,
`lctrain fit ...`. In a checkout it is also found as `platform`, so that `python -m platform.fit` runs from
the repository root without installing anything. That name shadows the standard library's `platform.py`,
which torch, Lightning, `uuid` and pytest import (`platform.system()` and friends), so when this file is
loaded as `platform` it does two things and imports nothing heavy:
- it loads the standard module from its file and re-exports every name it has;
- it makes `lctrain` importable from this folder, and the entry points (`platform/fit.py`, ...) import
  everything else as `lctrain.*`. Every module inside imports its siblings relatively, so each is loaded
  once, under `lctrain`, whichever way the platform was started.
"""

import sys as _sys

__version__ = "0.1.0"

if __name__ == "platform":
    import importlib.abc as _abc
    import importlib.util as _importlib_util
    import os as _os
    import sysconfig as _sysconfig

    def _load_stdlib_platform():
        path = _os.path.join(_sysconfig.get_paths()["stdlib"], "platform.py")
        spec = _importlib_util.spec_from_file_location("_stdlib_platform", path)
        module = _importlib_util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    _stdlib = _load_stdlib_platform()

    # Public and private names alike (some callers reach for `platform._syscmd_ver`); the functions keep
    # the standard module's globals, so its caches work as they always did.
    globals().update({k: v for k, v in vars(_stdlib).items() if not (k.startswith("__") and k.endswith("__"))})
    __doc__ = (__doc__ or "") + "\n" + (_stdlib.__doc__ or "")

    def __getattr__(name: str):
        return getattr(_stdlib, name)

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(dir(_stdlib)))

    class _CheckoutFinder(_abc.MetaPathFinder):
        """Finds the package `lctrain` in this checkout (its submodules follow through `__path__`), ahead
        of any installed copy: code run from a checkout is the checkout's."""

        def find_spec(self, fullname, path=None, target=None):
            if fullname != "lctrain":
                return None
            here = _os.path.dirname(_os.path.abspath(__file__))
            init = _os.path.join(here, "__init__.py")
            return _importlib_util.spec_from_file_location(fullname, init, submodule_search_locations=[here])

    if "lctrain" not in _sys.modules:
        _sys.meta_path.insert(0, _CheckoutFinder())
