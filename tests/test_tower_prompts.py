"""Prompts inside both towers: equal to open_clip without prompts, to a plain reference with them.

The references are written here from the definitions (MaPLe / IVLP / PromptSRC, KMnP's VPT): explicit
loops over open_clip's blocks, sequences built by hand with slicing and in-place assignment.
"""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch

from nemesis.errors import NemesisError
from nemesis.model.deep_prompts import check_layer_prompts
from nemesis.model.text_encoder import TextEncoder
from nemesis.model.vision_prompts import (
    VisionPromptPlacement,
    check_vision_prompts,
    insert_prompts,
    patch_embeddings,
    pool_prompted,
    prompted_image_features,
    run_blocks,
)

from .conftest import cached_backbone

MODELS = ["tiny", "ViT-B-32"]
CLASSNAMES = ["golden retriever", "dog", "the greater spotted long tailed mountain water bird", "sea lion"]
TOLERANCE = 1e-5
EXACT = 1e-6


def _prompts(depth: int, n: int, width: int, seed: int, batch: int | None = None) -> list[torch.Tensor]:
    """depth prompts [n, W] (or [batch, n, W]), N(0, 0.5^2): large enough to move the features."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n, width) if batch is None else (batch, n, width)
    return [torch.randn(*shape, generator=generator) * 0.5 for _ in range(depth)]


def _images(backbone, count: int = 2) -> torch.Tensor:
    size = backbone.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(3))


# --- the vision tower ---------------------------------------------------------------------------


def _reference_vision(visual, images, prompts, placement: str, through_ln_pre: bool) -> torch.Tensor:
    """Features [B, D] from the definitions, class-token pooling (the towers tested here pool that way)."""
    depth = len(prompts)
    n = prompts[0].shape[-2] if depth else 0
    x = visual.conv1(images)  # [B, W, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, P, W]
    batch, _, width = x.shape
    x = torch.cat([visual.class_embedding.expand(batch, 1, width), x], dim=1)  # [B, 1 + P, W]
    x = x + visual.positional_embedding  # the prompts get no positional embedding
    if not through_ln_pre:
        x = visual.ln_pre(x)
    if depth:
        first = prompts[0].expand(batch, n, width)
        # append: after the patches; prepend: between the class token and the patches
        at = x.shape[1] if placement == "append" else 1
        x = torch.cat([x[:, :at], first, x[:, at:]], dim=1)
    if through_ln_pre:
        x = visual.ln_pre(x)
    for layer, block in enumerate(visual.transformer.resblocks):
        if 1 <= layer < depth:
            x = x.clone()
            if placement == "append":
                x[:, -n:] = prompts[layer]  # the last n tokens
            else:
                x[:, 1 : 1 + n] = prompts[layer]
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj  # pooled from the class token: prompt outputs discarded


@pytest.mark.parametrize("name", MODELS)
def test_vision_without_prompts_equals_encode_image(name):
    backbone = cached_backbone(name)
    images = _images(backbone)
    width = backbone.model.visual.class_embedding.shape[0]
    with torch.no_grad():
        expected = backbone.model.encode_image(images)
        for prompts in ([], _prompts(2, 0, width, 0)):  # depth 0; n = 0 at depth > 0
            for placement in VisionPromptPlacement:
                ours = prompted_image_features(backbone.model.visual, images, prompts, placement)
                assert (ours - expected).abs().max().item() <= EXACT


VISION_CASES = [
    ("append", None, True),  # MaPLe / IVLP: appended before ln_pre
    ("prepend", None, False),  # KMnP: between class token and patches, after ln_pre (KMnP's ViT has none)
    ("prepend", True, True),
]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("placement", "through_ln_pre", "reference_ln_pre"), VISION_CASES)
@pytest.mark.parametrize("depth", [1, 2])
def test_vision_prompts_equal_the_reference(name, placement, through_ln_pre, reference_ln_pre, depth):
    backbone = cached_backbone(name)
    visual = backbone.model.visual
    images = _images(backbone)
    prompts = _prompts(depth, 3, visual.class_embedding.shape[0], seed=depth)
    with torch.no_grad():
        ours = prompted_image_features(visual, images, prompts, placement, through_ln_pre)
        reference = _reference_vision(visual, images, prompts, placement, reference_ln_pre)
        plain = backbone.model.encode_image(images)
    assert (ours - reference).abs().max().item() <= TOLERANCE
    assert (ours - plain).abs().max().item() > 1e-3  # the prompts do something


def test_vision_deep_prompts_at_every_layer_and_per_image_prompts(tiny):
    """Depth = all layers (KMnP's deep VPT), one prompt per image (a sweep's variants), and the cached path."""
    visual = tiny.model.visual
    images = _images(tiny, count=3)
    layers = len(visual.transformer.resblocks)
    prompts = _prompts(layers, 2, visual.class_embedding.shape[0], seed=5, batch=3)
    with torch.no_grad():
        ours = prompted_image_features(visual, images, prompts, "prepend")
        for row in range(3):
            alone = _reference_vision(visual, images[row : row + 1], [p[row] for p in prompts], "prepend", False)
            assert (ours[row] - alone[0]).abs().max().item() <= TOLERANCE
        # Resuming from the hidden states entering layer 1 (what a sweep caches) changes nothing.
        x = insert_prompts(visual, patch_embeddings(visual, images), prompts[0], "prepend")
        entering = run_blocks(visual, x, prompts, "prepend", last=1)
        resumed = pool_prompted(visual, run_blocks(visual, entering, prompts, "prepend", first=1), 2, "prepend")
    assert (resumed - ours).abs().max().item() <= EXACT


@pytest.mark.parametrize("placement", ["append", "prepend"])
def test_gradients_reach_every_vision_prompt(tiny, placement):
    visual = tiny.model.visual
    prompts = [p.requires_grad_() for p in _prompts(2, 2, visual.class_embedding.shape[0], seed=7)]
    prompted_image_features(visual, _images(tiny), prompts, placement).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)
    assert all(param.grad is None for param in visual.parameters())  # the tower stays frozen


def test_other_vit_poolings_drop_the_prompt_outputs(tmp_path):
    """Average pooling and final-LN-after-pool: open_clip's own pooling of the prompt-free tokens."""
    vision = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}
    for name, extra in [("tp-avg", {"pool_type": "avg"}), ("tp-lnafter", {"final_ln_after_pool": True})]:
        config = {"embed_dim": 32, "vision_cfg": {**vision, **extra}, "text_cfg": text}
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in ("tp-avg", "tp-lnafter"):
        visual = open_clip.create_model(name, pretrained=None).eval().visual
        with torch.no_grad():
            assert (prompted_image_features(visual, images, []) - visual(images)).abs().max().item() <= EXACT
            prompts = _prompts(2, 3, 64, seed=1)
            x = run_blocks(visual, insert_prompts(visual, patch_embeddings(visual, images), prompts[0]), prompts)
            pooled, _ = visual._pool(x[:, :-3])  # the prompt tokens are the last 3
            assert (prompted_image_features(visual, images, prompts) - pooled @ visual.proj).abs().max() <= EXACT


