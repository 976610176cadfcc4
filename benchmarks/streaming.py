"""Peak memory of evaluating a PLOT prompt on a large test split: local features streamed from the cache
entry a block at a time vs held whole.

Setting: RN50 with random weights, a random PLOT ctx [4, 16, 512], 1,000 ImageNet-like class names,
and a feature-cache entry of N random local features [N, 50, 1024] (float32, RN50's 50 tokens at
224 px) written batch by batch as encoding writes it, for N = 2,000 and 6,000 images. Each way runs in
a fresh process: build the model and learner, then read its baseline resident memory, then predict
every image's class with the official Sinkhorn rule (blocks of 100 images):

- held whole: the entry's features read into one tensor (what evaluation did before streaming);
- streamed: `StoredFeatures` walked by `predictions` in blocks of about 256 MiB (whole Sinkhorn blocks).

Both ways must predict the same class for every image. The figure is the peak resident set size
(VmHWM) above the baseline; ImageNet's 50,000 test images are 10 GB of such features. The last line
is `ratio: <held whole / streamed>` at the larger N.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from support.baseline import imagenet_like_classnames, peak_resident_bytes, resident_bytes

from nemesis import load_clip
from nemesis.data.feature_store import stored_features, write_entry
from nemesis.evaluation.metrics import predictions
from nemesis.methods.plot.learner import PLOTLearner

MODEL, N_CLASSES, N_TOKENS, WIDTH = "RN50", 1000, 50, 1024
SIZES = (2000, 6000)
WRITE_BATCH = 500


def write_features(path: Path, n_images: int) -> None:
    """A cache entry of `n_images` random local features, written a batch at a time."""
    generator = torch.Generator().manual_seed(n_images)
    labels = torch.arange(n_images) % N_CLASSES
    with write_entry(path, labels, {"model": MODEL, "benchmark": "streaming"}) as writer:
        for first in range(0, n_images, WRITE_BATCH):
            count = min(WRITE_BATCH, n_images - first)
            writer.append(torch.randn(count, N_TOKENS, WIDTH, generator=generator))


def measure(path: Path, way: str) -> dict:
    """Predictions of every image of the entry, and the peak resident memory above the set-up."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    backbone = load_clip(MODEL, pretrained=None)
    ctx = torch.randn(4, 16, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    learner = PLOTLearner(backbone, imagenet_like_classnames(N_CLASSES), ctx=ctx)
    stored = stored_features(path)
    before = resident_bytes()
    start = time.process_time()
    features = stored if way == "streamed" else stored[0 : len(stored)]
    predicted = predictions(learner, features, ctx.unsqueeze(0))[0]
    seconds = time.process_time() - start
    digest = hashlib.sha256(predicted.numpy().tobytes()).hexdigest()
    return {"peak": peak_resident_bytes() - before, "seconds": seconds, "predictions": digest}


def in_process(path: Path, way: str) -> dict:
    command = [sys.executable, __file__, "--measure", str(path), "--way", way]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(sizes: list[int]) -> None:
    lines = [
        f"{MODEL} random weights, PLOT ctx [4, 16, 512], {N_CLASSES} ImageNet-like classes, local features "
        f"[N, {N_TOKENS}, {WIDTH}] float32; peak resident memory above the set-up, CPU seconds of one thread"
    ]
    ratio = None
    with tempfile.TemporaryDirectory() as folder:
        for n_images in sizes:
            path = Path(folder) / f"features-{n_images}.safetensors"
            write_features(path, n_images)
            whole, streamed = in_process(path, "whole"), in_process(path, "streamed")
            assert whole["predictions"] == streamed["predictions"], f"predictions differ at {n_images} images"
            size = path.stat().st_size / 2**20
            lines.append(
                f"{n_images} images ({size:,.0f} MiB of features), same predictions: held whole "
                f"+{whole['peak'] / 2**20:,.0f} MiB ({whole['seconds']:.0f} s), streamed "
                f"+{streamed['peak'] / 2**20:,.0f} MiB ({streamed['seconds']:.0f} s)"
            )
            ratio = whole["peak"] / streamed["peak"]
            path.unlink()
    lines.append(f"ratio: {ratio:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="numbers of test images, comma-separated")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--way", choices=("whole", "streamed"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.measure:
        print(json.dumps(measure(arguments.measure, arguments.way)))
    else:
        main([int(size) for size in arguments.sizes.split(",")])
