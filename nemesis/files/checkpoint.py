"""Prompt checkpoints: our safetensors format, and CoOp / official Nemesis (Dassl) files.

Our format is one `.safetensors` file: tensor `ctx` (fp32) and, in the header metadata under key
`nemesis`, a JSON object describing the prompt (PEFT's config + tensors habit, in one file).
Dassl files are `torch.save` pickles read through `nemesis.unpickle`'s restricted unpickler.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from .. import __version__
from ..atomic import atomic_path
from ..constants import (
    CTX_TENSOR,
    DASSL_BEST_FILE,
    DASSL_FILE_PREFIX,
    DASSL_PROMPT_FOLDER,
    METADATA_KEY,
    PROMPT_FORMAT_VERSION,
    RUN_CHECKPOINTS,
    RUN_CONFIG,
    RUN_PROMPT,
)
from ..errors import NemesisError
from ..methods import METHODS, MethodSpec, method_of_dassl_path, method_spec, split_method
from ..model.clip_models import embed_dim, list_models, text_heads, text_width, vision_width
from ..penalties import NO_PENALTY, PENALTIES, DasslTrainer, penalty_names
from ..unpickle import UnreadTensor, load_torch_file
from . import peft_prefix, whole_model
from .coop_paths import identity_from_path


@dataclass
class PromptMetadata:
    """What a prompt file says about itself. Dassl files carry none of it: the user names model and data.

    Version 2 names the prompt method and its config, and the penalty and its config, apart;
    version-1 files (one word for both, CoOp's options as fields) are read into the same fields.
    """

    format_version: int = PROMPT_FORMAT_VERSION
    model: str | None = None
    pretrained: str | None = None
    weights_id: str | None = None
    activation: str | None = None  # "quickgelu" or "gelu": the CLIP activation the prompt was trained under
    text_width: int | None = None
    classnames: list[str] | None = None
    dataset: str | None = None
    shots: int | None = None
    seed: int | None = None
    subsample: str = "all"
    prompt_method: str | None = None  # the learner (nemesis.methods); None: read from the file's tensors
    prompt_config: dict[str, Any] = field(default_factory=dict)  # the method's options as trained
    penalty: str | None = NO_PENALTY  # "none", "nemesis", ...; None: not recorded (a Dassl file outside a tree)
    penalty_config: dict[str, Any] = field(default_factory=dict)  # e.g. NemesisConfig.to_json()
    epoch: int | None = None
    source_format: str = "nemesis"  # "nemesis", "dassl" or "peft"
    toolkit_version: str = __version__

    @classmethod
    def from_json(cls, text: str, origin: str) -> PromptMetadata:
        """Parse and type-check the metadata JSON: every field against its annotation, sizes bounded."""
        if len(text) > MAX_METADATA_CHARS:
            raise NemesisError(
                f"{origin}: metadata of {len(text)} characters is far more than a prompt's description "
                f"(at most {MAX_METADATA_CHARS}); the file is damaged or was not written by this toolkit"
            )
        try:
            values = json.loads(text)
        except RecursionError:
            raise NemesisError(f"{origin}: metadata nests too deep to be a prompt's description") from None
        except json.JSONDecodeError as error:
            raise NemesisError(f"{origin}: metadata is not valid JSON ({error})") from error
        if not isinstance(values, dict):
            raise NemesisError(f"{origin}: metadata is a JSON {type(values).__name__}, not an object of named fields")
        if values.get("format_version", 1) == 1:
            values = _version_1(values)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(f"{origin}: ignoring unknown metadata keys {unknown[:20]}", stacklevel=3)
        return _dataclass_from_json(cls, {key: value for key, value in values.items() if key in known}, origin)


# Version 1's fields for what version 2 keeps in `prompt_config`, and its one word for method and penalty.
VERSION_1_PROMPT_FIELDS = ("n_ctx", "ctx_init", "class_specific", "class_position")


def _version_1(values: dict[str, Any]) -> dict[str, Any]:
    """Version-1 metadata in version 2's fields (values are type-checked afterwards, as any file's)."""
    values = dict(values)
    old = {name: values.pop(name) for name in VERSION_1_PROMPT_FIELDS if name in values}
    word = values.pop("method", None)
    method, penalty = split_method(word)
    values.setdefault("prompt_method", method if isinstance(word, str) and word in METHODS else None)
    values["penalty"] = penalty if word not in (None, "unknown") else None
    values["penalty_config"] = values.pop("method_config", {})
    spec = METHODS.get(values["prompt_method"]) if isinstance(values["prompt_method"], str) else None
    names = spec.option_names() if spec is not None else VERSION_1_PROMPT_FIELDS
    values["prompt_config"] = {name: value for name, value in old.items() if name in names}
    values["format_version"] = PROMPT_FORMAT_VERSION
    return values


# Bounds on a prompt's metadata: enough for 21k class names, far below what would stall a terminal.
MAX_METADATA_CHARS = 4 * 2**20
MAX_METADATA_STRING = 4096
MAX_METADATA_ITEMS = 100_000
MAX_METADATA_DEPTH = 16


def _json_value_ok(value: Any, depth: int = 0) -> bool:
    """A JSON value of bounded size and depth (free-form fields such as prompt_config)."""
    if depth > MAX_METADATA_DEPTH:
        return False
    if value is None or isinstance(value, (bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= MAX_METADATA_STRING
    if isinstance(value, list):
        return len(value) <= MAX_METADATA_ITEMS and all(_json_value_ok(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return len(value) <= MAX_METADATA_ITEMS and all(
            len(key) <= MAX_METADATA_STRING and _json_value_ok(item, depth + 1) for key, item in value.items()
        )
    return False


def _conforms(value: Any, hint: Any, depth: int = 0) -> bool:
    """Whether a JSON value fits a type annotation (the generic check behind PromptMetadata.from_json)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _json_value_ok(value, depth)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg, depth) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, str) and value in {member.value for member in hint}
    if hint is str:
        return isinstance(value, str) and len(value) <= MAX_METADATA_STRING
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin is list or hint is list:
        item = args[0] if args else Any
        return (
            isinstance(value, list)
            and len(value) <= MAX_METADATA_ITEMS
            and all(_conforms(entry, item, depth + 1) for entry in value)
        )
    if origin is tuple:
        if not isinstance(value, list) or len(value) > MAX_METADATA_ITEMS:
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(entry, args[0], depth + 1) for entry in value)
        return len(value) == len(args) and all(_conforms(v, a, depth + 1) for v, a in zip(value, args, strict=True))
    if origin is dict or hint is dict:
        key_hint, item = args if args else (str, Any)
        return (
            isinstance(value, dict)
            and len(value) <= MAX_METADATA_ITEMS
            and all(_conforms(key, key_hint) and _conforms(entry, item, depth + 1) for key, entry in value.items())
        )
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return isinstance(value, dict) and all(
            key in hints and _conforms(entry, hints[key], depth + 1) for key, entry in value.items()
        )
    return _json_value_ok(value, depth)  # an annotation this check does not know: at least bounded JSON


