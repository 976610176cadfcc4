"""What the shared-prefix benchmarks compare against: the text pass as it was before prefixes were shared.

Not a benchmark itself (it prints nothing; hence its own folder). `todays_cut_pass` is the encoder before issue 12: one
[K x n_cls, M, W] copy of the ctx rows, full 77-token prompts assembled, chunks of 256 prompts in
class order, each cut after its last end-of-text token. `imagenet_like_classnames` gives class
names of ImageNet's shape: mostly two or three words, some one, some four to six; `resident_bytes`
reads the process's resident memory.
"""

from __future__ import annotations

import os
import random

import torch

from nemesis.methods.coop.learner import PromptLearner

TODAYS_CHUNK = 256  # prompts per text pass before token budgets

VOCABULARY = (
    "red tailed hawk great grey owl golden retriever english springer spaniel tabby cat snow leopard "
    "african elephant american black bear sea lion king penguin rock beauty monarch butterfly "
    "garbage truck fire engine steel arch bridge paper towel wooden spoon electric guitar grand piano "
    "crash helmet mountain bike police van school bus sports car racing car tow truck trolley bus "
    "coral reef volcano alpine lake sandbar seashore valley cliff geyser lakeside promontory "
    "granny smith custard apple bell pepper head cabbage acorn squash spaghetti squash hot dog "
    "cheeseburger meat loaf ice cream chocolate sauce red wine espresso eggnog cup plate potpie "
    "border collie shetland sheepdog old english sheepdog miniature poodle standard schnauzer "
    "black widow spider garden spider tiger beetle leaf beetle dung beetle rhinoceros beetle weevil"
)


def imagenet_like_classnames(count: int, seed: int = 0) -> list[str]:
    """`count` distinct multi-word class names, lengths drawn like ImageNet's (1-6 words, mostly 2-3)."""
    generator = random.Random(seed)
    words = VOCABULARY.split()
    names: set[str] = set()
    ordered = []
    while len(ordered) < count:
        n_words = generator.choices([1, 2, 3, 4, 5, 6], weights=[20, 40, 25, 8, 4, 3])[0]
        name = " ".join(generator.choice(words) for _ in range(n_words))
        if name not in names:
            names.add(name)
            ordered.append(name)
    return ordered


def todays_cut_pass(learner: PromptLearner, ctx_variants: torch.Tensor, max_chunks: int | None = None) -> torch.Tensor:
    """Text features [K, n_cls, D] of unified ctx variants [K, M, W], the way the encoder did it before.

    `max_chunks` stops after that many chunks (their features only): enough to see the pass's peak
    memory, which later chunks reuse.
    """
    n_variants, n_classes = ctx_variants.shape[0], learner.n_classes
    ctx_rows = (
        ctx_variants.unsqueeze(1).expand(-1, n_classes, -1, -1).reshape(n_variants * n_classes, learner.n_ctx, -1)
    )
    class_rows = torch.arange(n_classes, device=ctx_rows.device).repeat(n_variants)  # [K * n_cls]
    chunks = []
    for start in range(0, ctx_rows.shape[0], TODAYS_CHUNK)[:max_chunks]:
        rows = slice(start, start + TODAYS_CHUNK)
        embeddings = learner.prompt_embeddings(ctx_rows[rows], class_rows[rows])  # full 77-token rows
        chunks.append(learner.encoder(embeddings, learner.pool_index[class_rows[rows]]))
    features = torch.cat(chunks)
    return features if max_chunks is not None else features.reshape(n_variants, n_classes, -1)


def peak_resident_bytes() -> int:
    """This process's peak resident set size (Linux's VmHWM). Not `ru_maxrss`: that survives `exec`, so a
    child started by a large parent would report the parent's peak."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def resident_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
