"""OpenAI's CLIP weights as its `clip` package caches them (`~/.cache/clip/RN50.pt`, ...), read without running them.

Those files are TorchScript archives: a zip holding `<name>/data.pkl` (the pickled module tree,
whose classes are named `__torch__.*`), the raw tensor storages under `<name>/data/<key>`, and
the module's TorchScript code. `torch.jit.load` would compile and keep that code; here `data.pkl`
goes through the restricted unpickler (`nemesis.unpickle.load_torch_file`): every `__torch__`
class becomes an inert record, tensors are rebuilt from the bounded storages, and the code is never
read. The tensors of the module tree, under OpenAI's key names (open_clip's CLIP uses the same),
form the state dict; the three metadata tensors OpenAI keeps beside the weights are dropped.
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from ..errors import NemesisError
from ..unpickle import PickledObject, load_torch_file

# Tensors of OpenAI's archives that describe the model instead of being weights (open_clip's
# `build_model_from_openai_state_dict` drops the same three).
METADATA_TENSORS = ("input_resolution", "context_length", "vocab_size")
# A module's causal mask, when a tracer kept it as a tensor attribute: not a weight.
MASK_ATTRIBUTE = "attn_mask"
TORCHSCRIPT_CLASS_PREFIX = "__torch__."


def _plain_list(values: Any) -> list:
    return list(values)


def _untagged(value: Any, _type_tag: Any) -> Any:
    return value


# TorchScript's helpers for typed lists and containers in module attributes: they only build plain values.
_TORCHSCRIPT_GLOBALS = {
    **{
        f"torch.jit._pickle.{name}": _plain_list
        for name in ("build_intlist", "build_floatlist", "build_doublelist", "build_boollist", "build_tensorlist")
    },
    "torch.jit._pickle.restore_type_tag": _untagged,
}


def _archive_prefix(archive: zipfile.ZipFile) -> str | None:
    """The archive's top folder when it is a TorchScript archive (it has code/ and constants.pkl), else None."""
    names = archive.namelist()
    pickles = [name[: -len("/data.pkl")] for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        return None
    prefix = pickles[0]
    has_code = f"{prefix}/constants.pkl" in names or any(name.startswith(f"{prefix}/code/") for name in names)
    return prefix if has_code else None


def is_openai_archive(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript archive (OpenAI's CLIP files), not a state dict."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return _archive_prefix(archive) is not None
    except (OSError, zipfile.BadZipFile):
        return False


def _tensors_of(record: Any, prefix: str, found: dict[str, torch.Tensor]) -> None:
    """Every tensor of a module record and its submodules, under dotted key names."""
    state = record.state if isinstance(record, PickledObject) else None
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            found[prefix + name] = value
        elif isinstance(value, PickledObject) and value.pickled_class.startswith(TORCHSCRIPT_CLASS_PREFIX):
            _tensors_of(value, f"{prefix}{name}.", found)


def read_openai_archive(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of an OpenAI CLIP TorchScript archive under OpenAI's key names (fp16 or fp32, as stored).

    Nothing of the archive runs: its pickle may only name TorchScript classes (kept as inert records),
    tensors and plain containers; anything else is refused with a NemesisError.
    """
    path = Path(path)
    if not is_openai_archive(path):
        raise NemesisError(f"{path} is not a TorchScript archive (no <name>/data.pkl beside code/)")
    root = load_torch_file(path, inert_prefixes=(TORCHSCRIPT_CLASS_PREFIX,), extra_globals=_TORCHSCRIPT_GLOBALS)
    found: dict[str, torch.Tensor] = {}
    _tensors_of(root, "", found)
    if not found:
        raise NemesisError(f"{path} holds no tensors in its module tree; it is not a CLIP archive")
    return {
        key: tensor
        for key, tensor in found.items()
        if key not in METADATA_TENSORS and key.rsplit(".", 1)[-1] != MASK_ATTRIBUTE
    }


# --- fitting the weights to an open_clip model ------------------------------------------------


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _differences(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> list[str]:
    """Where the archive's weights do not fit an architecture's keys and shapes (empty when they fit)."""
    differences = [f"{key} missing" for key in expected if key not in state]
    differences += [f"unexpected {key}" for key in state if key not in expected]
    differences += [
        f"{key} {list(state[key].shape)} vs {list(shape)}"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    return differences


@functools.cache
def _meta_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key shapes of open_clip model `name`, built on the meta device (no memory, no initialisation cost)."""
    logging.disable(logging.WARNING)  # open_clip's notice that no weights were loaded: deliberate here
    try:
        with torch.device("meta"):
            return _shapes(open_clip.create_model(name, pretrained=None, device="meta"))
    finally:
        logging.disable(logging.NOTSET)


def _archive_model_name(state: dict[str, torch.Tensor]) -> str | None:
    """Which of OpenAI's released CLIP models the weights are, when one fits exactly."""
    for name in open_clip.list_openai_models():
        if not name.endswith("-quickgelu") and not _differences(_meta_shapes(name), state):
            return name
    return None


def read_openai_weights(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """The archive's weights, checked to fit open_clip architecture `name` (else one error naming both)."""
    state = read_openai_archive(path)
    differences = _differences(_meta_shapes(name), state)
    if differences:
        held = _archive_model_name(state)
        what = f"OpenAI's {held}" if held else f"a CLIP of another architecture ({differences[0]})"
        hint = f"pass --model {held}" if held else "pass the --model the weights were released for"
        raise NemesisError(f"{path} holds {what}, which does not fit --model {name}; {hint}")
    return state
