"""Prompt methods: learners of one shape (`PromptMethod`), registered by name (CoOp, CoCoOp; PLOT and deep
prompts later).

Every learner is an `nn.Module` whose parameters are what training updates and which has the
members `PromptMethod` declares; `tests/test_method_conformance.py` runs every registered method
through the same checks. Adding a method is one module holding its learner class and one line in
`PROMPT_METHODS`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .choices import ClassPosition
from .clip_models import Backbone
from .cocoop import CoCoOp, embed_dim_of
from .errors import NemesisError
from .prompt_learner import PromptLearner
from .tensors import WHOLE_CTX as WHOLE_CTX  # re-exported with CorruptionSite: the interface's vocabulary
from .tensors import CorruptionSite  # defined with the tensor helpers, below the learners that return it


@runtime_checkable
class PromptMethod(Protocol):
    """What generic code (training, evaluation, sweeps, checkpoints) uses of a learner.

    Learners are also `nn.Module`s (`.to`, `.parameters()`); `isinstance` checks only that the
    members below exist, not their signatures.
    """

    method: ClassVar[str]  # the registry name (`PROMPT_METHODS`), written into prompt files

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

    @property
    def class_specific(self) -> bool: ...  # one ctx per class ([n_cls, M, W])

    @property
    def class_position(self) -> ClassPosition: ...  # where the class name sits in the prompt

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

    @classmethod
    def extra_shapes(cls, embed_dim: int, text_width: int) -> dict[str, tuple[int, ...]]:
        """Shapes of `extra_parameters()` on a model of image width D and text width W."""
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


PROMPT_METHODS: dict[str, type[PromptMethod]] = {
    "coop": PromptLearner,
    "cocoop": CoCoOp,
}


def prompt_method(name: str) -> type[PromptMethod]:
    """The learner class registered as `name`."""
    if name not in PROMPT_METHODS:
        raise NemesisError(f"unknown prompt method '{name}'; choose one of {', '.join(PROMPT_METHODS)}")
    return PROMPT_METHODS[name]


def extra_tensor_names() -> set[str]:
    """Names of every registered method's tensors besides ctx (what a Dassl state dict may hold)."""
    return {name for learner in PROMPT_METHODS.values() for name in learner.extra_shapes(16, 1)}


def _method_with_extra(names: set[str]) -> str | None:
    for name, learner in PROMPT_METHODS.items():
        if set(learner.extra_shapes(16, 1)) == names:  # names do not depend on the widths
            return name
    return None


def detect_prompt_method(extra: dict[str, torch.Tensor], origin: str = "prompt") -> str:
    """The method whose extra tensors have exactly these names (no extra tensors: coop)."""
    found = _method_with_extra(set(extra))
    if found is None:
        raise NemesisError(
            f"{origin}: no prompt method learns the tensors {sorted(extra)}; known: {', '.join(PROMPT_METHODS)}"
        )
    return found


def check_extra(
    method: str, extra: dict[str, torch.Tensor], embed_dim: int, text_width: int, origin: str, model: str
) -> None:
    """Refuse extra tensors that are not `method`'s, or whose shapes do not fit `model` (widths D and W)."""
    expected = prompt_method(method).extra_shapes(embed_dim, text_width)
    if set(extra) != set(expected):
        found = detect_prompt_method(extra, origin)
        raise NemesisError(f"{origin} is a {found} prompt, not {method}; read it as {found}")
    for name, shape in expected.items():
        if tuple(extra[name].shape) != shape:
            raise NemesisError(
                f"{origin}: {name} has shape {tuple(extra[name].shape)}, but {method} on model '{model}' "
                f"(image width {embed_dim}, text width {text_width}) needs {shape}; name the model it was trained with"
            )
        if not torch.isfinite(extra[name]).all():
            raise NemesisError(f"{origin}: {name} contains NaN or Inf values")


def build_learner(
    method: str,
    clip: Backbone,
    classnames: list[str],
    *,
    extra: dict[str, torch.Tensor] | None = None,
    origin: str = "prompt",
    **options: Any,
) -> PromptMethod:
    """A learner of `method` for `classnames`; `options` are its constructor's (n_ctx, ctx_init, ctx, ...).

    `extra` (a checkpoint's tensors besides ctx) is checked against the model and loaded.
    """
    learner = prompt_method(method)(clip, classnames, **options)
    if extra is not None:
        check_extra(method, extra, embed_dim_of(clip), learner.ctx.shape[-1], origin, clip.name)
        with torch.no_grad():
            for name, parameter in learner.extra_parameters().items():
                parameter.copy_(extra[name].to(parameter.device, parameter.dtype))
    return learner