def _describe(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return text or str(hint).replace("typing.", "")


def _dataclass_from_json(cls: type, values: dict[str, Any], origin: str) -> Any:
    hints = typing.get_type_hints(cls)
    checked = {}
    for name, value in values.items():
        hint = hints[name]
        if not _conforms(value, hint):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise NemesisError(
                f"{origin}: metadata field '{name}' must be {_describe(hint)}, not {type(value).__name__} {shown}; "
                "the file is damaged or was not written by this toolkit"
            )
        nested = [arg for arg in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(arg)]
        checked[name] = _dataclass_from_json(nested[0], value, origin) if nested and isinstance(value, dict) else value
    try:
        return cls(**checked)
    except (TypeError, ValueError) as error:  # a dataclass's own cross-field checks
        raise NemesisError(f"{origin}: metadata does not describe a prompt ({error})") from error


@dataclass
class PromptCheckpoint:
    ctx: torch.Tensor  # fp32, the shape the method declares ([M, W] or [n_cls, M, W] for CoOp)
    metadata: PromptMetadata
    path: Path | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's other tensors (CoCoOp's meta-net)
    # A whole-model Dassl file's few frozen CLIP tensors (our state-dict names, as saved): the backbone must match
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """A checkpoint built in memory without its method or options gets what its tensors say."""
        complete_metadata(self.metadata, self.ctx, self.extra, str(self.path))

    @property
    def prompt_method(self) -> str:
        return self.metadata.prompt_method

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.prompt_method)

    @property
    def config(self) -> Any:
        """The method's config as recorded (a Dassl file's: what its tensors and path say)."""
        return self.spec.config(**self.metadata.prompt_config)

    @property
    def class_specific(self) -> bool:
        """Whether ctx has a class axis in front (CoOp's CSC), so it serves only its own classes."""
        return bool(getattr(self.config, "class_specific", False))

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {CTX_TENSOR: self.ctx, **self.extra}

    @property
    def records_trained_classes(self) -> bool:
        """Whether the file says which classes it was trained on: ours always; a Dassl file only through
        its base-to-new path (`train_base/`), else its `subsample` "all" is an assumption."""
        return self.metadata.source_format != "dassl" or identity_from_path(self.path).subsample is not None

    def check_model(self, model: str, embed_dim: int, text_width: int, n_classes: int | None = None) -> None:
        """Refuse a prompt whose tensors do not fit `model` (widths D and W, its image tower's width) or
        `n_classes` classes."""
        tower_width = vision_width(model)
        expected = self.spec.tensor_shapes(self.config, embed_dim, text_width, n_classes, tower_width)
        tower = self.spec.ctx_tower()
        width = tower_width if tower == "vision" else text_width
        if self.ctx.shape[-1] != width:
            raise NemesisError(
                f"{self.path}: ctx width {self.ctx.shape[-1]} does not match the {tower} width {width} "
                f"of model '{model}'; name the model the prompt was trained with (--model)"
            )
        if n_classes is not None and self.class_specific and self.ctx.shape[0] != n_classes:
            raise NemesisError(
                f"{self.path}: class-specific ctx has {self.ctx.shape[0]} classes but the dataset has {n_classes}"
            )
        tensors = self.tensors
        name = misfit(tensors, expected, order=expected)  # in the method's order: ctx first
        if name is not None:
            raise NemesisError(
                f"{self.path}: {name} has shape {tuple(tensors[name].shape)}, but {self.prompt_method} on model "
                f"'{model}' (image width {embed_dim}, text width {text_width}, image-tower width {tower_width}) "
                f"needs {_shown(expected[name])}; name the model it was trained with"
            )


