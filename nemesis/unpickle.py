"""A restricted unpickler for files written by CoOp, Dassl and the official Nemesis code.

Those files are pickles: Dassl checkpoints (`torch.save` of a dict whose `scheduler` entry holds
pickled LR-scheduler objects) and few-shot splits (`pickle.dump` of `Datum` objects). Pickles can
run arbitrary code, so nothing here imports a module named by the file. Tensors and plain
containers are rebuilt with torch's own allow-list; classes from Dassl and `torch.optim` come back
as inert `PickledObject` records (class name and state, no code run); anything else is refused.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import types
from pathlib import Path
from typing import Any

import torch
from torch._weights_only_unpickler import _get_allowed_globals

from .errors import NemesisError

# Classes recorded as inert state instead of being imported: Dassl's own types (Datum, warm-up
# schedulers) and torch optimisers and schedulers pickled inside Dassl's `scheduler` entry.
INERT_MODULE_PREFIXES = ("dassl.", "torch.optim.")

# numpy's own reconstruction helpers, for scalars and arrays that appear in `val_result`; pickles
# name them under `numpy.core` (numpy 1) or `numpy._core` (numpy 2).
_NUMPY_MULTIARRAY_NAMES = ("scalar", "_reconstruct")


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a function or class outside the allow-list; nothing of it was run."""


class PickledObject:
    """An object whose class was not imported: `pickled_class` names it, `state` holds its attributes."""

    pickled_class = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        instance = super().__new__(cls)
        instance.args = args
        instance.state = None
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"PickledObject({self.pickled_class})"


_inert_classes: dict[str, type] = {}


def _inert_class(qualified_name: str) -> type:
    if qualified_name not in _inert_classes:
        _inert_classes[qualified_name] = type(
            qualified_name.rsplit(".", 1)[-1], (PickledObject,), {"pickled_class": qualified_name}
        )
    return _inert_classes[qualified_name]


def _reconstructor(cls: type, base: type, state: Any) -> PickledObject:
    """Stand-in for `copyreg._reconstructor` (protocol 0 and 1 pickles) that only builds inert records."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise ForbiddenGlobal(f"refusing to rebuild {cls!r}")
    return cls()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and never imports a module itself."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 pickles (torch.save's default) name Python 2 modules, e.g. `__builtin__`.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        allowed = _allowed_globals()
        if qualified in allowed:
            return allowed[qualified]
        if qualified == "copyreg._reconstructor":
            return _reconstructor
        if qualified == "builtins.object":
            return object
        if module.startswith(INERT_MODULE_PREFIXES):
            return _inert_class(qualified)
        raise ForbiddenGlobal(f"the pickle asks for '{qualified}', which is neither a tensor nor a plain container")


_allowed_cache: dict[str, Any] = {}

# Plain containers beyond torch's list: optimiser state is a defaultdict(dict).
_CONTAINER_GLOBALS = {
    "collections.defaultdict": collections.defaultdict,
    "builtins.dict": dict,
    "builtins.list": list,
    "builtins.tuple": tuple,
    "builtins.frozenset": frozenset,
}


def _allowed_globals() -> dict[str, Any]:
    if not _allowed_cache:
        _allowed_cache.update(_get_allowed_globals())
        _allowed_cache.update(_CONTAINER_GLOBALS)
        import numpy

        multiarray = numpy._core.multiarray if hasattr(numpy, "_core") else numpy.core.multiarray
        for name in _NUMPY_MULTIARRAY_NAMES:
            for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
                _allowed_cache[f"{module}.{name}"] = getattr(multiarray, name)
        _allowed_cache["numpy.dtype"] = numpy.dtype
        _allowed_cache["numpy.ndarray"] = numpy.ndarray
    return _allowed_cache


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load accepts a `pickle_module`: handing it this one makes torch's own storage handling
# run under our find_class, so tensors are rebuilt and nothing else is imported.
_restricted_pickle_module = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler, load=_restricted_load, __name__="nemesis.unpickle"
)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise NemesisError(f"file not found: {path}")


def load_pickle(path: str | os.PathLike) -> Any:
    """Read a plain pickle (e.g. a Dassl few-shot split) without running code from it."""
    path = Path(path)
    _check_file(path)
    try:
        with open(path, "rb") as file:
            return _restricted_load(file)
    except ForbiddenGlobal as error:
        raise NemesisError(f"refusing to load {path}: {error}") from error
    except Exception as error:
        raise NemesisError(f"{path} is not a readable pickle ({type(error).__name__}: {error})") from error


def load_torch_file(path: str | os.PathLike) -> Any:
    """Read a `torch.save` file (zip or legacy format) on the CPU without running code from it."""
    path = Path(path)
    _check_file(path)
    try:
        # weights_only=False only because torch's own weights-only mode cannot stand in for Dassl's
        # classes; the pickle module passed here is at least as strict.
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module)
    except ForbiddenGlobal as error:
        raise NemesisError(f"refusing to load {path}: {error}") from error
    except Exception as error:
        raise NemesisError(f"{path} is not a torch checkpoint ({type(error).__name__}: {error})") from error


def loads_pickle(data: bytes) -> Any:
    """`load_pickle` for bytes in memory (tests, embedded splits)."""
    return _restricted_load(io.BytesIO(data))
