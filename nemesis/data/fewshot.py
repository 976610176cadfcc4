"""Few-shot subsets exactly as CoOp draws them, or as a CoOp run saved them.

CoOp writes `<dataset>/split_fewshot/shot_<K>-seed_<S>.pkl`: a pickle of `{"train": [Datum, ...],
"val": [Datum, ...]}` (ImageNet: train only) whose Datum objects hold absolute paths of the machine
that wrote it. Those files are read here without importing Dassl and their paths are moved onto
the local root, so a user gets the very samples of their CoOp runs.

Without such a file the subset is drawn CoOp's way: CoOp seeds Python's `random` with the run's
seed, then Dassl's `generate_fewshot_dataset` groups the samples by label (in order of first
appearance) and takes `random.sample(items, K)` per label, first for train, then for val with
min(K, 4) shots from the same random stream. The drawn subset is saved as JSON with paths relative
to the dataset folder, in `split_fewshot/` beside the pickles (never over them) when that folder is
writable, else in the user's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path, PurePosixPath
from typing import Any

from ..atomic import write_text_atomic
from ..constants import cache_root
from ..errors import NemesisError
from ..unpickle import PickledObject, load_pickle
from .dataset_records import FEWSHOT_DIR, LAYOUTS, Sample

FEWSHOT_FORMAT = "nemesis-fewshot"
FEWSHOT_FORMAT_VERSION = 1
# CoOp's validation subset never has more than 4 shots per class.
MAX_VAL_SHOTS = 4


def pickle_path(dataset_dir: Path, shots: int, seed: int) -> Path:
    return dataset_dir / FEWSHOT_DIR / f"shot_{shots}-seed_{seed}.pkl"


def json_name(shots: int, seed: int) -> str:
    return f"shot_{shots}-seed_{seed}.json"


def cache_json_path(name: str, dataset_dir: Path, shots: int, seed: int) -> Path:
    """Where a subset is saved when the dataset folder is read-only: keyed by dataset folder."""
    folder_key = hashlib.sha256(str(dataset_dir).encode()).hexdigest()[:12]
    return cache_root() / "fewshot" / f"{name}-{folder_key}" / json_name(shots, seed)


# ---------------------------------------------------------------------------------------------
# Sampling


def sample_fewshot(samples: list[Sample], shots: int, rng: random.Random) -> list[Sample]:
    """K samples per label drawn like Dassl's `generate_fewshot_dataset` (labels in order of first appearance)."""
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    subset = []
    for items in by_label.values():
        # Dassl keeps every item of a class with fewer than K (repeat=False).
        subset.extend(rng.sample(items, shots) if len(items) >= shots else items)
    return subset


def sample_fewshot_splits(
    train: list[Sample], val: list[Sample] | None, shots: int, seed: int
) -> tuple[list[Sample], list[Sample] | None]:
    """CoOp's train and val subsets for `seed`; `val=None` (ImageNet) samples train only."""
    # A private generator seeded like CoOp's global `random.seed(seed)` draws the same numbers.
    rng = random.Random(seed)
    few_train = sample_fewshot(train, shots, rng)
    few_val = None if val is None else sample_fewshot(val, min(shots, MAX_VAL_SHOTS), rng)
    return few_train, few_val


# ---------------------------------------------------------------------------------------------
# Dassl pickles


def _foreign_parts(path: str) -> tuple[str, ...]:
    # A pickle written on Windows holds backslash paths.
    if "\\" in path and "/" not in path:
        path = path.replace("\\", "/")
    return PurePosixPath(path).parts


def reroot(foreign_path: str, name: str, dataset_dir: Path) -> Path:
    """Move an absolute path written on another machine onto the local dataset folder.

    The dataset's folder name (e.g. `oxford_pets`) is looked up in the path, preferably where the
    image folder follows it; what comes after it is rebuilt under `dataset_dir`. Paths that lack
    the folder name but hold the image folder are rebuilt from there.
    """
    layout = LAYOUTS[name]
    parts = _foreign_parts(foreign_path)
    image_part = PurePosixPath(layout.image_dir).parts[0] if layout.image_dir else None
    folder_hits = [index for index, part in enumerate(parts[:-1]) if part == layout.folder]
    followed = [index for index in folder_hits if image_part is None or parts[index + 1] == image_part]
    if followed or folder_hits:
        start = (followed or folder_hits)[-1] + 1
        return dataset_dir.joinpath(*parts[start:])
    image_hits = [index for index, part in enumerate(parts[:-1]) if part == image_part]
    if image_hits:
        return dataset_dir.joinpath(*parts[image_hits[-1] :])
    raise NemesisError(
        f"cannot place '{foreign_path}' under {dataset_dir}: it holds neither '{layout.folder}' "
        f"nor '{layout.image_dir}'; delete the pickle to sample the subset again"
    )


def _checked_sample(path: Any, label: Any, classname: Any, dataset_dir: Path, labels: set[int], source: Path) -> Sample:
    """A subset's sample, refused unless its label is one of the dataset's and its path stays inside the dataset."""
    if not isinstance(label, int) or isinstance(label, bool) or label not in labels:
        raise NemesisError(
            f"{source} holds label {label!r:.40}, which is not a class of the dataset (0 to {max(labels, default=0)}); "
            "delete it to resample"
        )
    if not isinstance(path, (str, Path)) or not isinstance(classname, str):
        raise NemesisError(f"{source} holds a sample whose path or class name is not text; delete it to resample")
    try:
        outside = ".." in Path(path).relative_to(dataset_dir).parts
    except ValueError:
        outside = True
    if outside:
        raise NemesisError(f"{source} points at '{path!s:.200}', outside the dataset folder {dataset_dir}; delete it")
    return Sample(str(path), label, classname)