def misfit(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], order: Any) -> str | None:
    """The first tensor (of the names in `order` that both hold) whose shape is not the declared one."""
    for name in order:
        if name in tensors and name in expected and not shape_fits(tensors[name].shape, expected[name]):
            return name
    return None


def shape_fits(shape: Any, expected: tuple[int | None, ...]) -> bool:
    """Whether a tensor shape is the declared one (None: any size on that axis)."""
    shape = tuple(shape)
    return len(shape) == len(expected) and all(
        want is None or size == want for size, want in zip(shape, expected, strict=False)
    )


def _shown(expected: tuple[int | None, ...]) -> str:
    sizes = ["any" if size is None else str(size) for size in expected]
    return f"({sizes[0]},)" if len(sizes) == 1 else "(" + ", ".join(sizes) + ")"


# A prompt's own bounds: CLIP's text context holds 77 tokens, so at most 75 learned positions.
MAX_CTX_POSITIONS = 77
MAX_TEXT_WIDTH = 16384
MAX_TENSOR_DIMS = 5  # ctx [M, W] up to deep prompts' [tower-free layers, prompts, M, W] and more


def _checked(ctx: Any, origin: str) -> torch.Tensor:
    """Refuse anything but a dense, finite float tensor [..., M, W] of prompt size; return it as fp32."""
    if not isinstance(ctx, torch.Tensor):
        raise NemesisError(f"{origin}: ctx is a {type(ctx).__name__}, not a tensor")
    if ctx.layout != torch.strided or ctx.is_meta or ctx.is_quantized or not ctx.is_floating_point():
        kind = "meta" if ctx.is_meta else ctx.dtype if ctx.layout == torch.strided else str(ctx.layout)[6:]
        raise NemesisError(f"{origin}: ctx is a {kind} tensor; a prompt is a dense floating-point tensor")
    if not 2 <= ctx.dim() <= MAX_TENSOR_DIMS:
        raise NemesisError(
            f"{origin}: ctx has shape {tuple(ctx.shape)}; expected [..., M, W] with at most {MAX_TENSOR_DIMS} axes"
        )
    if not ctx.is_contiguous():
        raise NemesisError(f"{origin}: ctx of shape {tuple(ctx.shape)} is a strided view, not a stored prompt")
    if not (0 < ctx.shape[-2] <= MAX_CTX_POSITIONS and 0 < ctx.shape[-1] <= MAX_TEXT_WIDTH and ctx.shape[0] > 0):
        raise NemesisError(
            f"{origin}: ctx of shape {tuple(ctx.shape)} is not a prompt (at most {MAX_CTX_POSITIONS} positions "
            f"of width at most {MAX_TEXT_WIDTH})"
        )
    ctx = ctx.detach().to(torch.float32)  # fp16 Dassl ctx is read as fp32
    if not torch.isfinite(ctx).all():
        raise NemesisError(f"{origin}: ctx contains NaN or Inf values")
    return ctx.contiguous()


def _check_extra_shape(shape: Any, name: str, origin: str) -> None:
    shape = tuple(shape)
    if not 1 <= len(shape) <= MAX_TENSOR_DIMS or not all(0 < size <= MAX_TEXT_WIDTH for size in shape):
        raise NemesisError(f"{origin}: {name} of shape {shape} is not a prompt method's weight")


