"""A restricted unpickler for files written by CoOp, Dassl and the official Nemesis code.

Those files are pickles: Dassl checkpoints (`torch.save` of a dict whose `scheduler` entry holds
pickled LR-scheduler objects) and few-shot splits (`pickle.dump` of `Datum` objects). Pickles can
run arbitrary code, so nothing here imports a module named by the file and torch's own loader is
never used. The pure-Python unpickler below resolves globals from a fixed table of our own
functions (tensors rebuilt from bounded storages, plain containers); classes from Dassl and
`torch.optim` come back as inert `PickledObject` records (class name and state, no code run);
anything else is refused. BUILD (setstate) is allowed on those records only, so a file cannot
patch a function or class it names; persistent ids other than tensor storages are refused. Storage
bytes come from the archive's own members, uncompressed and inside the file, so a file can never
make us allocate more than it holds.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch

from .errors import NemesisError

# Classes recorded as inert state instead of being imported: Dassl's own types (Datum, warm-up
# schedulers) and torch optimisers and schedulers pickled inside Dassl's `scheduler` entry.
INERT_MODULE_PREFIXES = ("dassl.", "torch.optim.")

# Bounds on what a file may declare. A Dassl `data.pkl` is a few kB and a few-shot split of 16 shots
# on ImageNet about 3 MB; pure-Python unpickling of a pickle costs at most a few dozen times its size.
MAX_PICKLE_BYTES = 32 * 2**20
MAX_ARCHIVE_MEMBERS = 10_000
MAX_NESTING = 100  # containers inside containers; real files nest fewer than 10 deep
MAX_NAME_LENGTH = 200
MAX_TENSOR_DIMS = 8


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names something outside the allow-list or asks for what we refuse; nothing of it was run."""


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


class _Storage:
    """A tensor storage of the archive: a flat tensor of its dtype, never reachable as a callable; when the
    caller reads only some tensors (`load_torch_file(tensors=...)`), `flat` is None until one needs it."""

    def __init__(
        self, flat: torch.Tensor | None, dtype: torch.dtype | None = None, numel: int = 0, member: Any = None
    ) -> None:
        self.flat = flat
        self.dtype = flat.dtype if flat is not None else dtype
        self.numel = flat.numel() if flat is not None else numel
        self.member = member  # the archive member `flat` is read from when it is needed


class UnreadTensor:
    """A tensor of a torch file that was not asked for: its dtype and shape only, its bytes never read."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = dtype, torch.Size(shape)

    def __repr__(self) -> str:
        return f"UnreadTensor({self.dtype}, {tuple(self.shape)})"


class _PendingTensor:
    """A tensor whose storage is read only if a wanted key holds it (checked view of a `_Storage`)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _StorageType:
    """What `torch.FloatStorage` and friends resolve to: the dtype only, not torch's class."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_TENSOR_DIMS:
        raise ForbiddenGlobal(f"tensor {what} {value!r:.80} is not a tuple of at most {MAX_TENSOR_DIMS} sizes")
    if not all(_is_int(item) and 0 <= item < 2**62 for item in value):
        raise ForbiddenGlobal(f"tensor {what} {value!r:.80} holds something other than non-negative integers")
    return tuple(value)


def _no_hooks(value: Any, what: str) -> None:
    if value is not None and not (isinstance(value, dict) and not value):
        raise ForbiddenGlobal(f"tensor {what} must be empty; the pickle attaches {type(value).__name__}")


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    """Stand-in for torch's `_rebuild_tensor_v2`: a view of a storage read from the file, inside its bounds."""
    if not isinstance(storage, _Storage):
        raise ForbiddenGlobal("a tensor is rebuilt from something that is not a storage of the file")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or not _is_int(storage_offset) or storage_offset < 0:
        raise ForbiddenGlobal(f"tensor size {size}, stride {stride} and offset {storage_offset!r:.40} do not fit")
    if not isinstance(requires_grad, bool):
        raise ForbiddenGlobal("tensor requires_grad is not a boolean")
    _no_hooks(backward_hooks, "backward hooks")
    _no_hooks(metadata, "metadata")
    available = storage.numel
    elements = 1
    for length in size:
        elements *= length
    if elements:
        # a view may select from its storage (CoOp's token_prefix/suffix are slices of one embedding) but
        # never overlap itself (stride 0 of a dimension longer than 1) nor reach past the storage's end
        if any(length > 1 and step == 0 for length, step in zip(size, stride, strict=True)):
            raise ForbiddenGlobal(f"tensor of size {size} repeats its storage (stride {stride})")
        last = storage_offset + sum((length - 1) * step for length, step in zip(size, stride, strict=True))
        if last >= available or elements > available:
            raise ForbiddenGlobal(f"tensor of size {size} reaches past its storage of {available} elements")
    if storage.flat is None:  # read later, if a wanted key holds it
        return _PendingTensor(storage, storage_offset if elements else 0, size, stride)
    return torch.as_strided(storage.flat, size, stride, storage_offset if elements else 0)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> torch.Tensor:
    """Stand-in for torch's `_rebuild_parameter(_with_state)`: the tensor itself; Python attributes are dropped."""
    if not isinstance(data, (torch.Tensor, _PendingTensor)):
        raise ForbiddenGlobal("a parameter is rebuilt from something that is not a tensor")
    _no_hooks(backward_hooks, "backward hooks")
    return data


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use to carry bytes as latin-1 text."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ForbiddenGlobal("the pickle encodes something other than latin-1 text")
    return text.encode("latin-1")


