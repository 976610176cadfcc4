"""Results of CoOp / Dassl runs, read from their output trees so reports put them beside ours.

A Dassl run folder (e.g. `output/oxford_pets/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1`) holds
`log.txt`, the copy of everything the run printed. After training (`Finish training`, then the
deployed model) and in evaluation-only runs, Dassl's evaluator prints a result block:

    => result
    * total: 3,669
    * correct: 3,215
    * accuracy: 87.6%
    * error: 12.4%
    * macro_f1: 87.3%

The last such block is the run's test result; a log without one is a run still training or one
that stopped. Dataset, shots, seed, method and class subset come from the folder names
(`nemesis.files.coop_paths`); the backbone from the config the log starts with.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nemesis.constants import RUN_LOG
from nemesis.files.coop_paths import identity_from_path
from nemesis.methods import method_of_dassl_path
from nemesis.penalties import UNKNOWN_PENALTY

from .labels import method_label

RESULT_MARK = "=> result"
_ACCURACY = re.compile(r"^\* accuracy: ([0-9]+(?:\.[0-9]+)?)%", re.M)
_TOTAL = re.compile(r"^\* total: ([0-9,]+)", re.M)
_MACRO_F1 = re.compile(r"^\* macro_f1: ([0-9]+(?:\.[0-9]+)?)%", re.M)
_BACKBONE = re.compile(r"^\s*BACKBONE:\s*\n(?:\s+\w+:.*\n)*?\s+NAME: (\S+)", re.M)  # the yacs config dump
_CONFIG_MODELS = {"rn50": "RN50", "rn101": "RN101", "vit_b32": "ViT-B-32", "vit_b16": "ViT-B-16", "vit_l14": "ViT-L-14"}
SOURCE_MARK = " (Dassl log)"  # their runs get rows of their own, never averaged into ours


def is_dassl_log(path: Path) -> bool:
    """A `log.txt` inside a CoOp output tree (its path names a dataset)."""
    return path.name == RUN_LOG and path.is_file() and identity_from_path(path.parent).dataset is not None


def _model(text: str, folder: Path) -> str | None:
    if match := _BACKBONE.search(text):
        return match.group(1).replace("/", "-")  # CLIP's "ViT-B/16" is open_clip's "ViT-B-16"
    for part in reversed(folder.parts):
        for prefix, name in _CONFIG_MODELS.items():
            if part.lower().startswith(prefix + "_") or part.lower() == prefix:
                return name
    return None


def read_dassl_log(path: str | Path) -> dict[str, Any] | None:
    """An evaluation record (the shape of `nemesis eval --out` rows) from a Dassl `log.txt`, or None
    when the log holds no result block yet."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    start = text.rfind(RESULT_MARK)
    if start < 0:
        return None
    block = text[start:]
    accuracy, total = _ACCURACY.search(block), _TOTAL.search(block)
    if accuracy is None or total is None:
        return None
    macro_f1 = _MACRO_F1.search(block)
    where = identity_from_path(path.parent)
    method, penalty = method_of_dassl_path(where.trainer, where.nemesis)
    penalty = penalty or UNKNOWN_PENALTY
    return {
        "kind": "eval",
        "checkpoint": str(path.parent),
        "model": _model(text, path.parent),
        "pretrained": "openai",  # CoOp and CoCoOp build OpenAI's CLIP weights (`clip.load`)
        "dataset": where.dataset,
        "train_dataset": where.dataset,
        "subsample": where.subsample or "all",
        "shots": where.shots,
        "seed": where.seed,
        "method": method or "unknown",
        "penalty": penalty,
        "method_label": method_label(method, penalty=penalty) + SOURCE_MARK,
        "n": int(total.group(1).replace(",", "")),
        "accuracy": float(accuracy.group(1)),
        "macro_f1": float(macro_f1.group(1)) if macro_f1 else None,
    }