def _checked_extra(tensor: Any, name: str, origin: str) -> torch.Tensor:
    """A prompt method's tensor besides ctx (e.g. CoCoOp's meta-net weight): dense, finite, bounded; as fp32."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or not tensor.is_floating_point():
        raise NemesisError(f"{origin}: {name} is not a dense floating-point tensor")
    _check_extra_shape(tensor.shape, name, origin)
    tensor = tensor.detach().to(torch.float32).contiguous()
    if not torch.isfinite(tensor).all():
        raise NemesisError(f"{origin}: {name} contains NaN or Inf values")
    return tensor


def _extra_names(spec: MethodSpec, config: Any) -> set[str]:
    return set(spec.tensor_shapes(config)) - {CTX_TENSOR}


def _known_extra_names() -> set[str]:
    """Every registered method's tensor names besides ctx (those its default options learn, and those other
    options may add: the config's `possible_tensor_names()`): what a file may hold that is read."""
    possible = {name for spec in METHODS.values() for name in getattr(spec.config, "possible_tensor_names", tuple)()}
    return possible | {name for spec in METHODS.values() for name in _extra_names(spec, spec.config())}


def method_of_tensors(names: set[str], origin: str) -> str:
    """The method whose tensors besides ctx have exactly these names (of the known ones in a file)."""
    names = names & _known_extra_names()
    for spec in METHODS.values():
        if _extra_names(spec, spec.config()) == names:  # names do not depend on options or widths
            return spec.name
    raise NemesisError(f"{origin}: no prompt method learns the tensors {sorted(names)}; known: {', '.join(METHODS)}")


def _check_declared(spec: MethodSpec, config: Any, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Refuse tensors that are not the method's, by name and by the shapes the file itself fixes."""
    width = tensors[CTX_TENSOR].shape[-1]
    text, vision = (None, width) if spec.ctx_tower() == "vision" else (width, None)
    expected = spec.tensor_shapes(config, None, text, None, vision)
    if set(tensors) != set(expected):
        found = method_of_tensors(set(tensors) - {CTX_TENSOR}, origin)
        raise NemesisError(f"{origin} says it is a {spec.name} prompt but holds the tensors of {found}")
    name = misfit(tensors, expected, order=tensors)
    if name is not None:
        raise NemesisError(
            f"{origin}: {name} has shape {tuple(tensors[name].shape)}, but a {spec.name} prompt with options "
            f"{dataclasses.asdict(config)} holds {_shown(expected[name])}"
        )


def save_prompt(
    path: str | os.PathLike,
    ctx: torch.Tensor,
    metadata: PromptMetadata,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ctx, the method's other tensors (`extra`, e.g. CoCoOp's meta-net) and the metadata as one
    safetensors file, atomically. What the metadata leaves out (the method, its options) is written as
    the tensors say it; the caller's metadata is not changed."""
    path = Path(path)
    metadata = dataclasses.replace(metadata, prompt_config=dict(metadata.prompt_config))
    ctx = _checked(ctx.detach().cpu().contiguous(), str(path))
    extra = {
        name: _checked_extra(tensor.detach().cpu().contiguous(), name, str(path))
        for name, tensor in (extra or {}).items()
    }
    complete_metadata(metadata, ctx, extra, str(path))
    metadata.text_width = ctx.shape[-1]
    spec = method_spec(metadata.prompt_method)
    _check_declared(spec, spec.config(**metadata.prompt_config), {CTX_TENSOR: ctx, **extra}, str(path))
    with atomic_path(path) as temporary:
        tensors = {CTX_TENSOR: ctx, **extra}
        save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(asdict(metadata))})
    return path


def complete_metadata(metadata: PromptMetadata, ctx: torch.Tensor, extra: dict[str, torch.Tensor], origin: str) -> None:
    """Fill in what the tensors say where the metadata is silent: the method (from the tensor names) and
    its options not recorded (n_ctx from ctx's shape...); recorded options are kept."""
    metadata.prompt_method = metadata.prompt_method or method_of_tensors(set(extra), origin)
    spec = method_spec(metadata.prompt_method)
    implied = dataclasses.asdict(spec.options_from_dassl(tuple(ctx.shape), None))
    metadata.prompt_config = dataclasses.asdict(_recorded_config(spec, implied | metadata.prompt_config, origin))


def _read_prompt_tensors(file: Any, metadata: PromptMetadata, origin: str) -> dict[str, torch.Tensor]:
    """ctx and the tensors the file's method declares (older files: those its tensor names say), each
    after its shape is checked from the header; any other tensor in the file is not read."""
    if CTX_TENSOR not in file.keys():  # noqa: SIM118 (safe_open has no __contains__)
        raise NemesisError(f"{origin} holds no '{CTX_TENSOR}' tensor; it is not a prompt checkpoint")
    if metadata.prompt_method is None:
        metadata.prompt_method = method_of_tensors(set(file.keys()) - {CTX_TENSOR}, origin)
    names = _known_extra_names() & set(file.keys())
    tensors = {CTX_TENSOR: file.get_tensor(CTX_TENSOR)}
    for name in sorted(names):
        _check_extra_shape(file.get_slice(name).get_shape(), name, origin)
        tensors[name] = file.get_tensor(name)
    return tensors


