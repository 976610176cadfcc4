"""Prefix tuning's mechanism in the text encoder (issue 25, build item 1's foundation): learned keys and
values before every layer's own, seen by every token, in the cut pass and the shared-prefix pass.

The reference is written here from the definition (Li & Liang 2021; PEFT's prefix tuning): per layer,
h = ln_1(x); q, k, v = h's projections split into heads; k and v get the layer's P learned keys and
values (split into heads the same way) in front; attention softmax(q k^T / sqrt(d) + mask) v with the
prefix columns open and the rest causal; out_proj; the residual; the MLP.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemesis.model.text_encoder import TextEncoder

from .conftest import cached_backbone

MODELS = ["tiny", "ViT-B-32"]
CLASSNAMES = ["golden retriever", "dog", "the greater spotted long tailed mountain water bird", "sea lion"]
TOLERANCE = 1e-5


def _prefix(model, count: int, seed: int, batch: int | None = None) -> torch.Tensor:
    """Learned keys and values [layers, 2, P, W] (or [batch, ...]), N(0, 1): large enough to matter."""
    layers = len(model.transformer.resblocks)
    width = model.token_embedding.weight.shape[1]
    shape = (layers, 2, count, width) if batch is None else (batch, layers, 2, count, width)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _reference(model, token_ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Text features [C, D] of whole prompts under one prefix [layers, 2, P, W], explicit attention."""
    x = model.token_embedding(token_ids) + model.positional_embedding  # [C, L, W]
    count, length = prefix.shape[-2], x.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    mask = torch.cat([torch.zeros(length, count), causal], dim=1)  # [L, P + L]: the prefix seen by every token
    for layer, block in enumerate(model.transformer.resblocks):
        attention = block.attn
        heads = attention.num_heads
        h = block.ln_1(x)
        q, k, v = torch.nn.functional.linear(h, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
        k = torch.cat([prefix[layer, 0].expand(x.shape[0], -1, -1), k], dim=1)  # [C, P + L, W]
        v = torch.cat([prefix[layer, 1].expand(x.shape[0], -1, -1), v], dim=1)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))  # [C, heads, *, d]
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(x.shape)
        x = x + attention.out_proj(out)
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)] @ model.text_projection


def _prompts(backbone):
    token_ids = backbone.tokenizer([f"a photo of a {name}." for name in CLASSNAMES])
    encoder = TextEncoder(backbone.model, backbone.name, backbone.tokenizer)
    with torch.no_grad():
        embeddings = encoder.token_embedding(token_ids)
    return encoder, token_ids, embeddings


@pytest.mark.parametrize("name", MODELS)
def test_an_empty_prefix_equals_encode_text(name):
    backbone = cached_backbone(name)
    encoder, token_ids, embeddings = _prompts(backbone)
    with torch.no_grad():
        expected = backbone.model.encode_text(token_ids)
        ours = encoder(embeddings, encoder.pool_index(token_ids), kv_prefix=_prefix(backbone.model, 0, 0))
    assert (ours - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", MODELS)
def test_a_prefix_equals_the_reference_in_both_passes(name):
    backbone = cached_backbone(name)
    model = backbone.model
    encoder, token_ids, embeddings = _prompts(backbone)
    pool_index = encoder.pool_index(token_ids)
    variants = 3
    prefixes = _prefix(model, 5, seed=1, batch=variants)  # one per variant, as a sweep passes them
    shared = 5  # [SOS] "a photo of a": the same for every class
    with torch.no_grad():
        starts = embeddings[:1, :shared].expand(variants, -1, -1)
        paired = encoder.encode_pairs(starts, embeddings[:, shared:], pool_index, kv_prefix=prefixes)  # [V, C, D]
        for v in range(variants):
            reference = _reference(model, token_ids, prefixes[v])
            whole = encoder(embeddings, pool_index, kv_prefix=prefixes[v])  # the cut pass
            assert (whole - reference).abs().max().item() <= TOLERANCE
            assert (paired[v] - reference).abs().max().item() <= TOLERANCE
        plain = model.encode_text(token_ids)
        assert (paired[0] - plain).abs().max().item() > 1e-3  # the prefix does something


def test_gradients_reach_the_prefix_through_the_shared_pass(tiny):
    encoder, token_ids, embeddings = _prompts(tiny)
    prefix = _prefix(tiny.model, 2, seed=3).requires_grad_()
    features = encoder.encode_pairs(
        embeddings[:1, :5], embeddings[:, 5:], encoder.pool_index(token_ids), kv_prefix=prefix
    )
    features.sum().backward()
    assert prefix.grad is not None and bool((prefix.grad[:, 0].abs().sum(-1) > 0).all())  # every key
    assert bool((prefix.grad[:, 1].abs().sum(-1) > 0).all())  # every value
    assert all(parameter.grad is None for parameter in tiny.model.parameters())


def test_a_prefix_that_does_not_fit_is_refused(tiny):
    encoder, token_ids, embeddings = _prompts(tiny)
    wrong = torch.zeros(len(tiny.model.transformer.resblocks) + 1, 2, 3, encoder.width)
    with pytest.raises(ValueError, match="prefix keys and values of shape"):
        encoder(embeddings, encoder.pool_index(token_ids), kv_prefix=wrong)
