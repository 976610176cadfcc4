"""The toolkit's choices as str enums, light to import so the CLI can declare its options without torch.

A bottom module (it imports no other): `nemesis.errors.choice` reads a value into one of these enums.
"""

from __future__ import annotations

import math
from enum import Enum


def nemesis_variant(beta: float, weight: float) -> str:
    """Which Nemesis a prompt was trained with, as labels say it: "PUN, weight 1", "PAN, weight 20",
    or "PUN+PAN, beta 0.5, weight 1"."""
    if float(beta) == 1.0:
        return f"PUN, weight {float(weight):g}"
    if float(beta) == 0.0:
        return f"PAN, weight {float(weight):g}"
    return f"PUN+PAN, beta {float(beta):g}, weight {float(weight):g}"


class Precision(str, Enum):
    fp32 = "fp32"
    amp = "amp"  # bf16 (or fp16 with loss scaling) autocast on CUDA; plain fp32 on the CPU
    # The official CoOp / CoCoOp / Nemesis code (Dassl's PREC "fp16"): the text tower and the learned
    # tensors held in fp16, so SGD updates them in fp16 and steps below fp16's resolution are lost.
    fp16 = "fp16"


class Activation(str, Enum):
    """The MLP activation of the CLIP towers: OpenAI's CLIP (so CoOp and Nemesis) trained with QuickGELU."""

    quickgelu = "quickgelu"
    gelu = "gelu"


class ClassPosition(str, Enum):
    end = "end"
    middle = "middle"
    front = "front"


class Norm(str, Enum):
    """The p of the per-position norm ||ctx_j||_p."""

    l1 = "1"
    l2 = "2"
    inf = "inf"

    @property
    def order(self) -> float:
        return math.inf if self is Norm.inf else float(self.value)


class Schedule(str, Enum):
    """s(e), the factor on the penalty at epoch index e."""

    constant = "constant"
    logistic = "logistic"


class VisionPromptPlacement(str, Enum):
    """Where layer-0 vision prompts enter a ViT (both without positional embedding)."""

    append = "append"  # after the patches, before ln_pre (MaPLe, IVLP, PromptSRC and their VPT)
    prepend = "prepend"  # between the class token and the patches (KMnP's VPT)
