"""Datasets in CoOp's folder layout, plus the embedded Fashion-MNIST default.

Each CoOp dataset lives in its own folder under a root (`--root`), laid out as CoOp's DATASETS.md
describes: a `split_zhou_*.json` file, FGVC-Aircraft's `images_variant_*.txt` lists, or ImageNet's
class folders with `classnames.txt`. `load_dataset` turns one into plain `Sample` lists; few-shot
subsets and the base-to-new class split are applied the way CoOp applies them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NemesisError

# The records every data module shares, re-exported so `from nemesis.data.datasets import Sample` keeps working.
from .dataset_records import (  # noqa: F401
    DATASET_NAMES,
    FASHION_MNIST,
    FEWSHOT_DIR,
    FGVC_CLASSES_FILE,
    IMAGENET_CLASSNAMES_FILE,
    IMAGENET_PREPROCESSED_FILE,
    LAYOUTS,
    SPLITS,
    Dataset,
    Layout,
    LayoutKind,
    Sample,
    Subsample,
    dataset_dir,
    resolve_name,
)

# How many missing files an error message names before it stops.
MISSING_SHOWN = 3

# Files inside the ImageNet-A/-R folders that are not classes.
_NOT_CLASS_FOLDERS = {"README.txt"}
_SETUP_HINT = "lay it out as CoOp's DATASETS.md describes"


def _root_or_error(name: str, root: str | os.PathLike | None) -> Path:
    if root is None:
        raise NemesisError(f"dataset '{name}' needs a data folder; pass --root DATA (the folder holding it)")
    return Path(root).expanduser().absolute()


# ---------------------------------------------------------------------------------------------
# Reading the full splits of each layout. Each reader returns (classnames, {split: samples}).


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise NemesisError(
            f"split file missing: {path}; download it from the link in CoOp's DATASETS.md into {path.parent}"
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise NemesisError(f"{path} is not valid JSON ({error}); download it again") from error
    if not isinstance(content, dict):
        raise NemesisError(f"{path} is not a split file (its top level is not an object); download it again")
    return content


def _classnames_from_samples(splits: dict[str, list[Sample]], source: Path) -> list[str]:
    names: dict[int, str] = {}
    for samples in splits.values():
        for sample in samples:
            names.setdefault(sample.label, sample.classname)
    if not names:
        return []
    if min(names) < 0 or max(names) >= len(names):  # labels run 0..n-1, so none is beyond the count
        raise NemesisError(
            f"{source} has label {max(names) if min(names) >= 0 else min(names)} among {len(names)} classes; "
            "labels must run 0..n-1"
        )
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise NemesisError(f"{source} has no sample of label {missing[:MISSING_SHOWN]}; labels must run 0..n-1")
    return [names[label] for label in range(len(names))]


def _read_split_json(layout: Layout, folder: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    split_path = folder / layout.split_file
    content = _read_json(split_path)
    image_dir = folder / layout.image_dir if layout.image_dir else folder
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        if split not in content:
            raise NemesisError(f"{split_path} has no '{split}' list; download CoOp's split file again")
        try:
            # Kept in file order: CoOp's few-shot sampling depends on it.
            splits[split] = [
                Sample(str(image_dir / relative), int(label), str(classname))
                for relative, label, classname in content[split]
            ]
        except (TypeError, ValueError) as error:
            raise NemesisError(f"{split_path}: '{split}' entries must be [path, label, classname]") from error
    return _classnames_from_samples(splits, split_path), splits


def _read_lines(path: Path, fix: str) -> list[str]:
    if not path.is_file():
        raise NemesisError(f"file missing: {path}; {fix}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_fgvc(layout: Layout, folder: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    fix = "FGVC-Aircraft's data/ folder (fgvc-aircraft-2013b) goes to <root>/fgvc_aircraft"
    classnames = _read_lines(folder / FGVC_CLASSES_FILE, fix)
    label_of = {classname: label for label, classname in enumerate(classnames)}
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        list_path = folder / f"images_variant_{split}.txt"
        samples = []
        for line in _read_lines(list_path, fix):
            image_id, _, classname = line.partition(" ")
            if classname not in label_of:
                raise NemesisError(f"{list_path}: variant '{classname}' is not in {FGVC_CLASSES_FILE}")
            samples.append(Sample(str(folder / layout.image_dir / f"{image_id}.jpg"), label_of[classname], classname))
        splits[split] = samples
    return classnames, splits


def read_imagenet_classnames(folder: Path, root: Path) -> dict[str, str]:
    """wnid -> class name from `classnames.txt` in `folder`, else in the ImageNet folder (file order kept)."""
    candidates = [
        folder / IMAGENET_CLASSNAMES_FILE,
        root / LAYOUTS["imagenet"].folder / IMAGENET_CLASSNAMES_FILE,
    ]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise NemesisError(
            f"{IMAGENET_CLASSNAMES_FILE} missing in {folder}; copy CoOp's ImageNet {IMAGENET_CLASSNAMES_FILE} there"
        )
    classnames = {}
    for line in _read_lines(path, ""):
        wnid, _, classname = line.partition(" ")
        classnames[wnid] = classname
    return classnames


def _list_images(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_file() and not entry.name.startswith("."))


def _list_class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise NemesisError(f"image folder missing: {folder}; {_SETUP_HINT}")
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in _NOT_CLASS_FOLDERS
    )


def _read_wnid_folders(folder: Path, wnids: list[str], names: dict[str, str]) -> list[Sample]:
    unknown = [wnid for wnid in wnids if wnid not in names]
    if unknown:
        raise NemesisError(f"class folders {unknown[:MISSING_SHOWN]} in {folder} are not in {IMAGENET_CLASSNAMES_FILE}")
    return [
        Sample(str(folder / wnid / image), label, names[wnid])
        for label, wnid in enumerate(wnids)
        for image in _list_images(folder / wnid)
    ]


def _read_imagenet(layout: Layout, folder: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    names = read_imagenet_classnames(folder, folder.parent)
    preprocessed = folder / IMAGENET_PREPROCESSED_FILE
    if preprocessed.is_file():
        # CoOp lists images in the file system's order and caches that listing: reading it gives
        # CoOp's order, so few-shot draws equal those of CoOp runs on the same machine.
        from .fewshot import read_imagenet_preprocessed

        train, test = read_imagenet_preprocessed(preprocessed, folder, set(range(len(names))))
        classnames = _classnames_from_samples({"train": train, "test": test}, preprocessed)
        return classnames, {"train": train, "val": test, "test": test}
    image_dir = folder / layout.image_dir
    # Labels follow the sorted train folders, as in CoOp; val must hold the same classes.
    wnids = _list_class_folders(image_dir / "train")
    val_wnids = _list_class_folders(image_dir / "val")
    if val_wnids != wnids:
        differing = sorted(set(wnids) ^ set(val_wnids))
        raise NemesisError(
            f"ImageNet train and val folders hold different classes (e.g. {differing[:MISSING_SHOWN]}); "
            "sort val images into <wnid> folders as CoOp's DATASETS.md says"
        )
    train = _read_wnid_folders(image_dir / "train", wnids, names)
    # CoOp evaluates on ImageNet's val folder and uses it as the validation set too.
    test = _read_wnid_folders(image_dir / "val", wnids, names)
    return [names[wnid] for wnid in wnids], {"train": train, "val": test, "test": test}


def _read_imagenet_v2(layout: Layout, folder: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    names = list(read_imagenet_classnames(folder, folder.parent).values())
    image_dir = folder / layout.image_dir
    if not image_dir.is_dir():
        raise NemesisError(f"image folder missing: {image_dir}; {_SETUP_HINT}")
    # Folders are named by label: the position of the class in classnames.txt.
    missing = [str(label) for label in range(len(names)) if not (image_dir / str(label)).is_dir()]
    if missing:
        raise NemesisError(f"class folders missing in {image_dir}: {', '.join(missing[:MISSING_SHOWN])}")
    test = [
        Sample(str(image_dir / str(label) / image), label, classname)
        for label, classname in enumerate(names)
        for image in _list_images(image_dir / str(label))
    ]
    return names, {"train": [], "val": [], "test": test}


def _read_imagenet_variant(layout: Layout, folder: Path) -> tuple[list[str], dict[str, list[Sample]]]:
    names = read_imagenet_classnames(folder, folder.parent)
    image_dir = folder / layout.image_dir
    # ImageNet-A and -R hold 200 classes: their labels follow their own sorted folders.
    wnids = _list_class_folders(image_dir)
    test = _read_wnid_folders(image_dir, wnids, names)
    return [names[wnid] for wnid in wnids], {"train": [], "val": [], "test": test}


_READERS = {
    LayoutKind.SPLIT_JSON: _read_split_json,
    LayoutKind.FGVC: _read_fgvc,
    LayoutKind.IMAGENET: _read_imagenet,
    LayoutKind.IMAGENET_V2: _read_imagenet_v2,
    LayoutKind.IMAGENET_VARIANT: _read_imagenet_variant,
}


def read_full_splits(name: str, root: str | os.PathLike) -> tuple[list[str], dict[str, list[Sample]]]:
    """Class names and full train/val/test lists of a CoOp dataset (no image is opened)."""
    layout = LAYOUTS[resolve_name(name)]
    folder = Path(root).expanduser().absolute() / layout.folder
    if not folder.is_dir():
        raise NemesisError(
            f"dataset '{layout.name}' not found: {folder} does not exist; {_SETUP_HINT} or pass the right --root"
        )
    return _READERS[layout.kind](layout, folder)


# ---------------------------------------------------------------------------------------------
# Missing files, base-to-new, and the public loader.


def missing_files(samples: list[Sample]) -> list[str]:
    """Paths of `samples` that are not files, in sample order, without duplicates."""
    seen: set[str] = set()
    missing = []
    for sample in samples:
        if sample.path not in seen:
            seen.add(sample.path)
            if not os.path.isfile(sample.path):
                missing.append(sample.path)
    return missing


def _raise_if_missing(name: str, root: Path, samples: list[Sample]) -> None:
    missing = missing_files(samples)
    if missing:
        shown = ", ".join(os.path.relpath(path, root) for path in missing[:MISSING_SHOWN])
        raise NemesisError(
            f"dataset '{name}' is incomplete: {len(missing)} image files missing ({shown}, ...); "
            f"`nemesis data check --root {root} --dataset {name}` lists them; re-extract the dataset"
        )


def subsample_classes(dataset: Dataset, subsample: str | Subsample) -> Dataset:
    """CoOp's base-to-new split: sorted labels, first ceil(n/2) are base, the rest new, relabelled from 0."""
    subsample = Subsample(subsample)
    if subsample == Subsample.ALL:
        return dataset
    # CoOp takes the labels of the training set; test-only datasets fall back on the test labels.
    reference = next((samples for samples in (dataset.train, dataset.val, dataset.test) if samples), [])
    labels = sorted({sample.label for sample in reference})
    half = math.ceil(len(labels) / 2)
    selected = labels[:half] if subsample == Subsample.BASE else labels[half:]
    new_label = {label: index for index, label in enumerate(selected)}

    def relabel(samples: list[Sample]) -> list[Sample]:
        return [Sample(s.path, new_label[s.label], s.classname) for s in samples if s.label in new_label]

    return Dataset(
        name=dataset.name,
        classnames=[dataset.classnames[label] for label in selected],
        train=relabel(dataset.train),
        val=relabel(dataset.val),
        test=relabel(dataset.test),
        image_loader=dataset.image_loader,
    )


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    shots: int | None = None,
    seed: int = 1,
    subsample: str | Subsample = "all",
) -> Dataset:
    """Load a dataset: full splits (`shots=None`) or CoOp's K-shot train/val subsets, then base/new classes.

    Few-shot subsets come from the dataset's `split_fewshot/shot_<K>-seed_<S>.pkl` when CoOp wrote
    one, else they are sampled CoOp's way (see `nemesis.data.fewshot`). Test-only datasets (the ImageNet
    variants) ignore `shots`.
    """
    from . import fewshot  # on use: the CLI imports this module at start-up and needs no sampling

    name = resolve_name(name)
    try:
        subsample = Subsample(subsample)
    except ValueError as error:
        choices = ", ".join(choice.value for choice in Subsample)
        raise NemesisError(f"unknown subsample '{subsample}'; available: {choices}") from error
    if shots is not None and shots < 1:
        raise NemesisError(f"shots must be at least 1 (got {shots}); leave it out for the full training set")
    if name == FASHION_MNIST:
        from .fashion_mnist import load_fashion_mnist

        dataset = load_fashion_mnist()
        if shots is not None:
            train, val = fewshot.sample_fewshot_splits(dataset.train, dataset.val, shots, seed)
            dataset = Dataset(dataset.name, dataset.classnames, train, val, dataset.test, dataset.image_loader)
        return subsample_classes(dataset, subsample)

    layout = LAYOUTS[name]
    root_path = _root_or_error(name, root)
    classnames, splits = read_full_splits(name, root_path)
    train, val, test = splits["train"], splits["val"], splits["test"]
    if layout.kind in (LayoutKind.SPLIT_JSON, LayoutKind.FGVC):
        # Folder-listed layouts exist by construction; listed ones are checked (as CoOp's Datum does)
        # before a few-shot subset is drawn and saved.
        _raise_if_missing(name, root_path, [*train, *val, *test])
    if shots is not None and not layout.test_only:
        train, few_val = fewshot.load_fewshot(name, root_path / layout.folder, train, val, shots, seed)
        # ImageNet has no separate val split in CoOp: its few-shot files hold train only.
        val = few_val if few_val is not None else val
        _raise_if_missing(name, root_path, [*train, *(few_val or [])])
    dataset = Dataset(name, classnames, train, val, test)
    return subsample_classes(dataset, subsample)


