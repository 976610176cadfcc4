"""Names people read: method labels for tables and legends, paper names of datasets, shot labels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from nemesis.choices import nemesis_variant

# CoOp's dataset keys -> the names the paper prints.
DATASET_NAMES = {
    "oxford_pets": "OxfordPets",
    "food101": "Food101",
    "imagenet": "ImageNet",
    "stanford_cars": "StanfordCars",
    "caltech101": "Caltech101",
    "dtd": "DTD",
    "sun397": "SUN397",
    "ucf101": "UCF101",
    "fgvc_aircraft": "FGVCAircraft",
    "eurosat": "EuroSAT",
    "oxford_flowers": "Flowers102",
    "imagenetv2": "ImageNet-V2",
    "imagenet_sketch": "ImageNet-Sketch",
    "imagenet_a": "ImageNet-A",
    "imagenet_r": "ImageNet-R",
    "fashion_mnist": "Fashion-MNIST",
}

# The 11 datasets the paper averages over, in the order of its LNE figure.
PAPER_DATASETS = (
    "oxford_pets",
    "food101",
    "imagenet",
    "stanford_cars",
    "caltech101",
    "dtd",
    "sun397",
    "ucf101",
    "fgvc_aircraft",
    "eurosat",
    "oxford_flowers",
)

# Target datasets of the domain-generalisation setting, in the paper's column order.
IMAGENET_VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")

MISSING_LABEL = "n/a"

# The method of `nemesis eval --zero-shot` records (nemesis.zero_shot names it; that module loads torch).
ZERO_SHOT_METHOD = "zero-shot"


def dataset_name(key: Any) -> str:
    """The paper's name for a CoOp dataset key; unknown keys are shown as they are."""
    if key is None or (isinstance(key, float) and pd.isna(key)):
        return MISSING_LABEL
    return DATASET_NAMES.get(str(key), str(key))


def method_label(method: str | None, beta: float | None = None, weight: float | None = None) -> str:
    """The label of a method in tables and legends.

    coop -> "CoOp"; nemesis with beta 1 -> "CoOp+Nemesis (PUN, weight <weight>)", beta 0 -> PAN,
    any other beta -> "CoOp+Nemesis (PUN+PAN, beta <beta>, weight <weight>)"; cocoop and cocoop-nemesis
    alike with "CoCoOp" (the paper's base-to-new rows).
    """
    if method is None or (isinstance(method, float) and pd.isna(method)):
        return "unknown"
    method = str(method).lower()
    bases = {"coop": "CoOp", "nemesis": "CoOp", "cocoop": "CoCoOp", "cocoop-nemesis": "CoCoOp"}
    if method not in bases:
        return method
    base = bases[method]
    if method in ("coop", "cocoop"):
        return base
    if beta is None or weight is None:
        return f"{base}+Nemesis"
    return f"{base}+Nemesis ({nemesis_variant(beta, weight)})"


def method_label_from_config(config: Mapping[str, Any]) -> str:
    """The method label of a run from its `config.json` (method plus the `nemesis` block)."""
    nemesis = config.get("nemesis") or {}
    return method_label(config.get("method"), nemesis.get("beta"), nemesis.get("weight"))


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


OWN_DATASET = "own"  # `trained_on` of a prompt tested on the dataset it was trained on


def prompt_kind_label(method: Any, subsample: Any = None, trained_on: Any = OWN_DATASET, variant: Any = None) -> str:
    """What kind of prompt a sweep group holds: "CoOp", "CoOp, base classes", "CoOp, trained on ImageNet",
    "CoOp+Nemesis (PAN, weight 20)" (`variant`: the sweep's method_variant).

    A table written before sweeps recorded the prompt kind says so: "(classes not recorded)".
    """
    parts = [method_label(None if _missing(method) else str(method))]
    if not _missing(variant) and parts[0].endswith("+Nemesis"):
        parts[0] += f" ({variant})"
    if _missing(subsample):
        parts.append("classes not recorded")
    elif str(subsample) != "all":
        parts.append(f"{subsample} classes")
    if not _missing(trained_on) and str(trained_on) != OWN_DATASET:
        parts.append(f"trained on {dataset_name(trained_on)}")
    return ", ".join(parts)


def is_paper_kind(method: Any, subsample: Any, trained_on: Any, dataset: Any) -> bool:
    """Whether a group is the kind of prompt the paper's LNE figure counts: CoOp, all classes, its own dataset."""
    known = not any(_missing(value) for value in (method, subsample, trained_on))
    return (
        known
        and str(method) == "coop"
        and str(subsample) == "all"
        and str(trained_on) == OWN_DATASET
        and str(dataset) in PAPER_DATASETS
    )


def shots_label(shots: Any) -> str:
    """Shots per class as an axis or column label: 16 -> "16", missing -> "n/a"."""
    if shots is None or pd.isna(shots):
        return MISSING_LABEL
    return str(int(shots))
