"""Building a frozen open_clip model from resolved weights: the activation the weights need, the
weights identity used in cache keys, and the model itself in eval mode with every parameter frozen.

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

from .choices import Activation
from .clip_models import QUICKGELU_SUFFIX, Backbone, model_config
from .constants import RANDOM_WEIGHTS
from .errors import NemesisError, choice
from .openai_archive import is_openai_archive, read_openai_weights


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


def uses_quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether open_clip's record of tag `pretrained` says its weights were trained with QuickGELU."""
    if pretrained is None or Path(pretrained).is_file():
        return False
    return bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


def resolve_activation(
    name: str, pretrained: str | None, activation: Activation | str | None = None
) -> tuple[Activation, str | None]:
    """The activation `name` is built with for `pretrained`, and a note when it had to be guessed.

    `-quickgelu` model names say QuickGELU; else an explicit `activation` wins; else the weights'
    provenance: open_clip's record for a tag (QuickGELU for `openai`), QuickGELU for an OpenAI
    TorchScript archive, the config's own for random weights. A plain weights file cannot say: GELU,
    with a note when the architecture is one OpenAI released (their weights need QuickGELU).
    """
    chosen = None if activation is None else choice(Activation, activation, "activation")
    if model_config(name).get("quick_gelu", False):
        if chosen is Activation.gelu:
            base = name.removesuffix("-quickgelu")
            raise NemesisError(f"--activation gelu contradicts the model name {name}; use --model {base} for GELU")
        return Activation.quickgelu, None
    if chosen is not None:
        return chosen, None
    if pretrained is None:
        return Activation.gelu, None
    if not Path(pretrained).is_file():
        return (Activation.quickgelu if uses_quick_gelu(name, pretrained) else Activation.gelu), None
    if is_openai_archive(pretrained):
        return Activation.quickgelu, None
    note = None
    if "openai" in open_clip.list_pretrained_tags_by_model(name):
        note = (
            f"{Path(pretrained).name} is a plain weights file: building {name} with GELU; "
            "OpenAI's CLIP weights (CoOp, Nemesis) need --activation quickgelu"
        )
    return Activation.gelu, note


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
) -> Backbone:
    """Build `name` with `resolved` weights (an open_clip tag, a local file, or None for random) and
    `activation`; `pretrained` is what the user named (a tag `resolved` came from), kept in the record.

    OpenAI's TorchScript archives are read without running them. Random weights are drawn from a
    fixed seed so two processes build the same model (cache keys depend on it).
    """
    pretrained = resolved if pretrained is None else pretrained
    archive = resolved is not None and Path(resolved).is_file() and is_openai_archive(resolved)
    # An OpenAI archive is read and checked against the architecture before any model is built.
    archive_weights = read_openai_weights(resolved, name) if archive else None
    weights_id = _weights_identity(name, resolved) + (QUICKGELU_SUFFIX if activation is Activation.quickgelu else "")
    try:
        with torch.random.fork_rng(devices=[]), _quiet_logging(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # open_clip's QuickGELU notice: handled here
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if archive else resolved, force_quick_gelu=activation is Activation.quickgelu
            )
        if archive_weights is not None:
            with torch.no_grad():
                model.load_state_dict(archive_weights, strict=True)  # copies, casting fp16 to the model's dtype
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
