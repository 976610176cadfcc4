"""Deep prompts: learned tokens that replace hidden states at the input of a tower's layers.

The rule both towers share (MaPLe, IVLP, PromptSRC, KMnP's deep VPT): a tower of depth d gets
prompts[0] at its input (layer 0) and, at the input of each layer i = 1..d-1, the n hidden states
at the prompt's slots are thrown away and replaced by prompts[i]; layers from d on carry on with
what the layer before them produced there. The slots are positions 1..n in the text tower (right
after the start token) and, in the image tower, the last n tokens (appended prompts) or positions
1..n (KMnP's prompts between the class token and the patches).

A prompt is [n, W] (the same for every sequence) or [B, n, W] (one per sequence: per ctx variant,
or per image when a sweep batches variants).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LayerPrompts = Sequence[torch.Tensor]  # prompts[i] [n, W] or [B, n, W]: the tokens entering layer i


def prompt_length(prompts: LayerPrompts) -> int:
    """n, the tokens each layer's prompt has (0 without prompts)."""
    return prompts[0].shape[-2] if len(prompts) else 0


def check_layer_prompts(prompts: LayerPrompts, width: int, layers: int, tower: str) -> None:
    """Refuse prompts that do not fit a tower of `layers` blocks of width `width` (ValueError naming them)."""
    if len(prompts) > layers:
        raise ValueError(f"{len(prompts)} layers of {tower} prompts, but the {tower} tower has {layers} layers")
    n = prompt_length(prompts)
    for layer, prompt in enumerate(prompts):
        if prompt.dim() not in (2, 3) or prompt.shape[-2:] != (n, width):
            raise ValueError(
                f"{tower} prompt of layer {layer} has shape {tuple(prompt.shape)}; expected [{n}, {width}] "
                f"or [B, {n}, {width}] (every layer the same length n, the tower's width {width})"
            )


def replace_tokens(x: torch.Tensor, prompt: torch.Tensor, start: int) -> torch.Tensor:
    """x [B, L, W] with positions start..start+n-1 replaced by prompt [n, W] or [B, n, W].

    Built by concatenation, not in place, so gradients reach both the prompt and what came before.
    """
    batch, _, width = x.shape
    n = prompt.shape[-2]
    prompt = prompt.to(x.dtype).expand(batch, n, width)  # [B, n, W]
    return torch.cat([x[:, :start], prompt, x[:, start + n :]], dim=1)


def select_rows(prompts: LayerPrompts, rows: torch.Tensor) -> list[torch.Tensor]:
    """The prompts of sequences `rows` [B'] when prompts are per sequence; shared prompts unchanged."""
    return [prompt[rows] if prompt.dim() == 3 else prompt for prompt in prompts]