def _defaultdict(factory: Any = None, *args: Any) -> collections.defaultdict:
    """`collections.defaultdict` whose default factory can only build an empty container."""
    if factory not in (None, dict, list) or args:
        raise ForbiddenGlobal(f"refusing a defaultdict whose default factory is {factory!r:.60}")
    return collections.defaultdict(factory)


class _NumpyDtype(PickledObject):
    pickled_class = "numpy.dtype"


class _NumpyArray(PickledObject):
    pickled_class = "numpy.ndarray"


_NUMPY_SCALAR_CODE = re.compile(r"[biuf][1248]|c(8|16)|f16")


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for numpy's `scalar`: a plain numeric numpy scalar from its bytes (Dassl's `val_result`)."""
    import numpy

    code = dtype.args[0] if isinstance(dtype, _NumpyDtype) and dtype.args else None
    order = dtype.state[1] if isinstance(dtype.state, tuple) and len(dtype.state) > 1 else "<"
    if not isinstance(code, str) or not _NUMPY_SCALAR_CODE.fullmatch(code) or order not in ("<", ">", "|", "="):
        raise ForbiddenGlobal(f"refusing a numpy scalar of type {code!r:.40}")
    numpy_dtype = numpy.dtype(code).newbyteorder(order)
    if not isinstance(data, bytes) or len(data) != numpy_dtype.itemsize:
        raise ForbiddenGlobal(f"numpy scalar of type {code} does not hold {numpy_dtype.itemsize} bytes")
    return numpy.frombuffer(data, dtype=numpy_dtype)[0]


def _numpy_reconstruct(cls: Any, *args: Any) -> PickledObject:
    if cls is not _NumpyArray:
        raise ForbiddenGlobal(f"refusing to rebuild {cls!r:.60} as a numpy array")
    return _NumpyArray(*args)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> PickledObject:
    """Stand-in for `copyreg._reconstructor` (protocol 0 and 1 pickles) that only builds inert records."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise ForbiddenGlobal(f"refusing to rebuild {cls!r:.60}")
    return cls()


