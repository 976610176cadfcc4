"""Fixed names shared by writers and readers: file names, metadata keys, defaults."""

from __future__ import annotations

import os
from pathlib import Path

# Prompt checkpoints: safetensors tensor name and the header metadata key holding our JSON.
CTX_TENSOR = "ctx"
METADATA_KEY = "nemesis"
PROMPT_FORMAT_VERSION = 2  # 2: method and penalty apart, each with its config (1 is still read)

# Run folder (`nemesis train --out DIR`).
RUN_CONFIG = "config.json"
RUN_PROMPT = "prompt.safetensors"
RUN_CHECKPOINTS = "checkpoints"
RUN_METRICS = "metrics.jsonl"
RUN_LOG = "log.txt"

# Dassl (CoOp / official Nemesis) checkpoint layout.
DASSL_PROMPT_FOLDER = "prompt_learner"
DASSL_FILE_PREFIX = "model.pth.tar-"
DASSL_BEST_FILE = "model-best.pth.tar"

# Weights identity of a model built with random weights (seeded, so it is reproducible).
RANDOM_WEIGHTS = "random-seed0"
# `--pretrained none`: random weights are always named, never what a missing option gives.
NO_WEIGHTS = "none"


def cache_root() -> Path:
    """The user's cache folder for the toolkit: $NEMESIS_CACHE, else ~/.cache/nemesis."""
    configured = os.environ.get("NEMESIS_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemesis"


POOLED_FEATURES = "pooled"  # a learner's image input: the image tower's pooled, projected features [B, D]
LOCAL_FEATURES = "local"  # ... or one projected feature per image token [B, T, D], the global one first (PLOT)
# ... or a ViT's patch embeddings [B, 1 + P, W] (class token and patches with positions, before ln_pre): what
# vision prompts do not change, so a learner with prompts in the image tower runs its blocks from there
PATCH_TOKENS = "patches"

ZERO_SHOT_METHOD = "zero-shot"  # the method of zero-shot records: the hand-crafted prompt, nothing learned
