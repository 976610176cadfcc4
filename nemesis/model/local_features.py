"""Local image features: one projected feature per image token, in the joint space (PLOT's image side).

open_clip's image towers return one pooled feature per image. PLOT matches several text prompts per
class against many features of one image, so this module recomputes the tower's last step for every
token with the tower's own weights:

- ModifiedResNet (RN50, RN101, ...): the attention pool with every token as a query, not only the
  mean token: T = HW + 1 tokens (50 at 224 px), token 0 being the usual pooled feature.
- VisionTransformer with class-token pooling (ViT-B/32, ViT-B/16, `tiny`): the final tokens after
  `ln_post` and the projection, class token first: T = 1 + number of patches.

Plain functions over the tower's modules (nothing in open_clip is patched); callers choose
`torch.no_grad` and autocast, and the result has the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from ..errors import NemesisError


def local_features_problem(visual: nn.Module) -> str | None:
    """Why this image tower has no local features computed here; None when it has."""
    if isinstance(visual, ModifiedResNet):
        return None
    if not isinstance(visual, VisionTransformer):
        return f"its image tower is a {type(visual).__name__}, neither a ModifiedResNet nor a VisionTransformer"
    if visual.attn_pool is not None:
        return "its ViT pools with an attentional pooler"
    if visual.pool_type != "tok":
        return f"its ViT pools with '{visual.pool_type}', not its class token"
    if visual.proj is None:
        return "its ViT has no projection into the joint space"
    return None


def check_local_features(model: nn.Module, model_name: str) -> None:
    """Refuse, in one line naming the model, a model whose local image features cannot be computed."""
    problem = local_features_problem(model.visual)
    if problem is not None:
        raise NemesisError(f"{model_name} has no local image features: {problem}")


def local_image_features(model: nn.Module, images: torch.Tensor, model_name: str = "this model") -> torch.Tensor:
    """Projected local features [B, T, D] of images [B, 3, H, W]; token 0 equals `model.encode_image`."""
    check_local_features(model, model_name)
    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        return _resnet_local_features(visual, images)
    return _vit_local_features(visual, images)


# ---------------------------------------------------------------------------------------------
# ModifiedResNet: the attention pool for every token


def _resnet_local_features(visual: ModifiedResNet, images: torch.Tensor) -> torch.Tensor:
    # The same stages as ModifiedResNet.forward, up to its attention pool.
    grid = visual.stem(images.to(visual.conv1.weight.dtype))
    for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        grid = stage(grid)
    return _attention_pool_all_tokens(visual.attnpool, grid)


def _attention_pool_all_tokens(pool: nn.Module, grid: torch.Tensor) -> torch.Tensor:
    """open_clip's AttentionPool2d on a grid [B, C, H, W], keeping all HW + 1 outputs [B, HW + 1, D]."""
    spatial = grid.flatten(2).transpose(1, 2)  # [B, HW, C]
    tokens = torch.cat([spatial.mean(dim=1, keepdim=True), spatial], dim=1)  # [B, HW + 1, C]
    tokens = tokens + pool.positional_embedding.to(tokens.dtype)
    heads = pool.num_heads

    def split_heads(projected: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, heads, T, C / heads]
        return projected.unflatten(-1, (heads, -1)).transpose(1, 2)

    query, key, value = (split_heads(project(tokens)) for project in (pool.q_proj, pool.k_proj, pool.v_proj))
    attended = F.scaled_dot_product_attention(query, key, value)  # softmax(q k^T / sqrt(d_head)) v
    return pool.c_proj(attended.transpose(1, 2).flatten(2))  # [B, T, D]


# ---------------------------------------------------------------------------------------------
# VisionTransformer: the final tokens, projected


def _vit_local_features(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    # The same steps as VisionTransformer.forward with class-token pooling, on all tokens: ln_post acts on
    # each token alone, so token 0 is the pooled feature whether ln_post comes before or after the pooling.
    # `_embeds` is open_clip's own input step (patches, class token, positions, ln_pre), used, not copied.
    tokens = visual.transformer(visual._embeds(images.to(visual.conv1.weight.dtype)))  # [B, 1 + patches, width]
    return visual.ln_post(tokens) @ visual.proj  # [B, T, D]
