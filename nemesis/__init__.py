"""Nemesis toolkit core: backbones, prompt learner, text encoding and prompt checkpoints."""

__version__ = "0.1.0"

from .backbone import Backbone, load_clip
from .checkpoint import (
    PromptCheckpoint,
    PromptMetadata,
    export_dassl,
    load_checkpoint,
    save_prompt,
)
from .errors import NemesisError
from .prompt_learner import PromptedCLIP, PromptLearner, position_norms

__all__ = [
    "Backbone",
    "NemesisError",
    "PromptCheckpoint",
    "PromptLearner",
    "PromptMetadata",
    "PromptedCLIP",
    "export_dassl",
    "load_checkpoint",
    "load_clip",
    "position_norms",
    "save_prompt",
]
