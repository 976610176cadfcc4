"""The autocast policy's decisions, pinned on the CPU (the CUDA cases read from the description), and the
half text side of `--precision fp16`."""

from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch

from nemesis.choices import Precision
from nemesis.precision import Autocast, autocast_policy, half_text_side

TRAINING = [None, *Precision]  # None: evaluation


@pytest.mark.parametrize("training", TRAINING, ids=lambda value: getattr(value, "value", "evaluation"))
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_nothing_runs_under_autocast_on_the_cpu(device, training):
    policy = autocast_policy(device, training=training)
    assert policy == Autocast("cpu") and not policy.enabled and not policy.scales_loss
    assert isinstance(policy.context(), contextlib.nullcontext)
    with policy.context():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_evaluation_on_cuda_is_fp16_autocast_as_coop_runs_clip(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # evaluation does not ask
    policy = autocast_policy(device)
    assert (policy.device_type, policy.dtype, policy.enabled) == ("cuda", torch.float16, True)


@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_training_on_cuda_is_bf16_where_the_gpu_has_it_else_fp16_with_loss_scaling(bf16, dtype, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    policy = autocast_policy("cuda", training=Precision.amp)
    assert (policy.device_type, policy.dtype, policy.enabled) == ("cuda", dtype, True)
    assert policy.scales_loss is (not bf16)


@pytest.mark.parametrize("precision", [Precision.fp32, Precision.fp16])
def test_fp32_and_fp16_training_on_cuda_run_without_autocast(precision, monkeypatch):
    # fp16 holds the text tower and the learned tensors in fp16 itself; autocast would change nothing it needs.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: pytest.fail("only amp asks the GPU"))
    policy = autocast_policy("cuda", training=precision)
    assert policy == Autocast("cuda") and not policy.enabled and not policy.scales_loss
    assert isinstance(policy.context(), contextlib.nullcontext)


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return list(itertools.chain(model.parameters(), model.buffers()))


def _bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def test_fp16_text_side_shares_the_fp32_image_tower_and_copies_less(tiny):
    model = tiny.model
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    half = half_text_side(model)
    assert half is not model and half.visual is model.visual  # the image tower is the original's, not a copy
    assert all(tensor.dtype == torch.float32 for tensor in _tensors(half.visual))
    text = [tensor for tensor in _tensors(half) if not any(tensor is own for own in _tensors(model.visual))]
    assert text and all(tensor.dtype == torch.float16 for tensor in text if tensor.is_floating_point())
    # The original is left as it was: fp32 and bit-identical.
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert all(tensor.dtype == torch.float32 for tensor in _tensors(model) if tensor.is_floating_point())

    # Memory: only the text side is new, at half its fp32 bytes; the whole-model half copy also held the tower.
    original = {tensor.data_ptr() for tensor in _tensors(model)}
    copied = _bytes(tensor for tensor in _tensors(half) if tensor.data_ptr() not in original)
    whole = copy.deepcopy(model).half()
    assert copied == _bytes(_tensors(whole)) - _bytes(_tensors(whole.visual)) < _bytes(_tensors(whole))

    # The text passes give what the whole-model half copy gives, bit for bit.
    tokens = tiny.tokenizer(["a photo of a red apple", "a blue sky"])
    with torch.no_grad():
        assert torch.equal(half.encode_text(tokens), whole.encode_text(tokens))
    assert torch.equal(half.logit_scale, whole.logit_scale) and half.logit_scale.dtype == torch.float16
    assert torch.equal(half.attn_mask, whole.attn_mask) and half.attn_mask.dtype == whole.attn_mask.dtype
