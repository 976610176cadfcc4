"""open_clip models as their configs describe them, without building one: the `Backbone` record a
built model travels in, config lookups (widths, text tower), devices.

The bottom of the model modules: learners and configs need only this; `clip_build` builds a model
from resolved weights and `backbone.load_clip` resolves tags and files (training `tiny`'s own
weights on first use) before building.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from ..choices import Activation
from ..errors import NemesisError

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIGS)  # registers `tiny` beside open_clip's own configs


QUICKGELU_SUFFIX = "+quickgelu"  # appended to the weights identity of QuickGELU builds (cache keys)


@dataclass
class Backbone:
    """A frozen CLIP model with what is needed to feed it and to name its weights in cache keys."""

    name: str
    pretrained: str | None
    model: nn.Module
    preprocess: Any  # the model's own test transform: PIL image -> tensor [3, H, W]
    tokenizer: Any
    weights_id: str
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    activation: Activation = Activation.gelu

    @property
    def text_width(self) -> int:
        return text_width(self.name)


def resolve_device(device: str | None) -> str:
    """`device` checked for this machine (cpu, cuda, cuda:N); None: cuda when available, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise NemesisError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise NemesisError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise NemesisError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif parsed.type != "cpu":
        raise NemesisError(f"device '{device}' is not supported; use cpu, cuda or cuda:N")
    return str(parsed)


def list_models() -> list[str]:
    return open_clip.list_models()


def model_config(name: str) -> dict:
    """open_clip's config of `name`, or a NemesisError listing the closest known names."""
    config = open_clip.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `open_clip.list_models()` lists them"
        raise NemesisError(f"unknown model '{name}'{hint}")
    return config


def text_width(name: str) -> int:
    """Width of the token embeddings of `name`'s text tower, read from its config without building it."""
    return int(model_config(name)["text_cfg"].get("width", 512))


def text_heads(name: str) -> int:
    """Attention heads of `name`'s text tower, from its config (open_clip's default 8)."""
    return int(model_config(name)["text_cfg"].get("heads", 8))


def vision_width(name: str) -> int:
    """Width of the tokens inside `name`'s image tower (a ViT's; a ResNet's config has it too), from its config."""
    return int(model_config(name)["vision_cfg"].get("width", 768))


def embed_dim(name: str) -> int:
    """Width D of `name`'s image (and projected text) features, read from its config."""
    return int(model_config(name)["embed_dim"])
