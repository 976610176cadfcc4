"""Writing real CoOp-format data folders of a few classes, for tests and benchmarks.

`make_coop_folder` lays a dataset out exactly as CoOp's readers expect (split JSON, FGVC lists,
ImageNet folders with `classnames.txt`) with small images whose colour and stripes depend on the
class, so even a small model can tell classes apart. Few-shot pickles are written the way Dassl
writes them: `Datum` objects of module `dassl.data.datasets.base_dataset` holding absolute paths
of another machine.
"""

from __future__ import annotations

import colorsys
import json
import os
import pickle
import random
import sys
import types
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset_records import (
    FEWSHOT_DIR,
    FGVC_CLASSES_FILE,
    IMAGENET_CLASSNAMES_FILE,
    IMAGENET_PREPROCESSED_FILE,
    LAYOUTS,
    LayoutKind,
    Sample,
)
from .fewshot import sample_fewshot_splits

# Where the pickles pretend to come from.
FOREIGN_ROOT = "/home/someone/data"
DASSL_DATUM_MODULE = "dassl.data.datasets.base_dataset"
DEFAULT_CLASSNAMES = ("red apple", "green leaf", "blue sky", "yellow sun")


def wnid(index: int) -> str:
    """A WordNet-like id; ids sort in index order, like ImageNet's classnames.txt."""
    return f"n{10_000_000 + 37 * index:08d}"


def class_image(label: int, n_classes: int, index: int, size: int) -> Image.Image:
    """An RGB image whose hue and stripe direction/frequency come from the class; noise from the index."""
    rng = np.random.default_rng([label, index])
    red, green, blue = colorsys.hsv_to_rgb(label / max(n_classes, 1), 0.8, 0.9)
    coordinates = np.arange(size, dtype=np.float32) / size
    row, column = np.meshgrid(coordinates, coordinates, indexing="ij")  # [size, size] each
    angle = np.pi * (label % 4) / 4
    frequency = 2 + label % 3
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (row * np.cos(angle) + column * np.sin(angle)))
    colour = np.array([red, green, blue], dtype=np.float32)
    pixels = stripes[..., None] * colour + 0.08 * rng.standard_normal((size, size, 3))  # [size, size, 3]
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


class _DatumForPickling:
    """Stand-in for Dassl's Datum: only its attribute names and pickled class name matter."""

    def __init__(self, impath: str, label: int, classname: str, domain: int = 0) -> None:
        self._impath = impath
        self._label = label
        self._domain = domain
        self._classname = classname


