"""Names people read: method labels for tables and legends, paper names of datasets, shot labels."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from nemesis.choices import nemesis_variant
from nemesis.constants import RANDOM_WEIGHTS
from nemesis.methods import METHODS, split_method
from nemesis.penalties import NEMESIS, UNKNOWN_PENALTY, penalty_label, uses_nemesis

from .paper_numbers import LNE_PROMPTS

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


def dataset_name(key: Any) -> str:
    """The paper's name for a CoOp dataset key; unknown keys are shown as they are."""
    if key is None or (isinstance(key, float) and pd.isna(key)):
        return MISSING_LABEL
    return DATASET_NAMES.get(str(key), str(key))


def method_label(
    method: str | None, beta: float | None = None, weight: float | None = None, penalty: str | None = None
) -> str:
    """The label of a method in tables and legends: the prompt method's own label, then its penalty.

    coop -> "CoOp"; with Nemesis, beta 1 -> "CoOp+Nemesis (PUN, weight <weight>)", beta 0 -> PAN,
    any other beta -> "CoOp+Nemesis (PUN+PAN, beta <beta>, weight <weight>)"; without beta and weight
    "CoOp+Nemesis". A penalty that is not recorded (a Dassl file outside a CoOp tree) says so. Records
    written when one word named method and penalty ("nemesis", "cocoop-nemesis") read the same.
    """
    if is_missing(method):
        return "unknown"
    method, penalty = split_method(str(method).lower(), None if is_missing(penalty) else str(penalty))
    spec = METHODS.get(method)
    base = spec.label if spec is not None else method
    if penalty == UNKNOWN_PENALTY:
        return f"{base} (penalty not recorded)"
    label = base + penalty_label(penalty)
    if uses_nemesis(penalty) and beta is not None and weight is not None and not is_missing(beta):
        label += f" ({nemesis_variant(beta, weight)})"
    return label


def method_label_from_config(config: Mapping[str, Any]) -> str:
    """The method label of a run from its `config.json` (method and penalty, plus the `nemesis` block)."""
    nemesis = config.get("nemesis") or {}
    method = config.get("prompt_method", config.get("method"))
    return method_label(method, nemesis.get("beta"), nemesis.get("weight"), config.get("penalty"))


def is_missing(value: Any) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


OWN_DATASET = "own"  # `trained_on` of a prompt tested on the dataset it was trained on


# Results of random weights (`--pretrained none`) are no method's result: their label says so, which
# also keeps them apart from the same prompt's results on real weights.
RANDOM_WEIGHTS_MARK = " (random weights)"
RANDOM_WEIGHTS_LABEL = "random weights"
_SHORT_HASH = 12  # hex digits of a weights file's SHA-256 shown in labels


def is_random_weights_id(weights_id: Any) -> bool:
    """Whether a backbone's weights id (`Backbone.weights_id`, a sweep's `weights`) is random weights."""
    return isinstance(weights_id, str) and weights_id.startswith(RANDOM_WEIGHTS)


