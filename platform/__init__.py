"""The training platform, and the standard library's `platform` module under the same name.

From the repository root this folder shadows the standard library's `platform.py`, which torch,
Lightning, `uuid` and pytest import (`platform.system()` and friends). So this file loads the
standard module from its file and re-exports every name it has; submodules (`platform.fit`,
`platform.models`, ...) are found in this folder as usual. It imports nothing heavy.
"""

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