@contextmanager
def _fake_dassl_module() -> Iterator[type]:
    """Make `dassl.data.datasets.base_dataset.Datum` resolvable while pickling, then undo it."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", DASSL_DATUM_MODULE]
    saved = {name: sys.modules.get(name) for name in names}
    datum = type("Datum", (_DatumForPickling,), {"__module__": DASSL_DATUM_MODULE, "__qualname__": "Datum"})
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[DASSL_DATUM_MODULE].Datum = datum
    try:
        yield datum
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _foreign_path(sample: Sample, dataset_dir: Path, foreign_root: str) -> str:
    relative = Path(sample.path).relative_to(dataset_dir.parent).as_posix()
    return f"{foreign_root.rstrip('/')}/{relative}"


def write_imagenet_preprocessed(
    dataset_dir: Path, train: Iterable[Sample], test: Iterable[Sample], foreign_root: str = FOREIGN_ROOT
) -> Path:
    """Write `imagenet/preprocessed.pkl` as CoOp's ImageNet reader caches its listing: a pickle of
    `{"train": [Datum], "test": [Datum]}` (samples in the order given), paths moved to `foreign_root`."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / IMAGENET_PREPROCESSED_FILE
    with _fake_dassl_module() as datum:
        content = {
            split: [datum(_foreign_path(s, dataset_dir, foreign_root), s.label, s.classname) for s in samples]
            for split, samples in (("train", train), ("test", test))
        }
        with open(path, "wb") as file:
            pickle.dump(content, file, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def write_fewshot_pickle(
    dataset_dir: Path,
    shots: int,
    seed: int,
    train: Iterable[Sample],
    val: Iterable[Sample] | None,
    foreign_root: str = FOREIGN_ROOT,
) -> Path:
    """Write `split_fewshot/shot_<K>-seed_<S>.pkl` as Dassl does, paths moved to `foreign_root`."""
    dataset_dir = Path(dataset_dir)

    def foreign(sample: Sample) -> str:
        return _foreign_path(sample, dataset_dir, foreign_root)

    path = dataset_dir / FEWSHOT_DIR / f"shot_{shots}-seed_{seed}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _fake_dassl_module() as datum:
        content = {"train": [datum(foreign(s), s.label, s.classname) for s in train]}
        if val is not None:
            content["val"] = [datum(foreign(s), s.label, s.classname) for s in val]
        with open(path, "wb") as file:
            pickle.dump(content, file, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG", quality=95)


def _slug(classname: str) -> str:
    return "".join(character if character.isalnum() else "_" for character in classname)


def _write_split_json(layout, folder: Path, classnames, counts, size) -> dict[str, list[Sample]]:
    image_dir = folder / layout.image_dir if layout.image_dir else folder
    rows: dict[str, list] = {}
    splits: dict[str, list[Sample]] = {}
    number = 0
    for split, count in zip(("train", "val", "test"), counts, strict=True):
        rows[split], splits[split] = [], []
        for label, classname in enumerate(classnames):
            for index in range(count):
                number += 1
                if layout.name == "stanford_cars":
                    # StanfordCars' quirk: paths relative to the dataset folder, flat numbered files.
                    relative = f"cars_{'test' if split == 'test' else 'train'}/{number:05d}.png"
                else:
                    relative = f"{_slug(classname)}/{_slug(classname)}_{split}_{index:04d}.png"
                _save(class_image(label, len(classnames), number, size), image_dir / relative)
                rows[split].append([relative, label, classname])
                splits[split].append(Sample(str(image_dir / relative), label, classname))
    (folder / layout.split_file).write_text(json.dumps(rows), encoding="utf-8")
    return splits


def _write_fgvc(layout, folder: Path, classnames, counts, size) -> dict[str, list[Sample]]:
    (folder / FGVC_CLASSES_FILE).parent.mkdir(parents=True, exist_ok=True)
    (folder / FGVC_CLASSES_FILE).write_text("".join(f"{name}\n" for name in classnames), encoding="utf-8")
    splits: dict[str, list[Sample]] = {}
    number = 1_000_000
    for split, count in zip(("train", "val", "test"), counts, strict=True):
        lines, splits[split] = [], []
        for label, classname in enumerate(classnames):
            for _ in range(count):
                number += 1
                path = folder / layout.image_dir / f"{number:07d}.jpg"
                _save(class_image(label, len(classnames), number, size), path)
                lines.append(f"{number:07d} {classname}\n")
                splits[split].append(Sample(str(path), label, classname))
        (folder / f"images_variant_{split}.txt").write_text("".join(lines), encoding="utf-8")
    return splits


def _write_class_folders(folder: Path, names: Sequence[str], classnames, count, size, split) -> list[Sample]:
    samples = []
    for label, (name, classname) in enumerate(zip(names, classnames, strict=True)):
        for index in range(count):
            path = folder / name / f"{name}_{split}_{index:04d}.png"
            _save(class_image(label, len(classnames), index + 1000 * (split == "test"), size), path)
            samples.append(Sample(str(path), label, classname))
    return samples


def _write_classnames_txt(path: Path, classnames: Sequence[str], extra: int) -> None:
    """ImageNet's `classnames.txt`; `extra` unused classes mimic the 1000-class list of A/R."""
    lines = [f"{wnid(i)} {name}\n" for i, name in enumerate(classnames)]
    lines += [f"{wnid(len(classnames) + i)} unused class {i}\n" for i in range(extra)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")


def make_coop_folder(
    root: str | os.PathLike,
    dataset: str = "oxford_pets",
    classnames: Sequence[str] | None = None,
    per_class: tuple[int, int, int] = (4, 2, 3),
    image_size: int = 32,
    fewshot: Iterable[tuple[int, int]] = (),
    classnames_in_variant_folder: bool = True,
    foreign_root: str = FOREIGN_ROOT,
) -> Path:
    """Write dataset `dataset` in CoOp's layout under `root`; return its folder.

    `per_class` = images per class in (train, val, test); ImageNet's val folder gets the test
    count and variants only the test count. `fewshot` lists (shots, seed) pairs for which a
    Dassl-style pickle is written, drawn CoOp's way.
    """
    layout = LAYOUTS[dataset]
    classnames = list(classnames or DEFAULT_CLASSNAMES)
    folder = Path(root).expanduser().absolute() / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    n_train, _, n_test = per_class
    wnids = [wnid(i) for i in range(len(classnames))]
    if layout.kind == LayoutKind.SPLIT_JSON:
        splits = _write_split_json(layout, folder, classnames, per_class, image_size)
    elif layout.kind == LayoutKind.FGVC:
        splits = _write_fgvc(layout, folder, classnames, per_class, image_size)
    elif layout.kind == LayoutKind.IMAGENET:
        _write_classnames_txt(folder / IMAGENET_CLASSNAMES_FILE, classnames, 0)
        image_dir = folder / layout.image_dir
        train = _write_class_folders(image_dir / "train", wnids, classnames, n_train, image_size, "train")
        test = _write_class_folders(image_dir / "val", wnids, classnames, n_test, image_size, "test")
        splits = {"train": train, "val": test, "test": test}
    else:
        names_txt = folder / IMAGENET_CLASSNAMES_FILE
        if not classnames_in_variant_folder:
            names_txt = Path(root).expanduser().absolute() / LAYOUTS["imagenet"].folder / IMAGENET_CLASSNAMES_FILE
        # ImageNet-A/-R name 200 of the 1000 classes: extra unused lines in classnames.txt.
        extra = 3 if layout.kind == LayoutKind.IMAGENET_VARIANT else 0
        _write_classnames_txt(names_txt, classnames, extra)
        folders = [str(i) for i in range(len(classnames))] if layout.kind == LayoutKind.IMAGENET_V2 else wnids
        test = _write_class_folders(folder / layout.image_dir, folders, classnames, n_test, image_size, "test")
        splits = {"train": [], "val": [], "test": test}
    for shots, seed in fewshot:
        val = None if layout.kind == LayoutKind.IMAGENET else splits["val"]
        train_subset, val_subset = sample_fewshot_splits(splits["train"], val, shots, seed)
        write_fewshot_pickle(folder, shots, seed, train_subset, val_subset, foreign_root)
    return folder


def make_all_coop_folders(root: str | os.PathLike, **options) -> dict[str, Path]:
    """Every CoOp dataset under one root (small: meant for smoke tests of the readers)."""
    return {name: make_coop_folder(root, name, **options) for name in LAYOUTS}


def shuffled_subset(samples: Sequence[Sample], per_label: int, seed: int) -> list[Sample]:
    """A subset unlike CoOp's draw (the last items of each class, shuffled), for tests that must
    tell a pickle's subset from a fresh draw."""
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    subset = [item for items in by_label.values() for item in items[-per_label:]]
    random.Random(seed).shuffle(subset)
    return subset


def write_openai_archive(model, path: str | os.PathLike, dtype=None) -> Path:
    """Save open_clip CLIP `model` the way OpenAI's `clip` package ships its weights: a TorchScript archive.

    The module is traced under OpenAI's key names (open_clip's CLIP uses the same) with the three
    metadata tensors OpenAI keeps beside the weights (`input_resolution`, `context_length`,
    `vocab_size`); `dtype=torch.float16` stores the weights in half precision as OpenAI's files do.
    """
    import copy
    import warnings

    import torch

    model = copy.deepcopy(model).float().eval()
    image_size = model.visual.image_size
    image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    context_length, vocab_size = int(model.context_length), int(model.vocab_size)
    del model.context_length, model.vocab_size  # plain ints in open_clip, tensors in OpenAI's archives
    model.register_buffer("input_resolution", torch.tensor(image_size))
    model.register_buffer("context_length", torch.tensor(context_length))
    model.register_buffer("vocab_size", torch.tensor(vocab_size))
    images = torch.zeros(1, 3, image_size, image_size)
    texts = torch.zeros(1, context_length, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        traced = torch.jit.trace_module(model, {"encode_image": (images,), "encode_text": (texts,)}, check_trace=False)
        if dtype is not None:
            traced = traced.to(dtype)
        torch.jit.save(traced, str(path))
    return Path(path)
