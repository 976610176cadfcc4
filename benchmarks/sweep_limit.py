"""What a corrupted sweep cell costs against one bare text pass, at 1,000 ImageNet-like classes.

Setting: ViT-B-32 with random weights, a unified CoOp prompt of 16 context vectors, 1,000
ImageNet-like class names (mostly two or three words), cached test features of one image per
class, and the default grid (RESCALE 0.001-10, REPLACE sigma 0-1 at every position; `--positions`
picks fewer to keep the run short: the cost per cell does not depend on how many there are).

- Bare pass: one cut text pass of the checkpoint's 1,000 prompts with the encoder as it was before
  shared prefixes (`baseline.todays_cut_pass`, one variant).
- Per cell: `evaluate_cells`, the sweep engine's loop (ctx variants chunk by chunk, their text
  passes with shared prefixes, one matrix product per variant), divided by the cells it ran.
  Writing the table is left out: it is under 3 % of a sweep.

Before timing, the script checks that the two encoders agree on every cell of the grid: at 50
classes, the sweep's similarities under each cell's corrupted ctx equal the old cut pass's (<= 1e-5).
It then times each way in its own process, checks that the sweep's original cell classifies every
test image as the bare pass does, prints seconds (CPU seconds of one thread, so other work on the
machine does not distort them) and peak memory side by side, and ends with
`ratio: <bare pass / per-cell cost>`. Peak memory is the peak resident set size above the level
after the model and prompts are set up; a third process measures it for the sweep's pass as it was
before shared prefixes (the [cells x n_cls, M, W] copy of ctx rows and the first chunks of full
prompts: later chunks reuse that memory, so the pass is not run to its end).
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

from support.baseline import imagenet_like_classnames, peak_resident_bytes, resident_bytes, todays_cut_pass

from corrupt.engine import VARIANTS_PER_PASS, evaluate_cells
from corrupt.grid import parse_grid
from corrupt.operators import corrupt_ctx
from nemesis import PromptLearner, load_clip
from nemesis.evaluation.evaluate import EvaluationSetup

N_CTX = 16
AGREEMENT_CLASSES = 50  # the two encoders are compared on every cell at this size before timing
BEFORE_CHUNKS = 2  # chunks of the old sweep pass run to see its peak memory


def setting(n_classes: int) -> tuple:
    """The backbone, ctx, learner, test features and labels of the benchmark at `n_classes`."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    backbone = load_clip("ViT-B-32")
    ctx = torch.randn(N_CTX, 512, generator=torch.Generator().manual_seed(0)) * 0.5
    learner = PromptLearner(backbone, imagenet_like_classnames(n_classes), ctx=ctx)
    features = torch.randn(n_classes, 512, generator=torch.Generator().manual_seed(1))  # one test image per class
    return backbone, ctx, learner, features, torch.arange(n_classes)


def check_agreement(positions: str | None) -> tuple[int, float]:
    """Cells compared and the largest difference of the two encoders' similarities over them."""
    _, ctx, learner, features, _ = setting(AGREEMENT_CLASSES)
    cells = parse_grid(positions=positions).cells(N_CTX)
    variants = torch.stack([corrupt_ctx(ctx, cell) for cell in cells])  # [K, M, W]
    with torch.inference_mode():
        ours = learner.similarities(features, variants)  # [K, N, n_cls], shared prefixes
        old = F.normalize(features, dim=-1) @ F.normalize(todays_cut_pass(learner, variants), dim=-1).transpose(1, 2)
    difference = (ours - old).abs().max().item()
    assert difference <= 1e-5, f"the sweep's encoder and the old cut pass disagree by {difference}"
    return len(cells), difference