def load_prompt(path: str | os.PathLike) -> PromptCheckpoint:
    """Read one of our safetensors prompt files (format version 1 or 2)."""
    path = Path(path)
    if not path.is_file():
        raise NemesisError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
            text = header.get(METADATA_KEY)
            # A file without our description records nothing of its training, its penalty included.
            metadata = PromptMetadata.from_json(text, str(path)) if text is not None else PromptMetadata(penalty=None)
            tensors = _read_prompt_tensors(file, metadata, str(path))
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, NemesisError):
            raise
        raise NemesisError(f"{path} is not a safetensors prompt checkpoint ({error})") from error
    ctx = _checked(tensors.pop(CTX_TENSOR), str(path))
    extra = {name: _checked_extra(tensor, name, str(path)) for name, tensor in tensors.items()}
    complete_metadata(metadata, ctx, extra, str(path))  # a file that does not record its options
    spec = method_spec(metadata.prompt_method)
    _check_declared(spec, spec.config(**metadata.prompt_config), {CTX_TENSOR: ctx, **extra}, str(path))
    return PromptCheckpoint(ctx, metadata, path, extra)


def _recorded_config(spec: MethodSpec, values: dict[str, Any], origin: str) -> Any:
    unknown = sorted(set(values) - set(spec.option_names()))
    if unknown:
        raise NemesisError(f"{origin}: {spec.name} has no options {unknown}; the file is damaged")
    try:
        return spec.config(**values)
    except (TypeError, ValueError, NemesisError) as error:
        raise NemesisError(f"{origin}: the recorded {spec.name} options are not valid ({error})") from None


# --- Dassl (CoOp / official Nemesis) ----------------------------------------------------------


def _dassl_epoch(path: Path) -> int | None:
    match = re.fullmatch(re.escape(DASSL_FILE_PREFIX) + r"(\d+)", path.name)
    return int(match.group(1)) if match else None


def dassl_folders() -> tuple[str, ...]:
    """The folders Dassl trainers register their models in: CoOp's `prompt_learner`, then those of the
    trainers that save the whole model (`MultiModalPromptLearner`, `VLPromptLearner`)."""
    return tuple(dict.fromkeys((DASSL_PROMPT_FOLDER, *whole_model.folders(METHODS))))


def find_dassl_file(path: Path, epoch: int | None = None) -> Path:
    """The checkpoint file inside a Dassl run or model folder (`prompt_learner/`, `VLPromptLearner/`...):
    `epoch`, else the latest."""
    folder = next((path / name for name in dassl_folders() if (path / name).is_dir()), path)
    if epoch is not None:
        candidate = folder / f"{DASSL_FILE_PREFIX}{epoch}"
        if not candidate.is_file():
            raise NemesisError(f"no checkpoint for epoch {epoch} in {folder} (expected {candidate.name})")
        return candidate
    numbered = [(e, p) for p in folder.glob(f"{DASSL_FILE_PREFIX}*") if (e := _dassl_epoch(p)) is not None]
    if numbered:
        return max(numbered)[1]
    if (folder / DASSL_BEST_FILE).is_file():
        return folder / DASSL_BEST_FILE
    others = ", ".join(f"{name}/" for name in dassl_folders() if name != DASSL_PROMPT_FOLDER)
    raise NemesisError(
        f"no prompt checkpoint in {path} (looked for {RUN_PROMPT}, {DASSL_PROMPT_FOLDER}/{DASSL_FILE_PREFIX}<epoch> "
        f"or {DASSL_BEST_FILE}, also in {others})"
    )


def _dassl_method(
    trained: str | None, extra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], origin: str
) -> str:
    """The method of a Dassl file: the one named (or its trainer folder's) when the file holds that
    method's tensors, else the one its tensors say (a CoCoOp file copied into a CoOp tree is read as
    CoCoOp, meta-net included); among methods learning tensors of the same names, the first whose
    layout the file's shapes fit."""
    if trained is not None and _extra_names(method_spec(trained), method_spec(trained).config()) == set(extra):
        _check_buffers_fit(method_spec(trained), extra, shapes, origin)
        return trained
    method_of_tensors(set(extra), origin)  # refuses tensors no method learns
    same_names = [spec for spec in METHODS.values() if _extra_names(spec, spec.config()) == set(extra)]
    fitting = [spec for spec in same_names if spec.fits_dassl(shapes)]
    return (fitting or same_names)[0].name


