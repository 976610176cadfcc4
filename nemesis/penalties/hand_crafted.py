"""The text features of a dataset's hand-crafted prompt, the zero-shot knowledge KgCoOp and ProGrad keep.

Computed once per run from the learner's own frozen CLIP (`encode_text` of the template filled with
each class name), without gradients: KgCoOp pulls the prompt's text features towards them, and
ProGrad's zero-shot teacher classifies with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.templates import template_for
from ..tensors import at_least_fp32

TEXT_CHUNK = 256  # prompts per text pass: ImageNet's 1000 classes in a few passes


def hand_crafted_features(learner, dataset: str, templates: dict[str, str]) -> torch.Tensor:
    """Normalised text features [n_cls, D] of the dataset's template in `templates` for each of the
    learner's class names."""
    template = template_for(dataset, templates)
    return prompt_features(learner.clip, [template.format(name) for name in learner.classnames])


def prompt_features(clip, texts: list[str]) -> torch.Tensor:
    """Normalised text features [len(texts), D] of plain prompts by the frozen CLIP's `encode_text`, without
    gradients, `TEXT_CHUNK` prompts a pass (VPT's fixed text side too)."""
    device = clip.model.logit_scale.device
    with torch.no_grad():
        chunks = [
            at_least_fp32(clip.model.encode_text(clip.tokenizer(texts[start : start + TEXT_CHUNK]).to(device)))
            for start in range(0, len(texts), TEXT_CHUNK)
        ]
    return F.normalize(torch.cat(chunks), dim=-1)
