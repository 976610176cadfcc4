"""Text pass of CoOp prompts (ViT-B-32, unified ctx, 16 context vectors) for 100 and 1,000 classes.

Two ways, in this one process, on the same learner and ctx:

- cut pass (the encoder before shared prefixes): whole prompts in chunks of 256 in class order,
  each assembled at 77 tokens and cut after its last end-of-text token;
- shared-prefix pass (today's `PromptLearner.encode`): [SOS] + ctx runs once, then the class
  names, '.' and [EOT] of every class against its cached keys and values, in chunks ordered by
  end-of-text position.

Class names are ImageNet-like (mostly two or three words, some up to six). The script checks both
ways agree, prints the seconds of each side by side, and as its last line
`ratio: <cut / shared-prefix at the largest class count>`. Seconds are CPU seconds of one thread
(`time.process_time`, torch on one thread), so other work on a shared machine does not distort
them the way it distorts wall-clock time.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from support.baseline import imagenet_like_classnames, todays_cut_pass

from nemesis import PromptLearner, load_clip


def seconds(run, repeats: int) -> float:
    """CPU seconds per call of `run` (torch runs on one thread here)."""
    run()  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        run()
    return (time.process_time() - start) / repeats


def main(class_counts: list[int], repeats: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    clip = load_clip("ViT-B-32")
    ratio = None
    for count in class_counts:
        learner = PromptLearner(clip, imagenet_like_classnames(count), n_ctx=16, seed=0)
        variants = learner.ctx.detach().unsqueeze(0)  # [1, M, W]
        with torch.inference_mode():
            difference = (todays_cut_pass(learner, variants) - learner.encode(variants)).abs().max().item()
            assert difference <= 1e-5, f"cut and shared-prefix passes disagree by {difference}"
            cut = seconds(lambda: todays_cut_pass(learner, variants), repeats)  # noqa: B023
            shared = seconds(lambda: learner.encode(variants), repeats)  # noqa: B023
        lengths = learner.pool_index + 1
        ratio = cut / shared
        print(
            f"{count} classes (prompt lengths {int(lengths.min())}-{int(lengths.max())} tokens, "
            f"{1 + learner.shared_context} shared): cut {cut:.3f} s   shared prefix {shared:.3f} s   "
            f"ratio {ratio:.2f}   max difference {difference:.1e}"
        )
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="100,1000", help="class counts, comma-separated (last one: the ratio)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per way (after one warm-up)")
    arguments = parser.parse_args()
    main([int(count) for count in arguments.classes.split(",")], arguments.repeats)