def _globals_table() -> dict[str, Any]:
    table: dict[str, Any] = {
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": _defaultdict,
        "builtins.dict": dict,
        "builtins.list": list,
        "builtins.tuple": tuple,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.object": object,
        "copyreg._reconstructor": _reconstructor,
        "_codecs.encode": _encode,
        "torch.Size": torch.Size,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        table[f"torch.{name}"] = _StorageType(dtype)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"):
        table[f"torch.{name}"] = getattr(torch, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[f"{module}.scalar"] = _numpy_scalar
        table[f"{module}._reconstruct"] = _numpy_reconstruct
    table["numpy.dtype"] = _NumpyDtype
    table["numpy.ndarray"] = _NumpyArray
    return table


_GLOBALS = _globals_table()

_REFUSED_OPCODES = {
    pickle.EXT1: "an extension-registry code",
    pickle.EXT2: "an extension-registry code",
    pickle.EXT4: "an extension-registry code",
    pickle.BYTEARRAY8: "a bytearray",
    pickle.NEXT_BUFFER: "an out-of-band buffer",
    pickle.READONLY_BUFFER: "an out-of-band buffer",
}


class RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler that resolves only allow-listed globals and never imports a module itself.

    `storages(dtype, key, numel)` supplies tensor storages for persistent ids (None: a plain pickle,
    which may hold none). Names under `inert_prefixes` become `PickledObject` records; `extra_globals`
    adds allowed names (qualified name -> object) for readers of other archive layouts.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)

    def __init__(
        self,
        file: Any,
        *,
        storages: Callable[[torch.dtype, str, int], _Storage] | None = None,
        inert_prefixes: Iterable[str] = INERT_MODULE_PREFIXES,
        extra_globals: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(file)
        self._storages = storages
        self._inert_prefixes = tuple(inert_prefixes)
        self._globals = {**_GLOBALS, **(extra_globals or {})}
        self._inert_classes: dict[str, type] = {}  # per file: nothing a file names outlives its load

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str) or len(module) + len(name) > MAX_NAME_LENGTH:
            raise ForbiddenGlobal("the pickle names a global that is not a short module and name")
        # Protocol 2 pickles (torch.save's default) name Python 2 modules, e.g. `__builtin__`.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in self._globals:
            return self._globals[qualified]
        if module.startswith(self._inert_prefixes):
            return self.inert_class(qualified)
        raise ForbiddenGlobal(f"the pickle asks for '{qualified}', which is neither a tensor nor a plain container")

    def inert_class(self, qualified_name: str) -> type:
        """The record class standing for `qualified_name` in this file."""
        if qualified_name not in self._inert_classes:
            short = qualified_name.rsplit(".", 1)[-1]
            self._inert_classes[qualified_name] = type(short, (PickledObject,), {"pickled_class": qualified_name})
        return self._inert_classes[qualified_name]

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise ForbiddenGlobal("the pickle refers to external objects (persistent ids); plain pickles never do")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise ForbiddenGlobal(f"the pickle asks for a persistent object {pid!r:.60}; only tensor storages are read")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise ForbiddenGlobal(f"storage type {storage_type!r:.60} is not a tensor storage type")
        if not isinstance(key, str) or len(key) > MAX_NAME_LENGTH or not _is_int(numel) or numel < 0:
            raise ForbiddenGlobal(f"storage {key!r:.60} of {numel!r:.30} elements is not a valid declaration")
        return self._storages(storage_type.dtype, key, numel)

    def load_build(self) -> None:
        # BUILD runs setstate on the object below it; on a function or class that patches the process
        # (e.g. a function's __defaults__), so only our records and torch's state_dict metadata take it.
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, PickledObject):
            target.__setstate__(state)
        elif type(target) is collections.OrderedDict and isinstance(state, dict) and set(state) <= {"_metadata"}:
            pass  # torch state_dicts carry `_metadata` (module versions) as an attribute; not needed
        else:
            name = type(target).__name__
            raise ForbiddenGlobal(f"the pickle sets the state of {name!r:.60}; only inert records take state")

    dispatch[pickle.BUILD[0]] = load_build


for _opcode, _what in _REFUSED_OPCODES.items():

    def _refuse(self: RestrictedUnpickler, what: str = _what) -> None:
        raise ForbiddenGlobal(f"the pickle holds {what}, which checkpoints never do")

    RestrictedUnpickler.dispatch[_opcode[0]] = _refuse


def _check_nesting(value: Any, path: Path) -> None:
    """Refuse containers nested deeper than MAX_NESTING (later code walking them would overflow the stack)."""
    seen: set[int] = set()
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_NESTING:
            raise NemesisError(f"refusing to load {path}: it nests containers more than {MAX_NESTING} deep")
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            children: Iterable[Any] = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = item
        elif isinstance(item, PickledObject):
            children = (item.args, item.state)
        else:
            continue
        pending.extend((child, depth + 1) for child in children)


def _unpickle(data: bytes, path: Path, what: str, **options: Any) -> Any:
    try:
        value = RestrictedUnpickler(io.BytesIO(data), **options).load()
    except ForbiddenGlobal as error:
        raise NemesisError(f"refusing to load {path}: {error}") from error
    except NemesisError:
        raise
    except Exception as error:  # any damage: truncated, wrong opcodes, bad arguments to our own functions
        raise NemesisError(f"{path} is not {what} ({type(error).__name__}: {str(error)[:200]})") from error
    _check_nesting(value, path)
    return value


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    if not path.is_file():
        raise NemesisError(f"file not found: {path}")
    size = path.stat().st_size
    if size > limit:
        raise NemesisError(f"refusing to load {path}: {size} bytes is more than {what} may hold ({limit} bytes)")
    return path.read_bytes()


