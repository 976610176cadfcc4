"""Invariants I1 (hard-prompt equivalence), I2 (truncation) and I5 (frozen CLIP) of DESIGN section 4."""

from __future__ import annotations

import hashlib

import pytest
import torch

from nemesis.errors import NemesisError
from nemesis.methods.coop.learner import PromptedCLIP, PromptLearner
from nemesis.penalties.losses import position_norms

from .conftest import cached_backbone

MODELS = ["ViT-B-32", "RN50", "tiny"]
CLASSNAMES = ["dog", "golden retriever", "sea_lion", "airbus a320"]
# Class position -> the hard prompt with the same word order as CoOp's layout of "a photo of a".
HARD_PROMPTS = {"end": "a photo of a {}.", "middle": "a photo {} of a.", "front": "{} a photo of a."}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("class_position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_hard_prompt_equivalence(model_name, class_position, class_specific):
    clip = cached_backbone(model_name)
    learner = PromptLearner(
        clip,
        CLASSNAMES,
        ctx_init="a photo of a",
        class_specific=class_specific,
        class_position=class_position,
    )
    assert learner.n_ctx == 4
    texts = [HARD_PROMPTS[class_position].format(name.replace("_", " ")) for name in CLASSNAMES]
    with torch.no_grad():
        ours = learner.text_features()
        reference = clip.model.encode_text(clip.tokenizer(texts))
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("class_specific", [False, True])
def test_cut_sequence_equals_full_length(model_name, class_specific):
    clip = cached_backbone(model_name)
    learner = PromptLearner(clip, CLASSNAMES, n_ctx=16, class_specific=class_specific, seed=3)
    assert learner.encoder.can_cut
    with torch.no_grad():
        cut = learner.text_features(cut=True)
        full = learner.text_features(cut=False)
    assert (cut - full).abs().max().item() <= 1e-5


def test_random_ctx_is_seeded_and_small(tiny):
    first = PromptLearner(tiny, CLASSNAMES, n_ctx=16, seed=1).ctx
    again = PromptLearner(tiny, CLASSNAMES, n_ctx=16, seed=1).ctx
    other = PromptLearner(tiny, CLASSNAMES, n_ctx=16, seed=2).ctx
    assert first.shape == (16, 64)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert 0.015 < first.std().item() < 0.025


def test_chunked_encoding_equals_one_pass(tiny):
    classnames = [f"class {index}" for index in range(23)]
    one_pass = PromptLearner(tiny, classnames, seed=0, chunk_size=1000)
    chunked = PromptLearner(tiny, classnames, seed=0, chunk_size=5)
    with torch.no_grad():
        assert torch.allclose(one_pass.text_features(), chunked.text_features(), atol=1e-6)


def test_encode_variants_match_single_prompts(tiny):
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=6, seed=0)
    variants = torch.stack([learner.ctx.detach() * scale for scale in (1.0, 0.5, 2.0)])  # [3, M, W]
    with torch.no_grad():
        batched = learner.encode(variants)
        for index, variant in enumerate(variants):
            alone = PromptLearner(tiny, CLASSNAMES, ctx=variant).text_features()
            assert torch.allclose(batched[index], alone, atol=1e-6)


def _checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("class_specific", [False, True])
def test_gradients_reach_ctx_only(tiny, class_specific):
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=4, class_specific=class_specific, seed=0)
    assert [name for name, _ in learner.named_parameters()] == ["ctx"]
    classifier = PromptedCLIP(learner)
    before_clip, before_ctx = _checksum(tiny.model), learner.ctx.detach().clone()
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    image_features = torch.randn(8, 64, generator=generator)
    labels = torch.arange(8) % len(CLASSNAMES)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(classifier(image_features), labels)
        optimizer.zero_grad()
        loss.backward()
        assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
        assert all(parameter.grad is None for parameter in tiny.model.parameters())
        optimizer.step()
    assert not torch.equal(learner.ctx.detach(), before_ctx)
    assert _checksum(tiny.model) == before_clip  # I5


def test_for_classnames_keeps_ctx(tiny):
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=4, seed=5)
    other = learner.for_classnames(["cat", "horse"])
    assert torch.equal(other.ctx, learner.ctx) and other.n_classes == 2
    specific = PromptLearner(tiny, CLASSNAMES, n_ctx=4, class_specific=True)
    with pytest.raises(NemesisError, match="class-specific"):
        specific.for_classnames(["cat", "horse"])


def test_bad_ctx_is_refused(tiny):
    with pytest.raises(NemesisError, match="width"):
        PromptLearner(tiny, CLASSNAMES, ctx=torch.zeros(4, 512))
    with pytest.raises(NemesisError, match="NaN"):
        PromptLearner(tiny, CLASSNAMES, ctx=torch.full((4, 64), float("nan")))
    with pytest.raises(NemesisError, match="class position"):
        PromptLearner(tiny, CLASSNAMES, class_position="left")


def test_position_norms_uses_class_mean():
    ctx = torch.zeros(2, 3, 4)
    ctx[0, 1, 0] = 3.0
    ctx[1, 1, 0] = 1.0
    assert position_norms(ctx).tolist() == [0.0, 2.0, 0.0]
    assert position_norms(torch.tensor([[3.0, 4.0]])).tolist() == [5.0]


def test_ctx_init_accepts_coop_underscores(tiny):
    spaced = PromptLearner(tiny, CLASSNAMES, ctx_init="a photo of a")
    underscored = PromptLearner(tiny, CLASSNAMES, ctx_init="a_photo_of_a")
    assert underscored.n_ctx == 4 and torch.equal(underscored.ctx, spaced.ctx)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("class_specific", [False, True])
def test_multi_token_init_learns_one_vector_per_word_like_coop(model_name, class_specific):
    """I1 for "an X-ray of a": 4 words, 6 BPE tokens; CoOp learns 4 and keeps "of a" frozen in the prompt."""
    clip = cached_backbone(model_name)
    assert len(clip.tokenizer.encode("an X-ray of a")) == 6
    learner = PromptLearner(clip, CLASSNAMES, ctx_init="an X-ray of a", class_specific=class_specific)
    assert learner.n_ctx == 4 and learner.ctx.shape[-2] == 4
    texts = [f"an X-ray of a {name.replace('_', ' ')}." for name in CLASSNAMES]
    with torch.no_grad():
        reference = clip.model.encode_text(clip.tokenizer(texts))
        assert (learner.text_features() - reference).abs().max().item() <= 1e-5
        # The same ctx with the recorded init (as evaluation rebuilds it) gives the same prompt.
        again = PromptLearner(clip, CLASSNAMES, ctx=learner.ctx.detach(), ctx_init="an X-ray of a",
                              class_specific=class_specific)  # fmt: skip
        assert (again.text_features() - reference).abs().max().item() <= 1e-5


def test_multi_token_init_needs_the_class_at_the_end(tiny):
    with pytest.raises(NemesisError, match=r"more tokens \(6\) than words \(4\).*class position end"):
        PromptLearner(tiny, CLASSNAMES, ctx_init="an X-ray of a", class_position="middle")
