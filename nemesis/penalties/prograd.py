"""ProGrad's prompt-aligned gradient (Zhu et al., ICCV 2023), on the penalty axis.

Zero-shot CLIP (the dataset's hand-crafted prompt, ProGrad's templates) is a frozen teacher. At each
step the gradient g_kl of the distillation term between its predictions and the prompt's,
`T^2 * mean_b sum_c -softmax(z_teacher / T)_bc * log_softmax(z / T)_bc` (ProGrad's `ProGradLoss`),
gives the direction of general knowledge; the step's gradient g (cross-entropy, and any other
penalty's part) is kept where it agrees with it, and where the two conflict (g . g_kl < 0) loses
lambda times its component along it: `g - lambda * (g . u) u`, u = g_kl / ||g_kl||, for each learned
tensor apart (Dassl.ProGrad's `prograd_backward_and_update`). The distillation term adds no loss of
its own: only its direction is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.templates import PROGRAD_TEMPLATES
from ..tensors import at_least_fp32
from . import PROGRAD, penalty_options
from .base import PenaltyPart, PenaltyTerm, TrainingStep
from .hand_crafted import hand_crafted_features


def distillation(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample distillation terms [B]: T^2 * sum_c -softmax(teacher / T) * log_softmax(logits / T)."""
    targets = F.softmax(at_least_fp32(teacher_logits) / temperature, dim=-1)
    return -(targets * F.log_softmax(at_least_fp32(logits) / temperature, dim=-1)).sum(dim=-1) * temperature**2


def projected(gradient: torch.Tensor, knowledge: torch.Tensor, strength: float) -> torch.Tensor:
    """`gradient` less `strength` times its component along `knowledge` when they conflict (negative dot
    product); unchanged otherwise, or when either is zero. Computed in fp32 at least, returned in the
    gradient's dtype."""
    g, k = at_least_fp32(gradient), at_least_fp32(knowledge)
    unit = k / torch.linalg.vector_norm(k).clamp_min(torch.finfo(k.dtype).tiny)  # 0 stays 0: no conflict
    along = (g * unit).sum()
    # A tensor condition, not a Python branch: no device sync per step.
    return torch.where(along < 0, g - strength * along * unit, g).to(gradient.dtype)


class ProGradTerm(PenaltyTerm):
    """Keeps each step's gradient from going against zero-shot CLIP's predictions."""

    edits_gradients = True

    def __init__(self, strength: float, temperature: float, teacher_text: torch.Tensor) -> None:
        self.strength = strength  # lambda
        self.temperature = temperature  # T
        self.teacher_text = teacher_text  # [n_cls, D] normalised hand-crafted text features
        self.knowledge: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # this step's g_kl per tensor

    def teacher_logits(self, learner, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot CLIP's logits [B, n_cls] of image features [B, D]: logit_scale * cos(image, hand-crafted text)."""
        scale = at_least_fp32(learner.clip.model.logit_scale.detach().exp())
        return scale * F.normalize(at_least_fp32(images.detach()), dim=-1) @ self.teacher_text.T

    def loss(self, step: TrainingStep) -> PenaltyPart:
        """Records g_kl of the whole batch (summed over ranks) for `after_backward`; adds nothing to the loss."""
        teacher = self.teacher_logits(step.learner, step.images)
        kl = distillation(step.logits, teacher, self.temperature).sum() / step.whole_batch  # this rank's share
        parameters = [step.learner.ctx, *step.learner.extra_parameters().values()]
        gradients = torch.autograd.grad(kl, parameters, retain_graph=True, allow_unused=True)
        self.knowledge = [
            (parameter, step.sum_over_ranks(gradient))
            for parameter, gradient in zip(parameters, gradients, strict=True)
            if gradient is not None
        ]
        value = step.sum_over_ranks(kl.detach().clone())
        return PenaltyPart(kl.new_zeros(()), {"prograd_kl": float(value)})

    def after_backward(self, learner) -> None:
        for parameter, knowledge in self.knowledge:
            if parameter.grad is not None:
                parameter.grad = projected(parameter.grad, knowledge, self.strength)
        self.knowledge = []


def prograd_term(config, learner) -> ProGradTerm:
    """The run's ProGrad term: lambda and T from the run's penalty options, the dataset's ProGrad template."""
    options = penalty_options(PROGRAD, config.penalty_options)
    teacher = hand_crafted_features(learner, config.dataset, PROGRAD_TEMPLATES)
    return ProGradTerm(options.prograd_lambda, options.prograd_temperature, teacher)