def _datum_to_sample(datum: Any, name: str, dataset_dir: Path, source: Path, labels: set[int]) -> Sample:
    state = datum.state if isinstance(datum, PickledObject) else None
    if not isinstance(state, dict) or "_impath" not in state or "_label" not in state:
        raise NemesisError(f"{source} holds {datum!r:.80} where a Dassl Datum was expected; delete it to resample")
    if not isinstance(state["_impath"], str):
        raise NemesisError(f"{source} holds an image path that is not text; delete it to resample")
    path = reroot(state["_impath"], name, dataset_dir)
    return _checked_sample(path, state["_label"], state.get("_classname", ""), dataset_dir, labels, source)


def read_fewshot_pickle(
    path: Path, name: str, dataset_dir: Path, labels: set[int]
) -> tuple[list[Sample], list[Sample] | None]:
    """Train (and val, when present) samples of a Dassl few-shot pickle, paths re-rooted onto `dataset_dir`."""
    content = load_pickle(path)
    if not isinstance(content, dict) or not isinstance(content.get("train"), list):
        raise NemesisError(f"{path} is not a Dassl few-shot split (no 'train' list); delete it to resample")
    train = [_datum_to_sample(datum, name, dataset_dir, path, labels) for datum in content["train"]]
    val = content.get("val")
    if val is None:
        return train, None
    if not isinstance(val, list):
        raise NemesisError(f"{path} is not a Dassl few-shot split ('val' is not a list); delete it to resample")
    return train, [_datum_to_sample(datum, name, dataset_dir, path, labels) for datum in val]


def read_imagenet_preprocessed(path: Path, dataset_dir: Path, labels: set[int]) -> tuple[list[Sample], list[Sample]]:
    """Train and test samples of CoOp's `imagenet/preprocessed.pkl`, in its order, paths re-rooted.

    Each sample is checked like a few-shot split's: a label in `labels`, a path inside the dataset.
    """
    content = load_pickle(path)
    if not isinstance(content, dict) or not all(isinstance(content.get(key), list) for key in ("train", "test")):
        raise NemesisError(
            f"{path} is not CoOp's ImageNet listing (no 'train' and 'test' lists); delete it to list the folders"
        )
    train, test = (
        [_datum_to_sample(datum, "imagenet", dataset_dir, path, labels) for datum in content[key]]
        for key in ("train", "test")
    )
    return train, test


# ---------------------------------------------------------------------------------------------
# Our JSON subsets


def _to_rows(samples: list[Sample], dataset_dir: Path) -> list[list]:
    return [[Path(s.path).relative_to(dataset_dir).as_posix(), s.label, s.classname] for s in samples]


def save_fewshot_json(
    path: Path,
    name: str,
    dataset_dir: Path,
    shots: int,
    seed: int,
    train: list[Sample],
    val: list[Sample] | None,
) -> None:
    content = {
        "format": FEWSHOT_FORMAT,
        "version": FEWSHOT_FORMAT_VERSION,
        "dataset": name,
        "shots": shots,
        "seed": seed,
        "paths_relative_to": "dataset folder",
        "train": _to_rows(train, dataset_dir),
        "val": None if val is None else _to_rows(val, dataset_dir),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(content, indent=1) + "\n")


def read_fewshot_json(path: Path, dataset_dir: Path, labels: set[int]) -> tuple[list[Sample], list[Sample] | None]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as error:
        raise NemesisError(f"{path} is not a readable few-shot subset ({error}); delete it to resample") from None
    if not isinstance(content, dict) or content.get("format") != FEWSHOT_FORMAT:
        raise NemesisError(f"{path} is not a nemesis few-shot subset; delete it to resample")

    def rows(key: str) -> list[Sample] | None:
        value = content.get(key)
        if value is None and key == "val":
            return None
        if not isinstance(value, list) or not all(isinstance(row, list) and len(row) == 3 for row in value):
            raise NemesisError(
                f"{path}: '{key}' is not a list of [path, label, class name] rows; delete it to resample"
            )
        samples = []
        for relative, label, classname in value:
            if not isinstance(relative, str) or PurePosixPath(relative).is_absolute():
                raise NemesisError(f"{path} holds '{relative!s:.200}', not a path inside the dataset; delete it")
            samples.append(_checked_sample(dataset_dir / relative, label, classname, dataset_dir, labels, path))
        return samples

    return rows("train") or [], rows("val")


def _writable(folder: Path) -> bool:
    probe = folder if folder.exists() else folder.parent
    return os.access(probe, os.W_OK)


def load_fewshot(
    name: str, dataset_dir: Path, train: list[Sample], val: list[Sample], shots: int, seed: int
) -> tuple[list[Sample], list[Sample] | None]:
    """The K-shot train and val subsets of a dataset for `seed` (val None when the source has train only).

    Order of preference: CoOp's pickle, our saved JSON (beside the dataset, then in the cache), a
    fresh CoOp-style draw that is then saved.
    """
    labels = {sample.label for sample in train}
    pickled = pickle_path(dataset_dir, shots, seed)
    if pickled.is_file():
        return read_fewshot_pickle(pickled, name, dataset_dir, labels)
    beside = pickled.with_name(json_name(shots, seed))
    cached = cache_json_path(name, dataset_dir, shots, seed)
    for saved in (beside, cached):
        if saved.is_file():
            return read_fewshot_json(saved, dataset_dir, labels)
    # ImageNet: CoOp samples train only and keeps the full val (= test) folder.
    sample_val = None if name == "imagenet" else val
    few_train, few_val = sample_fewshot_splits(train, sample_val, shots, seed)
    target = beside if _writable(beside.parent) else cached
    save_fewshot_json(target, name, dataset_dir, shots, seed, few_train, few_val)
    return few_train, few_val
