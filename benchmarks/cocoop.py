"""A CoCoOp evaluation, 200 images x 50 classes on ViT-B-32 (random weights): ours vs CoOp's repository's way.

Ours: every (image, class) prompt row in batched text passes cut after the end-of-text token,
[SOS] + each image's context run once and shared by its class prompts (`CoCoOp.similarities`).
The slow way, as CoOp's `trainers/cocoop.py` evaluates: per image, one full 77-token text pass of
all class prompts built from that image's shifted context.

The slow way is timed on the first `--slow-images` images and scaled to all of them (it is linear
in the number of images); both ways must predict the same classes for those images. The last
line is `ratio: <theirs / ours>`.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nemesis.methods.cocoop.learner import CoCoOp, embed_dim_of
from nemesis.model.backbone import load_clip

CLASSNAMES = [f"class number {index}" for index in range(50)]


def their_predictions(learner: CoCoOp, features: torch.Tensor) -> torch.Tensor:
    """Per image: ctx + meta_net(f), then one full-length text pass of every class prompt."""
    prompts, classes = learner.prompts, torch.arange(learner.n_classes)
    predicted = []
    for feature in features:
        shifted = learner.shifted_ctx(feature.unsqueeze(0))  # [1, M, W]
        embeddings = prompts.prompt_embeddings(shifted.expand(learner.n_classes, -1, -1), classes)  # [n_cls, 77, W]
        text = prompts.encoder(embeddings, prompts.pool_index, cut=False)  # [n_cls, D], all 77 tokens
        logits = F.normalize(feature, dim=-1) @ F.normalize(text, dim=-1).T  # [n_cls]
        predicted.append(logits.argmax())
    return torch.stack(predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--slow-images", type=int, default=10, help="images the slow way is timed on")
    args = parser.parse_args()
    torch.manual_seed(0)
    clip = load_clip("ViT-B-32")
    learner = CoCoOp(clip, CLASSNAMES, ctx_init="a photo of a", seed=0)
    with torch.no_grad():  # a trained-looking meta-net: a shift of the same order as the context
        for parameter in learner.meta_net.parameters():
            parameter.normal_(0, 0.05)
    features = torch.randn(args.images, embed_dim_of(clip), generator=torch.Generator().manual_seed(1))
    ctx = learner.ctx.detach().unsqueeze(0)  # [1, M, W]

    with torch.inference_mode():
        learner.similarities(features[:2], ctx)  # warm-up
        start = time.perf_counter()
        ours = learner.similarities(features, ctx)[0].argmax(dim=-1)  # [N]
        our_seconds = time.perf_counter() - start

        subset = features[: args.slow_images]
        their_predictions(learner, subset[:1])  # warm-up
        start = time.perf_counter()
        theirs = their_predictions(learner, subset)
        their_seconds = (time.perf_counter() - start) * args.images / len(subset)

    agree = bool(torch.equal(ours[: len(subset)], theirs))
    assert agree, "the two ways predict different classes"
    rows = args.images * len(CLASSNAMES)
    length = int(learner.prompts.pool_index.max()) + 1
    print(f"{args.images} images x {len(CLASSNAMES)} classes = {rows} prompt rows, cut at {length} of 77 tokens")
    print(f"ours: {our_seconds:.2f} s for all images (batched, chunked, cut)")
    print(f"theirs: {their_seconds:.2f} s (per image full pass, timed on {len(subset)} images and scaled)")
    print(f"same predictions on the {len(subset)} timed images: {agree}")
    print(f"ratio: {their_seconds / our_seconds:.2f}")


if __name__ == "__main__":
    main()
