"""Precision: the autocast policy of evaluation and training, and the half text side of `--precision fp16`.

One decision for evaluation and training (`autocast_policy`). It returns a description (`Autocast`),
so the choice can be checked without a GPU; callers enter `policy.context()`.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from .choices import Precision


@dataclass(frozen=True)
class Autocast:
    """Autocast on `device_type` in `dtype`; `dtype` None: no autocast, tensors keep their own dtypes."""

    device_type: str
    dtype: torch.dtype | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def scales_loss(self) -> bool:
        """Whether a backward pass under it needs a GradScaler: fp16's range loses small gradients."""
        return self.dtype == torch.float16

    def context(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def autocast_policy(device: torch.device | str, training: Precision | None = None) -> Autocast:
    """How code on `device` runs: autocast on CUDA only, never on the CPU.

    Evaluation and training differ on purpose, hence the `training` argument:
    - evaluation (`training=None`: scoring prompts, zero-shot, encoding image features): fp16 autocast,
      as CoOp runs CLIP in fp16 at test time, whatever precision a prompt was trained in;
    - training (`training=` the run's precision): autocast only under `amp`, in bf16 where the GPU has
      it, else in fp16 (and then the loss is scaled); `fp32` runs as is, and `fp16` holds the text tower
      and the learned tensors in fp16 itself, without autocast.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return Autocast(device.type)
    if training is None:
        return Autocast("cuda", torch.float16)
    if training is Precision.amp:
        return Autocast("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return Autocast("cuda")


def half_text_side(model: nn.Module) -> nn.Module:
    """A copy of open_clip `model` whose text side is fp16, for `--precision fp16`'s text passes.

    The text side is everything but the image tower `model.visual` (open_clip's CLIP and
    CustomTextCLIP alike): token and positional embeddings, transformer, final norm, text projection,
    attention mask and logit scale, converted as `model.half()` converts them. The image tower is
    neither copied nor converted: the copy holds the original's, fp32 and shared (training reads image
    features from the fp32 model), so the copy costs the text side's half bytes, not the whole model's.
    """
    visual = model.visual
    copied = copy.deepcopy(model, memo={id(visual): visual})  # the memo hands back the original tower
    for child in copied.children():
        if child is not visual:
            child.half()
    # The model's own tensors (positional embedding, projection, logit scale, mask), as Module.half does.
    for parameter in copied.parameters(recurse=False):
        if parameter.is_floating_point():
            parameter.data = parameter.data.half()
    for name, buffer in copied.named_buffers(recurse=False):
        if buffer.is_floating_point():
            setattr(copied, name, buffer.half())
    return copied
