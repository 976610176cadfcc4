"""PromptSRC's learner: IVLP's architecture under PromptSRC's name (evaluation, sweeps, reports)."""

from __future__ import annotations

from ..tower_prompt_learner import TowerPromptLearner
from . import PromptSRCConfig


class PromptSRCLearner(TowerPromptLearner):
    method = "promptsrc"
    config_class = PromptSRCConfig
