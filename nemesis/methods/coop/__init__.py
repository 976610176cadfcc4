"""CoOp (Zhou et al., IJCV 2022): learned context vectors around each class name.

The learner is `nemesis.methods.coop.learner.PromptLearner`; this module holds its options and spec.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...choices import ClassPosition
from ...constants import CTX_TENSOR
from ...errors import NemesisError, choice
from ..base import MethodSpec, TrainingDefaults


def init_word_count(ctx_init: str) -> int:
    """CoOp's n_ctx for an init phrase: its number of words (underscores count as spaces, as in CoOp)."""
    return len(ctx_init.replace("_", " ").split())


def checked_text_options(config: Any) -> None:
    """The checks CoOp-style options share: a blank init is none, n_ctx at least 1, a known position."""
    if config.ctx_init is not None and not config.ctx_init.strip():
        config.ctx_init = None
    if config.n_ctx < 1:
        raise NemesisError(f"n_ctx must be at least 1, got {config.n_ctx}")
    config.class_position = choice(ClassPosition, config.class_position, "class position").value


def check_prompt_length(
    n_ctx: int, classnames: list[str], token_count: Callable[[str], int], context_length: int
) -> None:
    """Refuse classes whose prompt (start, n_ctx context tokens, the name, '.', end) exceeds the model's
    context length, before any model is built."""
    longest = max(classnames, key=token_count)
    if n_ctx + token_count(longest) + 3 > context_length:
        raise NemesisError(
            f"the prompt for class '{longest}' with {n_ctx} context tokens exceeds the context length {context_length}"
        )


def init_suffix(ctx_init: str | None) -> str:
    """`_init-a_photo_of_a` for a settings folder when ctx starts from a phrase ("" when random)."""
    if not ctx_init:
        return ""
    words = re.sub(r"[^A-Za-z0-9-]+", "_", ctx_init.strip()).strip("_")
    return f"_init-{words}"


def with_init_phrase(cls: type, given: dict[str, Any]) -> Any:
    """Options over the defaults; an init phrase sets n_ctx to its word count, as in CoOp (ProGrad's
    padded init keeps n_ctx: the phrase fills the last vectors)."""
    if given.get("ctx_init") and given["ctx_init"].strip() and not given.get("pad_init"):
        given = given | {"n_ctx": init_word_count(given["ctx_init"])}
    return cls(**given)


@dataclass
class CoOpConfig:
    """CoOp's options; the defaults are CoOp's (16 vectors drawn from N(0, 0.02^2), class at the end)."""

    n_ctx: int = 16  # context vectors M (an init phrase sets M to its word count)
    ctx_init: str | None = None  # words to initialise ctx from, e.g. "a photo of a"
    class_specific: bool = False  # one ctx per class (CoOp's CSC): [n_cls, M, W]
    class_position: str = "end"  # where the class name goes: end, middle or front
    # ProGrad's init: keep n_ctx, the init phrase's words in the last vectors and zeros before them
    pad_init: bool = False

    def __post_init__(self) -> None:
        checked_text_options(self)
        if self.pad_init and self.ctx_init is not None and init_word_count(self.ctx_init) > self.n_ctx:
            raise NemesisError(
                f"ctx init '{self.ctx_init}' has {init_word_count(self.ctx_init)} words, more than the {self.n_ctx} "
                "context vectors a padded init keeps; raise --n-ctx"
            )

    @classmethod
    def from_options(cls, **given: Any) -> CoOpConfig:
        return with_init_phrase(cls, given)

    def tensor_shapes(
        self, embed_dim: int | None, text_width: int | None, n_classes: int | None, vision_width: int | None = None
    ) -> dict[str, tuple[int | None, ...]]:
        """ctx [M, W], or [n_cls, M, W] class-specific."""
        leading = (n_classes,) if self.class_specific else ()
        return {CTX_TENSOR: (*leading, self.n_ctx, text_width)}

    def check_classnames(self, classnames: list[str], token_count: Callable[[str], int], context_length: int) -> None:
        check_prompt_length(self.n_ctx, classnames, token_count, context_length)

    def folder_name(self) -> str:
        """CoOp's settings folder, `nctx16_cscFalse_ctpend` (an init phrase appended: Dassl puts it in the
        config's name, which a grid's tree does not have)."""
        padded = "_padded" if self.pad_init and self.ctx_init else ""
        return (
            f"nctx{self.n_ctx}_csc{self.class_specific}_ctp{self.class_position}" + init_suffix(self.ctx_init) + padded
        )

    @classmethod
    def dassl_fits(cls, shapes: dict[str, tuple[int, ...]]) -> bool:
        """ctx [M, W], or class-specific [n_cls, M, W] with one `token_prefix` row per class."""
        ctx, prefix = shapes["ctx"], shapes.get("token_prefix")
        return len(ctx) == 2 or prefix is None or prefix[0] == ctx[0]

    @classmethod
    def from_dassl(cls, ctx_shape: tuple[int, ...], class_position: str | None) -> CoOpConfig:
        """A CoOp Dassl file: ctx [M, W], or [n_cls, M, W] class-specific; the position from its path."""
        return cls(n_ctx=ctx_shape[-2], class_specific=len(ctx_shape) == 3, class_position=class_position or "end")


SPEC = MethodSpec(
    name="coop",
    label="CoOp",
    learner="nemesis.methods.coop.learner:PromptLearner",
    config=CoOpConfig,
    training=TrainingDefaults(batch_size=32, epochs=None),
    dassl_trainers=("CoOp",),
)
