"""CoCoOp's learner against CoOp's: each image's prompts are a CoOp prompt with that image's shifted ctx."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemesis.errors import NemesisError
from nemesis.files.checkpoint import PromptCheckpoint, PromptMetadata, method_of_tensors
from nemesis.methods import METHODS
from nemesis.methods.cocoop import CoCoOpConfig
from nemesis.methods.cocoop.learner import CoCoOp, embed_dim_of
from nemesis.methods.coop.learner import PromptLearner
from nemesis.methods.protocol import build_learner

from .conftest import cached_backbone

MODELS = ["ViT-B-32", "RN50", "tiny"]
CLASSNAMES = ["dog", "golden retriever", "sea_lion", "airbus a320"]


def _images(clip, count: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, embed_dim_of(clip), generator=torch.Generator().manual_seed(seed))


def _randomise_meta_net(learner: CoCoOp, scale: float, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in learner.meta_net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def _shift_by_hand(learner: CoCoOp, image: torch.Tensor) -> torch.Tensor:
    """linear2(relu(linear1(f / |f|))) written out, independent of the learner's forward."""
    state = {name: tensor.detach() for name, tensor in learner.extra_parameters().items()}
    hidden = F.relu(F.normalize(image, dim=-1) @ state["meta_net.linear1.weight"].T + state["meta_net.linear1.bias"])
    return hidden @ state["meta_net.linear2.weight"].T + state["meta_net.linear2.bias"]  # [W]


@pytest.mark.parametrize("model_name", MODELS)
def test_zero_meta_net_equals_coop(model_name):
    clip = cached_backbone(model_name)
    cocoop = CoCoOp(clip, CLASSNAMES, ctx_init="a photo of a")
    with torch.no_grad():
        cocoop.meta_net.linear2.weight.zero_()
        cocoop.meta_net.linear2.bias.zero_()
        per_image = cocoop.text_features(_images(clip))  # [3, n_cls, D]
        coop = PromptLearner(clip, CLASSNAMES, ctx=cocoop.ctx.detach()).text_features()  # [n_cls, D]
    assert per_image.shape == (3, len(CLASSNAMES), coop.shape[-1])
    assert (per_image - coop).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_name", MODELS)
def test_each_image_gets_coop_with_its_shifted_ctx(model_name):
    clip = cached_backbone(model_name)
    cocoop = CoCoOp(clip, CLASSNAMES, n_ctx=4, seed=2)
    _randomise_meta_net(cocoop, scale=0.05)
    images = _images(clip)
    with torch.no_grad():
        per_image = cocoop.text_features(images)
        similarities = cocoop.similarities(images, cocoop.ctx.detach().unsqueeze(0))[0]  # [3, n_cls]
        logits = cocoop.logits(images)
        for index, image in enumerate(images):
            shifted = cocoop.ctx.detach() + _shift_by_hand(cocoop, image)  # [M, W]
            assert (shifted - cocoop.ctx).abs().max() > 1e-2  # the shift is not negligible
            coop = PromptLearner(clip, CLASSNAMES, ctx=shifted).text_features()
            assert (per_image[index] - coop).abs().max().item() <= 1e-5
            cosine = F.normalize(image, dim=-1) @ F.normalize(coop, dim=-1).T  # [n_cls]
            assert (similarities[index] - cosine).abs().max().item() <= 1e-5
            scale = clip.model.logit_scale.exp().item()
            assert (logits[index] - scale * cosine).abs().max().item() <= 1e-4


def test_variants_change_ctx_before_the_shift(tiny):
    cocoop = CoCoOp(tiny, CLASSNAMES, n_ctx=4, seed=0)
    _randomise_meta_net(cocoop, scale=0.1)
    images = _images(tiny, count=5)
    variants = torch.stack([cocoop.ctx.detach() * factor for factor in (1.0, 0.0, 3.0)])  # [3, M, W]
    with torch.no_grad():
        batched = cocoop.similarities(images, variants)
        for index, variant in enumerate(variants):
            alone = CoCoOp(tiny, CLASSNAMES, ctx=variant)
            alone.meta_net.load_state_dict(cocoop.meta_net.state_dict())
            assert torch.allclose(batched[index], alone.similarities(images, variant.unsqueeze(0))[0], atol=1e-6)


