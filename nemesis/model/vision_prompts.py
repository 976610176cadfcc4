"""Prompts inside open_clip's ViT image tower (VPT on CLIP, and the vision side of IVLP, MaPLe, PromptSRC).

Placement of the layer-0 prompts (both without positional embedding):

- `append` (MaPLe, IVLP, PromptSRC and their VPT): after the patch tokens, after the positional
  embedding and before `ln_pre`, so `ln_pre` normalises them with the other tokens;
- `prepend` (KMnP's VPT): between the class token and the patches. KMnP's ViT has no `ln_pre`: its
  prompts join the embeddings on their way into the first block. On CLIP the faithful place is
  therefore after `ln_pre` (the default for `prepend`); `through_ln_pre=True` puts them before it.

At layers i = 1..depth-1 the prompt slots (the last n tokens, or positions 1..n) are replaced by
that layer's prompt (`deep_prompts`). The prompt outputs are dropped before pooling, so the tower
pools exactly as open_clip's own (`_pool`: class token, average of the patches, attentional pooler)
and with no prompts these functions equal `encode_image`.

The steps are separate functions so a sweep can cache what a corruption does not change: the patch
embeddings (`patch_embeddings`) and the hidden states entering layer l (`run_blocks` from l on).
"""

from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from ..choices import VisionPromptPlacement
from ..errors import NemesisError
from .deep_prompts import LayerPrompts, check_layer_prompts, prompt_length, replace_tokens


def vision_prompts_problem(visual: nn.Module) -> str | None:
    """Why prompts cannot enter this image tower; None when they can."""
    if not isinstance(visual, VisionTransformer):
        return f"its image tower is a {type(visual).__name__}, not a VisionTransformer"
    if not getattr(visual.transformer, "batch_first", False):
        return "its ViT runs sequence-first; install open_clip>=2.26.1"
    return None


def check_vision_prompts(visual: nn.Module, model_name: str) -> None:
    """Refuse, in one line naming the model, an image tower prompts cannot enter."""
    problem = vision_prompts_problem(visual)
    if problem is not None:
        raise NemesisError(f"{model_name} cannot take vision prompts: {problem}")


def token_width(visual: VisionTransformer) -> int:
    return visual.class_embedding.shape[0]


def prompted_image_features(
    visual: VisionTransformer,
    images: torch.Tensor,
    prompts: LayerPrompts,
    placement: VisionPromptPlacement | str = VisionPromptPlacement.append,
    through_ln_pre: bool | None = None,
) -> torch.Tensor:
    """Projected image features [B, D] of images [B, 3, H, W] with prompts[i] entering layer i.

    `prompts` has `depth` entries, [n, W] or [B, n, W] each; none (depth 0) or n = 0: `encode_image`.
    """
    placement = VisionPromptPlacement(placement)
    check_layer_prompts(prompts, token_width(visual), len(visual.transformer.resblocks), "vision")
    tokens = patch_embeddings(visual, images)  # [B, 1 + P, W]
    x = insert_prompts(visual, tokens, prompts[0] if len(prompts) else None, placement, through_ln_pre)
    x = run_blocks(visual, x, prompts, placement)
    return pool_prompted(visual, x, prompt_length(prompts), placement)


def patch_embeddings(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Class token and patches with positions [B, 1 + P, W]: open_clip's `_embeds` up to, not including, `ln_pre`.

    The same steps as `_embeds` (which cannot be used: the prompts go in before its `ln_pre`).
    """
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, W, grid, grid]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, P, W]
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)  # [B, 1, W]
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # [B, 1 + P, W]
    return visual.patch_dropout(x)


def insert_prompts(
    visual: VisionTransformer,
    tokens: torch.Tensor,
    prompt: torch.Tensor | None,
    placement: VisionPromptPlacement | str = VisionPromptPlacement.append,
    through_ln_pre: bool | None = None,
) -> torch.Tensor:
    """The first block's input [B, 1 + P + n, W]: patch embeddings [B, 1 + P, W], the layer-0 prompt, `ln_pre`."""
    placement = VisionPromptPlacement(placement)
    if through_ln_pre is None:
        through_ln_pre = placement is VisionPromptPlacement.append
    if prompt is None or prompt.shape[-2] == 0:
        return visual.ln_pre(tokens)
    if through_ln_pre:
        return visual.ln_pre(_insert(tokens, prompt, placement))
    return _insert(visual.ln_pre(tokens), prompt, placement)


def _insert(tokens: torch.Tensor, prompt: torch.Tensor, placement: VisionPromptPlacement) -> torch.Tensor:
    """tokens [B, 1 + P, W] with prompt [n, W] or [B, n, W] after the patches or after the class token."""
    start = tokens.shape[1] if placement is VisionPromptPlacement.append else 1
    prompt = prompt.to(tokens.dtype).expand(tokens.shape[0], -1, -1)  # [B, n, W]
    return torch.cat([tokens[:, :start], prompt, tokens[:, start:]], dim=1)  # [B, 1 + P + n, W]


def run_blocks(
    visual: VisionTransformer,
    x: torch.Tensor,
    prompts: LayerPrompts,
    placement: VisionPromptPlacement | str = VisionPromptPlacement.append,
    first: int = 0,
    last: int | None = None,
) -> torch.Tensor:
    """Blocks first..last-1 on hidden states x [B, T, W] entering layer `first`; layer i >= 1 below depth
    gets prompts[i] in the prompt slots. Returns the hidden states after block last-1 (default: all blocks)."""
    placement = VisionPromptPlacement(placement)
    blocks = visual.transformer.resblocks
    last = len(blocks) if last is None else last
    n = prompt_length(prompts)
    for layer in range(first, last):
        if 1 <= layer < len(prompts) and n > 0:
            x = replace_tokens(x, prompts[layer], _slot_start(x.shape[1], n, placement))
        x = blocks[layer](x, attn_mask=None)  # the image tower has no attention mask
    return x


def pool_prompted(
    visual: VisionTransformer,
    x: torch.Tensor,
    n: int,
    placement: VisionPromptPlacement | str = VisionPromptPlacement.append,
) -> torch.Tensor:
    """Projected features [B, D] of the last block's output x [B, 1 + P + n, W]: prompt outputs dropped,
    then open_clip's own pooling and projection."""
    if n > 0:
        start = _slot_start(x.shape[1], n, VisionPromptPlacement(placement))
        x = torch.cat([x[:, :start], x[:, start + n :]], dim=1)  # [B, 1 + P, W]
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def _slot_start(length: int, n: int, placement: VisionPromptPlacement) -> int:
    """First position of the n prompt tokens in a sequence of `length` tokens."""
    return length - n if placement is VisionPromptPlacement.append else 1