def _check_buffers_fit(spec: MethodSpec, extra: dict, shapes: dict[str, tuple[int, ...]], origin: str) -> None:
    """Refuse a file named as (or filed under) `spec` whose buffers say it is another method's: a PLOT file
    (N x n_cls `token_prefix` rows) given as CoOp, or a class-specific CoOp file given as PLOT."""
    buffers = set(shapes) - {CTX_TENSOR} - set(extra)  # token_prefix, ...: without them the layout cannot tell
    if not buffers or spec.fits_dassl(shapes):
        return
    others = [
        other
        for other in METHODS.values()
        if other.name != spec.name and _extra_names(other, other.config()) == set(extra) and other.fits_dassl(shapes)
    ]
    if others:
        rows = shapes.get("token_prefix", (None,))[0]
        raise NemesisError(
            f"{origin} holds a {others[0].label} prompt (ctx {list(shapes[CTX_TENSOR])}, {rows} token_prefix rows), "
            f"not a {spec.label} one; pass --prompt-method {others[0].name}"
        )


def _penalty_trainer(penalty: str | None, state: dict) -> tuple[str | None, DasslTrainer | None]:
    """(penalty, official trainer) of a Dassl file trained with a penalty: the trainer of the penalty its
    path names (KgCoOp, ProGrad), else, outside a tree, the one whose marker key the file holds."""
    for name in penalty_names(penalty or NO_PENALTY):
        spec = PENALTIES.get(name)
        if spec is not None and spec.dassl is not None:
            return penalty, spec.dassl
    if penalty is None:
        for spec in PENALTIES.values():
            if spec.dassl is not None and spec.dassl.marker is not None and spec.dassl.marker in state:
                return spec.name, spec.dassl
    return penalty, None


def _with_trainer_options(config: Any, trainer: DasslTrainer | None, dataset: str | None) -> Any:
    """The config with what the official trainer builds its prompts from (ProGrad: its template's words)."""
    if trainer is None or trainer.prompt_options is None:
        return config
    fields = {spec.name for spec in dataclasses.fields(config)}
    implied = {name: value for name, value in trainer.prompt_options(dataset).items() if name in fields}
    return dataclasses.replace(config, **implied)


def load_dassl(path: str | os.PathLike, prompt_method: str | None = None) -> PromptCheckpoint:
    """Read a Dassl checkpoint file: `state_dict["ctx"]` and the method's other tensors (CoCoOp's
    `meta_net.*`); buffers (`token_prefix`, `token_suffix`) only tell layouts apart, and optimiser
    state is ignored, as are the unused keys of a penalty's official trainer (KgCoOp's `bias_vectors`
    and `meta_net.linear1.*`).

    The file names nothing else: the method is `prompt_method` when named, else its trainer folder's
    (else its tensors'), and dataset, shots, seed, penalty, classes and class position come from its path.
    """
    path = Path(path)
    content = load_torch_file(path, tensors=_dassl_reads())  # the frozen towers of whole-model files stay unread
    state = content.get("state_dict") if isinstance(content, dict) else None
    epoch = content.get("epoch") if isinstance(content, dict) else None
    epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch < 2**31 else None
    where = identity_from_path(path)
    trained, penalty = method_of_dassl_path(where.trainer, where.nemesis)
    if isinstance(state, dict) and whole_model.is_whole_model(state):
        return _load_whole_model(path, state, prompt_method, trained, penalty, epoch)
    if not isinstance(state, dict) or CTX_TENSOR not in state or not isinstance(state[CTX_TENSOR], torch.Tensor):
        raise NemesisError(f"{path} is not a CoOp/Nemesis prompt checkpoint (no state_dict['ctx'])")
    penalty, trainer = _penalty_trainer(penalty, state)
    if trainer is not None:
        trained = trained or trainer.method
        state = {name: value for name, value in state.items() if name not in trainer.unused_keys}
    extra = {name: _checked_extra(state[name], name, str(path)) for name in sorted(_known_extra_names() & set(state))}
    ctx = _checked(state[CTX_TENSOR], str(path))
    shapes = {
        name: tuple(tensor.shape) for name, tensor in state.items() if isinstance(tensor, (torch.Tensor, UnreadTensor))
    }
    spec = method_spec(_dassl_method(prompt_method or trained, extra, shapes, str(path)))
    config = spec.options_from_dassl(tuple(ctx.shape), where.class_position)
    if spec.name == trained:  # the trainer's own method: its prompts are built as it builds them
        config = _with_trainer_options(config, trainer, where.dataset)
    extra = {name: tensor for name, tensor in extra.items() if name in _extra_names(spec, config)}
    _check_declared(spec, config, {CTX_TENSOR: ctx, **extra}, str(path))
    metadata = PromptMetadata(
        text_width=ctx.shape[-1],
        epoch=epoch,
        dataset=where.dataset,
        shots=where.shots,
        seed=where.seed,
        prompt_method=spec.name,
        prompt_config=dataclasses.asdict(config),
        penalty=penalty,
        activation=None,  # not recorded: CoOp trains under QuickGELU, but exports of GELU-trained prompts exist
        subsample=where.subsample or "all",
        source_format="dassl",
    )
    return PromptCheckpoint(ctx, metadata, path, extra)


