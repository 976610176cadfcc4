"""PromptSRC (Khattak et al., ICCV 2023): IVLP's prompts (4+4 tokens, depth 9 in both towers) trained
with self-regularising losses and Gaussian prompt aggregation.

Its users' checkpoints are read and evaluated, swept and reported as IVLP's architecture under
PromptSRC's name; training it here is not offered (its losses need a second frozen image tower).
The learner is `nemesis.methods.promptsrc.learner.PromptSRCLearner`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodSpec, TrainingDefaults
from ..tower_prompts import TowerPromptsConfig, independent_layout

# Its files hold a second frozen image tower (the zero-shot one its losses compare with); IVLP's never do.
ZERO_SHOT_IMAGE_TOWER = "prompt_learner.ZS_image_encoder."


@dataclass
class PromptSRCConfig(TowerPromptsConfig):
    """PromptSRC's base-to-novel config (vit_b16_c2_ep20_batch4_4+4ctx): 4+4 tokens at depth 9."""

    n_ctx: int = 4
    text_depth: int = 9
    vision_depth: int = 9


SPEC = MethodSpec(
    name="promptsrc",
    label="PromptSRC",
    learner="nemesis.methods.promptsrc.learner:PromptSRCLearner",
    config=PromptSRCConfig,
    training=TrainingDefaults(batch_size=4, epochs=20),
    dassl_trainers=("PromptSRC",),
    dassl_layout=independent_layout("VLPromptLearner", image_tower_copy=ZERO_SHOT_IMAGE_TOWER),
    trains=False,
)
