"""Scoring prompts: predicted labels under batches of ctx variants, accuracy, macro-F1, and the result
lines CoOp prints. Shared by evaluation, training, zero-shot and the corruption sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..precision import autocast_policy


class ScoresVariants(Protocol):
    """What `predictions` needs of a learner: cosine similarities [K, B, n_cls] under K ctx variants.

    Optional: `scorer(ctx_variants)`, the same as a function of the images with the text side computed
    once (features streamed from disk come in blocks), and `image_block`, how many images must be
    scored together (PLOT's Sinkhorn runs over blocks of images)."""

    def similarities(self, image_features: torch.Tensor, ctx_variants: torch.Tensor) -> torch.Tensor: ...


Scorer = Callable[[torch.Tensor], torch.Tensor]  # image features [B, ...] -> similarities [K, B, n_cls]
# Image features read at a time when they are streamed from disk (`nemesis.data.feature_store`).
STREAM_BLOCK_BYTES = 256 * 2**20


def variant_scorer(learner: ScoresVariants, ctx_variants: torch.Tensor, site: Any = None) -> Scorer:
    """The learner's similarities under `ctx_variants` as a function of the images: its own `scorer`,
    which computes the text side once, or `similarities` called on each block. A `site` (the corruption
    site the variants differ at, of a learner whose `scores_sites` is set) says which tensor they are of."""
    if site is not None:
        return learner.scorer(ctx_variants, site)
    if _scorer_is_current(type(learner)):
        return learner.scorer(ctx_variants)
    return lambda image_features: learner.similarities(image_features, ctx_variants)


def _scorer_is_current(kind: type) -> bool:
    """Whether `kind` has a `scorer` defined where its `similarities` is or below: a subclass that
    changes `similarities` alone (a plug-in's learner) must not be scored by its parent's `scorer`."""

    def owner(name: str) -> type | None:
        return next((cls for cls in kind.__mro__ if name in cls.__dict__), None)

    scorer, similarities = owner("scorer"), owner("similarities")
    return scorer is not None and similarities is not None and issubclass(scorer, similarities)


def image_blocks(learner: ScoresVariants, features: Any) -> Iterator[torch.Tensor]:
    """The image features in the blocks evaluation scores: a tensor whole; features streamed from disk
    (`StoredFeatures`) in blocks of about `STREAM_BLOCK_BYTES`, each a whole number of the learner's
    `image_block`s, so every image is scored with the images it would be scored with in one block."""
    if isinstance(features, torch.Tensor):
        yield features
        return
    together = getattr(learner, "image_block", 1)
    yield from features.split(max(1, STREAM_BLOCK_BYTES // (features.row_bytes * together)) * together)


def predictions(
    learner: ScoresVariants, features: Any, ctx_variants: torch.Tensor, variants_per_pass: int = 32, site: Any = None
) -> torch.Tensor:
    """Predicted labels [K, N] of image features [N, ...] (a tensor, or `StoredFeatures` streamed from
    disk) under K ctx variants (of `site`'s tensor, for a learner that scores sites), without autograd.

    The logit scale is left out: a positive factor does not change the arg-max.
    """
    device = features.device
    rows = []
    with torch.inference_mode(), autocast_policy(device).context():
        for start in range(0, ctx_variants.shape[0], variants_per_pass):
            score = variant_scorer(learner, ctx_variants[start : start + variants_per_pass].to(device), site)
            rows.append(torch.cat([score(block).argmax(dim=-1) for block in image_blocks(learner, features)], dim=1))
    return torch.cat(rows)  # [K, N]


def class_logits(learner: ScoresVariants, features: Any, logit_scale: torch.Tensor) -> torch.Tensor:
    """Logits [N, n_cls] (logit scale x the learner's similarities) of the learner's own prompt on image
    features [N, ...] in their order (a tensor or `StoredFeatures`), under evaluation's precision."""
    ctx = learner.ctx.detach().unsqueeze(0).to(features.device)
    with torch.inference_mode(), autocast_policy(features.device).context():
        score = variant_scorer(learner, ctx)
        similarities = torch.cat([score(block)[0].float() for block in image_blocks(learner, features)])
    return logit_scale.detach().exp().float() * similarities  # [N, n_cls]


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
