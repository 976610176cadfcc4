"""Nemesis toolkit core: backbones, prompt learner, text encoding, data, feature cache, checkpoints.

The public names below are imported on first use, so light modules such as `nemesis.errors`
(used by `analysis`, which needs no model) do not pull in torch and open_clip.
"""

from __future__ import annotations

from .lazy import lazy_attributes

__version__ = "0.1.0"

_PUBLIC = {
    "Backbone": "backbone",
    "load_clip": "backbone",
    "PromptCheckpoint": "checkpoint",
    "PromptMetadata": "checkpoint",
    "export_dassl": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_prompt": "checkpoint",
    "Dataset": "datasets",
    "Sample": "datasets",
    "load_dataset": "datasets",
    "NemesisError": "errors",
    "encode_split": "feature_cache",
    "PromptLearner": "methods.coop.learner",
    "TrainConfig": "configs",
    "NemesisConfig": "penalties",
    "CoCoOp": "methods.cocoop.learner",
    "PromptMethod": "prompt_methods",
    "METHODS": "methods",
    "MethodSpec": "methods",
    "register_method": "methods",
    "CorruptionSite": "prompt_methods",
    "build_learner": "prompt_methods",
    "train": "trainer",
    "pretrained_tiny_weights": "tiny",
    "PromptedCLIP": "methods.coop.learner",
    "position_norms": "tensors",
}

__all__ = sorted(_PUBLIC)

__getattr__ = lazy_attributes(__name__, _PUBLIC)
