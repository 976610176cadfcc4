"""The zero-shot baseline: CLIP with CoOp's hand-crafted prompt per dataset, no learned context.

The templates are the ones CoOp's zero-shot trainer uses (its `CUSTOM_TEMPLATES`, in
`nemesis.data.templates`), keyed by CoOp's dataset folder names. The result is recorded like any
`nemesis eval` so `nemesis report` puts a zero-shot row (0 shots) in its few-shot table.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..constants import ZERO_SHOT_METHOD
from ..data.datasets import Dataset, load_dataset
from ..data.feature_cache import encode_split
from ..data.templates import TEMPLATES as TEMPLATES  # re-exported: tests read the zero-shot templates here
from ..data.templates import template_for
from ..model.backbone import Backbone, load_clip, resolve_device
from ..penalties import NO_PENALTY
from ..precision import autocast_policy
from .metrics import BASE_TO_NEW, EvaluationResult, macro_f1

ZERO_SHOT_LABEL = "Zero-shot CLIP"


def zero_shot_evaluate(
    model: str,
    pretrained: str | None,
    dataset: str,
    root: str | os.PathLike | None = None,
    subsample: str = "all",
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    activation: str | None = None,
) -> EvaluationResult:
    """Test accuracy of `model` with the dataset's hand-crafted prompt, from cached test features."""
    data = load_dataset(dataset, root, subsample=subsample)
    device = resolve_device(device)
    backbone = load_clip(model, pretrained, device=device, activation=activation)
    return _evaluate(backbone, data, subsample, cache_dir, device)


def zero_shot_base_to_new(
    model: str,
    pretrained: str | None,
    dataset: str,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    activation: str | None = None,
) -> list[EvaluationResult]:
    """The hand-crafted prompt on the dataset's base classes, then on its new classes (the reference
    row of a base-to-new table), with one backbone."""
    splits = [load_dataset(dataset, root, subsample=subsample) for subsample in BASE_TO_NEW]  # both checked first
    device = resolve_device(device)
    backbone = load_clip(model, pretrained, device=device, activation=activation)
    return [
        _evaluate(backbone, data, subsample, cache_dir, device)
        for data, subsample in zip(splits, BASE_TO_NEW, strict=True)
    ]


def _evaluate(
    backbone: Backbone, data: Dataset, subsample: str, cache_dir: str | os.PathLike | None, device: str
) -> EvaluationResult:
    template = template_for(data.name)
    texts = [template.format(name.replace("_", " ")) for name in data.classnames]
    features, labels = encode_split(backbone, data, "test", cache_dir=cache_dir, device=device, stream=False)
    with torch.inference_mode(), autocast_policy(device).context():
        text = F.normalize(backbone.model.encode_text(backbone.tokenizer(texts).to(device)).float(), dim=-1)
        images = F.normalize(features.to(device).float(), dim=-1)
        predicted = (images @ text.T).argmax(dim=-1).cpu()  # [N]
    correct = int((predicted == labels).sum())
    n = int(labels.numel())
    model, pretrained = backbone.name, backbone.pretrained
    source = {
        "checkpoint": f"{ZERO_SHOT_METHOD}:{model}:{pretrained}",  # one record per model and weights
        "model": model,
        "pretrained": pretrained,
        "weights_id": backbone.weights_id,
        "activation": backbone.activation.value,
        "dataset": data.name,
        "train_dataset": data.name,
        "shots": 0,
        "seed": None,
        "subsample": subsample,
        "method": ZERO_SHOT_METHOD,
        "method_label": ZERO_SHOT_LABEL,
        "penalty": NO_PENALTY,
        "prompt_config": {"template": template},
        "epoch": None,
    }
    return EvaluationResult(n, correct, 100.0 * correct / n, macro_f1(predicted, labels), source)
