"""VPT (Jia et al., ECCV 2022) on CLIP: prompts in the image tower, the text side the fixed
hand-crafted prompt "a photo of a {}." (as the MaPLe authors' VPT trainer has it), or with
`text_depth=1` CoOp's learned context of n tokens (`text_prompts` [1, n, Wt]).

The learner is `nemesis.methods.vpt.learner.VPTLearner`; this module holds its options and spec.
The defaults are that trainer's (vit_b16_c2_ep5_batch4_4): 8 tokens per layer, depth 12 (deep VPT;
depth 1 is shallow VPT), appended after the patches; `vision_placement=prepend` is KMnP's VPT,
after the class token, with its Xavier-uniform init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import NemesisError
from ..base import MethodSpec, TrainingDefaults
from ..tower_prompts import IMAGE_BLOCK_PROMPT, IMAGE_FIRST_PROMPT, VISION_TOWER, TowerPromptsConfig
from ..whole_model_layout import PromptStackKeys, WholeModelLayout

# The MaPLe authors' VPT trainer registers the whole model as "prompt_learner" (no `prompt_learner.*` key in
# it) and runs CLIP in fp32 (`load_clip_to_cpu` returns `model.float()`), so every tensor is fp32.
DASSL_LAYOUT = WholeModelLayout(
    folder="prompt_learner",
    stacks=(PromptStackKeys("ctx", IMAGE_FIRST_PROMPT, IMAGE_BLOCK_PROMPT, tower=VISION_TOWER),),
    depth_options={"ctx": ("vision_depth",)},
    frozen_dtype="float32",
)


@dataclass
class VPTConfig(TowerPromptsConfig):
    """VPT's options: vision prompts only."""

    n_ctx: int = 8
    text_depth: int = 0
    vision_depth: int = 12
    ctx_init: str | None = None

    first_tower: ClassVar[str] = VISION_TOWER

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text_depth not in (0, 1) or self.vision_depth == 0:
            raise NemesisError(
                "VPT prompts the image tower (vision_depth at least 1) beside a fixed text side (text_depth 0) or "
                "CoOp's context (text_depth 1); deeper text prompts are IVLP's (--method ivlp)"
            )

    def folder_name(self) -> str:
        return f"nctx{self.n_ctx}_depth{self.vision_depth}_{self.vision_placement}"


SPEC = MethodSpec(
    name="vpt",
    label="VPT",
    learner="nemesis.methods.vpt.learner:VPTLearner",
    config=VPTConfig,
    training=TrainingDefaults(batch_size=4, epochs=5),
    dassl_trainers=("VPT",),
    dassl_layout=DASSL_LAYOUT,
)
