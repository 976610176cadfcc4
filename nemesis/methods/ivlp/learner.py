"""IVLP's learner: the tower-prompt learner with independent text and vision stacks."""

from __future__ import annotations

from ..tower_prompt_learner import TowerPromptLearner
from . import IVLPConfig


class IVLPLearner(TowerPromptLearner):
    method = "ivlp"
    config_class = IVLPConfig
