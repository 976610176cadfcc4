"""Corruption operators: pure functions that change one context position of a prompt.

Every operator has the same signature, `(ctx, position, factor, noise_seed) -> corrupted ctx`,
and works on unified ctx [M, W] and class-specific ctx [n_cls, M, W] alike (class-specific:
position j of every class). Adding an operator is one function and one line in `OPERATORS`.
A cell's corruption site (`nemesis.methods.protocol.CorruptionSite`) picks the part of ctx the
operator gets (`corrupt_ctx`): all of it, or e.g. prompt n of ctx [N, M, W].
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nemesis.tensors import CorruptionSite, position_norms

ORIGINAL = "original"  # the uncorrupted prompt: one such cell per checkpoint

# (ctx [..., M, W], position j, factor, noise seed) -> new ctx of the same shape; the input is not changed.
OperatorFunction = Callable[[torch.Tensor, int, float, int], torch.Tensor]


@dataclass(frozen=True)
class Operator:
    apply: OperatorFunction
    factor_name: str  # what the factor is called in DESIGN section 5 and in error messages
    seeded: bool  # whether the noise seed changes the result (only those cells carry a noise seed)


def rescale(ctx: torch.Tensor, position: int, factor: float, noise_seed: int) -> torch.Tensor:
    """RESCALE(tau): ctx_j <- tau * ctx_j."""
    corrupted = ctx.clone()
    corrupted[..., position, :] = ctx[..., position, :] * factor
    return corrupted


def replacement_noise(width: int, sigma: float, noise_seed: int, position: int) -> torch.Tensor:
    """eps ~ N(0, sigma^2 I) of size [width], fixed by (noise_seed, position) alone.

    The generator is seeded from those two numbers only, so a cell draws the same eps whether it
    is evaluated alone or in a batch (I4), on any device. Different sigmas scale the same draw.
    """
    if sigma == 0:
        return torch.zeros(width)
    digest = hashlib.sha256(f"replace:{noise_seed}:{position}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(width, generator=generator) * sigma


def replace(ctx: torch.Tensor, position: int, factor: float, noise_seed: int) -> torch.Tensor:
    """REPLACE(sigma, seed): ctx_j <- eps; class-specific ctx: the same eps for every class at position j."""
    corrupted = ctx.clone()
    noise = replacement_noise(ctx.shape[-1], factor, noise_seed, position).to(ctx.device, ctx.dtype)
    corrupted[..., position, :] = noise  # broadcasts over the class dimension of class-specific ctx
    return corrupted


OPERATORS: dict[str, Operator] = {
    "rescale": Operator(rescale, factor_name="tau", seeded=False),
    "replace": Operator(replace, factor_name="sigma", seeded=True),
}


def corrupt_ctx(ctx: torch.Tensor, cell) -> torch.Tensor:
    """ctx after one cell's corruption (a `Cell`: op, position, factor, noise_seed, site); original: ctx itself.

    The operator gets the cell site's part of ctx; the rest of ctx is kept.
    """
    if cell.op == ORIGINAL:
        return ctx
    noise_seed = 0 if cell.noise_seed is None else cell.noise_seed
    site = cell.site
    corrupted = OPERATORS[cell.op].apply(site.part(ctx), cell.position, cell.factor, noise_seed)
    if not site.index:  # the whole of ctx
        return corrupted
    whole = ctx.clone()
    whole[site.index] = corrupted
    return whole


def corrupted_variants(ctx: torch.Tensor, cells: Sequence) -> torch.Tensor:
    """A batch [K, *ctx.shape] of ctx variants, one per cell (with op, position, factor, noise_seed)."""
    return torch.stack([corrupt_ctx(ctx, cell) for cell in cells])


def position_norm(ctx: torch.Tensor, position: int, site: CorruptionSite | None = None) -> float:
    """L2 norm of context position `position` of `site`'s part of ctx (None: all of ctx); the mean over
    the part's leading axes (class-specific ctx: over classes)."""
    part = ctx if site is None else site.part(ctx)
    return float(position_norms(part, 2.0)[position])
