"""PLOT's transport plans of one image (issue 22, item 8): the plans behind evaluation's scores, their
weighted sum with the cosine similarities being the image's similarity for the class, from the Sinkhorn
run of the image's block."""

from __future__ import annotations

import pytest
import torch

from nemesis.methods.cocoop.learner import embed_dim_of
from nemesis.methods.plot.learner import PLOTLearner

from .conftest import cached_backbone
from .test_trainer import CLASSNAMES

N_PROMPTS, N_CTX = 4, 4


def _embed_dim() -> int:
    return embed_dim_of(cached_backbone("tiny"))


def _tokens_and_text(learner: PLOTLearner, features: torch.Tensor):
    return learner._tokens(features), learner.prompt_features(learner.ctx.detach().unsqueeze(0))[0]  # [N, n_cls, D]


def test_plans_weighted_by_the_similarities_give_the_blockwise_similarities():
    ctx = torch.randn(N_PROMPTS, N_CTX, 64, generator=torch.Generator().manual_seed(0)) * 0.5
    learner = PLOTLearner(cached_backbone("tiny"), CLASSNAMES, ctx=ctx, sinkhorn_batch=2)
    features = torch.randn(5, 17, _embed_dim(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = learner.similarities(features, ctx.unsqueeze(0))[0]  # [B, n_cls], one run per 2 images
        tokens, text = _tokens_and_text(learner, features)
        for image in (0, 3, 4):  # the first block, the second's second image, the last block of one
            classes = [2, 0]
            plans = learner.plans(features, image, classes)
            assert plans.shape == (2, 17, N_PROMPTS)
            for plan, cls in zip(plans, classes, strict=True):
                pair = torch.einsum("td,nd->tn", tokens[image], text[:, cls])  # [T, N] cosine similarities
                torch.testing.assert_close((plan * pair).sum(), expected[image, cls], rtol=1e-6, atol=1e-6)


def test_plans_of_spatial_tokens_leave_the_global_token_out():
    learner = PLOTLearner(cached_backbone("tiny"), CLASSNAMES, n_prompts=2, n_ctx=N_CTX)
    learner.image_tokens = "spatial"  # as on a ModifiedResNet (tiny, a ViT, is refused spatial tokens when built)
    features = torch.randn(3, 17, _embed_dim(), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plans = learner.plans(features, 1, [0])
    assert plans.shape == (1, 16, 2) and not learner.includes_global_token


def test_plans_refuse_an_image_outside_the_features():
    learner = PLOTLearner(cached_backbone("tiny"), CLASSNAMES, n_prompts=2, n_ctx=N_CTX)
    with pytest.raises(Exception, match="not one of the 3 images"):
        learner.plans(torch.randn(3, 17, _embed_dim()), 3, [0])
