"""IVLP (Khattak et al., CVPR 2023, "independent vision-language prompting"): independent prompt stacks
in the text and image towers, n tokens per layer in their first layers.

The learner is `nemesis.methods.ivlp.learner.IVLPLearner`; this module holds its options and spec.
The defaults are its 2+2 config (vit_b16_c2_ep5_batch4_2+2ctx): 2 tokens per layer, depth 12 in both
towers, "a photo of a" (its first 2 tokens learned), batch 4, 5 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodSpec, TrainingDefaults
from ..tower_prompts import TowerPromptsConfig, independent_layout


@dataclass
class IVLPConfig(TowerPromptsConfig):
    """IVLP's options (`TowerPromptsConfig`'s defaults are its own)."""


SPEC = MethodSpec(
    name="ivlp",
    label="IVLP",
    learner="nemesis.methods.ivlp.learner:IVLPLearner",
    config=IVLPConfig,
    training=TrainingDefaults(batch_size=4, epochs=5),
    dassl_trainers=("IVLP",),
    dassl_layout=independent_layout("VLPromptLearner"),  # trainers/independentVL.py registers the whole model
)
