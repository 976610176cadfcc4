"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context shifted by a meta-net of each image's feature.

The learner is `nemesis.methods.cocoop.learner.CoCoOp`; this module holds its options and spec. The defaults are
those of its base-to-new config (vit_b16_c4_ep10_batch1_ctxv1): 4 vectors from "a photo of a",
batch 1, 10 epochs (SGD lr 0.002, cosine, 1 warm-up epoch at 1e-5, as CoOp).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...constants import CTX_TENSOR
from ..base import MethodSpec, TrainingDefaults
from ..coop import check_prompt_length, checked_text_options, init_suffix, with_init_phrase

DEFAULT_INIT = "a photo of a"
META_NET = "meta_net"  # the state-dict prefix of CoCoOp's Dassl checkpoints: meta_net.linear1.weight, ...
META_NET_REDUCTION = 16  # hidden width D // 16, CoCoOp's choice


@dataclass
class CoCoOpConfig:
    """CoCoOp's options: one unified context (no class-specific variant)."""

    n_ctx: int = 4
    ctx_init: str | None = DEFAULT_INIT
    class_position: str = "end"

    def __post_init__(self) -> None:
        checked_text_options(self)

    @classmethod
    def from_options(cls, **given: Any) -> CoCoOpConfig:
        """Given options over the defaults: a given n_ctx alone starts from N(0, 0.02^2), not the phrase."""
        if "n_ctx" in given and "ctx_init" not in given:
            given["ctx_init"] = None
        return with_init_phrase(cls, given)

    def check_classnames(self, classnames: list[str], token_count: Callable[[str], int], context_length: int) -> None:
        check_prompt_length(self.n_ctx, classnames, token_count, context_length)

    def folder_name(self) -> str:
        """`nctx4_ctpend_init-a_photo_of_a` (CoCoOp has no class-specific context)."""
        return f"nctx{self.n_ctx}_ctp{self.class_position}" + init_suffix(self.ctx_init)

    def tensor_shapes(
        self, embed_dim: int | None, text_width: int | None, n_classes: int | None, vision_width: int | None = None
    ) -> dict[str, tuple[int | None, ...]]:
        """ctx [M, W] and the meta-net Linear(D, D // 16) - ReLU - Linear(D // 16, W)."""
        hidden = None if embed_dim is None else embed_dim // META_NET_REDUCTION
        return {
            CTX_TENSOR: (self.n_ctx, text_width),
            f"{META_NET}.linear1.weight": (hidden, embed_dim),
            f"{META_NET}.linear1.bias": (hidden,),
            f"{META_NET}.linear2.weight": (text_width, hidden),
            f"{META_NET}.linear2.bias": (text_width,),
        }

    @classmethod
    def from_dassl(cls, ctx_shape: tuple[int, ...], class_position: str | None) -> CoCoOpConfig:
        return cls(n_ctx=ctx_shape[-2], ctx_init=None, class_position=class_position or "end")


SPEC = MethodSpec(
    name="cocoop",
    label="CoCoOp",
    learner="nemesis.methods.cocoop.learner:CoCoOp",
    config=CoCoOpConfig,
    training=TrainingDefaults(batch_size=1, epochs=10),
    dassl_trainers=("CoCoOp",),
)
