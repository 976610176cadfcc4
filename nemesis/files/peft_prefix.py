"""Prefix-tuning prompts in PEFT's adapter layout: `adapter_model.safetensors` holding one tensor,
`prompt_embeddings` [P, layers x 2 x W], beside `adapter_config.json` (peft_type PREFIX_TUNING).

PEFT reads row p as [layers x 2, heads, head_dim] and gives layer l the key at 2l and the value at
2l + 1, each [heads, P, head_dim]: the numbers of our ctx [layers, 2, P, W] with its heads side by side
in W, so the two layouts are one permutation apart. A method says it is stored so by
`MethodSpec.peft_type`; this module names no method. Safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from ..atomic import atomic_path, write_text_atomic
from ..errors import NemesisError

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_TENSOR = "prompt_embeddings"


def is_peft_adapter(path: Path) -> bool:
    """A PEFT adapter folder, or its weights file beside its config."""
    folder = path if path.is_dir() else path.parent
    return (folder / PEFT_CONFIG).is_file() and (folder / PEFT_WEIGHTS).is_file()


def to_peft(ctx: torch.Tensor) -> torch.Tensor:
    """ctx [layers, 2, P, W] as PEFT's prompt_embeddings [P, layers x 2 x W]."""
    layers, _, count, width = ctx.shape
    return ctx.permute(2, 0, 1, 3).reshape(count, layers * 2 * width).contiguous()


def from_peft(embeddings: torch.Tensor, layers: int) -> torch.Tensor:
    """PEFT's prompt_embeddings [P, layers x 2 x W] as ctx [layers, 2, P, W]."""
    count = embeddings.shape[0]
    return embeddings.reshape(count, layers, 2, -1).permute(1, 2, 0, 3).contiguous()


def export_peft(ctx: torch.Tensor, peft_type: str, heads: int, out_dir: Path, base_model: str) -> Path:
    """Write the adapter folder `out_dir` (its weights, then its config, each atomically); returns the folder."""
    layers, _, count, width = ctx.shape
    config = {
        "peft_type": peft_type,
        "task_type": None,
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": count,
        "num_layers": layers,
        "token_dim": width,
        "num_attention_heads": heads,
        "num_transformer_submodules": 1,
        "prefix_projection": False,  # the saved embeddings are the final keys and values
        "inference_mode": True,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / PEFT_WEIGHTS) as temporary:
        save_file({PEFT_TENSOR: to_peft(ctx.detach().float().cpu())}, str(temporary))
    write_text_atomic(out_dir / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    return out_dir


def read_peft(path: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """(the adapter's config, its ctx [layers, 2, P, W]) of an adapter folder or weights file; bad input is
    one NemesisError line."""
    folder = path if path.is_dir() else path.parent
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise NemesisError(f"{folder / PEFT_CONFIG} is not a PEFT adapter config ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("num_layers"), int) or config["num_layers"] < 1:
        raise NemesisError(f"{folder / PEFT_CONFIG} does not say num_layers; not a prefix-tuning adapter")
    try:
        with safe_open(str(folder / PEFT_WEIGHTS), framework="pt") as file:
            if PEFT_TENSOR not in file.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise NemesisError(f"{folder / PEFT_WEIGHTS} holds no '{PEFT_TENSOR}'")
            embeddings = file.get_tensor(PEFT_TENSOR)
    except (SafetensorError, OSError) as error:
        raise NemesisError(f"{folder / PEFT_WEIGHTS} is not a safetensors adapter ({error})") from None
    layers = config["num_layers"]
    if embeddings.dim() != 2 or embeddings.shape[1] % (2 * layers):
        raise NemesisError(
            f"{folder / PEFT_WEIGHTS}: prompt_embeddings of shape {tuple(embeddings.shape)} is not "
            f"[P, num_layers x 2 x W] for num_layers {layers}"
        )
    return config, from_peft(embeddings.float(), layers)