def test_misfitting_prompts_are_refused(tiny):
    visual = tiny.model.visual
    with pytest.raises(ValueError, match="3 layers of vision prompts"):
        prompted_image_features(visual, _images(tiny), _prompts(3, 2, 64, seed=0))
    with pytest.raises(ValueError, match="expected"):
        check_layer_prompts([torch.zeros(2, 64), torch.zeros(3, 64)], 64, 2, "vision")


# --- the text tower -----------------------------------------------------------------------------


def _text_inputs(backbone, n: int):
    """Token ids [C, 77] of "X ... X <name>." (n placeholders) and their embeddings with ctx at 1..n."""
    placeholders = " ".join(["X"] * n)
    token_ids = backbone.tokenizer([f"{placeholders} {name}." for name in CLASSNAMES])
    width = backbone.model.token_embedding.weight.shape[1]
    ctx = torch.randn(n, width, generator=torch.Generator().manual_seed(11)) * 0.5
    with torch.no_grad():
        embeddings = backbone.model.token_embedding(token_ids)  # [C, 77, W]
    embeddings[:, 1 : 1 + n] = ctx  # the layer-0 prompt, right after the start token
    return token_ids, embeddings


def _reference_text(model, token_ids, embeddings, deep_prompts) -> torch.Tensor:
    """Features [C, D]: the whole 77-token prompts, layer by layer, positions 1..n replaced before layers 1..d-1."""
    x = embeddings + model.positional_embedding  # the layer-0 ctx gets positions; deeper prompts do not
    for layer, block in enumerate(model.transformer.resblocks):
        if 1 <= layer <= len(deep_prompts):
            prompt = deep_prompts[layer - 1]
            x = x.clone()
            x[:, 1 : 1 + prompt.shape[-2]] = prompt
        x = block(x, attn_mask=model.attn_mask)  # the causal mask
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)]  # at the end-of-text token
    return pooled @ model.text_projection


