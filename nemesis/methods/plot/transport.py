"""PLOT's optimal transport between an image's local features and a class's N prompts (Chen et al., ICLR 2023).

For each (image, class) pair: cosine similarities `sim` [T, N] of its T image tokens and N prompt
features, cost 1 - sim, kernel exp(-cost / eps), uniform marginals u = 1/T, v = 1/N, and Sinkhorn
from r = c = 1 (r = u / (K c), then c = v / (K^T r)); the plan T = diag(r) K diag(c) carries no
gradient, and the pair's score is sum(T * sim), which the logit scale multiplies.

The stopping rule decides the numbers (to about 1e-3 of a logit on trained CLIP): the official code
runs one Sinkhorn over a whole batch of images x classes and stops when the mean of |r - r_prev| over
that batch falls below 1e-2, or after 100 iterations (`OFFICIAL`). Here every transport of a batch
runs at once, and K prompt variants side by side each keep their own stopping decision, as K separate
official runs would. `CONVERGED` stops each pair on its own, when its r moves less than 1e-6.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import OFFICIAL

BatchSum = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the processes sharing one batch

EPSILON = 0.1  # the kernel's temperature, the official value
OFFICIAL_THRESHOLD, OFFICIAL_ITERATIONS = 1e-2, 100
CONVERGED_THRESHOLD, CONVERGED_ITERATIONS = 1e-6, 1000


def transport_plans(
    similarities: torch.Tensor, rule: str = OFFICIAL, batch_sum: BatchSum | None = None
) -> torch.Tensor:
    """Plans [K, P, T, N] for the cosine similarities [K, P, T, N] of K variants x P (image, class) pairs.

    `OFFICIAL`: each variant's P pairs are one Sinkhorn run with one stopping decision (the mean change
    of r over all its pairs); `CONVERGED`: each pair stops on its own. Computed in fp32, without gradient.
    `batch_sum`: the batch is sharded over processes (torchrun), and the official decision is taken over
    the whole batch, as one process would take it: the changes and their count are summed over them.
    """
    with torch.no_grad(), torch.autocast(similarities.device.type, enabled=False):
        kernel = torch.exp(-(1.0 - similarities.detach().float()) / EPSILON)  # [K, P, T, N]
        n_tokens, n_prompts = kernel.shape[-2:]
        u, v = 1.0 / n_tokens, 1.0 / n_prompts
        r = kernel.new_ones(kernel.shape[:-1])  # [K, P, T]
        c = kernel.new_ones((*kernel.shape[:-2], n_prompts))  # [K, P, N]
        official = rule == OFFICIAL
        threshold = OFFICIAL_THRESHOLD if official else CONVERGED_THRESHOLD
        iterations = OFFICIAL_ITERATIONS if official else CONVERGED_ITERATIONS
        # Which runs still iterate: one per variant (official), one per pair (converged).
        running = torch.ones(kernel.shape[:1] if official else kernel.shape[:2], dtype=torch.bool, device=kernel.device)
        for _ in range(iterations):
            new_r = u / (kernel @ c.unsqueeze(-1)).squeeze(-1)  # [K, P, T]
            new_c = v / (kernel.transpose(-1, -2) @ new_r.unsqueeze(-1)).squeeze(-1)  # [K, P, N]
            change = (new_r - r).abs()
            change = _batch_mean(change, batch_sum) if official else change.amax(dim=2)  # [K] or [K, P]
            keep = running.reshape((*running.shape, *(1,) * (r.dim() - running.dim())))
            r, c = torch.where(keep, new_r, r), torch.where(keep, new_c, c)
            running = running & ~(change < threshold)
            if not bool(running.any()):  # the one host synchronisation per iteration, as the official loop's
                break
        return r.unsqueeze(-1) * kernel * c.unsqueeze(-2)  # diag(r) K diag(c)


def _batch_mean(change: torch.Tensor, batch_sum: BatchSum | None) -> torch.Tensor:
    """Mean over pairs and tokens [K] of |r - r_prev| [K, P, T], over the whole batch when it is sharded."""
    if batch_sum is None:
        return change.mean(dim=(1, 2))
    totals = torch.cat([change.sum(dim=(1, 2)), change.new_tensor([change[0].numel()])])  # [K + 1]
    totals = batch_sum(totals)
    return totals[:-1] / totals[-1]


def transport_scores(
    similarities: torch.Tensor, rule: str = OFFICIAL, batch_sum: BatchSum | None = None
) -> torch.Tensor:
    """sum(T * sim) [K, P] for similarities [K, P, T, N]; gradients flow through `sim`, not the plan."""
    plans = transport_plans(similarities, rule, batch_sum)
    return (plans * similarities.float()).sum(dim=(-2, -1))
