"""A sweep of deep vision-prompt cells, ViT-B-16 (random weights): ours vs the whole image tower per cell.

Setting: ViT-B-16 with random weights, a VPT prompt with 8 tokens in each of its 12 image layers
(`build_learner("vpt", ...)`, the prompts made non-trivial: N(0, 1) instead of the N(0, 0.02^2) init),
10 class names, 200 random images at 224 px whose patch embeddings are computed once (what the feature
cache holds for these methods), and REPLACE sigma 0 and 1 (noise seed 0) at positions 0 and 5 of the
vision prompts of layers 0, 4 and 8: 12 corrupted cells, 4 a layer. REPLACE, not RESCALE: rescaling a
vision prompt that the next layer replaces changes nothing in pre-LN CLIP, so only REPLACE gives the
agreement check teeth.

- Ours: `corrupt.engine.evaluate_cells` on an `EvaluationSetup` over the cached patch embeddings; the
  learner is told each cell's site, computes once per site the hidden states entering the site's layer
  under the prompt's own stack, and runs only the blocks from that layer on, the site's variants side by
  side. Per corrupted site at layer l: l blocks once, then 12 - l blocks per cell.
- The slow way, per cell: the corrupted stack through the whole image tower (`image_features` from
  layer 0, the patch embeddings to the pooled features), then the similarities to the same text
  features. It is timed on `--slow-cells` cells of each layer (a cell's cost does not depend on which
  cell it is) and scaled to the 12.

Ours is run once per layer with the labels set to the slow way's predictions for that layer's first
cell, so ours must call every sample of that cell correct: both ways predict the same class for every
image on every cell the slow way ran. Layer reuse alone bounds the ratio at 36 / 24 = 1.5 for layers
0, 4 and 8 with many cells a layer; with 4 cells a layer, 144 / (96 + 12) = 1.33 blocks.

Times are CPU seconds of the process (`time.process_time`, every thread), so other work on the
machine distorts them less than wall clock; wall seconds are printed beside them. Both ways run on
`--threads` threads (default 1): with two, how the variants side by side share them moved the ratio
by +-0.1 from run to run. The peak resident
set size (VmHWM) above the level after the set-up is printed after each way. The last line is
`ratio: <slow / ours>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from support.baseline import peak_resident_bytes, resident_bytes

from corrupt.engine import evaluate_cells
from corrupt.grid import Cell
from corrupt.operators import corrupt_ctx
from nemesis import load_clip
from nemesis.evaluation.evaluate import EvaluationSetup
from nemesis.methods.protocol import build_learner
from nemesis.model.vision_prompts import patch_embeddings

MODEL = "ViT-B-16"
COLOURS = ("red", "orange", "yellow", "lime", "green", "teal", "blue", "violet", "pink", "brown")
CLASSNAMES = [f"{colour} object" for colour in COLOURS]
N_IMAGES = 200
N_CTX = 8
LAYERS = (0, 4, 8)
POSITIONS = (0, 5)
SIGMAS = (0.0, 1.0)
MIB = 2**20
CHECKED = 16  # images whose similarities are compared


def slow_scores(learner, patches: torch.Tensor, text: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [N, n_cls] under one vision stack [12, n, Wv], run through every image layer."""
    with torch.inference_mode():
        images = learner.image_features(patches, stack.unsqueeze(0))  # [1, N, D], from layer 0
        return learner._scores(images, text)[0]


def check_scores(learner, patches: torch.Tensor, cell: Cell, slow: torch.Tensor, original: torch.Tensor) -> str:
    """Ours' similarities of the first images (the learner told the site, as the sweep runs it) against the
    slow way's: their difference must be far below what the cell changes (random weights: the arg-max of
    most images does not move, so predictions alone would be a weak check)."""
    count = original.shape[0]
    variant = corrupt_ctx(learner.ctx.detach(), cell).unsqueeze(0)
    with torch.inference_mode():
        ours = learner.similarities(patches[:count], variant, site=cell.site)[0]  # [count, n_cls]
    difference = (ours - slow[:count]).abs().max().item()
    change = (slow[:count] - original).abs().max().item()
    assert difference < change / 10, f"{cell}: scores differ by {difference:.2e}; the cell changes them by {change:.2e}"
    return f"scores of {count} images within {difference:.1e} of the slow way's (the cell moves them by {change:.1e})"


