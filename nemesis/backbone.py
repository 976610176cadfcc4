"""Loading frozen open_clip backbones: model, test preprocessing, tokenizer and a weights identity."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from .constants import RANDOM_WEIGHTS
from .errors import NemesisError

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIGS)  # registers `tiny` beside open_clip's own configs


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


def text_tower_problem(name: str) -> str | None:
    """Why `name`'s text tower cannot take soft prompts, read from its config; None when it can.

    The same conditions `TextEncoder` checks on a built model: CLIP's token embedding with start and
    end-of-text tokens, no class token, and a pooling it knows.
    """
    from .text_encoder import POOL_TYPES

    text = model_config(name)["text_cfg"]
    if text.get("hf_model_name"):
        return f"Hugging Face text tower ({text['hf_model_name']})"
    if text.get("hf_tokenizer_name"):
        return "tokenizer without CLIP's start token"
    if text.get("embed_cls"):
        return "class token in the text tower"
    if text.get("pool_type", "argmax") not in POOL_TYPES:
        return f"text pooling '{text['pool_type']}'"
    return None


def embed_dim(name: str) -> int:
    """Width D of `name`'s image (and projected text) features, read from its config."""
    return int(model_config(name)["embed_dim"])


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_identity(name: str, pretrained: str | None) -> str:
    if pretrained is None:
        return RANDOM_WEIGHTS
    if Path(pretrained).is_file():
        return f"sha256:{file_sha256(pretrained)}"
    return f"tag:{pretrained}"


def _resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """Check a tag or file before any download so mistakes fail at once with the alternatives."""
    check_pretrained(name, pretrained)
    if name == "tiny" and pretrained == "fmnist":
        from .tiny import pretrained_tiny_weights  # trains once, then cached

        return str(pretrained_tiny_weights())
    return pretrained


def check_pretrained(name: str, pretrained: str | None) -> None:
    """Refuse a weights file that does not exist or a tag `name` lacks, without downloading or training."""
    if pretrained is None or Path(pretrained).is_file() or (name == "tiny" and pretrained == "fmnist"):
        return
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise NemesisError(f"weights file not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        known = ", ".join(tags) if tags else "none"
        raise NemesisError(
            f"unknown pretrained tag '{pretrained}' for {name} (known tags: {known}); or pass a local weights file"
        )


def uses_quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether the weights were trained with QuickGELU (OpenAI's CLIP, used by CoOp and Nemesis).

    open_clip's configs default to GELU and only warn when an `openai` tag needs QuickGELU; building
    with the wrong activation changes every feature. A local OpenAI weights file cannot say which it
    needs: name the model `RN50-quickgelu`, `ViT-B-16-quickgelu`, ... for those.
    """
    if pretrained is None or Path(pretrained).is_file():
        return False
    return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """open_clip logs a warning for deliberate random weights; our errors say what matters."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def load_clip(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Build open_clip model `name` with `pretrained` weights (a tag, a local file, or None for random).

    The model comes back in eval mode with every parameter frozen. Random weights are drawn from a
    fixed seed so two processes build the same model (cache keys depend on it).
    """
    model_config(name)
    resolved = _resolve_pretrained(name, pretrained)
    quick_gelu = uses_quick_gelu(name, resolved)
    weights_id = _weights_identity(name, resolved) + ("+quickgelu" if quick_gelu else "")
    try:
        with torch.random.fork_rng(devices=[]), _quiet_logging(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # open_clip's QuickGELU notice: handled here
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=resolved, force_quick_gelu=quick_gelu
            )
    except NemesisError:
        raise
    except Exception as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if resolved is not None and not Path(resolved).is_file():
            raise NemesisError(
                f"weights '{pretrained}' for {name} could not be loaded ({reason}); without internet, download "
                "them elsewhere and pass the file with --pretrained PATH"
            ) from error
        raise NemesisError(f"could not build {name} with weights {pretrained} ({reason})") from error
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    visual = model.visual
    image_size = visual.image_size
    image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    return Backbone(
        name=name,
        pretrained=pretrained,
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        weights_id=weights_id,
        image_size=image_size,
        image_mean=tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        image_std=tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
    )
