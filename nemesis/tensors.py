"""Generic tensor helpers on soft prompts, shared by learners, losses, operators and reports."""

from __future__ import annotations

import torch


def position_norms(ctx: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """n_j = ||ctx_j||_p for each position j [M], averaged over all leading axes of ctx [..., M, W]."""
    n_positions = ctx.shape[-2]
    norms = torch.linalg.vector_norm(ctx, ord=p, dim=-1)  # [..., M]
    return norms.reshape(-1, n_positions).mean(dim=0)  # [M]
