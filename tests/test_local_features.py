"""Local image features (PLOT's image side): equal to open_clip's pooling and to a plain reference, cached, refused."""

from __future__ import annotations

import json
import math
import os
from typing import ClassVar

import open_clip
import pytest
import torch

from nemesis.constants import LOCAL_FEATURES, POOLED_FEATURES
from nemesis.data import feature_cache
from nemesis.data.datasets import Sample, load_dataset
from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError
from nemesis.evaluation.evaluate import evaluate, resolve_target
from nemesis.files.checkpoint import load_checkpoint
from nemesis.methods import METHODS, MethodSpec, register_method
from nemesis.methods.coop import CoOpConfig
from nemesis.methods.coop.learner import PromptLearner
from nemesis.model.backbone import load_clip
from nemesis.model.local_features import local_image_features
from nemesis.training.configs import TrainConfig
from nemesis.training.trainer import train

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}
# Small towers of each kind, random weights: a 3 x 3 grid into an 8-head attention pool (T = 10), a
# 4 x 4-patch ViT (T = 17), and two ViTs without class-token pooling.
SMALL_RN = "local-test-rn"
SMALL_VIT = "local-test-vit"
AVG_POOL_VIT = "local-test-vit-avg"
ATTENTIONAL_POOL_VIT = "local-test-vit-attn"
VIT_CFG = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
CONFIGS = {
    SMALL_RN: {"image_size": 96, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64},
    SMALL_VIT: {**VIT_CFG, "final_ln_after_pool": True},
    AVG_POOL_VIT: {**VIT_CFG, "pool_type": "avg"},
    ATTENTIONAL_POOL_VIT: {**VIT_CFG, "attentional_pool": True, "attn_pooler_queries": 4},
}
CLASSNAMES = ["red apple", "green leaf", "blue sky"]


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    for name, vision in CONFIGS.items():
        config = {"embed_dim": 32, "quick_gelu": False, "vision_cfg": vision, "text_cfg": TEXT_CFG}
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return {name: load_clip(name) for name in CONFIGS}


@pytest.fixture
def pets(tmp_path):
    make_coop_folder(tmp_path / "data", "oxford_pets", CLASSNAMES, per_class=(3, 1, 4), image_size=32)
    return load_dataset("oxford_pets", tmp_path / "data")


