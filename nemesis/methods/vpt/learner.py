"""VPT's learner: the tower-prompt learner with a vision stack and the hand-crafted text side."""

from __future__ import annotations

from ..tower_prompt_learner import TowerPromptLearner
from . import VPTConfig


class VPTLearner(TowerPromptLearner):
    method = "vpt"
    config_class = VPTConfig