def _dassl_reads() -> Any:
    """Which tensors a Dassl file is read for: ctx, the methods' other tensors, and a whole-model file's
    prompt rows and reference weights; buffers (token_prefix...) and frozen towers give their shapes only."""
    known = {CTX_TENSOR, *_known_extra_names()}
    return lambda key: key in known or whole_model.wanted(key, METHODS)


def _load_whole_model(
    path: Path, state: dict, prompt_method: str | None, trained: str | None, penalty: str | None, epoch: int | None
) -> PromptCheckpoint:
    """A whole-model file of an official trainer (MaPLe's, IVLP's...): our tensors from its prompt rows."""
    read = whole_model.read_whole_model(state, METHODS, prompt_method, trained, str(path))
    tensors = {name: _checked(t, str(path)) if name == CTX_TENSOR else t for name, t in read.tensors.items()}
    ctx = tensors.pop(CTX_TENSOR)
    extra = {name: _checked_extra(tensor, name, str(path)) for name, tensor in tensors.items()}
    _check_declared(read.spec, read.config, {CTX_TENSOR: ctx, **extra}, str(path))
    where = identity_from_path(path)
    metadata = PromptMetadata(
        text_width=ctx.shape[-1],
        epoch=epoch,
        dataset=where.dataset,
        shots=where.shots,
        seed=where.seed,
        prompt_method=read.spec.name,
        prompt_config=dataclasses.asdict(read.config),
        penalty=penalty if read.spec.name == trained else None,
        activation=None,  # their CLIP runs QuickGELU (OpenAI's weights), not recorded in the file
        subsample=where.subsample or "all",
        source_format="dassl",
    )
    return PromptCheckpoint(ctx, metadata, path, extra, frozen=read.frozen)


def export_dassl(
    checkpoint: PromptCheckpoint, out_dir: str | os.PathLike, epoch: int | None = None, backbone: Any = None
) -> Path:
    """Write `<out_dir>/prompt_learner/model.pth.tar-<E>` so CoOp's `load_model` reads the prompt; a method
    whose official trainer saves the whole model (`MethodSpec.dassl_layout`) gets that file instead, in its
    folder, the frozen towers taken from `backbone` (the weights the prompt was trained on).

    Only tensors and plain values are saved, so the file also loads with `torch.load(weights_only=True)`.
    Buffers the method needs to be told apart (PLOT's `token_prefix` rows, when its classes are recorded)
    are written as zeros; Dassl's loaders drop them.
    """
    epoch = epoch if epoch is not None else (checkpoint.metadata.epoch or 0)
    if checkpoint.spec.dassl_layout is not None:
        if backbone is None:
            raise NemesisError(f"{checkpoint.spec.label}'s checkpoints hold the whole model: name its weights")
        return whole_model.export_whole_model(checkpoint, backbone, Path(out_dir), epoch)
    folder = Path(out_dir) / DASSL_PROMPT_FOLDER  # created with any missing parents by the atomic write
    target = folder / f"{DASSL_FILE_PREFIX}{epoch}"
    classnames = checkpoint.metadata.classnames
    buffers = checkpoint.spec.dassl_buffers(
        checkpoint.config, tuple(checkpoint.ctx.shape), len(classnames) if classnames else None
    )
    state = {CTX_TENSOR: checkpoint.ctx.clone(), **{k: v.clone() for k, v in checkpoint.extra.items()}}
    state |= {name: checkpoint.ctx.new_zeros(shape) for name, shape in buffers.items()}
    content = {
        "state_dict": state,
        "epoch": epoch,
        "optimizer": None,
        "scheduler": None,
        "val_result": None,
    }
    with atomic_path(target) as temporary:
        torch.save(content, temporary)
    return target


# --- PEFT adapters (prefix tuning) ---------------------------------------------------------------