def _images(backbone, count: int = 2) -> torch.Tensor:
    size = backbone.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def _input_of(module: torch.nn.Module, run) -> torch.Tensor:
    """What `module` receives (its first argument) while `run()` runs."""
    seen = []
    handle = module.register_forward_hook(lambda _module, args, _output: seen.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def _reference_attention_pool(pool, grid: torch.Tensor) -> torch.Tensor:
    """Every token of one image's grid [C, H, W] as a query of the attention pool, written from its
    definition with loops: tokens = [mean, spatial...] + position; per head softmax(q k^T / sqrt(d)) v;
    heads joined, then c_proj. Returns [HW + 1, D]."""
    channels, height, width = grid.shape
    spatial = [grid[:, row, column] for row in range(height) for column in range(width)]
    tokens = [torch.stack(spatial).mean(dim=0), *spatial]
    tokens = [token + pool.positional_embedding[index] for index, token in enumerate(tokens)]
    head_dim = channels // pool.num_heads
    outputs = []
    for query_token in tokens:
        heads = []
        for head in range(pool.num_heads):
            part = slice(head * head_dim, (head + 1) * head_dim)
            query = pool.q_proj(query_token)[part]
            scores = torch.stack([query @ pool.k_proj(token)[part] / math.sqrt(head_dim) for token in tokens])
            weights = torch.softmax(scores, dim=0)
            heads.append(sum(weight * pool.v_proj(token)[part] for weight, token in zip(weights, tokens, strict=True)))
        outputs.append(pool.c_proj(torch.cat(heads)))
    return torch.stack(outputs)


def test_resnet_local_features_are_the_attention_pool_of_every_token(small_models):
    model = small_models[SMALL_RN].model
    images = _images(small_models[SMALL_RN])
    with torch.no_grad():
        local = local_image_features(model, images)
        pooled = model.encode_image(images)
        grids = _input_of(model.visual.attnpool, lambda: model.encode_image(images))  # layer4's output
        reference = torch.stack([_reference_attention_pool(model.visual.attnpool, grid) for grid in grids])
    assert local.shape == (2, 3 * 3 + 1, 32) and local.dtype == torch.float32
    assert torch.allclose(local[:, 0], pooled, atol=1e-6, rtol=1e-5)
    assert torch.allclose(local, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny", SMALL_VIT])
def test_vit_local_features_are_the_projected_final_tokens_class_token_first(name, small_models, tiny):
    backbone = tiny if name == "tiny" else small_models[name]
    model, visual = backbone.model, backbone.model.visual
    images = _images(backbone)
    with torch.no_grad():
        local = local_image_features(model, images)
        pooled = model.encode_image(images)
        # open_clip's own tokens: its embedding of the images as encode_image makes it, through its
        # transformer, ln_post and proj (SMALL_VIT normalises after pooling, so its ln_post sees token 0 only).
        embedded = _input_of(visual.transformer, lambda: model.encode_image(images))
        final = visual.ln_post(visual.transformer(embedded)) @ visual.proj
    patches = visual.grid_size[0] * visual.grid_size[1]
    assert local.shape == (2, 1 + patches, model.visual.output_dim)
    assert torch.allclose(local[:, 0], pooled, atol=1e-6, rtol=1e-5)
    assert torch.allclose(local, final, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("name", "reason"), [(AVG_POOL_VIT, "'avg'"), (ATTENTIONAL_POOL_VIT, "attentional pooler")])
def test_a_tower_without_class_token_pooling_is_refused_in_one_line_naming_the_model(name, reason, small_models, pets):
    backbone = small_models[name]
    before = feature_cache.encoded_images
    with pytest.raises(NemesisError) as error:
        feature_cache.encode_split(backbone, pets, "test", inputs=LOCAL_FEATURES, progress=False)
    message = str(error.value)
    assert "\n" not in message and name in message and reason in message
    assert feature_cache.encoded_images == before  # refused before any image is encoded
    with pytest.raises(NemesisError, match=name):
        local_image_features(backbone.model, _images(backbone), name)


def test_an_unknown_image_input_is_refused(tiny):
    with pytest.raises(NemesisError, match="unknown image input 'pixels'"):
        feature_cache.image_encoder(tiny, "pixels")


def _live_local(backbone, dataset, split):
    images = torch.stack([backbone.preprocess(dataset.open_image(s)) for s in dataset.split(split)])
    with torch.no_grad():
        return local_image_features(backbone.model, images)


def test_local_features_are_cached_in_float32_and_read_back_without_encoding(tiny, pets, tmp_path):
    cache = tmp_path / "cache"
    before = feature_cache.encoded_images
    local, labels = feature_cache.encode_split(
        tiny, pets, "test", cache_dir=cache, batch_size=5, progress=False, inputs=LOCAL_FEATURES
    )
    assert feature_cache.encoded_images - before == len(pets.test)
    assert local.shape == (12, 17, 64) and local.dtype == torch.float32
    assert labels.tolist() == [s.label for s in pets.test]
    assert torch.allclose(local, _live_local(tiny, pets, "test"), atol=1e-5)

    encoded = feature_cache.encoded_images
    again, _ = feature_cache.encode_split(tiny, pets, "test", cache_dir=cache, progress=False, inputs=LOCAL_FEATURES)
    assert feature_cache.encoded_images == encoded and torch.equal(again, local)

    # The pooled entry is another file, and its features are the local ones' token 0.
    pooled, _ = feature_cache.encode_split(tiny, pets, "test", cache_dir=cache, progress=False)
    assert torch.allclose(pooled, local[:, 0], atol=1e-5)
    entries = [name for name in os.listdir(cache) if name != feature_cache.LOCKS_FOLDER]
    assert len(entries) == 2


def test_local_training_views_are_cached_and_their_token_0_is_the_pooled_view(tiny, pets, tmp_path):
    cache = tmp_path / "cache"
    local, labels = feature_cache.encode_train_views(
        tiny, pets, 2, seed=7, cache_dir=cache, progress=False, inputs=LOCAL_FEATURES
    )
    assert local.shape == (2, len(pets.train), 17, 64) and labels.tolist() == [s.label for s in pets.train]
    encoded = feature_cache.encoded_images
    again, _ = feature_cache.encode_train_views(
        tiny, pets, 2, seed=7, cache_dir=cache, progress=False, inputs=LOCAL_FEATURES
    )
    assert feature_cache.encoded_images == encoded and torch.equal(again, local)
    pooled, _ = feature_cache.encode_train_views(tiny, pets, 2, seed=7, cache_dir=cache, progress=False)
    assert torch.allclose(pooled, local[:, :, 0], atol=1e-5)


# feature_key of this backbone and these samples before local features existed: pooled keys must not
# change, or every cache entry already on users' disks would be encoded again.
KEY_BACKBONE = type("KeyBackbone", (), {"name": "RN50", "weights_id": "openai"})()
KEY_SAMPLES = [Sample("a/1.jpg", 0, "cat"), Sample("b/2.jpg", 1, "dog")]
POOLED_TEST_KEY = "a2a44e9dd29656fc5dc5c8ba85b9f4b4d63671503f79d8d6e82721a17c22841b"
POOLED_VIEW_KEY = "ae4091f32fd3db8f11da5d5f324b53abbc2947c9607928a48268cae5b0e6fcfc"


def test_pooled_keys_are_those_of_before_and_local_keys_differ():
    def key(inputs: str, *view: object) -> str:
        split, preprocessing, precision = ("train", "augment", "amp-fp16") if view else ("test", "Compose(...)", "fp32")
        return feature_cache.feature_key(
            KEY_BACKBONE, "dtd", split, KEY_SAMPLES, preprocessing, precision, *view, inputs=inputs
        )

    assert key(POOLED_FEATURES) == POOLED_TEST_KEY
    assert key(POOLED_FEATURES, 2, 7) == POOLED_VIEW_KEY
    assert key(LOCAL_FEATURES) != POOLED_TEST_KEY and key(LOCAL_FEATURES, 2, 7) != POOLED_VIEW_KEY


# --- a learner of local features, through training and evaluation -----------------------------


class ClassTokenCoOp(PromptLearner):
    """CoOp on local features [B, T, D] classifying by token 0, the pooled feature: so it must train and
    score as CoOp does on pooled features, and it records the shapes it is handed."""

    method = "coop-token0"
    image_inputs = (LOCAL_FEATURES,)
    shapes_seen: ClassVar[list[tuple[int, ...]]] = []  # every learner of the class, shared

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        self.shapes_seen.append(tuple(image_features.shape))
        return super().logits(image_features[:, 0])

    def similarities(self, image_features: torch.Tensor, ctx_variants: torch.Tensor) -> torch.Tensor:
        self.shapes_seen.append(tuple(image_features.shape))
        return super().similarities(image_features[:, 0], ctx_variants)


@pytest.fixture
def token0_method():
    register_method(MethodSpec(ClassTokenCoOp.method, "CoOp on token 0", ClassTokenCoOp, CoOpConfig))
    ClassTokenCoOp.shapes_seen.clear()
    yield ClassTokenCoOp.method
    del METHODS[ClassTokenCoOp.method]


@pytest.mark.parametrize("train_views", [0, 2])
def test_training_and_evaluation_hand_a_local_learner_local_features(token0_method, tmp_path, train_views):
    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(4, 2, 3), image_size=28)
    options = dict(dataset="oxford_pets", root=str(root), shots=4, seed=2, model="tiny", pretrained=None, n_ctx=4,
                   epochs=2, batch_size=4, lr=0.05, device="cpu", train_views=train_views)  # fmt: skip
    prompts, accuracies = {}, {}
    for method in ("coop", token0_method):
        out = train(TrainConfig(prompt_method=method, **options), tmp_path / method, progress=False)
        checkpoint = load_checkpoint(out / "prompt.safetensors")
        prompts[method] = checkpoint.ctx
        accuracies[method] = evaluate(resolve_target(checkpoint), root=root, device="cpu", progress=False).accuracy
    tokens = 1 + 4 * 4  # tiny: a class token and 4 x 4 patches
    assert ClassTokenCoOp.shapes_seen and all(len(s) == 3 and s[1:] == (tokens, 64) for s in ClassTokenCoOp.shapes_seen)
    assert torch.allclose(prompts[token0_method], prompts["coop"], atol=1e-5)
    assert accuracies[token0_method] == accuracies["coop"]
