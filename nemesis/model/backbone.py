"""Loading frozen open_clip backbones: model, test preprocessing, tokenizer and a weights identity.

`load_clip` resolves the weights a user names (an open_clip tag, checked before any download; a
local file; `tiny`'s own `fmnist`, trained on first use) and builds the model with `clip_build`.
Which activation the weights need is decided here too (`resolve_activation`). The record and config
lookups live in `clip_models`, the building in `clip_build`; both are re-exported here, where the
rest of the toolkit imports them.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import open_clip
import torch

from ..choices import Activation
from ..constants import NO_WEIGHTS
from ..errors import NemesisError, NemesisNote, choice
from .clip_build import (  # noqa: F401
    build_backbone,
    file_sha256,
)
from .clip_models import (  # noqa: F401
    QUICKGELU_SUFFIX,
    Backbone,
    embed_dim,
    model_config,
    resolve_device,
    text_width,
)
from .openai_archive import is_openai_archive, read_openai_weights
from .text_encoder import POOL_TYPES
from .tiny import pretrained_tiny_weights


def text_tower_problem(name: str) -> str | None:
    """Why `name`'s text tower cannot take soft prompts, read from its config; None when it can.

    The same conditions `TextEncoder` checks on a built model: CLIP's token embedding with start and
    end-of-text tokens, no class token, and a pooling it knows.
    """
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


def _resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    """Check a tag or file before any download so mistakes fail at once with the alternatives."""
    check_pretrained(name, pretrained)
    if pretrained is not None and not Path(pretrained).is_file() and not (name == "tiny" and pretrained == "fmnist"):
        _check_downloadable(name, pretrained)
    if name == "tiny" and pretrained == "fmnist":
        return str(pretrained_tiny_weights())  # trains once, then cached
    return pretrained


def named_weights(pretrained: str | None) -> str | None:
    """`pretrained` as load_clip takes it: `none` (random weights, named explicitly) becomes None."""
    return None if pretrained == NO_WEIGHTS else pretrained


def known_tags(name: str) -> list[str]:
    """The pretrained tags `name` has: open_clip's, and the toolkit's own `fmnist` for `tiny`."""
    return ["fmnist"] if name == "tiny" else open_clip.list_pretrained_tags_by_model(name)


def example_tag(name: str) -> str:
    """A tag to suggest for `name`: `openai` where it exists, else its first known tag."""
    tags = known_tags(name)
    return "openai" if "openai" in tags else tags[0] if tags else "TAG"


def check_pretrained(name: str, pretrained: str | None) -> None:
    """Refuse a weights file that does not exist or a tag `name` lacks, without downloading or training."""
    if pretrained is None or Path(pretrained).is_file() or (name == "tiny" and pretrained == "fmnist"):
        return
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise NemesisError(f"weights file not found: {pretrained}")
    tags = known_tags(name)
    if pretrained not in tags:
        known = f"known tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
        raise NemesisError(
            f"unknown pretrained tag '{pretrained}' for {name} ({known}); pass a local weights file, "
            "or --pretrained none for random weights"
        )


HUB_HOST = "huggingface.co"


def _offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "NEMESIS_OFFLINE")
    )


def _weights_cached(config: dict) -> bool:
    """Whether open_clip would find these weights without downloading (Hugging Face cache or ~/.cache/clip)."""
    if config.get("file"):
        return Path(config["file"]).is_file()
    if hub := config.get("hf_hub", ""):
        from huggingface_hub import try_to_load_from_cache

        model_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename, str(Path(filename).with_suffix(".safetensors")), "open_clip_model.safetensors"]
        return any(isinstance(try_to_load_from_cache(model_id, candidate), str) for candidate in names)
    if url := config.get("url", ""):
        return (Path.home() / ".cache" / "clip" / os.path.basename(url)).is_file()
    return False


def _check_downloadable(name: str, tag: str) -> None:
    """Fail at once, in one line, when weights must be downloaded but cannot be: open_clip would
    otherwise retry for most of a minute and log before failing."""
    if _weights_cached(open_clip.get_pretrained_cfg(name, tag)):
        return
    if _offline():
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=1.0).close()
            return
        except OSError:
            reason = f"{HUB_HOST} cannot be reached"
    raise NemesisError(
        f"weights '{tag}' for {name} are not downloaded yet and {reason}; download them where there is internet "
        "and pass the file with --pretrained PATH, or --pretrained none for random weights; to try the toolkit "
        "offline: --model tiny --pretrained fmnist"
    )


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


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    activation: Activation | str | None = None,
) -> Backbone:
    """Build open_clip model `name` with `pretrained` weights (a tag, a local file, or None or `none` for random).

    `pretrained` may be an open_clip tag, an open_clip state dict or safetensors file, or one of
    OpenAI's TorchScript archives (read without running it). The activation follows the weights
    (`resolve_activation`); a guess is announced as a `NemesisNote` warning. The model comes back
    in eval mode with every parameter frozen. Random weights are drawn from a fixed seed so two
    processes build the same model (cache keys depend on it).
    """
    model_config(name)
    pretrained = named_weights(pretrained)
    resolved = _resolve_pretrained(name, pretrained)
    chosen, note = resolve_activation(name, pretrained, activation)  # the tag, not the file it resolved to
    if note is not None:
        warnings.warn(note, NemesisNote, stacklevel=2)
    archive = resolved is not None and Path(resolved).is_file() and is_openai_archive(resolved)
    # An OpenAI archive is read and checked against the architecture before any model is built.
    archive_weights = read_openai_weights(resolved, name) if archive else None
    return build_backbone(name, resolved, chosen, device, pretrained=pretrained, state_dict=archive_weights)
