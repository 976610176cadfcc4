"""One CoOp training step on ViT-B-32, 100 classes: full 77-token text pass vs the toolkit's encoder.

A step is the text pass of all 100 prompts, the logits of a batch of image features, the
cross-entropy, its backward pass to ctx and one SGD update. Three ways start from the same ctx in
this one process: the full 77-token pass, whole prompts cut after the last end-of-text token, and
the toolkit's encoder (cut, with [SOS] + ctx run once and its cached keys and values shared by
every class, gradients flowing back through them). The script checks all give the same loss and
update, then prints seconds per step and, as its last line, `ratio: <full / toolkit's encoder>`.
Seconds are CPU seconds of one thread (torch on one thread), so other work on a shared machine
does not distort them.
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
WAYS = {"full": (False, False), "cut": (True, False), "shared prefix": (True, True)}  # (cut, share_prefix)


def training_step(learner: PromptLearner, start: torch.Tensor, images, labels, way: str):
    """Loss and updated ctx of one SGD step from ctx = `start`."""
    cut, learner.share_prefix = WAYS[way]
    with torch.no_grad():
        learner.ctx.copy_(start)
    optimizer = torch.optim.SGD([learner.ctx], lr=0.002, momentum=0.9, weight_decay=5e-4)
    logits = PromptedCLIP(learner).logits(images, learner.text_features(cut=cut))  # [B, n_cls]
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), learner.ctx.detach().clone()


def seconds_per_step(learner, start, images, labels, way: str, repeats: int) -> float:
    training_step(learner, start, images, labels, way)  # warm-up
    began = time.process_time()
    for _ in range(repeats):
        training_step(learner, start, images, labels, way)
    return (time.process_time() - began) / repeats


def main(repeats: int = 2) -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    learner = PromptLearner(load_clip("ViT-B-32"), CLASSNAMES, n_ctx=16, seed=0)
    start = learner.ctx.detach().clone()
    images = torch.randn(BATCH, 512, generator=generator)  # image features [B, D]
    labels = torch.randint(len(CLASSNAMES), (BATCH,), generator=generator)
    results = {way: training_step(learner, start, images, labels, way) for way in WAYS}
    full_loss, full_ctx = results["full"]
    for way, (loss, ctx) in results.items():
        assert abs(loss - full_loss) <= 1e-5, f"losses differ: {way} {loss} vs full {full_loss}"
        update_difference = (ctx - full_ctx).abs().max().item()
        assert update_difference <= 1e-6, f"updated ctx of the {way} pass differs by {update_difference}"
    length = int(learner.pool_index.max()) + 1
    seconds = {way: seconds_per_step(learner, start, images, labels, way, repeats) for way in WAYS}
    print(f"classes: {len(CLASSNAMES)}, batch: {BATCH}, cut length: {length} of 77 tokens, "
          f"shared prefix: {1 + learner.shared_context} tokens")  # fmt: skip
    print("  ".join(f"loss {way}: {loss:.6f}" for way, (loss, _) in results.items()))
    print("   ".join(f"{way} step: {value:.3f} s" for way, value in seconds.items()))
    print(f"full / cut: {seconds['full'] / seconds['cut']:.2f}")
    print(f"ratio: {seconds['full'] / seconds['shared prefix']:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