def test_chunked_rows_equal_one_pass(tiny, monkeypatch):
    import nemesis.methods.cocoop.learner as cocoop_module

    cocoop = CoCoOp(tiny, [f"class {index}" for index in range(7)], n_ctx=3, seed=0, chunk_size=5)
    _randomise_meta_net(cocoop, scale=0.1)
    images = _images(tiny, count=9)
    with torch.no_grad():
        whole = cocoop.similarities(images, cocoop.ctx.detach().unsqueeze(0))
        monkeypatch.setattr(cocoop_module, "ROWS_PER_PASS", 8)  # one image per pass
        chunked = cocoop.similarities(images, cocoop.ctx.detach().unsqueeze(0))
    assert torch.allclose(whole, chunked, atol=1e-6)


def test_training_reaches_ctx_and_meta_net_only(tiny):
    cocoop = CoCoOp(tiny, CLASSNAMES, n_ctx=4, seed=0)
    names = {name for name, _ in cocoop.named_parameters()}
    assert names == {"prompts.ctx", *(f"meta_net.{n}" for n, _ in cocoop.meta_net.named_parameters())}
    loss = torch.nn.functional.cross_entropy(cocoop.logits(_images(tiny)), torch.tensor([0, 1, 2]))
    loss.backward()
    assert cocoop.ctx.grad is not None and cocoop.meta_net.linear1.weight.grad is not None
    assert all(parameter.grad is None for parameter in tiny.model.parameters())


def test_meta_net_is_seeded_and_shaped_like_cocoops(tiny):
    first, again = CoCoOp(tiny, CLASSNAMES, seed=1), CoCoOp(tiny, CLASSNAMES, seed=1)
    other = CoCoOp(tiny, CLASSNAMES, seed=2)
    state = {name: tensor.detach() for name, tensor in first.extra_parameters().items()}
    declared = METHODS["cocoop"].tensor_shapes(CoCoOpConfig(), embed_dim_of(tiny), 64)
    assert {name: tuple(t.shape) for name, t in state.items()} | {"ctx": (4, 64)} == declared
    assert all(torch.equal(state[name], tensor) for name, tensor in again.extra_parameters().items())
    assert not torch.equal(state["meta_net.linear1.weight"], other.meta_net.linear1.weight)


def test_other_classnames_keep_the_frozen_rest_of_the_init_phrase(tiny):
    # "an X-ray of a" is 4 words but more tokens: n_ctx = 4 learned, the rest of the phrase frozen.
    cocoop = CoCoOp(tiny, CLASSNAMES, n_ctx=4, ctx_init="an X-ray of a", seed=0)
    with torch.no_grad():
        same = cocoop.for_classnames(list(CLASSNAMES))
        assert torch.allclose(same.logits(_images(tiny)), cocoop.logits(_images(tiny)), atol=1e-5)
        assert torch.equal(same.meta_net.linear1.weight, cocoop.meta_net.linear1.weight)


def test_registry_builds_and_checks(tiny):
    assert set(METHODS) >= {"coop", "cocoop"}
    source = CoCoOp(tiny, CLASSNAMES, seed=3)
    extra = {name: tensor.detach() for name, tensor in source.extra_parameters().items()}
    assert method_of_tensors(set(extra), "x") == "cocoop" and method_of_tensors(set(), "x") == "coop"
    built = build_learner("cocoop", tiny, CLASSNAMES, ctx=source.ctx.detach(), extra=extra)
    assert torch.equal(built.meta_net.linear2.weight, source.meta_net.linear2.weight)
    with pytest.raises(NemesisError, match="cocoop learns"):
        build_learner("cocoop", tiny, CLASSNAMES, ctx=source.ctx.detach(), extra={})
    with pytest.raises(NemesisError, match="coop learns"):
        build_learner("coop", tiny, CLASSNAMES, ctx=source.ctx.detach(), extra=extra)
    narrow = dict(extra, **{"meta_net.linear1.weight": torch.zeros(4, 32)})
    with pytest.raises(NemesisError, match="image width"):
        PromptCheckpoint(source.ctx.detach(), PromptMetadata(), "x", narrow).check_model("tiny", embed_dim_of(tiny), 64)
    with pytest.raises(NemesisError, match="unified"):
        CoCoOp(tiny, CLASSNAMES, class_specific=True)