def load_pickle(path: str | os.PathLike) -> Any:
    """Read a plain pickle (e.g. a Dassl few-shot split) without running code from it."""
    path = Path(path)
    return _unpickle(_read_bounded(path, MAX_PICKLE_BYTES, "a pickle"), path, "a readable pickle")


def loads_pickle(data: bytes) -> Any:
    """`load_pickle` for bytes in memory (tests, embedded splits)."""
    return _unpickle(data, Path("<bytes>"), "a readable pickle")


_TAR_MAGIC_OFFSET = 257


def _torch_format(path: Path) -> str:
    with open(path, "rb") as file:
        head = file.read(_TAR_MAGIC_OFFSET + 8)
    if zipfile.is_zipfile(path):
        return "zip"
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    if head[:1] == b"\x80":
        return "legacy"
    return "unknown"


def _check_member(info: zipfile.ZipInfo, archive_size: int, path: Path) -> None:
    # torch writes members uncompressed; a compressed one could inflate far beyond the file (zip bomb)
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise NemesisError(f"refusing to load {path}: member {info.filename!r:.80} is compressed (torch never is)")
    if info.header_offset + info.file_size > archive_size:
        raise NemesisError(f"{path} is damaged: member {info.filename!r:.80} declares more bytes than the file holds")


def load_torch_file(
    path: str | os.PathLike,
    *,
    pickle_name: str = "data.pkl",
    inert_prefixes: Iterable[str] = INERT_MODULE_PREFIXES,
    extra_globals: dict[str, Any] | None = None,
    tensors: Callable[[str], bool] | None = None,
) -> Any:
    """Read a `torch.save` file (zip format, torch >= 1.6) on the CPU without running code from it.

    `pickle_name` names the archive's pickle (TorchScript archives also hold `constants.pkl`), whose
    storages lie in the folder of the same name (`data/`, `constants/`);
    `inert_prefixes` and `extra_globals` widen what the unpickler accepts (see RestrictedUnpickler).
    `tensors` reads only the tensors held under the dictionary keys it accepts (the innermost text key
    above a tensor decides): the others come back as `UnreadTensor` (dtype and shape) and their
    storages are never read, so a whole-model checkpoint of hundreds of MB yields its prompts in kB.
    """
    path = Path(path)
    if not path.is_file():
        raise NemesisError(f"file not found: {path}")
    kind = _torch_format(path)
    if kind in ("tar", "legacy"):
        origin = "torch 0.1 (tar format)" if kind == "tar" else "torch < 1.6 (legacy format)"
        raise NemesisError(
            f"refusing to load {path}: it was saved by {origin}, which only torch's unrestricted loader reads; "
            "re-save it with torch.save in a recent torch from a trusted copy"
        )
    if kind != "zip":
        raise NemesisError(f"{path} is not a torch checkpoint (neither a zip archive nor an older torch format)")
    try:
        with zipfile.ZipFile(path) as archive:
            return _load_torch_zip(archive, path, pickle_name, inert_prefixes, extra_globals, tensors)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        if isinstance(error, NemesisError):
            raise
        raise NemesisError(f"{path} is not a readable torch checkpoint ({type(error).__name__}: {error})") from error


