"""Loading frozen open_clip backbones: model, test preprocessing, tokenizer and a weights identity."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from .choices import Activation, choice
from .constants import NO_WEIGHTS, RANDOM_WEIGHTS
from .errors import NemesisError, NemesisNote
from .openai_archive import is_openai_archive, read_openai_weights

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
    if pretrained is not None and not Path(pretrained).is_file() and not (name == "tiny" and pretrained == "fmnist"):
        _check_downloadable(name, pretrained)
    if name == "tiny" and pretrained == "fmnist":
        from .tiny import pretrained_tiny_weights  # trains once, then cached

        return str(pretrained_tiny_weights())
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
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        known = ", ".join(tags) if tags else "none"
        raise NemesisError(
            f"unknown pretrained tag '{pretrained}' for {name} (known tags: {known}); or pass a local weights file"
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
    weights_id = _weights_identity(name, resolved) + (QUICKGELU_SUFFIX if chosen is Activation.quickgelu else "")
    try:
        with torch.random.fork_rng(devices=[]), _quiet_logging(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # open_clip's QuickGELU notice: handled here
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if archive else resolved, force_quick_gelu=chosen is Activation.quickgelu
            )
        if archive_weights is not None:
            with torch.no_grad():
                model.load_state_dict(archive_weights, strict=True)  # copies, casting fp16 to the model's dtype
    except NemesisError:
        raise
    except Exception as error:
        reason = _error_reason(error)
        if resolved is not None and not Path(resolved).is_file():
            quick = " with --activation quickgelu" if chosen is Activation.quickgelu else ""
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
        activation=chosen,
    )
