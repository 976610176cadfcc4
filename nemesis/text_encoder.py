"""Running an open_clip text tower from token embeddings, cut after the last end-of-text token.

This is the single entry point for text encoding (DESIGN section 10 plans a shared-prefix encoder
that replaces it exactly), so the prompt learner and the sweep engine both call `TextEncoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NemesisError

POOL_TYPES = ("argmax", "eos", "first", "last")


class TextEncoder:
    """Drives a CLIP text tower's own modules (token embedding, transformer, final norm, projection).

    Not an `nn.Module` on purpose: the frozen CLIP weights must not become parameters of the
    prompt learner that holds this encoder.
    """

    def __init__(self, model: nn.Module, model_name: str, tokenizer: object) -> None:
        tower = getattr(model, "text", model)  # CustomTextCLIP keeps its tower in `.text`
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(tower, part) for part in needed) or not hasattr(tokenizer, "sot_token_id"):
            raise NemesisError(
                f"model '{model_name}' has no CLIP-style text tower (token embedding + start/end tokens); "
                "soft prompts need one, e.g. ViT-B-32, RN50 or tiny"
            )
        if not getattr(tower.transformer, "batch_first", False):
            raise NemesisError(
                f"model '{model_name}': this open_clip runs text sequence-first; install open_clip>=2.26.1"
            )
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            raise NemesisError(
                f"model '{model_name}' uses a class token or padding mask in its text tower; not supported"
            )
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        if self.pool_type not in POOL_TYPES:
            raise NemesisError(
                f"model '{model_name}' pools text with '{self.pool_type}'; supported: {', '.join(POOL_TYPES)}"
            )
        self.tower = tower
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        self.sot_token_id = tokenizer.sot_token_id
        self.eot_token_id = tokenizer.eot_token_id
        self.attn_mask = tower.attn_mask
        # Causal attention + pooling at the end-of-text token: nothing after that token can change
        # the result, so the sequence is cut there (I2).
        self.can_cut = self.attn_mask is not None and self.pool_type in ("argmax", "eos")

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.tower.token_embedding

    @property
    def width(self) -> int:
        return self.tower.token_embedding.weight.shape[1]

    def pool_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Position whose hidden state becomes the text feature, per sequence [B]."""
        batch, length = token_ids.shape
        if self.pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(batch, dtype=torch.long, device=token_ids.device)
        return torch.full((batch,), length - 1, dtype=torch.long, device=token_ids.device)

    def __call__(self, embeddings: torch.Tensor, pool_index: torch.Tensor, cut: bool = True) -> torch.Tensor:
        """Projected, unnormalised text features [B, D] from token embeddings [B, L, W]."""
        tower = self.tower
        cast_dtype = tower.transformer.get_cast_dtype()
        length = embeddings.shape[1]
        if cut and self.can_cut:
            length = int(pool_index.max()) + 1
        x = embeddings[:, :length].to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = tower.transformer(x, attn_mask=mask)
        x = tower.ln_final(x)  # [B, length, W]
        pooled = x[torch.arange(x.shape[0], device=x.device), pool_index]  # [B, W]
        projection = tower.text_projection
        if projection is None:
            return pooled
        if isinstance(projection, nn.Linear):
            return projection(pooled)
        return pooled @ projection


def normalize(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=-1)