@dataclass
class DatasetReport:
    """What `check_dataset` found for one dataset."""

    name: str
    folder: str
    found: bool  # the folder and its split/list files are readable
    counts: dict[str, int] = field(default_factory=dict)  # samples per split
    missing: list[str] = field(default_factory=list)  # image files listed but absent (relative to root)
    problem: str = ""  # why the dataset could not be read, when not found

    @property
    def complete(self) -> bool:
        return self.found and not self.missing


def check_dataset(name: str, root: str | os.PathLike | None) -> DatasetReport:
    """Look for dataset `name` under `root`: is it there, how many samples per split, which files are missing."""
    name = resolve_name(name)
    if name == FASHION_MNIST:
        from .fashion_mnist import find_fashion_mnist_files

        try:
            folder = str(find_fashion_mnist_files(download=False)["train-images"].parent)
            dataset = load_dataset(FASHION_MNIST)
        except NemesisError as error:
            return DatasetReport(name, "", found=False, problem=str(error))
        return DatasetReport(name, folder, True, {split: len(dataset.split(split)) for split in SPLITS})
    root_path = _root_or_error(name, root)
    folder = root_path / LAYOUTS[name].folder
    try:
        _, splits = read_full_splits(name, root_path)
    except NemesisError as error:
        return DatasetReport(name, str(folder), found=False, problem=str(error))
    all_samples = [sample for split in SPLITS for sample in splits[split]]
    missing = [os.path.relpath(path, root_path) for path in missing_files(all_samples)]
    counts = {split: len(splits[split]) for split in SPLITS}
    return DatasetReport(name, str(folder), found=True, counts=counts, missing=missing)
