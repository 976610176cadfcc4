"""Generic tensor helpers on soft prompts, shared by learners, losses, operators and reports, and the
description of where on a prompt a corruption acts (`CorruptionSite`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in fp32 (half precision is widened), or as it is when wider: fp64 stays fp64, so checks
    against references can run in double precision."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def position_norms(ctx: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """n_j = ||ctx_j||_p for each position j [M], averaged over all leading axes of ctx [..., M, W]."""
    n_positions = ctx.shape[-2]
    norms = torch.linalg.vector_norm(ctx, ord=p, dim=-1)  # [..., M]
    return norms.reshape(-1, n_positions).mean(dim=0)  # [M]


@dataclass(frozen=True)
class CorruptionSite:
    """One place where a corruption may act: the positions of one part of a learned prompt tensor.

    Learners declare theirs (`PromptMethod.corruption_sites`); sweeps run their grid at every site.
    The part is `tensor[index]` (`part`), and its positions lie on axis -2 (`POSITION_AXIS`, the M of
    [..., M, W]); an operator at position j changes row j of every leading index of the part at once.
    Examples: CoOp's ctx [M, W] or class-specific [n_cls, M, W]: one site, `index` (), so position j
    of every class; two prompts per class, ctx [N, M, W]: "prompt n" with `index` (n,), and "every
    prompt" with `index` (); IVLP's vision stack [depth, n, W]: "vision layer 3" with `tensor`
    "vision_prompts", `index` (3,), `tower` "vision" and `layer` 3.
    """

    name: str = ""  # the sweep table's `site` value; "" for a method's single, whole-ctx site
    tensor: str = "ctx"  # the learned tensor it acts on (a learner's `similarities` takes variants of it)
    index: tuple[int, ...] = ()  # leading index of the part: () all of it; (n,) prompt n of ctx [N, M, W]
    tower: str = (
        ""  # prompts inside the towers: "text" or "vision", the tower the part enters ("" for ctx-only methods)
    )
    layer: int | None = None  # ... and the layer at whose input it enters (0: the tower's input)

    POSITION_AXIS: ClassVar[int] = -2

    def __post_init__(self) -> None:
        if not all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in self.index):
            raise ValueError(f"corruption site {self.name!r}: index {self.index!r} must hold whole numbers >= 0")

    def part(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of `tensor` this site corrupts, [..., M, W] (a view)."""
        if len(self.index) > tensor.dim() - 2:
            shape = tuple(tensor.shape)
            raise ValueError(f"corruption site {self.name!r}: index {self.index} does not fit ctx {shape}")
        return tensor[self.index]


WHOLE_CTX = CorruptionSite()  # a method's single site: all of ctx
