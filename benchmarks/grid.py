"""A demo-sized grid (8 runs, tiny model, Fashion-MNIST) as one `nemesis train` call vs 8 separate calls.

Grid: shots 1, 2 x seeds 1, 2 x methods coop, pen, reduced epochs on cached augmented views, as
the demo trains. The slow way is what `figures/README.md` did before grids: one `nemesis train`
process per run, each importing torch, building the model and reading the caches again. Both ways
run in fresh processes on a warm feature cache (a first, untimed grid fills it), so the figure is
the per-run overhead a grid saves. The script checks both ways wrote the same prompts, prints the
seconds and, as its last line, `ratio: <separate calls / one grid call>`.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

DATASET, SHOTS, SEEDS, METHODS = "fashion_mnist", (1, 2), (1, 2), ("coop", "pen")
SETTINGS = ["--model", "tiny", "--pretrained", "none", "--epochs", "10", "--train-views", "2", "--eval-every", "0",
            "--device", "cpu"]  # fmt: skip


def nemesis(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "nemesis_cli", *arguments], check=True, capture_output=True, text=True)


def grid_call(out: Path) -> None:
    lists = ["--shots", ",".join(map(str, SHOTS)), "--seed", ",".join(map(str, SEEDS)), "--method", ",".join(METHODS)]
    nemesis("train", "--dataset", DATASET, *lists, *SETTINGS, "--out", str(out))


def run_folders(out: Path) -> list[Path]:
    return [out / DATASET / method / f"tiny_{shots}shots" / f"seed{seed}"
            for method, shots, seed in itertools.product(METHODS, SHOTS, SEEDS)]  # fmt: skip


def separate_calls(out: Path) -> None:
    for folder, (method, shots, seed) in zip(run_folders(out), itertools.product(METHODS, SHOTS, SEEDS), strict=True):
        nemesis("train", "--dataset", DATASET, "--shots", str(shots), "--seed", str(seed), "--method", method,
                *SETTINGS, "--out", str(folder))  # fmt: skip


def timed(function, out: Path) -> float:
    start = time.perf_counter()
    function(out)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        os.environ.setdefault("NEMESIS_CACHE", str(scratch / "cache"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        grid_call(scratch / "warm-up")  # fills the feature cache for both ways
        separate = timed(separate_calls, scratch / "separate")
        grid = timed(grid_call, scratch / "grid")
        for one, other in zip(run_folders(scratch / "separate"), run_folders(scratch / "grid"), strict=True):
            first, second = (load_file(str(folder / "prompt.safetensors"))["ctx"] for folder in (one, other))
            assert torch.equal(first, second), f"prompts differ: {one} vs {other}"
    runs = len(run_folders(scratch))
    print(f"{runs} runs: separate calls {separate:.1f} s ({separate / runs:.1f} s per run), "
          f"one grid call {grid:.1f} s ({grid / runs:.1f} s per run); prompts identical")  # fmt: skip
    print(f"ratio: {separate / grid:.2f}")


if __name__ == "__main__":
    main()
