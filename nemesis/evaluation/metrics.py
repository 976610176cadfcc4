"""Scoring prompts: predicted labels under batches of ctx variants, accuracy, macro-F1, and the result
lines CoOp prints. Shared by evaluation, training, zero-shot and the corruption sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..precision import autocast_policy


class ScoresVariants(Protocol):
    """What `predictions` needs of a learner: cosine similarities [K, B, n_cls] under K ctx variants."""

    def similarities(self, image_features: torch.Tensor, ctx_variants: torch.Tensor) -> torch.Tensor: ...


def predictions(
    learner: ScoresVariants, features: torch.Tensor, ctx_variants: torch.Tensor, variants_per_pass: int = 32
) -> torch.Tensor:
    """Predicted labels [K, N] of image features [N, D] under K ctx variants, without autograd.

    The logit scale is left out: a positive factor does not change the arg-max.
    """
    device = features.device
    rows = []
    with torch.inference_mode(), autocast_policy(device).context():
        for start in range(0, ctx_variants.shape[0], variants_per_pass):
            chunk = ctx_variants[start : start + variants_per_pass].to(device)
            rows.append(learner.similarities(features, chunk).argmax(dim=-1))  # [k, N]
    return torch.cat(rows)


def class_logits(learner: ScoresVariants, features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Logits [N, n_cls] (logit scale x the learner's similarities) of the learner's own prompt on image
    features [N, ...] in their order, under evaluation's precision."""
    ctx = learner.ctx.detach().unsqueeze(0).to(features.device)
    with torch.inference_mode(), autocast_policy(features.device).context():
        similarities = learner.similarities(features, ctx)[0].float()  # [N, n_cls]
    return logit_scale.detach().exp().float() * similarities


def macro_f1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro-F1 in percent over the classes present in `labels` (Dassl's evaluator does the same)."""
    scores = []
    for label in torch.unique(labels):
        true_positive = ((predicted == label) & (labels == label)).sum().item()
        false_positive = ((predicted == label) & (labels != label)).sum().item()
        false_negative = ((predicted != label) & (labels == label)).sum().item()
        denominator = 2 * true_positive + false_positive + false_negative
        scores.append(2 * true_positive / denominator if denominator else 0.0)
    return 100.0 * sum(scores) / len(scores)


def coop_result_block(total: int, correct: int, macro_f1_percent: float) -> str:
    """The result lines CoOp prints after testing, so existing parsing scripts keep working."""
    accuracy = 100.0 * correct / total
    return (
        "=> result\n"
        f"* total: {total:,}\n"
        f"* correct: {correct:,}\n"
        f"* accuracy: {accuracy:.1f}%\n"
        f"* error: {100.0 - accuracy:.1f}%\n"
        f"* macro_f1: {macro_f1_percent:.1f}%"
    )


@dataclass
class EvaluationResult:
    n: int
    correct: int
    accuracy: float  # percent
    macro_f1: float  # percent
    source: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """One JSON Lines row of `nemesis eval --out` (the analysis package reads these)."""
        return {"kind": "eval", **self.source, "n": self.n, "accuracy": self.accuracy, "macro_f1": self.macro_f1}

    def result_block(self) -> str:
        return coop_result_block(self.n, self.correct, self.macro_f1)


BASE_TO_NEW = ("base", "new")
