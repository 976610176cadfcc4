"""MaPLe (Khattak et al., CVPR 2023): text prompt stacks whose vision prompts are their projections,
vision prompt of layer l = Linear_l(text prompt of layer l).

The learner is `nemesis.methods.maple.learner.MaPLeLearner`; this module holds its options and spec.
The defaults are its base-to-novel config (vit_b16_c2_ep5_batch4_2ctx): 2 tokens per layer, depth 9,
"a photo of a" (its first 2 tokens learned, "of a" kept as text), batch 4, 5 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import NemesisError
from ..base import MethodSpec, TrainingDefaults
from ..tower_prompts import PROJECTION_BIAS, PROJECTION_WEIGHT, TEXT_FIRST_PROMPT, TowerPromptsConfig
from ..whole_model_layout import PromptStackKeys, WholeModelLayout

# trainers/maple.py registers the whole model as "MultiModalPromptLearner". Layer 0: ctx and proj (fp16);
# layer l >= 1: compound_prompts_text[l-1] and compound_prompt_projections[l-1] (fp32 ParameterLists).
_DEEP_TEXT = "prompt_learner.compound_prompts_text.{}"
_DEEP_PROJECTION = "prompt_learner.compound_prompt_projections.{}"
DASSL_LAYOUT = WholeModelLayout(
    folder="MultiModalPromptLearner",
    stacks=(
        PromptStackKeys("ctx", TEXT_FIRST_PROMPT, _DEEP_TEXT, first_number=0, first_dtype="float16"),
        PromptStackKeys(
            PROJECTION_WEIGHT, "prompt_learner.proj.weight", _DEEP_PROJECTION + ".weight", 0, first_dtype="float16"
        ),
        PromptStackKeys(
            PROJECTION_BIAS, "prompt_learner.proj.bias", _DEEP_PROJECTION + ".bias", 0, first_dtype="float16"
        ),
    ),
    depth_options={"ctx": ("text_depth", "vision_depth")},
    same_depth=True,
)


@dataclass
class MaPLeConfig(TowerPromptsConfig):
    """MaPLe's options: one depth for both towers (its PROMPT_DEPTH)."""

    text_depth: int = 9
    vision_depth: int = 9

    coupled: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text_depth != self.vision_depth or self.text_depth == 0:
            raise NemesisError(
                f"MaPLe prompts the same layers in both towers (its depth); got text_depth {self.text_depth} and "
                f"vision_depth {self.vision_depth}"
            )

    def tensor_shapes(self, embed_dim, text_width, n_classes, vision_width=None) -> dict[str, tuple]:
        """ctx [depth, n, Wt] and the projections Linear_l(Wt -> Wv) stacked: [depth, Wv, Wt], [depth, Wv]."""
        return {
            "ctx": (None, self.n_ctx, text_width),
            PROJECTION_WEIGHT: (None, vision_width, text_width),
            PROJECTION_BIAS: (None, vision_width),
        }

    def folder_name(self) -> str:
        return f"nctx{self.n_ctx}_depth{self.text_depth}"


SPEC = MethodSpec(
    name="maple",
    label="MaPLe",
    learner="nemesis.methods.maple.learner:MaPLeLearner",
    config=MaPLeConfig,
    training=TrainingDefaults(batch_size=4, epochs=5),
    dassl_trainers=("MaPLe",),
    dassl_layout=DASSL_LAYOUT,
)
