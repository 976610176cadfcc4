"""The autocast policy's decisions, pinned on the CPU: the CUDA cases are read from the description."""

from __future__ import annotations

import contextlib

import pytest
import torch

from nemesis.choices import Precision
from nemesis.precision import Autocast, autocast_policy

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
