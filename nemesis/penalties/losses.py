"""Nemesis's norm penalties on soft prompts (DESIGN section 5).

`L = CE + s(e) * A * (beta * PUN + (1 - beta) * PAN)` with n_j = ||ctx_j||_p per position j:

- PUN penalises every position alike: mean_j n_j.
- PAN penalises only the positions where a pre-inference step finds that shrinking the vector
  helps: NP random positions are rescaled by CW one at a time, the current batch is classified
  with each copy and with the original (no gradients), and a_j = 1 when copy j gets strictly more
  samples right. PAN = sum_j a_j n_j / max(1, sum_j a_j).

Each penalty is a function `(ctx, PenaltyInputs) -> Penalty` registered in `NORM_PENALTIES`; adding
one is one function and one line. ctx may have any leading shape `[..., M, W]` (unified,
class-specific, or several prompts per class as PLOT has): norms are averaged over everything
but the position axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..choices import Schedule
from ..errors import NemesisError, choice
from ..tensors import position_norms  # re-exported: corrupt and the CLI import it from here
from . import LOGISTIC_RATE, NemesisConfig
from .base import PenaltyPart, PenaltyTerm, TrainingStep

# Classifies ctx variants [K, *ctx.shape] on the current batch: number of samples right per variant [K].
CountCorrect = Callable[[torch.Tensor], torch.Tensor]


def schedule_weight(schedule: Schedule | str, epoch: int, epochs: int, rate: float = LOGISTIC_RATE) -> float:
    """s(e): 1 for `constant`; `logistic`: 1 - 1 / (1 + exp(-rate * (e - E / 2))), e the 0-based epoch."""
    schedule = choice(Schedule, schedule, "schedule")
    if schedule is Schedule.constant:
        return 1.0
    x = -rate * (epoch - epochs / 2)
    # 1 - 1 / (1 + exp(x)) == 1 / (1 + exp(-x)) == exp(x) / (1 + exp(x)): each form where it cannot overflow.
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass
class PenaltyInputs:
    """What a penalty may use besides ctx. PAN needs `count_correct` (and a generator for reproducibility)."""

    p: float = 2.0
    positions: int = 1  # NP: positions PAN tries per step
    corrupt_weight: float = 0.5  # CW: the factor PAN rescales a tried position by
    count_correct: CountCorrect | None = None
    generator: torch.Generator | None = None
    # The learner's mean norm over every prompt it has (prompts in both towers: `mean_prompt_norm(p)`), which
    # PUN takes instead of ctx's when given; PAN still rescales ctx's positions.
    mean_norm: Callable[[float], torch.Tensor] | None = None


@dataclass
class Penalty:
    value: torch.Tensor  # scalar, differentiable with respect to ctx
    alpha: torch.Tensor  # [M] 1.0 where the penalty acts on position j, else 0.0


def pun(ctx: torch.Tensor, inputs: PenaltyInputs) -> Penalty:
    """Position-uniform normalisation: the mean of n_j over all M positions (or the learner's mean norm)."""
    norms = position_norms(ctx, inputs.p)
    value = norms.mean() if inputs.mean_norm is None else inputs.mean_norm(inputs.p)
    return Penalty(value, torch.ones_like(norms.detach()))


def pan_alpha(ctx: torch.Tensor, inputs: PenaltyInputs) -> torch.Tensor:
    """a_j [M]: 1 where rescaling position j by CW classifies strictly more batch samples right."""
    if inputs.count_correct is None:
        raise NemesisError("PAN needs the current batch to classify ctx variants (count_correct)")
    n_positions = ctx.shape[-2]
    if not 1 <= inputs.positions <= n_positions:
        raise NemesisError(f"PAN positions must be between 1 and n_ctx = {n_positions}, got {inputs.positions}")
    picked = torch.randperm(n_positions, generator=inputs.generator)[: inputs.positions]
    with torch.no_grad():
        original = ctx.detach()
        variants = original.unsqueeze(0).repeat(1 + len(picked), *([1] * original.dim()))  # [1 + NP, ..., M, W]
        for copy, position in enumerate(picked.tolist(), start=1):
            variants[copy, ..., position, :] *= inputs.corrupt_weight
        correct = inputs.count_correct(variants).cpu()  # [1 + NP], row 0 the original
    alpha = torch.zeros(n_positions)
    alpha[picked] = (correct[1:] > correct[0]).float()
    return alpha.to(ctx.device)


def pan(ctx: torch.Tensor, inputs: PenaltyInputs) -> Penalty:
    """Position-aware normalisation: sum_j a_j n_j / max(1, sum_j a_j)."""
    alpha = pan_alpha(ctx, inputs)
    norms = position_norms(ctx, inputs.p)
    return Penalty((alpha * norms).sum() / alpha.sum().clamp(min=1.0), alpha)


Penalize = Callable[[torch.Tensor, PenaltyInputs], Penalty]
NORM_PENALTIES: dict[str, Penalize] = {"pun": pun, "pan": pan}


@dataclass
class NormLoss:
    value: torch.Tensor  # s(e) * sum_k share_k * penalty_k (shares include A), to add to the cross-entropy
    alpha: torch.Tensor  # [M] PAN's a_j (zeros when PAN is not computed)
    schedule: float  # s(e)
    terms: dict[str, float]  # each computed penalty, unweighted


def norm_loss(
    ctx: torch.Tensor,
    config: NemesisConfig,
    epoch: int,
    epochs: int,
    count_correct: CountCorrect | None = None,
    generator: torch.Generator | None = None,
    mean_norm: Callable[[float], torch.Tensor] | None = None,
) -> NormLoss:
    """The penalty part of L at 0-based epoch index `epoch` of `epochs`."""
    inputs = PenaltyInputs(
        p=config.norm.order,
        positions=config.positions,
        corrupt_weight=config.corrupt_weight,
        count_correct=count_correct,
        generator=generator,
        mean_norm=mean_norm,
    )
    factor = schedule_weight(config.schedule, epoch, epochs, config.rate)
    value = ctx.new_zeros(())
    alpha = torch.zeros(ctx.shape[-2], device=ctx.device)
    terms = {}
    for name, share in config.shares().items():
        if share == 0.0:
            continue
        penalty = NORM_PENALTIES[name](ctx, inputs)
        value = value + share * penalty.value
        terms[name] = float(penalty.value.detach())
        if name == "pan":
            alpha = penalty.alpha
    return NormLoss(factor * value, alpha, factor, terms)


class NemesisTerm(PenaltyTerm):
    """Nemesis on the penalty axis: each step adds `norm_loss` (PUN and PAN on the learner's ctx)."""

    def __init__(self, config: NemesisConfig) -> None:
        self.config = config

    def loss(self, step: TrainingStep) -> PenaltyPart:
        """L = CE + s(e) * A * (beta * PUN + (1 - beta) * PAN): this is the part after CE (PAN's A
        replaced by `pan_weight` when set), times the learner's `norm_penalty_factor` if it has one. PUN
        takes the learner's `mean_prompt_norm` when it has prompts besides ctx (both towers)."""
        learner = step.learner
        mean_norm = getattr(learner, "mean_prompt_norm", None)
        penalty = norm_loss(
            learner.ctx, self.config, step.epoch, step.epochs, step.count_correct, step.random("pan"), mean_norm
        )
        value = penalty.value * getattr(step.learner, "norm_penalty_factor", 1.0)
        return PenaltyPart(value, {"norm_loss": float(value.detach()), "alpha": penalty.alpha.tolist()})


def nemesis_term(config, learner) -> NemesisTerm:
    """The run's Nemesis term, from the training config's Nemesis options."""
    return NemesisTerm(config.nemesis_config())
