"""What CoOp / Dassl output paths say about the run inside them.

CoOp names its trees `output/<dataset>/<Trainer>/<cfg>_<K>shots/nctx<M>_csc<B>_ctp<position>/seed<S>`
and base-to-new runs `output/base2new/train_base/<dataset>/shots_<K>/<Trainer>/<cfg>/seed<S>` (KgCoOp's
scripts: `shots_<K>_<w>`, its weight appended); the checkpoint files themselves carry none of it.
Read by Dassl checkpoint loading (so `eval`, `prompt info` and `corrupt` all see it) and by the
readers of CoOp's result logs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..data.dataset_records import DATASET_NAMES
from ..penalties import NEMESIS

_SHOTS_IN_CONFIG = re.compile(r"(?:^|_)(\d+)shots$")  # CoOp: <cfg>_<K>shots
_SHOTS_FOLDER = re.compile(r"shots_(\d+)(?:_[0-9.]+)?")  # base-to-new: shots_<K>; KgCoOp's shots_<K>_<w>
_SEED_FOLDER = re.compile(r"seed(\d+)")
_CLASS_POSITION = re.compile(r"ctp(end|middle|front)(?![a-z])")  # CoOp: nctx16_cscFalse_ctpend
BASE_TRAINING_FOLDER = "train_base"  # base-to-new runs train on the base classes
NEW_TESTING_FOLDER = "test_new"  # ... and are tested on the new ones in evaluation-only runs


@dataclass(frozen=True)
class PathIdentity:
    """What a CoOp output path says about the run inside it (None where it says nothing)."""

    dataset: str | None = None
    shots: int | None = None
    seed: int | None = None
    trainer: str | None = None  # the Dassl trainer folder ("CoOp"; nemesis.methods knows whose it is)
    nemesis: bool = False  # whether a folder of the run names Nemesis (the official release's trees)
    subsample: str | None = None
    class_position: str | None = None


def identity_from_path(path: str | os.PathLike) -> PathIdentity:
    """Dataset, shots, seed, trainer folder (whose method `nemesis.methods.method_of_dassl_path` says),
    whether a folder names Nemesis, class subset and class position, read from a CoOp output path
    (rightmost match wins).

    The path is read as given, made absolute but not resolved: a tree whose run folders are links
    to runs stored elsewhere keeps the identity its own folders name.
    """
    parts = Path(os.path.abspath(path)).parts
    dataset_index = max((i for i, part in enumerate(parts) if part in DATASET_NAMES), default=None)
    shots = seed = class_position = None
    for part in parts:
        if match := _SHOTS_IN_CONFIG.search(part) or _SHOTS_FOLDER.fullmatch(part):
            shots = int(match.group(1))
        if match := _SEED_FOLDER.fullmatch(part):
            seed = int(match.group(1))
        if match := _CLASS_POSITION.search(part):
            class_position = match.group(1)
    # The trainer folder follows the dataset folder (after `shots_<K>` in base-to-new trees).
    below = parts[dataset_index + 1 :] if dataset_index is not None else ()  # no tree: no method from folders
    trainer = next((part for part in below if not _SHOTS_FOLDER.fullmatch(part)), "")
    nemesis = any(NEMESIS in part.lower() for part in below)  # the official release's CoOp_Nemesis and configs
    return PathIdentity(
        dataset=parts[dataset_index] if dataset_index is not None else None,
        shots=shots,
        seed=seed,
        trainer=trainer or None,
        nemesis=nemesis,
        subsample="base" if BASE_TRAINING_FOLDER in parts else "new" if NEW_TESTING_FOLDER in parts else None,
        class_position=class_position,
    )
