"""What the methods with prompts inside the towers share (VPT, IVLP, MaPLe, PromptSRC): their options.

Their learned prompts are stacks [depth, n, W] per tower: row 0 enters the tower's input (text:
positions 1..n after the start token; vision: appended after the patches, or KMnP's place after
the class token), row i replaces the prompt slots at the input of layer i. `ctx` is the stack of
the method's first tower (text for IVLP, MaPLe, PromptSRC; vision for VPT), so Nemesis, sweeps
and reports see one [depth, n, W] tensor per tower with n positions at every layer.

A configured depth deeper than a tower is capped at its layer count (MaPLe's depth 9 on the
2-layer `tiny` prompts both layers): the stacks' first axis says the depth a prompt has.
Light to import: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..choices import VisionPromptPlacement
from ..errors import NemesisError, choice
from .whole_model_layout import PromptStackKeys, WholeModelLayout

TEXT_TOWER, VISION_TOWER = "text", "vision"


def stack_name(tower: str) -> str:
    """The checkpoint name of a tower's stack when it is not ctx: IVLP's `vision_prompts`, VPT's `text_prompts`."""
    return f"{tower}_prompts"


VISION_PROMPTS = stack_name("vision")  # IVLP's and PromptSRC's image stack
PROJECTION_WEIGHT, PROJECTION_BIAS = "projection.weight", "projection.bias"  # MaPLe's Linear_l, stacked over l
# How PUN averages the norms of every (tower, layer, position): each norm weighs the same, or each
# tower's mean norm weighs the same (then a tower with fewer prompts counts as much as one with more).
EVERY_NORM, EVERY_TOWER = "every-norm", "every-tower"
NORM_AVERAGES = (EVERY_NORM, EVERY_TOWER)
DEFAULT_INIT = "a photo of a"


def check_tower_options(config: Any) -> None:
    """The checks every tower-prompt config shares: n at least 1, depths at least 0, a known average."""
    if config.n_ctx < 1:
        raise NemesisError(f"n_ctx (prompt tokens per layer) must be at least 1, got {config.n_ctx}")
    for name in ("text_depth", "vision_depth"):
        if getattr(config, name) < 0:
            raise NemesisError(f"{name} must be at least 0, got {getattr(config, name)}")
    if config.text_depth == 0 and config.vision_depth == 0:
        raise NemesisError("a prompt needs text_depth or vision_depth above 0")
    if config.norm_average not in NORM_AVERAGES:
        raise NemesisError(f"unknown norm average '{config.norm_average}'; choose {', '.join(NORM_AVERAGES)}")
    if config.ctx_init is not None and not config.ctx_init.strip():
        config.ctx_init = None
    config.vision_placement = choice(VisionPromptPlacement, config.vision_placement, "vision placement").value


@dataclass
class TowerPromptsConfig:
    """Prompts in both towers: n tokens per layer, in the first `text_depth` text layers and the first
    `vision_depth` image layers (capped at each tower's layers); IVLP's defaults (its 2+2 config)."""

    n_ctx: int = 2  # prompt tokens per layer, the same in both towers (the sweep's positions)
    text_depth: int = 12  # text layers with prompts; 0: the hand-crafted prompt's text side
    vision_depth: int = 12  # image layers with prompts; 0: none (deep language prompting)
    ctx_init: str | None = DEFAULT_INIT  # the layer-0 text prompt's words (its first n tokens are learned)
    vision_placement: str = "append"  # after the patches (MaPLe, IVLP); prepend: after the class token (KMnP)
    norm_average: str = EVERY_NORM  # how Nemesis's PUN averages norms over towers (NORM_AVERAGES)

    first_tower: ClassVar[str] = TEXT_TOWER  # the tower whose stack is ctx
    coupled: ClassVar[bool] = False  # MaPLe: the vision prompts are projections of the text prompts

    def __post_init__(self) -> None:
        check_tower_options(self)

    def towers(self) -> tuple[str, ...]:
        """The towers with learned prompt stacks, ctx's first."""
        depths = {TEXT_TOWER: self.text_depth, VISION_TOWER: self.vision_depth}
        learned = [self.first_tower, *(t for t in depths if t != self.first_tower and not self.coupled)]
        return tuple(tower for tower in learned if depths[tower] > 0)

    def tensor_shapes(
        self,
        embed_dim: int | None,
        text_width: int | None,
        n_classes: int | None,
        vision_width: int | None = None,
    ) -> dict[str, tuple[int | None, ...]]:
        """ctx [depth, n, W] of the first tower (and IVLP's vision stack); the depth axis is any size, as a
        tower shallower than the configured depth caps it."""
        widths = {TEXT_TOWER: text_width, VISION_TOWER: vision_width}
        return {self.tensor_name(tower): (None, self.n_ctx, widths[tower]) for tower in self.towers()}

    def tensor_name(self, tower: str) -> str:
        """The checkpoint name of `tower`'s stack: ctx for the first tower."""
        return "ctx" if tower == self.first_tower else stack_name(tower)

    @classmethod
    def possible_tensor_names(cls) -> tuple[str, ...]:
        """Every name a prompt of this method may hold besides ctx, whatever its options (IVLP: vision_prompts,
        which deep language prompting, vision depth 0, lacks)."""
        return tuple(stack_name(tower) for tower in (TEXT_TOWER, VISION_TOWER) if tower != cls.first_tower)

    @classmethod
    def from_dassl(cls, ctx_shape: tuple[int, ...], class_position: str | None) -> TowerPromptsConfig:
        return cls(n_ctx=ctx_shape[-2])

    def folder_name(self) -> str:
        """`nctx2_depth12+12`: tokens per layer, text+vision depths."""
        return f"nctx{self.n_ctx}_depth{self.text_depth}+{self.vision_depth}"

    def check_classnames(self, classnames: list[str], token_count, context_length: int) -> None:
        longest = max(classnames, key=token_count)
        if self.text_depth and self.n_ctx + token_count(longest) + 3 > context_length:
            raise NemesisError(
                f"the prompt for class '{longest}' with {self.n_ctx} prompt tokens exceeds the context length "
                f"{context_length}"
            )


# --- their official trainers' whole-model checkpoints (nemesis.methods.whole_model_layout) ---------

TEXT_FIRST_PROMPT = "prompt_learner.ctx"  # the text prompt after the start token (IVLP, MaPLe, PromptSRC)
TEXT_BLOCK_PROMPT = "text_encoder.transformer.resblocks.{}.VPT_shallow"  # IVLP's deep text prompt of block {}
IMAGE_FIRST_PROMPT = "image_encoder.VPT"  # the vision prompt appended before ln_pre (IVLP, VPT)
IMAGE_BLOCK_PROMPT = "image_encoder.transformer.resblocks.{}.VPT_shallow"  # ... and the deep ones


def independent_layout(folder: str, image_tower_copy: str | None = None) -> WholeModelLayout:
    """IVLP's keys (PromptSRC's too): a text and a vision stack, row 0 apart and one parameter per deeper
    block (fp32); the text row 0 is fp16. Without vision prompts (deep language prompting) only the text."""
    return WholeModelLayout(
        folder=folder,
        stacks=(
            PromptStackKeys("ctx", TEXT_FIRST_PROMPT, TEXT_BLOCK_PROMPT, first_dtype="float16"),
            PromptStackKeys(VISION_PROMPTS, IMAGE_FIRST_PROMPT, IMAGE_BLOCK_PROMPT, tower=VISION_TOWER, optional=True),
        ),
        depth_options={"ctx": ("text_depth",), VISION_PROMPTS: ("vision_depth",)},
        image_tower_copy=image_tower_copy,
    )