def is_random_weights(pretrained: Any, weights_id: Any = None) -> bool:
    """Whether a record or run config was made with random weights: `pretrained` null or "none" (the
    commands' explicit choice), or the random backbone's weights id. A value that is missing altogether
    (NaN: a record without the key) is not taken for random."""
    if is_random_weights_id(weights_id):
        return True
    return pretrained is None or (isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none"))


def weights_label(pretrained: Any, activation: Any = None, weights_id: Any = None) -> str:
    """The weights as a note names them: "random weights", or the tag or file name and the activation."""
    if is_random_weights(pretrained, weights_id):
        return RANDOM_WEIGHTS_LABEL
    name = "not recorded" if pd.isna(pretrained) else Path(str(pretrained)).name
    return name if pd.isna(activation) else f"{name}, {activation}"


def _short_weights_id(weights_id: str) -> str:
    """ "tag:openai+quickgelu" -> "openai+quickgelu"; "sha256:<64 hex>" -> "sha256:<12 hex>"."""
    name, plus, activation = weights_id.partition("+")
    if name.startswith("tag:"):
        name = name.removeprefix("tag:")
    elif name.startswith("sha256:"):
        name = name[: len("sha256:") + _SHORT_HASH]
    return name + plus + activation


def weights_names(weights_ids: Iterable[Any]) -> dict[Any, str | None]:
    """What a label says of each weights id of one table (a sweep's `weights` column):
    "random weights" for random ones; nothing (None) for unknown weights (tables written before the
    column existed) and for real weights when the table holds one real id only; "weights <id>"
    (shortened) when it holds several, so their groups read apart."""
    ids = {value for value in weights_ids if not is_missing(value)}
    real = {value for value in ids if not is_random_weights_id(value)}
    names: dict[Any, str | None] = {}
    for value in ids:
        if is_random_weights_id(value):
            names[value] = RANDOM_WEIGHTS_LABEL
        else:
            names[value] = f"weights {_short_weights_id(str(value))}" if len(real) > 1 else None
    return names


def prompt_kind_label(
    method: Any,
    subsample: Any = None,
    trained_on: Any = OWN_DATASET,
    variant: Any = None,
    weights: Any = None,
    penalty: Any = None,
) -> str:
    """What kind of prompt a sweep group holds: "CoOp", "CoOp, base classes", "CoOp, trained on ImageNet",
    "CoOp+Nemesis (PAN, weight 20)" (`variant`: the sweep's method_variant), "CoOp (random weights)"
    (`weights`: what `weights_names` says of the group's weights id; None adds nothing).

    A table written before sweeps recorded the prompt kind says so: "(classes not recorded)".
    """
    parts = [method_label(None if is_missing(method) else str(method), penalty=penalty)]
    if not is_missing(variant) and parts[0].endswith(penalty_label(NEMESIS)):
        parts[0] += f" ({variant})"
    if not is_missing(weights):
        parts[0] += f" ({weights})"
    if is_missing(subsample):
        parts.append("classes not recorded")
    elif str(subsample) != "all":
        parts.append(f"{subsample} classes")
    if not is_missing(trained_on) and str(trained_on) != OWN_DATASET:
        parts.append(f"trained on {dataset_name(trained_on)}")
    return ", ".join(parts)


def kind_label(kind: Mapping[str, Any], weights: Mapping[Any, str | None] | None = None) -> str:
    """`prompt_kind_label` of a group from its prompt-kind column values (a column it lacks is no
    distinction); `weights`: `weights_names` of the table the group comes from."""
    weights_id = kind.get("weights")
    return prompt_kind_label(
        kind.get("method"),
        kind.get("subsample", "all"),
        kind.get("trained_on", OWN_DATASET),
        kind.get("method_variant"),
        None if is_missing(weights_id) else (weights or {}).get(weights_id),
        kind.get("penalty"),
    )


def is_paper_kind(kind: Mapping[str, Any], dataset: Any) -> bool:
    """Whether a group (its prompt-kind column values) is the kind of prompt the paper's LNE figure
    counts: CoOp without a penalty, all classes, its own dataset, not random weights (`weights`: the
    group's weights id; unknown in older tables)."""
    values = [kind.get(key) for key in ("method", "subsample", "trained_on")]
    if any(is_missing(value) for value in values):
        return False
    method, penalty = split_method(
        str(kind["method"]), kind.get("penalty") if not is_missing(kind.get("penalty")) else None
    )
    return (
        (method, penalty) == LNE_PROMPTS
        and not is_random_weights_id(kind.get("weights"))
        and str(kind["subsample"]) == "all"
        and str(kind["trained_on"]) == OWN_DATASET
        and str(dataset) in PAPER_DATASETS
    )


WHOLE_CTX_LABEL = "whole ctx"  # the site of a method that corrupts all of its ctx at once (site "")


def site_label(site: Any) -> str:
    """A corruption site as legends, summaries and tables name it: its name ("prompt 0"), or
    "whole ctx" for a method's single whole-ctx site (site "", or unknown in a frame built by hand)."""
    return WHOLE_CTX_LABEL if is_missing(site) or str(site) == "" else str(site)


def shots_label(shots: Any) -> str:
    """Shots per class as an axis or column label: 16 -> "16", missing -> "n/a"."""
    if shots is None or pd.isna(shots):
        return MISSING_LABEL
    return str(int(shots))
