"""The shared-prefix text pass equals open_clip's full pass (features and gradients), for every tower kind."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock, TextTransformer

from nemesis.methods.coop.learner import PromptLearner
from nemesis.model.text_encoder import TextEncoder

from .conftest import cached_backbone

MODELS = ["ViT-B-32", "RN50", "tiny"]
# One-token and 10+-token class names, in no particular length order.
CLASSNAMES = [
    "golden retriever",
    "dog",
    "the greater spotted long tailed north american mountain water bird",
    "sea_lion",
]
TOLERANCE = 1e-5


def _variants(ctx: torch.Tensor) -> torch.Tensor:
    """K = 4 variants of ctx: itself and corruptions of the first and the last position (as a sweep makes them)."""
    first_zeroed = ctx.clone()
    first_zeroed[..., 0, :] = 0.0  # REPLACE sigma 0 at position 0
    last_rescaled = ctx.clone()
    last_rescaled[..., -1, :] *= 0.001  # RESCALE at the last position
    noisy_last = ctx.clone()
    noisy_last[..., -1, :] = torch.randn(ctx.shape[-1], generator=torch.Generator().manual_seed(1))
    return torch.stack([ctx, first_zeroed, last_rescaled, noisy_last])  # [K, ...ctx]


def _full_pass(learner: PromptLearner, variants: torch.Tensor) -> torch.Tensor:
    """Reference [K, n_cls, D]: whole prompts through open_clip's own transformer, one variant at a time.

    Cut at the last end-of-text token (I2, tested against the 77-token pass in test_prompt_learner).
    """
    classes = torch.arange(learner.n_classes)
    rows = []
    for variant in variants:
        ctx = variant if learner.class_specific else variant.expand(learner.n_classes, -1, -1)  # [n_cls, M, W]
        rows.append(learner.encoder(learner.prompt_embeddings(ctx, classes), learner.pool_index))
    return torch.stack(rows)


# Every layout on tiny; on the big towers the shared layouts and one of each fallback (they run slowly on CPUs).
LAYOUTS = [("tiny", position, specific) for position in ("end", "middle", "front") for specific in (False, True)]
LAYOUTS += [
    (name, *layout)
    for name in MODELS[:2]
    for layout in [("end", False), ("middle", False), ("front", False), ("end", True)]
]


@pytest.mark.parametrize(("model_name", "class_position", "class_specific"), LAYOUTS)
def test_shared_prefix_pass_equals_full_pass(model_name, class_position, class_specific):
    learner = PromptLearner(
        cached_backbone(model_name), CLASSNAMES, n_ctx=6, class_specific=class_specific,
        class_position=class_position, seed=2,
    )  # fmt: skip
    shares = not class_specific and class_position != "front"
    assert learner.encoder.can_share and (learner.shared_context > 0) == shares
    variants = _variants(learner.ctx.detach())
    with torch.no_grad():
        ours = learner.encode(variants)
        reference = _full_pass(learner, variants)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(
    ("model_name", "class_position", "class_specific"),
    [("tiny", "end", False), ("tiny", "middle", False), ("tiny", "end", True), ("ViT-B-32", "end", False),
     ("RN50", "middle", False)],
)  # fmt: skip
def test_gradients_through_the_cached_prefix_equal_the_full_pass(model_name, class_position, class_specific):
    learner = PromptLearner(
        cached_backbone(model_name), CLASSNAMES, n_ctx=4, class_specific=class_specific,
        class_position=class_position, seed=4,
    )  # fmt: skip
    weights = torch.randn(learner.n_classes, learner.encoder.tower.text_projection.shape[-1],
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    gradients = []
    for features in (lambda: learner.text_features(), lambda: _full_pass(learner, learner.ctx.unsqueeze(0))[0]):
        learner.ctx.grad = None
        (features() * weights).sum().backward()
        gradients.append(learner.ctx.grad.clone())
    ours, reference = gradients
    assert reference.abs().sum() > 0
    assert ((ours - reference).norm() / reference.norm()).item() <= TOLERANCE


def test_encode_pairs_equals_the_whole_prompts(tiny):
    """The public pair API (CoCoOp's per-image prefixes): every (prefix, class) pair, in class order."""
    encoder = TextEncoder(tiny.model, tiny.name, tiny.tokenizer)
    token_ids = tiny.tokenizer([f"{name}." for name in CLASSNAMES])  # [C, 77]
    pool_index = encoder.pool_index(token_ids)
    generator = torch.Generator().manual_seed(0)
    prefix_length = 5
    prefixes = torch.randn(3, prefix_length, encoder.width, generator=generator) * 0.1  # [V, Lp, W]
    prefixes[:, 0] = encoder.token_embedding.weight[encoder.sot_token_id]
    with torch.no_grad():
        suffixes = encoder.token_embedding(token_ids[:, 1 : 1 + 77 - prefix_length])  # [C, Ls, W]
        ours = encoder.encode_pairs(prefixes, suffixes, pool_index + prefix_length - 1, token_budget=40)
        for v, prefix in enumerate(prefixes):
            whole = torch.cat([prefix.expand(len(CLASSNAMES), -1, -1), suffixes], dim=1)  # [C, 77, W]
            reference = encoder(whole, pool_index + prefix_length - 1, cut=False)
            assert (ours[v] - reference).abs().max().item() <= TOLERANCE


def _tower(**options) -> TextTransformer:
    torch.manual_seed(0)
    tower = TextTransformer(width=64, heads=2, layers=2, output_dim=32, **options)
    tower.init_parameters()
    return tower.eval()


@pytest.mark.parametrize(
    "options",
    [
        {"ls_init_value": 0.5},
        {"qk_norm": True, "scale_heads": True, "scale_attn": True, "scale_fc": True, "scale_attn_inner": True},
        {"no_causal_mask": True},  # bidirectional: nothing is shared, the full pass runs
    ],
    ids=["layer-scale", "custom-block", "bidirectional"],
)
def test_open_clip_tower_variants_match_their_own_forward(tiny, options):
    tower = _tower(**options)
    encoder = TextEncoder(tower, "custom", tiny.tokenizer)
    assert encoder.can_share == ("no_causal_mask" not in options)
    token_ids = tiny.tokenizer([f"a photo of a {name}." for name in CLASSNAMES])  # [C, 77]
    pool_index = encoder.pool_index(token_ids)
    embeddings = encoder.token_embedding(token_ids).detach()
    with torch.no_grad():
        ours = encoder.encode_pairs(embeddings[:1, :5], embeddings[:, 5:], pool_index)[0]  # "[SOS] a photo of a"
        reference = tower(token_ids)  # open_clip's own forward
    assert (ours - reference).abs().max().item() <= TOLERANCE


def test_unknown_block_type_falls_back_to_the_full_pass(tiny):
    class Block(ResidualAttentionBlock):
        pass  # may override forward: the encoder must not assume it knows how it runs

    tower = _tower()
    tower.transformer.resblocks[1].__class__ = Block
    encoder = TextEncoder(tower, "custom", tiny.tokenizer)
    assert encoder.can_cut and not encoder.can_share
    token_ids = tiny.tokenizer([f"a photo of a {name}." for name in CLASSNAMES])
    embeddings = encoder.token_embedding(token_ids).detach()
    with torch.no_grad():
        ours = encoder.encode_pairs(embeddings[:1, :5], embeddings[:, 5:], encoder.pool_index(token_ids))[0]
        assert (ours - tower(token_ids)).abs().max().item() <= TOLERANCE


def test_shared_prefix_under_autocast(tiny):
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=4, seed=0)
    variants = _variants(learner.ctx.detach())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = learner.encode(variants).float()
        reference = _full_pass(learner, variants).float()
    similarity = torch.nn.functional.cosine_similarity(ours, reference, dim=-1)
    assert similarity.min().item() > 0.999


def test_small_token_budgets_change_nothing(tiny):
    """Chunks ordered by end-of-text position and sized by tokens give the classes back in their order."""
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=4, seed=0)
    variants = _variants(learner.ctx.detach())
    with torch.no_grad():
        one_chunk = learner.encode(variants)
        learner.token_budget = 30  # about one prompt per chunk
        assert torch.allclose(learner.encode(variants), one_chunk, atol=1e-6)  # other cut lengths: rounding only


def test_prompts_are_assembled_only_up_to_the_cut(tiny):
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=4, seed=0)
    classes = torch.arange(learner.n_classes)
    ctx = learner.ctx.detach().expand(learner.n_classes, -1, -1)
    length = int(learner.pool_index.max()) + 1
    whole = learner.prompt_embeddings(ctx, classes)
    assert torch.equal(learner.prompt_embeddings(ctx, classes, length), whole[:, :length])
