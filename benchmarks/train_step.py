"""One CoOp training step on ViT-B-32, 100 classes: full 77-token text pass vs cut after the last end-of-text.

A step is the text pass of all 100 prompts, the logits of a batch of image features, the
cross-entropy, its backward pass to ctx and one SGD update. Both ways start from the same ctx in
this one process; the script checks they give the same loss and update, then prints seconds per
step and, as its last line, `ratio: <full / cut>`.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nemesis import PromptedCLIP, PromptLearner, load_clip

CLASSNAMES = [f"class number {index}" for index in range(100)]
BATCH = 32


def training_step(learner: PromptLearner, start: torch.Tensor, images, labels, cut: bool):
    """Loss and updated ctx of one SGD step from ctx = `start`."""
    with torch.no_grad():
        learner.ctx.copy_(start)
    optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    logits = PromptedCLIP(learner).logits(images, learner.text_features(cut=cut))  # [B, n_cls]
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), learner.ctx.detach().clone()


def seconds_per_step(learner, start, images, labels, cut: bool, repeats: int) -> float:
    training_step(learner, start, images, labels, cut)  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        training_step(learner, start, images, labels, cut)
    return (time.perf_counter() - began) / repeats


def main(repeats: int = 2) -> None:
    generator = torch.Generator().manual_seed(0)
    learner = PromptLearner(load_clip("ViT-B-32"), CLASSNAMES, n_ctx=16, seed=0)
    start = learner.ctx.detach().clone()
    images = torch.randn(BATCH, 512, generator=generator)  # image features [B, D]
    labels = torch.randint(len(CLASSNAMES), (BATCH,), generator=generator)
    cut_loss, cut_ctx = training_step(learner, start, images, labels, cut=True)
    full_loss, full_ctx = training_step(learner, start, images, labels, cut=False)
    assert abs(cut_loss - full_loss) <= 1e-5, f"losses differ: cut {cut_loss} vs full {full_loss}"
    update_difference = (cut_ctx - full_ctx).abs().max().item()
    assert update_difference <= 1e-6, f"updated ctx differs by {update_difference}"
    length = int(learner.pool_index.max()) + 1
    full = seconds_per_step(learner, start, images, labels, cut=False, repeats=repeats)
    cut = seconds_per_step(learner, start, images, labels, cut=True, repeats=repeats)
    print(f"classes: {len(CLASSNAMES)}, batch: {BATCH}, cut length: {length} of 77 tokens")
    print(f"loss cut: {cut_loss:.6f}  full: {full_loss:.6f}  (ctx updates differ by {update_difference:.1e})")
    print(f"full step: {full:.3f} s   cut step: {cut:.3f} s")
    print(f"ratio: {full / cut:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