def _load_torch_zip(
    archive: zipfile.ZipFile,
    path: Path,
    pickle_name: str,
    inert_prefixes: Iterable[str],
    extra_globals: dict[str, Any] | None,
    wanted: Callable[[str], bool] | None = None,
) -> Any:
    archive_size = path.stat().st_size
    members = archive.infolist()
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise NemesisError(f"refusing to load {path}: {len(members)} archive members, far more than a checkpoint holds")
    by_name = {info.filename: info for info in members}
    pickles = [name for name in by_name if name.count("/") == 1 and name.endswith("/" + pickle_name)]
    if len(pickles) != 1:
        raise NemesisError(f"{path} is not a torch checkpoint (no single <archive>/{pickle_name} inside)")
    prefix = pickles[0][: -len(pickle_name)]
    # Only members that are read must be stored plainly: TorchScript archives (OpenAI's CLIP files) also
    # hold deflated code/ files, which are never read.
    for info in members:
        if info.filename in (pickles[0], prefix + "byteorder") or info.filename.startswith(prefix + "data/"):
            _check_member(info, archive_size, path)
    if prefix + "byteorder" in by_name and archive.read(by_name[prefix + "byteorder"]) != b"little":
        raise NemesisError(f"refusing to load {path}: it was saved on a big-endian machine")
    pickle_info = by_name[pickles[0]]
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise NemesisError(f"refusing to load {path}: its pickle of {pickle_info.file_size} bytes is far too large")
    storage_folder = pickle_name.removesuffix(".pkl")  # data.pkl -> data/<key>, constants.pkl -> constants/<key>
    loaded: dict[str, _Storage] = {}
    budget = [archive_size]  # all storages together hold at most the file's own bytes

    def storage(dtype: torch.dtype, key: str, numel: int) -> _Storage:
        if key in loaded:
            if loaded[key].dtype != dtype or loaded[key].numel != numel:
                raise ForbiddenGlobal(f"storage {key!r:.60} is declared twice with different types or sizes")
            return loaded[key]
        info = by_name.get(f"{prefix}{storage_folder}/{key}")
        nbytes = numel * dtype.itemsize
        if info is None or info.file_size != nbytes:
            raise ForbiddenGlobal(f"storage {key!r:.60} ({nbytes} bytes) is absent from the archive or sized otherwise")
        if nbytes > budget[0]:
            raise ForbiddenGlobal("the storages declare more bytes than the file holds")
        budget[0] -= nbytes
        if wanted is None:  # checked above: uncompressed, inside the file, of the declared size
            loaded[key] = _Storage(_read_storage(archive, info, dtype))
        else:
            loaded[key] = _Storage(None, dtype, numel, member=info)
        return loaded[key]

    options = {"storages": storage, "inert_prefixes": inert_prefixes, "extra_globals": extra_globals}
    value = _unpickle(archive.read(pickle_info), path, "a torch checkpoint", **options)
    if wanted is None:
        return value

    def read(pending: _PendingTensor) -> torch.Tensor:
        held = pending.storage
        if held.flat is None:
            held.flat = _read_storage(archive, held.member, held.dtype)
        return torch.as_strided(held.flat, pending.size, pending.stride, pending.offset)

    return _resolve_pending(value, wanted, read, False, {})


_READ_CHUNK = 16 * 2**20


def _read_storage(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: torch.dtype) -> torch.Tensor:
    """One storage member as a flat tensor, read in chunks into its own buffer (never held twice)."""
    data = bytearray(info.file_size)
    view = memoryview(data)
    with archive.open(info) as member:
        done = 0
        while done < len(data):
            chunk = member.read(min(_READ_CHUNK, len(data) - done))
            if not chunk:
                raise EOFError(f"storage member {info.filename!r:.80} ends early")
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
    return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)


def _resolve_pending(
    value: Any, wanted: Callable[[str], bool], read: Callable[[_PendingTensor], torch.Tensor], here: bool, seen: dict
) -> Any:
    """`value` with each pending tensor read (when the innermost text key above it is wanted) or replaced by
    an `UnreadTensor`; containers are changed in place (shared ones once), tuples and sets rebuilt."""
    if isinstance(value, _PendingTensor):
        return read(value) if here else UnreadTensor(value.storage.dtype, value.size)
    if id(value) in seen:  # seen: id -> (the original, kept alive so its id is not reused; its result)
        return seen[id(value)][1]
    if isinstance(value, dict):
        seen[id(value)] = (value, value)
        for key in list(value):
            inner = wanted(key) if isinstance(key, str) else here
            value[key] = _resolve_pending(value[key], wanted, read, inner, seen)
    elif isinstance(value, list):
        seen[id(value)] = (value, value)
        value[:] = [_resolve_pending(item, wanted, read, here, seen) for item in value]
    elif isinstance(value, (tuple, set, frozenset)) and type(value) is not torch.Size:
        items = [_resolve_pending(item, wanted, read, here, seen) for item in value]
        seen[id(value)] = (value, type(value)(items))
    elif isinstance(value, PickledObject):
        seen[id(value)] = (value, value)
        value.args = _resolve_pending(value.args, wanted, read, here, seen)
        value.state = _resolve_pending(value.state, wanted, read, here, seen)
    else:
        return value
    return seen[id(value)][1]