def load_peft(path: Path) -> PromptCheckpoint:
    """A PEFT adapter folder (or its weights file): the method whose `peft_type` its config names, ctx from
    `prompt_embeddings`, the model when the config names an open_clip model; nothing else is recorded."""
    config, ctx = peft_prefix.read_peft(path)
    kinds = [spec for spec in METHODS.values() if spec.peft_type is not None]
    spec = next((spec for spec in kinds if spec.peft_type == config.get("peft_type")), None)
    if spec is None:
        known = ", ".join(sorted({str(kind.peft_type) for kind in kinds}))
        raise NemesisError(f"{path}: a PEFT adapter of type {config.get('peft_type')!r}; this toolkit reads {known}")
    ctx = _checked(ctx, str(path))
    base = config.get("base_model_name_or_path")
    model = base if isinstance(base, str) and base in list_models() else None
    metadata = PromptMetadata(
        model=model, prompt_method=spec.name, penalty=None, text_width=ctx.shape[-1], source_format="peft"
    )
    metadata.prompt_config = dataclasses.asdict(spec.options_from_dassl(tuple(ctx.shape), None))
    _check_declared(spec, spec.config(**metadata.prompt_config), {CTX_TENSOR: ctx}, str(path))
    return PromptCheckpoint(ctx, metadata, path)


def export_peft(checkpoint: PromptCheckpoint, out_dir: str | os.PathLike, model: str | None = None) -> Path:
    """Write the prompt as a PEFT adapter folder (`adapter_model.safetensors`, `adapter_config.json`), for a
    method stored so (`MethodSpec.peft_type`: prefix tuning)."""
    spec = checkpoint.spec
    model = model or checkpoint.metadata.model
    if spec.peft_type is None:
        raise NemesisError(f"{checkpoint.path}: {spec.label} prompts have no PEFT adapter layout")
    if model is None:
        raise NemesisError(f"{checkpoint.path}: the prompt does not name its model; pass --model")
    checkpoint.check_model(model, embed_dim(model), text_width(model))
    return peft_prefix.export_peft(checkpoint.ctx, spec.peft_type, text_heads(model), Path(out_dir), model)


# --- any format ---------------------------------------------------------------------------------


def _load_from_run_folder(path: Path, epoch: int | None) -> PromptCheckpoint:
    """A `nemesis train` run folder: the final prompt, or the checkpoint of `epoch` (latest saved if unfinished)."""
    saved = {
        int(match.group(1)): file
        for file in (path / RUN_CHECKPOINTS).glob("epoch-*.safetensors")
        if (match := re.fullmatch(r"epoch-(\d{1,9})", file.stem))
    }
    final = path / RUN_PROMPT
    if epoch is None:
        if final.is_file():
            return load_prompt(final)
        if saved:
            return load_prompt(saved[max(saved)])
    elif epoch in saved:
        return load_prompt(saved[epoch])
    elif final.is_file() and load_prompt(final).metadata.epoch == epoch:
        return load_prompt(final)
    available = ", ".join(str(number) for number in sorted(saved)) or "none"
    wanted = f"epoch {epoch}" if epoch is not None else "a prompt"
    raise NemesisError(
        f"run folder {path} has no {wanted} yet (saved epochs: {available}); finish or resume the run, "
        "or save checkpoints with --save-every"
    )


def load_checkpoint(
    path: str | os.PathLike, epoch: int | None = None, prompt_method: str | None = None
) -> PromptCheckpoint:
    """Load a prompt from any accepted place: our file or run folder, a Dassl file, `prompt_learner/`
    folder or run folder (latest epoch unless `epoch` is named).

    `prompt_method` names the method of a Dassl file (whose layout alone may not tell it) and refuses
    our files of another method; None accepts any.
    """
    if prompt_method is not None:
        method_spec(prompt_method)  # an unknown name fails with the choices
    checkpoint = _load_any(Path(path), epoch, prompt_method)
    if prompt_method is not None and checkpoint.prompt_method != prompt_method:
        found = checkpoint.prompt_method
        raise NemesisError(
            f"{checkpoint.path} is a {found} checkpoint, not {prompt_method}; pass --prompt-method {found} or drop it"
        )
    return checkpoint


def _load_any(path: Path, epoch: int | None, dassl_method: str | None = None) -> PromptCheckpoint:
    if not path.exists():
        raise NemesisError(f"checkpoint not found: {path}")
    if peft_prefix.is_peft_adapter(path):
        return load_peft(path)
    if path.is_dir():
        if (path / RUN_CONFIG).is_file():
            return _load_from_run_folder(path, epoch)
        if (path / RUN_PROMPT).is_file():  # a run folder copied without its config: its prompt says the rest
            return load_prompt(path / RUN_PROMPT)
        return load_dassl(find_dassl_file(path, epoch), dassl_method)
    with open(path, "rb") as file:
        magic = file.read(9)
    # safetensors files start with an 8-byte header length then a JSON object
    if len(magic) == 9 and magic[8:9] == b"{":
        return load_prompt(path)
    return load_dassl(path, dassl_method)
