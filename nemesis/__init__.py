"""Nemesis toolkit core: backbones, prompt learner, text encoding, data, feature cache, checkpoints.

The public names below are imported on first use, so light modules such as `nemesis.errors`
(used by `analysis`, which needs no model) do not pull in torch and open_clip.
"""

from __future__ import annotations

from .lazy import lazy_attributes

__version__ = "0.1.0"

_PUBLIC = {
    "Backbone": "model.backbone",
    "load_clip": "model.backbone",
    "PromptCheckpoint": "files.checkpoint",
    "PromptMetadata": "files.checkpoint",
    "export_dassl": "files.checkpoint",
    "load_checkpoint": "files.checkpoint",
    "save_prompt": "files.checkpoint",
    "Dataset": "data.datasets",
    "Sample": "data.datasets",
    "load_dataset": "data.datasets",
    "NemesisError": "errors",
    "encode_split": "data.feature_cache",
    "PromptLearner": "methods.coop.learner",
    "TrainConfig": "training.configs",
    "NemesisConfig": "penalties",
    "CoCoOp": "methods.cocoop.learner",
    "PromptMethod": "methods.protocol",
    "METHODS": "methods",
    "MethodSpec": "methods",
    "register_method": "methods",
    "CorruptionSite": "methods.protocol",
    "build_learner": "methods.protocol",
    "train": "training.trainer",
    "train_grid": "training.train_grid",
    "evaluate": "evaluation.evaluate",
    "evaluate_base_to_new": "evaluation.evaluate",
    "resolve_target": "evaluation.evaluate",
    "interpret_prompt": "evaluation.interpretation",
    "nearest_tokens": "evaluation.interpretation",
    "pretrained_tiny_weights": "model.tiny",
    "PromptedCLIP": "methods.coop.learner",
    "position_norms": "tensors",
}

__all__ = sorted(_PUBLIC)

__getattr__ = lazy_attributes(__name__, _PUBLIC)
