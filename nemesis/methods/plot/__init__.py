"""PLOT (Chen et al., ICLR 2023): N learned prompts per class matched to an image's local features by
optimal transport; the official Nemesis release trains it with PUN/PAN as `PLOTNemesis`.

The learner is `nemesis.methods.plot.learner.PLOTLearner`; this module holds its options and spec
(light: no torch, as every method's spec).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...choices import ClassPosition
from ...constants import CTX_TENSOR
from ...errors import NemesisError, choice
from ..base import MethodSpec, TrainingDefaults
from ..coop import check_prompt_length

# Sinkhorn's stopping rules (`transport`): the official one per batch of images, or each pair converged.
OFFICIAL, CONVERGED = "official", "converged"
STOPPING_RULES = (OFFICIAL, CONVERGED)
ALL_TOKENS, SPATIAL_TOKENS = "all", "spatial"  # the official Nemesis code's 50 tokens; the PLOT authors' 49
IMAGE_TOKENS = (ALL_TOKENS, SPATIAL_TOKENS)
OFFICIAL_TEST_BATCH = 100  # Dassl's test batch: one official Sinkhorn run per 100 test images


@dataclass
class PLOTConfig:
    """PLOT's options; the defaults are the official configs' (4 prompts of 16 vectors, class at the end)."""

    n_prompts: int = 4  # N prompts per class
    n_ctx: int = 16  # context vectors M of each prompt
    class_position: str = "end"  # PLOT's only layout
    image_tokens: str = ALL_TOKENS  # all: the global token and the spatial ones (Nemesis's); spatial: PLOT's
    stopping: str = OFFICIAL  # Sinkhorn's stopping rule: official (per batch) or converged (per pair)
    sinkhorn_batch: int = OFFICIAL_TEST_BATCH  # images per Sinkhorn run in evaluation (official: 100)
    # Add CLIP's global logit, cos(global token, mean of the N prompts' features), to the transport's: what
    # the PLOT authors do on ImageNet (with spatial tokens); the official Nemesis code never does.
    global_logit: bool = False

    def __post_init__(self) -> None:
        if self.n_prompts < 1 or self.n_ctx < 1 or self.sinkhorn_batch < 1:
            raise NemesisError("PLOT needs at least one prompt, one context vector and one image per Sinkhorn run")
        self.class_position = choice(ClassPosition, self.class_position, "class position").value
        if self.class_position != ClassPosition.end.value:
            raise NemesisError("PLOT puts the class name at the end of its prompts; use class position end")
        if self.image_tokens not in IMAGE_TOKENS:
            raise NemesisError(f"unknown PLOT image tokens '{self.image_tokens}'; choose {', '.join(IMAGE_TOKENS)}")
        if self.stopping not in STOPPING_RULES:
            raise NemesisError(f"unknown Sinkhorn stopping rule '{self.stopping}'; choose {', '.join(STOPPING_RULES)}")

    def tensor_shapes(
        self, embed_dim: int | None, text_width: int | None, n_classes: int | None, vision_width: int | None = None
    ) -> dict[str, tuple[int | None, ...]]:
        """ctx [N, M, W]: N prompts of M context vectors, shared by every class."""
        return {CTX_TENSOR: (self.n_prompts, self.n_ctx, text_width)}

    @classmethod
    def dassl_fits(cls, shapes: dict[str, tuple[int, ...]]) -> bool:
        """ctx [N, M, W] with N x n_cls `token_prefix` rows (CoOp's class-specific ctx has n_cls rows)."""
        ctx, prefix = shapes["ctx"], shapes.get("token_prefix")
        return len(ctx) == 3 and prefix is not None and prefix[0] % ctx[0] == 0 and prefix[0] > ctx[0]

    @staticmethod
    def dassl_buffer_shapes(ctx_shape: tuple[int, ...], n_classes: int | None) -> dict[str, tuple[int, ...]]:
        """`token_prefix` [N x n_cls, 1, W], the buffer that tells a PLOT file from class-specific CoOp (the
        60-token `token_suffix` is left out: nothing reads it); none when the classes are not known."""
        if n_classes is None:
            return {}
        return {"token_prefix": (ctx_shape[0] * n_classes, 1, ctx_shape[-1])}

    @classmethod
    def from_dassl(cls, ctx_shape: tuple[int, ...], class_position: str | None) -> PLOTConfig:
        """A PLOT Dassl file: ctx [N, M, W]."""
        return cls(n_prompts=ctx_shape[0], n_ctx=ctx_shape[-2])

    def check_classnames(self, classnames: list[str], token_count: Callable[[str], int], context_length: int) -> None:
        check_prompt_length(self.n_ctx, classnames, token_count, context_length)

    def folder_name(self) -> str:
        """The official tree's `N4_..._nctx16_..._ctpend` settings, shortened to what PLOT itself sets."""
        return f"N{self.n_prompts}_nctx{self.n_ctx}_ctp{self.class_position}"


SPEC = MethodSpec(
    name="plot",
    label="PLOT",
    learner="nemesis.methods.plot.learner:PLOTLearner",
    config=PLOTConfig,
    training=TrainingDefaults(batch_size=32, epochs=None),
    dassl_trainers=("PLOT",),  # the official release's PLOTNemesis too (its Nemesis mark is read apart)
)
