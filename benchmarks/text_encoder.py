"""Text pass of 100 CoOp prompts on ViT-B-32: full 77-token sequence vs cut after the last end-of-text token.

Both ways run in this one process on the same learner, on whole prompts (shared prefixes, which
`benchmarks/shared_prefix.py` measures, are switched off here); the script checks they give the
same features, then prints seconds per pass and, as its last line, `ratio: <full / cut>`.
"""

from __future__ import annotations

import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nemesis import PromptLearner, load_clip

CLASSNAMES = [f"class number {index}" for index in range(100)]


def seconds_per_pass(learner: PromptLearner, cut: bool, repeats: int) -> float:
    with torch.inference_mode():
        learner.text_features(cut=cut)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            learner.text_features(cut=cut)
    return (time.perf_counter() - start) / repeats


def main(repeats: int = 3) -> None:
    torch.manual_seed(0)
    learner = PromptLearner(load_clip("ViT-B-32"), CLASSNAMES, n_ctx=16, seed=0)
    learner.share_prefix = False  # whole prompts: this measures the cut alone
    with torch.inference_mode():
        difference = (learner.text_features(cut=True) - learner.text_features(cut=False)).abs().max().item()
    assert difference <= 1e-5, f"cut and full passes disagree by {difference}"
    length = int(learner.pool_index.max()) + 1
    full = seconds_per_pass(learner, cut=False, repeats=repeats)
    cut = seconds_per_pass(learner, cut=True, repeats=repeats)
    print(f"prompts: {len(CLASSNAMES)}, cut length: {length} of 77 tokens, max difference: {difference:.2e}")
    print(f"full pass: {full:.3f} s   cut pass: {cut:.3f} s")
    print(f"ratio: {full / cut:.2f}")


if __name__ == "__main__":
    main()
