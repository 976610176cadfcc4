"""A PLOT corruption sweep, RN50 (random weights), 100 classes, 500 images: ours vs the official way per cell.

Setting: RN50 with random weights, a random PLOT ctx [4, 16, 512] (N(0, 0.02), the official init), 100
ImageNet-like class names, 500 random images at 224 px (labels: image i is class i mod 100), and 24
corrupted cells (RESCALE 0.001, 0.5, 2, 10 and REPLACE sigma 0, 0.1, 0.5, 1 at positions 0, 7 and 15,
each scaling or replacing that position in all 4 prompts at once), plus the original cell. A sweep
users run has far more cells (the default grid, hundreds a prompt); the ratio at exactly 16 corrupted
cells is printed too, from the same measurements (ours: its encoding plus 17 of its cells at its
measured cost a cell).

- Ours: the images' local features [500, 50, 1024] encoded once (as the feature cache does), then
  `evaluate_cells` over all cells: ctx variants side by side, their 4 x 100 prompts in shared-prefix
  text passes, one Sinkhorn run per 100 images for every variant at once (each its own stopping rule).
- The official way, per cell, written out here: load the checkpoint (a copy of ctx, corrupted), then
  for each test batch of 100 images, as PLOT's `CustomCLIP.forward` does: encode the batch through the
  image tower to its 50 local tokens, run the full 77-token text pass of all N x n_cls prompts, and one
  Sinkhorn over the batch's 100 x n_cls pairs with the official stopping rule (mean |r - r_prev| < 1e-2
  or 100 iterations), a plain loop. It is timed on `--official-cells` corrupted cells and scaled to
  the 24 corrupted ones (a cell's cost does not depend on which cell it is; the original cell, which
  ours runs too, is not counted for it); both ways must predict the same class for every image on
  the cells it ran, and the sweep's correct flags there must be the official predictions'.

Beside it, the Sinkhorn alone on the same similarities, plans checked equal (<= 1e-6): with the
official rule, every variant's run of one test batch at once (`transport_plans`, each variant its own
stopping decision) against one plain official run per variant, as separate evaluations do; with the
per-pair converged rule (the one under which grouping pairs cannot change the plans), every pair and
variant at once against one plain Sinkhorn per image over its n_cls pairs, on `--sinkhorn-images`.
Then the peak memory of a sweep at 1,000 classes (3 cells, random local features of 200 images): in
a fresh process, the peak resident set size (VmHWM) above the level after the model, learner and
features are set up.

All times are CPU seconds of one thread (`torch.set_num_threads(1)`, `time.process_time`), so other
work on the machine does not distort them. The last line is `ratio: <official / ours>`, ours
including its one image encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from support.baseline import imagenet_like_classnames, peak_resident_bytes, resident_bytes

from corrupt.engine import evaluate_cells
from corrupt.grid import parse_grid
from corrupt.operators import corrupt_ctx
from nemesis import load_clip
from nemesis.evaluation.evaluate import EvaluationSetup
from nemesis.methods.plot import CONVERGED, OFFICIAL
from nemesis.methods.plot.learner import PLOTLearner
from nemesis.methods.plot.transport import transport_plans
from nemesis.model.local_features import local_image_features

MODEL = "RN50"
N_CLASSES = 100
N_PROMPTS, N_CTX = 4, 16
TEST_BATCH = 100  # Dassl's test batch in the official configs: one Sinkhorn run per 100 images
EPSILON, THRESHOLD, MAX_ITERATIONS = 0.1, 1e-2, 100  # the official Sinkhorn's settings
GRID = {"rescale": "0.001,0.5,2,10", "replace": "0,0.1,0.5,1", "positions": "0,7,15"}
FEWER_CELLS = 16  # the "at least 16 cells": the ratio there is printed beside the grid's
MEMORY_GRID = {"rescale": "0.001", "replace": "1", "positions": "15"}  # 2 corrupted cells + the original
CONVERGED_THRESHOLD, CONVERGED_ITERATIONS = 1e-6, 1000  # the per-pair rule of the Sinkhorn-alone comparison


def setting(n_classes: int) -> tuple:
    """The backbone, the PLOT ctx and its learner at `n_classes` ImageNet-like class names."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    backbone = load_clip(MODEL, pretrained=None)
    ctx = torch.randn(N_PROMPTS, N_CTX, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    learner = PLOTLearner(backbone, imagenet_like_classnames(n_classes), ctx=ctx)
    return backbone, ctx, learner


def test_images(count: int) -> torch.Tensor:
    """`count` random images [count, 3, 224, 224], already normalised as the model's transform would."""
    return torch.randn(count, 3, 224, 224, generator=torch.Generator().manual_seed(1))


# --- the official way, one cell ------------------------------------------------------------------


def official_text_features(backbone, classnames: list[str], ctx: torch.Tensor) -> torch.Tensor:
    """Normalised text features [N, n_cls, D]: every prompt "X ... X <class>." run whole (77 tokens),
    ctx swapped in for the X's, as the official TextEncoder runs them."""
    model = backbone.model
    texts = [" ".join(["X"] * N_CTX + [name]) + "." for name in classnames]
    tokens = backbone.tokenizer(texts)  # [n_cls, 77]
    embeddings = model.token_embedding(tokens)  # [n_cls, 77, W]
    features = []
    for prompt in ctx:  # [M, W]: prompt n of every class
        x = embeddings.clone()
        x[:, 1 : 1 + N_CTX] = prompt
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        x = model.ln_final(x)[torch.arange(len(classnames)), tokens.argmax(dim=-1)]  # the end-of-text token
        features.append(x @ model.text_projection)
    return F.normalize(torch.stack(features), dim=-1)


def official_plans(similarity: torch.Tensor) -> torch.Tensor:
    """Plans [P, T, N] of one official Sinkhorn run over the similarities [P, T, N] of P (image, class) pairs."""
    n_pairs, n_tokens, n_prompts = similarity.shape
    kernel = torch.exp(-(1.0 - similarity) / EPSILON)
    u, v = 1.0 / n_tokens, 1.0 / n_prompts
    r = torch.ones(n_pairs, n_tokens)
    c = torch.ones(n_pairs, n_prompts)
    for _ in range(MAX_ITERATIONS):
        previous = r
        r = u / torch.bmm(kernel, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.bmm(kernel.transpose(1, 2), r.unsqueeze(-1)).squeeze(-1)
        if (r - previous).abs().mean().item() < THRESHOLD:  # the mean over the whole batch
            break
    return r.unsqueeze(-1) * kernel * c.unsqueeze(1)


def official_sinkhorn_logits(image_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """sum(T * sim) [b, n_cls] of one test batch: one Sinkhorn over all its (image, class) pairs."""
    n_images, n_tokens = image_tokens.shape[:2]
    n_prompts, n_classes = text.shape[:2]
    similarity = torch.einsum("btd,ncd->bctn", F.normalize(image_tokens, dim=-1), text)
    similarity = similarity.reshape(n_images * n_classes, n_tokens, n_prompts)  # [pairs, T, N]
    return (official_plans(similarity) * similarity).sum(dim=(1, 2)).reshape(n_images, n_classes)


def official_cell(backbone, classnames, ctx, cell, images) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """One cell as the official code evaluates a corrupted checkpoint: scores [N_img, n_cls], predictions,
    and where its CPU seconds went."""
    seconds = {"images": 0.0, "text": 0.0, "sinkhorn": 0.0}
    corrupted = corrupt_ctx(ctx.clone(), cell)  # the loaded checkpoint's ctx, corrupted
    scores = []
    for first in range(0, len(images), TEST_BATCH):
        tick = time.process_time()
        tokens = local_image_features(backbone.model, images[first : first + TEST_BATCH], MODEL).float()
        tock = time.process_time()
        text = official_text_features(backbone, classnames, corrupted)  # every forward pass, as CustomCLIP's
        tuck = time.process_time()
        scores.append(official_sinkhorn_logits(tokens, text))
        seconds["images"] += tock - tick
        seconds["text"] += tuck - tock
        seconds["sinkhorn"] += time.process_time() - tuck
    scores = torch.cat(scores)
    return scores, scores.argmax(dim=-1), seconds


# --- the Sinkhorn alone: batched vs one image at a time -------------------------------------------


def per_image_plans(similarity: torch.Tensor) -> torch.Tensor:
    """Plans [K, P, T, N] of similarities [K, B x n_cls, T, N], one plain Sinkhorn per (variant, image)
    over that image's n_cls pairs, each pair stopping on its own (the converged rule)."""
    n_variants, n_pairs, n_tokens, n_prompts = similarity.shape
    plans = torch.empty_like(similarity)
    for k in range(n_variants):
        for first in range(0, n_pairs, N_CLASSES):
            pairs = slice(first, first + N_CLASSES)
            kernel = torch.exp(-(1.0 - similarity[k, pairs]) / EPSILON)  # [n_cls, T, N]
            r = torch.ones(kernel.shape[0], n_tokens)
            c = torch.ones(kernel.shape[0], n_prompts)
            running = torch.ones(kernel.shape[0], dtype=torch.bool)
            for _ in range(CONVERGED_ITERATIONS):
                new_r = (1.0 / n_tokens) / torch.bmm(kernel, c.unsqueeze(-1)).squeeze(-1)
                new_c = (1.0 / n_prompts) / torch.bmm(kernel.transpose(1, 2), new_r.unsqueeze(-1)).squeeze(-1)
                change = (new_r - r).abs().amax(dim=1)
                r = torch.where(running.unsqueeze(1), new_r, r)
                c = torch.where(running.unsqueeze(1), new_c, c)
                running = running & (change >= CONVERGED_THRESHOLD)
                if not running.any():
                    break
            plans[k, pairs] = r.unsqueeze(-1) * kernel * c.unsqueeze(1)
    return plans


def batch_similarities(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [K, B x n_cls, T, N] of local features [B, T, D] and text [K, N, n_cls, D]."""
    similarity = torch.einsum("btd,kncd->kbctn", F.normalize(features, dim=-1), text)
    return similarity.reshape(len(text), -1, *similarity.shape[-2:]).contiguous()


def timed(function, *arguments) -> tuple[torch.Tensor, float]:
    start = time.process_time()
    result = function(*arguments)
    return result, time.process_time() - start


def sinkhorn_alone(learner: PLOTLearner, features: torch.Tensor, variants: torch.Tensor, converged_images: int) -> dict:
    """Both comparisons of the Sinkhorn alone: seconds of each way and the largest plan difference.

    Official rule, one test batch: every variant's run at once (`transport_plans`) against one plain
    official run per variant, as separate official evaluations do. Converged rule, the first
    `converged_images` images: every pair and variant at once against one plain Sinkhorn per image.
    """
    with torch.inference_mode():
        text = learner.prompt_features(variants)  # [K, N, n_cls, D]
        similarity = batch_similarities(features[:TEST_BATCH], text)
        batched, batched_seconds = timed(transport_plans, similarity, OFFICIAL)
        looped, looped_seconds = timed(lambda: torch.stack([official_plans(part) for part in similarity]))
        official = {"batched": batched_seconds, "looped": looped_seconds, "difference": _largest(batched, looped)}
        similarity = batch_similarities(features[:converged_images], text)
        batched, batched_seconds = timed(transport_plans, similarity, CONVERGED)
        looped, looped_seconds = timed(per_image_plans, similarity)
        converged = {"batched": batched_seconds, "looped": looped_seconds, "difference": _largest(batched, looped)}
    return {"official": official, "converged": converged}


def _largest(batched: torch.Tensor, looped: torch.Tensor) -> float:
    difference = (batched - looped).abs().max().item()
    assert difference <= 1e-6, f"the batched and looped Sinkhorn plans differ by {difference}"
    return difference


# --- peak memory at 1,000 classes, in its own process ---------------------------------------------


def measure_memory(n_classes: int, images: int) -> dict:
    """Peak resident memory above the set-up of a sweep of `MEMORY_GRID`'s cells at `n_classes`."""
    backbone, ctx, learner = setting(n_classes)
    # Local features as the cache holds them; random ones, since their values do not change the memory.
    features = torch.randn(images, 50, 1024, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(images) % n_classes
    cells = parse_grid(**MEMORY_GRID).cells(N_CTX)
    before = resident_bytes()
    start = time.process_time()
    evaluate_cells(EvaluationSetup(backbone, None, learner, features, labels, {}), ctx, cells)
    seconds = time.process_time() - start
    peak = peak_resident_bytes() - before
    return {"peak": peak, "cells": len(cells), "seconds": seconds}


def memory_in_process(n_classes: int, images: int) -> dict:
    command = [sys.executable, __file__, "--memory", str(n_classes), "--memory-images", str(images)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


# --- the run ------------------------------------------------------------------------------------


def fewer_cells_line(encode_seconds: float, ours_per_cell: float, official_per_cell: float) -> str:
    """The ratio at `FEWER_CELLS` corrupted cells from the same measurements: ours pays its one image
    encoding whatever the cell count, so fewer cells lower the ratio; both ways' cells cost alike."""
    ours = encode_seconds + ours_per_cell * (FEWER_CELLS + 1)  # the original cell too, as ours runs it
    official = official_per_cell * FEWER_CELLS
    return (
        f"at {FEWER_CELLS} corrupted cells (+ the original), from the same measurements: ours {ours:.1f} s "
        f"({encode_seconds:.1f} s encoding + {FEWER_CELLS + 1} cells at {ours_per_cell:.2f} s), the official "
        f"way {official:.1f} s: ratio {official / ours:.2f}"
    )


def main(n_images: int, official_cells: int, sinkhorn_images: int, memory_classes: int, memory_images: int) -> None:
    backbone, ctx, learner = setting(N_CLASSES)
    images = test_images(n_images)
    labels = torch.arange(n_images) % N_CLASSES
    cells = parse_grid(**GRID).cells(N_CTX)
    n_corrupted = len(cells) - 1
    assert n_corrupted >= FEWER_CELLS, f"the grid has {n_corrupted} corrupted cells, fewer than {FEWER_CELLS}"

    with torch.inference_mode():
        local_image_features(backbone.model, images[:2], MODEL)  # warm-up
        start = time.process_time()
        features = torch.cat([local_image_features(backbone.model, batch, MODEL) for batch in images.split(TEST_BATCH)])
        encode_seconds = time.process_time() - start
    setup = EvaluationSetup(backbone, None, learner, features.float(), labels, {})
    start = time.process_time()
    outcome = evaluate_cells(setup, ctx, cells)
    sweep_seconds = time.process_time() - start
    ours_seconds = encode_seconds + sweep_seconds

    official_timed = cells[1 : 1 + official_cells]  # corrupted cells; every cell costs the official way the same
    official_seconds, parts, difference = 0.0, {"images": 0.0, "text": 0.0, "sinkhorn": 0.0}, 0.0
    with torch.inference_mode():
        for cell in official_timed:
            start = time.process_time()
            scores, predicted, seconds = official_cell(backbone, learner.classnames, ctx, cell, images)
            official_seconds += time.process_time() - start
            for part, value in seconds.items():
                parts[part] += value
            ours = learner.similarities(setup.features, corrupt_ctx(ctx, cell).unsqueeze(0))[0]  # outside the timing
            assert torch.equal(ours.argmax(dim=-1), predicted), f"predictions differ on {cell}"
            assert torch.equal(outcome.correct[cells.index(cell)], predicted == labels), f"sweep differs on {cell}"
            difference = max(difference, (ours - scores).abs().max().item())
    n_timed = len(official_timed)
    per_cell = official_seconds / n_timed
    official_total = per_cell * n_corrupted
    parts = {part: value / n_timed for part, value in parts.items()}

    variants = torch.stack([corrupt_ctx(ctx, cell) for cell in cells])
    alone = sinkhorn_alone(learner, setup.features, variants, sinkhorn_images)
    memory = memory_in_process(memory_classes, memory_images)

    n_batches = -(-n_images // TEST_BATCH)
    once = parts["images"] + parts["text"] / n_batches + parts["sinkhorn"]  # one text pass a cell, not a batch
    lines = [
        f"{MODEL} random weights, PLOT ctx [{N_PROMPTS}, {N_CTX}, 512], {N_CLASSES} ImageNet-like classes, "
        f"{n_images} images at 224 px, {n_corrupted} corrupted cells (+ the original); CPU seconds of one thread",
        f"same predictions on the {n_timed} cell(s) the official way ran (largest score difference "
        f"{difference:.1e}, {100 * difference:.1e} at logit scale 100)",
        f"ours: {ours_seconds:.1f} s (local features of {n_images} images once: {encode_seconds:.1f} s; "
        f"evaluate_cells over {len(cells)} cells: {sweep_seconds:.1f} s, {sweep_seconds / len(cells):.2f} s a cell)",
        f"official way: {official_total:.1f} s ({per_cell:.1f} s a cell, timed on {n_timed} cell(s) and scaled to "
        f"{n_corrupted}; a cell: images {parts['images']:.1f} s, {n_batches} text passes {parts['text']:.1f} s, "
        f"Sinkhorn {parts['sinkhorn']:.1f} s)",
        f"official way with one text pass a cell instead of one a batch: {once:.1f} s a cell, ratio "
        f"{once * n_corrupted / ours_seconds:.1f}; test features cached (ours without its encoding): ratio "
        f"{official_total / sweep_seconds:.1f}",
    ]
    slow_ways = {
        OFFICIAL: (TEST_BATCH, "one plain official run per variant"),
        CONVERGED: (sinkhorn_images, "one plain Sinkhorn per image"),
    }
    for rule, (images_used, slow_way) in slow_ways.items():
        figures = alone[rule]
        lines.append(
            f"Sinkhorn alone, {rule} rule, {len(cells)} variants x {images_used} images x {N_CLASSES} classes: "
            f"all at once {figures['batched']:.2f} s vs {slow_way} {figures['looped']:.2f} s, ratio "
            f"{figures['looped'] / figures['batched']:.1f} (largest plan difference {figures['difference']:.1e})"
        )
    lines.append(
        f"peak memory of a sweep at {memory_classes} classes ({memory['cells']} cells, local features of "
        f"{memory_images} images): +{memory['peak'] / 2**20:.0f} MiB resident above the set-up "
        f"({memory['seconds']:.1f} s)"
    )
    lines.append(fewer_cells_line(encode_seconds, sweep_seconds / len(cells), per_cell))
    lines.append(f"ratio: {official_total / ours_seconds:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--official-cells", type=int, default=1, help="corrupted cells the official way is timed on")
    parser.add_argument("--sinkhorn-images", type=int, default=10, help="images of the converged-rule comparison")
    parser.add_argument("--memory-classes", type=int, default=1000)
    parser.add_argument("--memory-images", type=int, default=200)
    parser.add_argument("--memory", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.memory:
        print(json.dumps(measure_memory(arguments.memory, arguments.memory_images)))
    else:
        main(
            arguments.images,
            arguments.official_cells,
            arguments.sinkhorn_images,
            arguments.memory_classes,
            arguments.memory_images,
        )
