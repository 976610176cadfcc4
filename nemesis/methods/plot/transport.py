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

Only runs still going are iterated: stopped variants (official) leave at once, stopped pairs
(converged) once fewer than half of those held still run; most pairs stop within a few dozen
iterations and a few run for hundreds, which kept all of them iterating before. On CPU the official
variants also go a few at a time, so that each one's tensors stay near the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import OFFICIAL

BatchSum = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the processes sharing one batch

EPSILON = 0.1  # the kernel's temperature, the official value
OFFICIAL_THRESHOLD, OFFICIAL_ITERATIONS = 1e-2, 100
CONVERGED_THRESHOLD, CONVERGED_ITERATIONS = 1e-6, 1000
# On CPU the official rule's variants go a group at a time, from kernel to plan, whose tensors stay near
# the cache: every iteration reads the kernel twice, and a sweep's batch of variants is 100s of MB (17
# variants of 100 images x 100 classes at once took twice the time of one at a time). On GPU all at once.
CPU_GROUP_BYTES = 8 * 2**20
# The converged rule gathers the pairs still running once fewer than half of those held run: most pairs
# stop within a few dozen iterations, a few run for hundreds, and a gather costs about one iteration.
CONVERGED_COMPACT_BELOW = 0.5

ChangeOf = Callable[[torch.Tensor], torch.Tensor]  # |r - r_prev| [R, ..., T] -> one change per run [R]


def transport_plans(
    similarities: torch.Tensor, rule: str = OFFICIAL, batch_sum: BatchSum | None = None
) -> torch.Tensor:
    """Plans [K, P, T, N] for the cosine similarities [K, P, T, N] of K variants x P (image, class) pairs.

    `OFFICIAL`: each variant's P pairs are one Sinkhorn run with one stopping decision (the mean change
    of r over all its pairs); `CONVERGED`: each pair stops on its own. Computed in fp32, without gradient.
    `batch_sum`: the batch is sharded over processes (torchrun), and the official decision is taken over
    the whole batch, as one process would take it: the changes and their count are summed over them.
    Runs that have stopped leave the later iterations; that changes the work, not the numbers.
    """
    with torch.no_grad(), torch.autocast(similarities.device.type, enabled=False):
        similarities = similarities.detach()
        if rule == OFFICIAL:
            runs, settings = similarities, _official_settings(batch_sum)  # a run per variant
        else:
            runs, settings = similarities.flatten(0, 1), _converged_settings()  # a run per pair
        groups = _groups(runs, rule, batch_sum)
        if len(groups) == 1:
            return _plans(runs, *settings).reshape(similarities.shape)
        plans = torch.empty(runs.shape, dtype=torch.float32, device=runs.device)
        for group in groups:
            plans[group] = _plans(runs[group], *settings)
        return plans.reshape(similarities.shape)


def _official_settings(batch_sum: BatchSum | None) -> tuple[ChangeOf, float, int, float]:
    """Change of a variant's run, threshold, iterations, and when to gather: as soon as any run stops."""

    def batch_mean(change: torch.Tensor) -> torch.Tensor:
        return _batch_mean(change, batch_sum)

    return batch_mean, OFFICIAL_THRESHOLD, OFFICIAL_ITERATIONS, 1.0


def _converged_settings() -> tuple[ChangeOf, float, int, float]:
    """Change of a pair's run (its largest), threshold, iterations, and when to gather."""

    def largest(change: torch.Tensor) -> torch.Tensor:
        return change.amax(dim=-1)

    return largest, CONVERGED_THRESHOLD, CONVERGED_ITERATIONS, CONVERGED_COMPACT_BELOW


def _groups(runs: torch.Tensor, rule: str, batch_sum: BatchSum | None) -> list[slice]:
    """Groups of runs (the first dimension of [R, ..., T, N]) computed one after the other.

    Official rule on CPU: variants a group of `CPU_GROUP_BYTES` (in fp32) at a time, at least one, as
    separate runs would be. Converged rule: all pairs at once, since a group's slowest pair keeps it
    iterating and few groups pay that tail few times; its stopped pairs are gathered out instead.
    Sharded, every rank must make the same calls to `batch_sum` with the same variants: no groups by
    size, which differ between shards of unequal size (dropping stopped variants is the same on every
    rank, since their decisions are taken over the whole batch)."""
    if rule != OFFICIAL or batch_sum is not None or runs.device.type != "cpu":
        return [slice(None)]
    size = max(1, CPU_GROUP_BYTES // max(1, runs[0].numel() * 4))
    return [slice(first, first + size) for first in range(0, runs.shape[0], size)]


def _plans(
    similarities: torch.Tensor, change_of: ChangeOf, threshold: float, iterations: int, compact_below: float
) -> torch.Tensor:
    """Plans diag(r) K diag(c) [R, ..., T, N] of R runs' similarities, kernel to plan in one go, so that
    on CPU a group's tensors are still near the cache at every step."""
    kernel = torch.exp(-(1.0 - similarities.float()) / EPSILON).contiguous()
    r, c = _sinkhorn(kernel, change_of, threshold, iterations, compact_below)
    return r.unsqueeze(-1) * kernel * c.unsqueeze(-2)


def _sinkhorn(
    kernel: torch.Tensor, change_of: ChangeOf, threshold: float, iterations: int, compact_below: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r [R, ..., T] and c [R, ..., N] of R Sinkhorn runs along the kernel's first dimension [R, ..., T, N]
    from r = c = 1, a run stopping (after its update) once `change_of(|r - r_prev|)` is below `threshold`.

    Only runs still going are computed: when fewer than `compact_below` of the runs held are running,
    those are gathered into smaller tensors and the others' results written back. A run's numbers are
    those it would have alone, since every operation acts on each run separately."""
    n_tokens, n_prompts = kernel.shape[-2:]
    u, v = 1.0 / n_tokens, 1.0 / n_prompts
    r = kernel.new_ones(kernel.shape[:-1])
    c = kernel.new_ones((*kernel.shape[:-2], n_prompts))
    held = torch.arange(kernel.shape[0], device=kernel.device)  # the runs the working tensors hold
    held_kernel, held_r, held_c = kernel, r, c
    running: torch.Tensor | None = None  # over the held runs; None while all of them run
    for _ in range(iterations):
        new_r = u / (held_kernel @ held_c.unsqueeze(-1)).squeeze(-1)
        new_c = v / (held_kernel.transpose(-1, -2) @ new_r.unsqueeze(-1)).squeeze(-1)
        going = ~(change_of((new_r - held_r).abs()) < threshold)
        if running is None:
            held_r, held_c, running = new_r, new_c, going
        else:
            keep = running.reshape((*running.shape, *(1,) * (held_r.dim() - 1)))
            held_r, held_c = torch.where(keep, new_r, held_r), torch.where(keep, new_c, held_c)
            running = running & going
        count = int(running.sum())  # the one host synchronisation per iteration, as the official loop's
        if count == 0:
            break
        if count < compact_below * running.shape[0]:
            r[held], c[held] = held_r, held_c
            kept = running.nonzero().squeeze(1)
            held, held_kernel, held_r, held_c = held[kept], held_kernel[kept], held_r[kept], held_c[kept]
            running = None
    r[held], c[held] = held_r, held_c
    return r, c


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
