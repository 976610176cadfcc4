"""Text pass of 100 CoOp prompts on ViT-B-32: full 77-token sequence vs cut after the last end-of-text token.

Both ways run in this one process on the same learner, on whole prompts (shared prefixes, which
`benchmarks/shared_prefix.py` measures, are switched off here); the script checks they give the
same features, then prints seconds per pass and, as its last line, `ratio: <full / cut>`.

Times are CPU seconds of one thread, the fastest of interleaved repeats (full, cut, full, cut, ...),
as in the other text-pass benchmarks: wall-clock seconds with every core on a machine shared with
other jobs moved this ratio between 2.1 and 5.6 from one run to the next of the same code.
"""

from __future__ import annotations

import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nemesis import PromptLearner, load_clip

CLASSNAMES = [f"class number {index}" for index in range(100)]


def cpu_seconds(learner: PromptLearner, cut: bool) -> float:
    start = time.process_time()
    learner.text_features(cut=cut)
    return time.process_time() - start


def fastest_passes(learner: PromptLearner, repeats: int) -> tuple[float, float]:
    """CPU seconds of the fastest full and the fastest cut pass, the two ways interleaved."""
    full, cut = [], []
    with torch.inference_mode():
        learner.text_features(cut=False)  # warm-up
        for _ in range(repeats):
            full.append(cpu_seconds(learner, cut=False))
            cut.append(cpu_seconds(learner, cut=True))
    return min(full), min(cut)


def main(repeats: int = 5) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    learner = PromptLearner(load_clip("ViT-B-32"), CLASSNAMES, n_ctx=16, seed=0)
    learner.share_prefix = False  # whole prompts: this measures the cut alone
    with torch.inference_mode():
        difference = (learner.text_features(cut=True) - learner.text_features(cut=False)).abs().max().item()
    assert difference <= 1e-5, f"cut and full passes disagree by {difference}"
    length = int(learner.pool_index.max()) + 1
    full, cut = fastest_passes(learner, repeats)
    print(f"prompts: {len(CLASSNAMES)}, cut length: {length} of 77 tokens, max difference: {difference:.2e}")
    print(f"full pass: {full:.3f} s   cut pass: {cut:.3f} s (CPU seconds, one thread)")
    print(f"ratio: {full / cut:.2f}")


if __name__ == "__main__":
    main()