def main(slow_cells: int) -> None:
    torch.manual_seed(0)
    backbone = load_clip(MODEL)
    learner = build_learner("vpt", backbone, CLASSNAMES, n_ctx=N_CTX)
    with torch.no_grad():
        learner.ctx.copy_(torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(1)))
        images = torch.randn(N_IMAGES, 3, 224, 224, generator=torch.Generator().manual_seed(2))
        patches = patch_embeddings(backbone.model.visual, images)  # [N, 197, 768], encoded once
        text = learner.text_features(learner.stacks())  # [1, n_cls, D], VPT's fixed text side
    sites = {site.layer: site for site in learner.corruption_sites()}
    assert len(sites) == 12, sites
    cells = {
        layer: [Cell("replace", position, sigma, 0, sites[layer]) for position in POSITIONS for sigma in SIGMAS]
        for layer in LAYERS
    }
    n_cells = sum(len(group) for group in cells.values())
    base = resident_bytes()
    original = slow_scores(learner, patches[:CHECKED], text, learner.ctx.detach())  # [CHECKED, n_cls]

    slow_seconds, slow_wall, slow_count, reference = 0.0, 0.0, 0, {}
    for layer, group in cells.items():
        for index, cell in enumerate(group[:slow_cells]):
            wall, start = time.perf_counter(), time.process_time()
            scores = slow_scores(learner, patches, text, corrupt_ctx(learner.ctx.detach(), cell))
            slow_seconds += time.process_time() - start
            slow_wall += time.perf_counter() - wall
            slow_count += 1
            checked = check_scores(learner, patches, cell, scores, original)
            print(f"{cell.site.name}, {cell.op} {cell.factor:g} at position {cell.position}: {checked}")
            if index == 0:
                reference[layer] = scores.argmax(dim=-1)
    slow_peak = peak_resident_bytes() - base
    slow_per_cell = slow_seconds / slow_count
    print(f"slow: {slow_per_cell:.1f} s a cell ({slow_wall / slow_count:.1f} s wall), timed on {slow_count} cells")

    ours_seconds = ours_wall = 0.0
    for layer, group in cells.items():
        setup = EvaluationSetup(backbone, None, learner, patches, reference[layer], {})
        wall, start = time.perf_counter(), time.process_time()
        outcome = evaluate_cells(setup, learner.ctx.detach(), group)
        ours_seconds += time.process_time() - start
        ours_wall += time.perf_counter() - wall
        correct = outcome.correct  # [4, N]: agreement with the slow way's first cell of this layer
        assert bool(correct[0].all()), f"layer {layer}: {int((~correct[0]).sum())} predictions differ from the slow way"
        changed = ", ".join(f"{100 * (1 - row.float().mean()):.0f}%" for row in correct[1:])
        classes = len(reference[layer].unique())
        print(f"layer {layer}: same predictions as the slow way ({classes} classes predicted); the other cells")
        print(f"  change {changed} of them")
    ours_peak = peak_resident_bytes() - base

    slow_total = slow_per_cell * n_cells
    sigmas = ", ".join(f"{sigma:g}" for sigma in SIGMAS)
    print(f"cells: {n_cells} (REPLACE sigma {sigmas} at positions {POSITIONS} of layers {LAYERS})")
    print(
        f"slow way: {slow_total:.0f} s for {n_cells} cells (scaled from {slow_count}); peak +{slow_peak / MIB:,.0f} MiB"
    )
    print(f"ours: {ours_seconds:.0f} s ({ours_wall:.0f} s wall), {ours_seconds / n_cells:.1f} s a cell", end="")
    print(f"; peak so far +{ours_peak / MIB:,.0f} MiB")
    print(f"ratio: {slow_total / ours_seconds:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow-cells", type=int, default=1, help="cells of each layer run the slow way")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both ways")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    main(arguments.slow_cells)
