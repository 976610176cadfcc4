"""KgCoOp's knowledge-guided term (Yao et al., CVPR 2023), on the penalty axis.

`L = CE + w * (1 - mean_c cos(t_c, t_c^hand))`: t_c the prompt's text feature of class c, t_c^hand
the frozen text feature of the dataset's hand-crafted prompt (KgCoOp's templates: CoOp's, save DTD's).
The prompt's text features come from the same text pass as the step's logits, so the term costs no
extra pass through the text tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.templates import KGCOOP_TEMPLATES
from ..tensors import at_least_fp32
from . import KGCOOP, penalty_options
from .base import PenaltyPart, PenaltyTerm, TrainingStep
from .hand_crafted import hand_crafted_features


def knowledge_distance(text_features: torch.Tensor, hand_crafted: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of cos(t_c, t_c^hand); text [n_cls, D], hand-crafted [n_cls, D] normalised."""
    cosines = (F.normalize(at_least_fp32(text_features), dim=-1) * hand_crafted).sum(dim=-1)  # [n_cls]
    return 1.0 - cosines.mean()


class KgCoOpTerm(PenaltyTerm):
    """w times the distance of the prompt's text features to the hand-crafted prompt's."""

    reads_text_features = True

    def __init__(self, weight: float, hand_crafted: torch.Tensor) -> None:
        self.weight = weight
        self.hand_crafted = hand_crafted  # [n_cls, D], normalised

    def loss(self, step: TrainingStep) -> PenaltyPart:
        """The same on every rank: it depends on the prompt alone, not on the batch."""
        value = self.weight * knowledge_distance(step.text_features, self.hand_crafted)
        return PenaltyPart(value, {"kgcoop_loss": float(value.detach())})


def kgcoop_term(config, learner) -> KgCoOpTerm:
    """The run's KgCoOp term: its weight from the run's penalty options, the dataset's KgCoOp template."""
    options = penalty_options(KGCOOP, config.penalty_options)
    return KgCoOpTerm(options.kgcoop_weight, hand_crafted_features(learner, config.dataset, KGCOOP_TEMPLATES))