@pytest.mark.parametrize("name", MODELS)
def test_text_without_deep_prompts_equals_encode_text(name):
    backbone = cached_backbone(name)
    encoder = TextEncoder(backbone.model, name, backbone.tokenizer)
    token_ids = backbone.tokenizer([f"a photo of a {c}." for c in CLASSNAMES])
    with torch.no_grad():
        expected = backbone.model.encode_text(token_ids)
        embeddings = encoder.token_embedding(token_ids)
        pool_index = encoder.pool_index(token_ids)
        for deep in ([], _prompts(len(encoder.tower.transformer.resblocks) - 1, 0, encoder.width, 0)):
            whole = encoder(embeddings, pool_index, cut=False, deep_prompts=deep)
            assert (whole - expected).abs().max().item() <= EXACT
            cut = encoder(embeddings, pool_index, cut=True, deep_prompts=deep)  # cut at end-of-text: I2's tolerance
            assert (cut - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("depth", [1, 2])
def test_deep_text_prompts_equal_the_reference_in_both_passes(name, depth):
    backbone = cached_backbone(name)
    encoder = TextEncoder(backbone.model, name, backbone.tokenizer)
    n = 4
    token_ids, embeddings = _text_inputs(backbone, n)
    pool_index = encoder.pool_index(token_ids)
    variants = 3
    deep = _prompts(depth - 1, n, encoder.width, seed=depth, batch=variants)  # [V, n, W] for layers 1..depth-1
    with torch.no_grad():
        # The shared-prefix pass: [SOS] + ctx once per variant, class suffixes attending to its keys and values.
        prefixes = embeddings[:1, : 1 + n].expand(variants, -1, -1)  # [V, 1 + n, W]
        shared = encoder.encode_pairs(prefixes, embeddings[:, 1 + n :], pool_index, deep_prompts=deep)
        for v in range(variants):
            layer_prompts = [p[v] for p in deep]
            reference = _reference_text(backbone.model, token_ids, embeddings, layer_prompts)
            cut = encoder(embeddings, pool_index, deep_prompts=layer_prompts)  # the cut pass
            assert (shared[v] - reference).abs().max().item() <= TOLERANCE
            assert (cut - reference).abs().max().item() <= TOLERANCE
        if depth > 1:
            plain = _reference_text(backbone.model, token_ids, embeddings, [])
            assert (shared[0] - plain).abs().max().item() > 1e-3  # the deep prompts do something


def test_deep_text_prompts_at_every_layer_and_the_whole_prompt_fallback(tiny):
    encoder = TextEncoder(tiny.model, tiny.name, tiny.tokenizer)
    token_ids, embeddings = _text_inputs(tiny, 2)
    pool_index = encoder.pool_index(token_ids)
    deep = _prompts(len(encoder.tower.transformer.resblocks) - 1, 2, encoder.width, seed=4, batch=2)
    with torch.no_grad():
        # Prefixes of length 0: whole prompts, each row's deep prompts those of its variant.
        whole = encoder.encode_prefixed(
            embeddings.new_zeros(2, 0, encoder.width),
            lambda prefix_rows, class_rows, length: embeddings[class_rows, :length],
            pool_index,
            embeddings.shape[1],
            deep_prompts=deep,
        )
        for v in range(2):
            reference = _reference_text(tiny.model, token_ids, embeddings, [p[v] for p in deep])
            assert (whole[v] - reference).abs().max().item() <= TOLERANCE


def test_gradients_reach_the_deep_text_prompts_through_the_shared_prefix(tiny):
    encoder = TextEncoder(tiny.model, tiny.name, tiny.tokenizer)
    n = 2
    token_ids, embeddings = _text_inputs(tiny, n)
    pool_index = encoder.pool_index(token_ids)
    gradients = []
    for shared in (True, False):
        deep = [p.requires_grad_() for p in _prompts(1, n, encoder.width, seed=9)]
        if shared:
            features = encoder.encode_pairs(
                embeddings[:1, : 1 + n], embeddings[:, 1 + n :], pool_index, deep_prompts=deep
            )
        else:
            features = _reference_text(tiny.model, token_ids, embeddings, deep)
        features.square().sum().backward()
        gradients.append(deep[0].grad)
    ours, reference = gradients
    assert reference.abs().sum() > 0
    assert ((ours - reference).norm() / reference.norm()).item() <= TOLERANCE


def test_deep_text_prompts_must_fit_the_prefix(tiny):
    encoder = TextEncoder(tiny.model, tiny.name, tiny.tokenizer)
    token_ids, embeddings = _text_inputs(tiny, 4)
    deep = _prompts(1, 4, encoder.width, seed=0)
    with pytest.raises(ValueError, match="do not fit after the start token"):
        encoder.encode_pairs(embeddings[:1, :3], embeddings[:, 3:], encoder.pool_index(token_ids), deep_prompts=deep)
    with pytest.raises(ValueError, match="layers of deep text prompts"):
        encoder(embeddings, encoder.pool_index(token_ids), deep_prompts=_prompts(2, 4, encoder.width, seed=0))


def test_ivlp_geometry_on_vit_b16():
    """The released checkpoints' geometry (ViT-B/16, 4 + 4 tokens, depth 9 in both towers: PromptSRC, IVLP)."""
    backbone = cached_backbone("ViT-B-16")
    visual = backbone.model.visual
    encoder = TextEncoder(backbone.model, backbone.name, backbone.tokenizer)
    images = _images(backbone)
    vision = _prompts(9, 4, visual.class_embedding.shape[0], seed=1)
    token_ids, embeddings = _text_inputs(backbone, 4)
    deep = _prompts(8, 4, encoder.width, seed=2)  # layers 1..8
    with torch.no_grad():
        ours = prompted_image_features(visual, images, vision)
        assert (ours - _reference_vision(visual, images, vision, "append", True)).abs().max().item() <= TOLERANCE
        text = encoder.encode_pairs(
            embeddings[:1, :5], embeddings[:, 5:], encoder.pool_index(token_ids), deep_prompts=deep
        )
        reference = _reference_text(backbone.model, token_ids, embeddings, deep)
    assert (text[0] - reference).abs().max().item() <= TOLERANCE


def test_low_precision_towers_take_fp32_prompts(tiny):
    """As the released models run: fp32 prompts cast to the tower's dtype where they enter (bf16 on the CPU)."""
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    encoder = TextEncoder(model, tiny.name, tiny.tokenizer)
    images = _images(tiny).to(torch.bfloat16)
    vision = _prompts(2, 2, 64, seed=1)
    token_ids, embeddings = _text_inputs(tiny, 2)
    deep = _prompts(1, 2, encoder.width, seed=2)
    with torch.no_grad():
        ours = prompted_image_features(model.visual, images, vision)
        reference = _reference_vision(model.visual, images, [p.to(torch.bfloat16) for p in vision], "append", True)
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, reference)
        embeddings = embeddings.to(torch.bfloat16)
        text = encoder(embeddings, encoder.pool_index(token_ids), cut=False, deep_prompts=deep)
        reference = _reference_text(model, token_ids, embeddings, [p.to(torch.bfloat16) for p in deep])
    assert text.dtype == torch.bfloat16 and torch.equal(text, reference)


def test_a_resnet_image_tower_is_refused_in_one_line_naming_the_model():
    backbone = cached_backbone("RN50")
    with pytest.raises(NemesisError, match=r"^RN50 cannot take vision prompts: its image tower is a ModifiedResNet"):
        check_vision_prompts(backbone.model.visual, "RN50")
    check_vision_prompts(cached_backbone("tiny").model.visual, "tiny")  # a ViT passes
