"""MaPLe's learner: the tower-prompt learner whose vision stack is projected from the text stack."""

from __future__ import annotations

from ..tower_prompt_learner import TowerPromptLearner
from . import MaPLeConfig


class MaPLeLearner(TowerPromptLearner):
    method = "maple"
    config_class = MaPLeConfig
