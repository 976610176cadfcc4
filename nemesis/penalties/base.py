"""What a penalty gives the trainer at each step: the `PenaltyTerm` interface.

A penalty is one name on the penalty axis ("nemesis", "kgcoop", "prograd"). For a run it is
built once into a `PenaltyTerm`; at each step the trainer asks every term of the run for its part
of the loss and, after the gradients are summed over ranks, lets it edit them. Terms combine: the
parts add up, and gradient edits run in the order the run names the penalties.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainingStep:
    """What a penalty may read at one optimisation step."""

    learner: Any  # the PromptMethod being trained
    images: torch.Tensor  # [B, D] this rank's image features
    labels: torch.Tensor  # [B]
    epoch: int  # 0-based
    epochs: int
    # ctx variants [K, ...] -> samples of the whole batch (all ranks) each classifies right [K]
    count_correct: Callable[[torch.Tensor], torch.Tensor]
    random: Callable[[str], torch.Generator]  # this step's random stream for a purpose ("pan")
    logits: torch.Tensor | None = None  # [B, n_cls] this rank's prompted logits, with their graph (ProGrad)
    # [n_cls, D] the prompt's text features behind `logits`, when a term reads them (KgCoOp)
    text_features: torch.Tensor | None = None
    batch_size: int | None = None  # the whole batch over all ranks (None: this rank's `labels`)
    # sums a tensor over the ranks sharing the batch (one process: unchanged)
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor

    @property
    def whole_batch(self) -> int:
        return len(self.labels) if self.batch_size is None else self.batch_size


@dataclass
class PenaltyPart:
    """A penalty's part of one step's loss."""

    value: torch.Tensor  # scalar added to the loss; the same on every rank (the trainer counts it once)
    logs: dict[str, Any] = field(default_factory=dict)  # values for the step's metrics row ("norm_loss")


class PenaltyTerm:
    """One penalty during one run. Subclasses override what they need."""

    edits_gradients = False  # True: `after_backward` changes gradients (unscaled first under AMP)
    # True: the step carries the prompt's text features, from the pass that made the logits (the learner
    # must have `logits_and_text_features`)
    reads_text_features = False

    def loss(self, step: TrainingStep) -> PenaltyPart | None:
        """This step's part of the loss, or None when the penalty adds none."""
        return None

    def after_backward(self, learner: Any) -> None:
        """Edit the learned tensors' gradients (summed over ranks) before the optimiser steps."""
