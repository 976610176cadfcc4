"""Prompt learners: the interface every method's learner has (`PromptMethod`), and building one by name.

Every learner is an `nn.Module` whose parameters are what training updates and which has the
members `PromptMethod` declares; `tests/test_method_conformance.py` runs every registered method
through the same checks. Methods are registered in `nemesis.methods` (one folder and one line each).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..constants import LOCAL_FEATURES, PATCH_TOKENS, POOLED_FEATURES
from ..errors import NemesisError
from ..model.clip_models import Backbone
from ..tensors import WHOLE_CTX as WHOLE_CTX  # re-exported with CorruptionSite: the interface's vocabulary
from ..tensors import CorruptionSite  # defined with the tensor helpers, below the learners that return it
from . import method_spec


@runtime_checkable
class PromptMethod(Protocol):
    """What generic code (training, evaluation, sweeps, checkpoints) uses of a learner.

    Learners are also `nn.Module`s (`.to`, `.parameters()`); `isinstance` checks only that the
    members below exist, not their signatures. Optional: `norm_penalty_factor` (a float, default 1)
    multiplies Nemesis's norm penalties on ctx; PLOT sets its prompt count N, as the official
    PLOTNemesis sums the norms over the N prompts where the losses average over ctx's leading axes.
    Optional: `optional_corruption_sites_for(ctx_shape)`, sites a sweep adds when asked (`--all-sites`).
    Optional, for sites on learned tensors besides ctx (prompts inside the towers): the classmethod
    `corruption_sites_of(shapes)` (every learned tensor's shape by name) replaces `corruption_sites_for`,
    and `scores_sites = True` makes sweeps call `scorer(variants, site)` with variants of `site.tensor`.
    Optional: `mean_prompt_norm(p)`, the mean norm PUN takes over every prompt the learner has.
    """

    method: ClassVar[str]  # the registry name (`nemesis.methods.METHODS`), written into prompt files
    # The image inputs `logits` and `similarities` take, from the feature cache: "pooled" features [B, D],
    # or "local" features [B, T, D], one per image token (PLOT); the first decides what the cache gives.
    # or "patches", a ViT's patch embeddings [B, 1 + P, W] before ln_pre (learners with vision prompts).
    image_inputs: ClassVar[tuple[str, ...]]

    @property
    def ctx(self) -> nn.Parameter:
        """The learned context `[..., M, W]` that Nemesis's norm losses and the corruption operators act
        on (losses and operators take any leading shape)."""
        ...

    @property
    def n_ctx(self) -> int: ...  # M, the number of context positions

    @property
    def n_classes(self) -> int: ...

    @property
    def classnames(self) -> list[str]: ...

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Training logits [B, n_cls] of image features [B, D], with gradients to the learned tensors."""
        ...

    def similarities(self, image_features: torch.Tensor, ctx_variants: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [K, B, n_cls] of the images under K variants of ctx (evaluation, sweeps,
        PAN's pre-inference); CoOp ignores which image it is, CoCoOp conditions each image's prompts on it."""
        ...

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        """Learned tensors besides ctx that a checkpoint carries, by checkpoint name."""
        ...

    def for_classnames(self, classnames: list[str]) -> PromptMethod:
        """The same learned tensors for other class names (base-to-new, domain shift)."""
        ...

    def norms(self, p: float = 2.0) -> torch.Tensor:
        """Per-position norms [M] of ctx."""
        ...

    def corruption_sites(self) -> list[CorruptionSite]:
        """Where sweeps may corrupt this learner's prompt (names unique; CoOp, CoCoOp: `[WHOLE_CTX]`)."""
        ...

    @classmethod
    def corruption_sites_for(cls, ctx_shape: tuple[int, ...]) -> list[CorruptionSite]:
        """`corruption_sites()` of a learner whose ctx has this shape: what sweeps plan with before any
        learner is built (from a checkpoint's ctx)."""
        ...


def planned_sites(learner_class: type, shapes: dict[str, tuple[int, ...]]) -> list[CorruptionSite]:
    """The sites a learner of `learner_class` with learned tensors of these shapes (by name, ctx's among
    them) declares, before any learner is built: `corruption_sites_of(shapes)`, else `corruption_sites_for`."""
    if hasattr(learner_class, "corruption_sites_of"):
        return list(learner_class.corruption_sites_of(shapes))
    return list(learner_class.corruption_sites_for(shapes[WHOLE_CTX.tensor]))


SUPPORTED_IMAGE_INPUTS = {
    POOLED_FEATURES,
    LOCAL_FEATURES,
    PATCH_TOKENS,
}  # what training, evaluation and sweeps can hand a learner


def prompt_method(name: str) -> type[PromptMethod]:
    """The learner class registered as `name` (nemesis.methods)."""
    return method_spec(name).learner_class()


def build_learner(
    method: str,
    clip: Backbone,
    classnames: list[str],
    *,
    extra: dict[str, torch.Tensor] | None = None,
    **options: Any,
) -> PromptMethod:
    """A learner of `method` for `classnames`; `options` are its constructor's (its config's fields, seed,
    ctx, ...). `extra` (a checkpoint's tensors besides ctx, checked against the model when it was read)
    is loaded into it."""
    learner_class = prompt_method(method)
    missing = set(learner_class.image_inputs) - SUPPORTED_IMAGE_INPUTS
    if missing:
        raise NemesisError(f"{method} needs image inputs {sorted(missing)}, which no feature cache provides yet")
    learner = learner_class(clip, classnames, **options)
    if extra is not None:
        parameters = learner.extra_parameters()
        if set(extra) != set(parameters):
            raise NemesisError(f"{method} learns {sorted(parameters)}, not {sorted(extra)}")
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(extra[name].to(parameter.device, parameter.dtype))
    return learner