def measure(way: str, n_classes: int, positions: str | None) -> dict:
    """Run one way in this process: CPU seconds, peak memory above the set-up, and its predictions."""
    backbone, ctx, learner, features, labels = setting(n_classes)
    cells = parse_grid(positions=positions).cells(N_CTX)
    before = resident_bytes()
    if way == "before":  # the old sweep's pass of these cells, for its peak memory only
        per_pass = min(VARIANTS_PER_PASS, len(cells))
        variants = torch.stack([corrupt_ctx(ctx, cell) for cell in cells[:per_pass]])
        with torch.inference_mode():
            todays_cut_pass(learner, variants, max_chunks=BEFORE_CHUNKS)
        peak = peak_resident_bytes() - before
        return {"seconds": None, "peak": peak, "correct": [], "cells": per_pass}
    if way == "bare":
        with torch.inference_mode():
            todays_cut_pass(learner, ctx.unsqueeze(0))  # warm-up
            start = time.process_time()
            text = F.normalize(todays_cut_pass(learner, ctx.unsqueeze(0))[0], dim=-1)  # [n_cls, D]
            seconds = time.process_time() - start
        correct = (F.normalize(features, dim=-1) @ text.T).argmax(dim=-1) == labels
        count = 1
    else:
        setup = EvaluationSetup(backbone, None, learner, features, labels, {})
        start = time.process_time()
        correct = evaluate_cells(setup, ctx, cells, VARIANTS_PER_PASS).correct[0]  # the original cell
        seconds = time.process_time() - start
        count = len(cells)
    peak = peak_resident_bytes() - before
    return {"seconds": seconds / count, "peak": peak, "correct": correct.tolist(), "cells": len(cells)}


def run_way(way: str, n_classes: int, positions: str | None) -> dict:
    """`measure` in a fresh process, so each way's peak memory is its own."""
    command = [sys.executable, __file__, "--measure", way, "--classes", str(n_classes)]
    command += ["--positions", positions] if positions else []
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(n_classes: int, positions: str | None) -> None:
    checked, difference = check_agreement(positions)
    print(f"before timing: at {AGREEMENT_CLASSES} classes, the sweep's encoder and the old cut pass agree on all "
          f"{checked} cells (largest similarity difference {difference:.1e})")  # fmt: skip
    bare = run_way("bare", n_classes, positions)
    sweep = run_way("sweep", n_classes, positions)
    old_pass = run_way("before", n_classes, positions)
    assert bare["correct"] == sweep["correct"], "the sweep's original cell disagrees with the bare pass"
    mib = 2**20
    per_pass = min(VARIANTS_PER_PASS, sweep["cells"])
    print(f"classes: {n_classes}, cells: {sweep['cells']} (default grid, positions {positions or 'all'}), "
          f"{VARIANTS_PER_PASS} variants per pass")  # fmt: skip
    print(f"at {n_classes} classes the sweep's original cell classifies every test image as the bare pass does")
    print(f"bare cut pass (encoder before shared prefixes, one variant): {bare['seconds']:.2f} s, "
          f"peak memory +{bare['peak'] / mib:.0f} MiB")  # fmt: skip
    print(f"sweep: {sweep['seconds']:.2f} s per cell, peak memory +{sweep['peak'] / mib:.0f} MiB with "
          f"{per_pass} cells per pass (+{sweep['peak'] / mib / per_pass:.0f} MiB per cell)")  # fmt: skip
    print(f"the same pass before shared prefixes: peak memory +{old_pass['peak'] / mib:.0f} MiB "
          f"(+{old_pass['peak'] / mib / per_pass:.0f} MiB per cell; its {per_pass} x {n_classes} x {N_CTX} x 512 "
          f"copy of ctx rows alone is {per_pass * n_classes * N_CTX * 512 * 4 / mib:.0f} MiB)")  # fmt: skip
    print(f"ratio: {bare['seconds'] / sweep['seconds']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000, help="class names (ImageNet-like)")
    parser.add_argument("--positions", default=None, help="corrupted positions, e.g. 0,15 (default: all 16)")
    parser.add_argument("--measure", choices=["bare", "sweep", "before"], help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.measure:
        print(json.dumps(measure(arguments.measure, arguments.classes, arguments.positions)))
    else:
        main(arguments.classes, arguments.positions)
