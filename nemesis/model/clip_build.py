"""Building a frozen open_clip model from resolved weights and a chosen activation: the weights
identity used in cache keys, and the model itself in eval mode with every parameter frozen.

`backbone.load_clip` resolves what the user named (a tag, a file, `tiny`'s `fmnist`) and builds
here; `tiny` builds its randomly initialised model for pretraining here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import open_clip
import torch

from ..choices import Activation
from ..constants import RANDOM_WEIGHTS
from ..errors import NemesisError
from .clip_models import QUICKGELU_SUFFIX, Backbone


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


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """open_clip logs a warning for deliberate random weights; our errors say what matters."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _error_reason(error: Exception) -> str:
    text = " ".join(str(error).split())  # one line, however many the message held
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def build_backbone(
    name: str,
    resolved: str | None,
    activation: Activation,
    device: str | torch.device = "cpu",
    pretrained: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Backbone:
    """Build `name` with `resolved` weights (an open_clip tag, a local file, or None for random) and
    `activation`; `pretrained` is what the user named (a tag `resolved` came from), kept in the record.

    `state_dict` (the weights of an OpenAI TorchScript archive at `resolved`, already read and
    checked) is loaded into a model open_clip builds without weights. Random weights are drawn from
    a fixed seed so two processes build the same model (cache keys depend on it).
    """
    pretrained = resolved if pretrained is None else pretrained
    weights_id = _weights_identity(name, resolved) + (QUICKGELU_SUFFIX if activation is Activation.quickgelu else "")
    try:
        with torch.random.fork_rng(devices=[]), _quiet_logging(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # open_clip's QuickGELU notice: handled here
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name,
                pretrained=None if state_dict is not None else resolved,
                force_quick_gelu=activation is Activation.quickgelu,
            )
        if state_dict is not None:
            with torch.no_grad():
                model.load_state_dict(state_dict, strict=True)  # copies, casting fp16 to the model's dtype
    except NemesisError:
        raise
    except Exception as error:
        reason = _error_reason(error)
        if resolved is not None and not Path(resolved).is_file():
            quick = " with --activation quickgelu" if activation is Activation.quickgelu else ""
            raise NemesisError(
                f"weights '{pretrained}' for {name} could not be loaded ({reason}); without internet, download "
                f"them elsewhere and pass the file with --pretrained PATH{quick} (OpenAI's ~/.cache/clip/*.pt "
                "archives need no --activation)"
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
        activation=activation,
    )
