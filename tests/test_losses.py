"""Nemesis's losses (DESIGN section 5): PUN's gradient, PAN's alpha, schedules, mixing, class-specific ctx."""

from __future__ import annotations

import math

import pytest
import torch

from nemesis.errors import NemesisError
from nemesis.methods.coop.learner import PromptedCLIP, PromptLearner
from nemesis.penalties import NemesisConfig
from nemesis.penalties.losses import (
    PenaltyInputs,
    norm_loss,
    pan,
    pan_alpha,
    position_norms,
    pun,
    schedule_weight,
)
from nemesis.training.trainer import _correct_counter

M, W = 6, 8


def random_ctx(*leading: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*leading, M, W, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def scripted_counter(ctx: torch.Tensor, correct_when_scaled: dict[int, int], original: int):
    """count_correct for PAN: the original gets `original` right; the copy that rescaled position j gets
    `correct_when_scaled[j]` right. The rescaled position is read off the variant itself."""
    seen = []

    def count_correct(variants: torch.Tensor) -> torch.Tensor:
        counts = []
        for variant in variants:
            changed = (variant != ctx.detach()).reshape(-1, M, W).any(dim=0).any(dim=-1).nonzero().flatten().tolist()
            assert len(changed) <= 1, "each copy rescales exactly one position"
            seen.append(changed)
            counts.append(original if not changed else correct_when_scaled[changed[0]])
        return torch.tensor(counts)

    count_correct.seen = seen
    return count_correct


def test_pun_gradient_is_the_closed_form_for_p2():
    ctx = random_ctx()
    config = NemesisConfig(beta=1.0, weight=2.5, norm="2", schedule="logistic")
    epoch, epochs = 7, 20
    penalty = norm_loss(ctx, config, epoch, epochs)
    penalty.value.backward()
    s = schedule_weight("logistic", epoch, epochs)
    expected = s * 2.5 * 1.0 * ctx.detach() / ctx.detach().norm(dim=-1, keepdim=True) / M
    torch.testing.assert_close(ctx.grad, expected, rtol=1e-6, atol=1e-7)


def test_logistic_schedule_matches_its_formula():
    epochs = 50
    for epoch in (0, 1, 10, 24, 25, 26, 40, 49):
        formula = 1 - 1 / (1 + math.exp(-0.2 * (epoch - epochs / 2)))
        assert schedule_weight("logistic", epoch, epochs) == pytest.approx(formula, rel=1e-12)
    assert schedule_weight("logistic", 25, 50) == pytest.approx(0.5)
    assert schedule_weight("logistic", 0, 10_000) == pytest.approx(1.0)  # no overflow far from the middle
    assert schedule_weight("constant", 3, 50) == 1.0
    with pytest.raises(NemesisError, match="unknown schedule 'cosine'"):
        schedule_weight("cosine", 0, 10)


def test_pan_sets_alpha_when_the_rescaled_copy_gets_strictly_more_right():
    ctx = random_ctx()
    # Position 1's copy gets 6 right (> 5: alpha 1); position 2's ties (5: alpha 0); others get fewer.
    counter = scripted_counter(ctx, {0: 4, 1: 6, 2: 5, 3: 0, 4: 5, 5: 4}, original=5)
    inputs = PenaltyInputs(positions=M, corrupt_weight=0.5, count_correct=counter)
    penalty = pan(ctx, inputs)
    assert penalty.alpha.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert counter.seen[0] == [] and sorted(changed[0] for changed in counter.seen[1:]) == list(range(M))
    torch.testing.assert_close(penalty.value, ctx.detach()[1].norm())


def test_pan_leaves_alpha_zero_when_no_copy_gets_more_right():
    ctx = random_ctx()
    counter = scripted_counter(ctx, dict.fromkeys(range(M), 5), original=5)  # every copy ties
    penalty = pan(ctx, PenaltyInputs(positions=M, count_correct=counter))
    assert penalty.alpha.sum() == 0
    assert penalty.value.item() == 0.0  # sum a_j n_j / max(1, 0)
    penalty.value.backward()
    assert ctx.grad.abs().sum() == 0


def test_pan_tries_np_distinct_positions_and_averages_the_selected_norms():
    ctx = random_ctx()
    counter = scripted_counter(ctx, dict.fromkeys(range(M), 9), original=1)  # every copy helps
    penalty = pan(ctx, PenaltyInputs(positions=3, count_correct=counter, generator=torch.Generator().manual_seed(4)))
    picked = penalty.alpha.nonzero().flatten()
    assert len(picked) == 3 and len(counter.seen) == 4
    norms = ctx.detach().norm(dim=-1)
    torch.testing.assert_close(penalty.value, norms[picked].mean())
    scaled = [changed[0] for changed in counter.seen[1:]]
    assert sorted(scaled) == picked.tolist()


def test_pan_copies_rescale_the_position_by_cw_in_one_batched_call():
    ctx = random_ctx()
    calls = []

    def count_correct(variants):
        calls.append(variants.clone())
        return torch.zeros(len(variants), dtype=torch.long)

    pan_alpha(ctx, PenaltyInputs(positions=2, corrupt_weight=0.25, count_correct=count_correct))
    assert len(calls) == 1 and calls[0].shape == (3, M, W)
    variants = calls[0]
    torch.testing.assert_close(variants[0], ctx.detach())
    for copy in variants[1:]:
        changed = (copy != ctx.detach()).any(dim=-1).nonzero().flatten()
        assert len(changed) == 1
        torch.testing.assert_close(copy[changed[0]], 0.25 * ctx.detach()[changed[0]])


def test_pan_alpha_agrees_with_classifying_each_copy_alone(tiny):
    """The trainer's batched pre-inference gives the counts a separate classification of each copy gives."""
    torch.manual_seed(0)
    learner = PromptLearner(tiny, ["cat", "dog", "bird"], n_ctx=4, seed=3)
    images, labels = torch.randn(12, 64), torch.tensor([0, 1, 2] * 4)
    counter = _correct_counter(learner, images, labels)
    ctx = learner.ctx.detach()
    variants = ctx.unsqueeze(0).repeat(5, 1, 1)
    for copy in range(1, 5):
        variants[copy, copy - 1] *= 0.01
    batched = counter(variants)
    with torch.no_grad():
        alone = [
            int((PromptedCLIP(learner).logits(images, learner.encode(v.unsqueeze(0))[0]).argmax(-1) == labels).sum())
            for v in variants
        ]
    assert batched.tolist() == alone
    alpha = pan_alpha(learner.ctx, PenaltyInputs(positions=4, corrupt_weight=0.01, count_correct=counter))
    assert alpha.tolist() == [float(count > alone[0]) for count in alone[1:]]


def test_beta_half_mixes_pun_and_pan():
    ctx = random_ctx()
    counter = scripted_counter(ctx, {0: 1, 1: 1, 2: 3, 3: 1, 4: 1, 5: 1}, original=2)
    config = NemesisConfig(beta=0.5, weight=3.0, schedule="constant", positions=M)
    penalty = norm_loss(ctx, config, 0, 10, counter)
    pun_value = ctx.detach().norm(dim=-1).mean()
    pan_value = ctx.detach()[2].norm()
    expected = 3.0 * (0.5 * pun_value + 0.5 * pan_value)
    torch.testing.assert_close(penalty.value.detach(), expected)
    assert penalty.alpha.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert penalty.terms == pytest.approx({"pun": float(pun_value), "pan": float(pan_value)})


def test_beta_one_never_runs_pan_and_beta_zero_never_runs_pun():
    ctx = random_ctx()

    def refuse(variants):
        raise AssertionError("PAN's pre-inference must not run when beta = 1")

    only_pun = norm_loss(ctx, NemesisConfig(beta=1.0), 0, 10, refuse)
    assert set(only_pun.terms) == {"pun"} and only_pun.alpha.sum() == 0
    counter = scripted_counter(ctx, dict.fromkeys(range(M), 0), original=0)
    only_pan = norm_loss(ctx, NemesisConfig(beta=0.0), 0, 10, counter)
    assert set(only_pan.terms) == {"pan"}


def test_class_specific_ctx_uses_the_class_mean_of_norms():
    ctx = random_ctx(3)  # [n_cls, M, W]
    norms = ctx.detach().norm(dim=-1)  # [n_cls, M]
    torch.testing.assert_close(position_norms(ctx), norms.mean(dim=0))
    penalty = pun(ctx, PenaltyInputs())
    torch.testing.assert_close(penalty.value.detach(), norms.mean())
    penalty.value.backward()
    expected = ctx.detach() / ctx.detach().norm(dim=-1, keepdim=True) / (M * 3)
    torch.testing.assert_close(ctx.grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("leading", [(), (3,), (2, 3)])
def test_losses_take_ctx_of_any_leading_shape(leading):
    ctx = random_ctx(*leading)
    counter = scripted_counter(ctx, dict.fromkeys(range(M), 7), original=0)
    penalty = norm_loss(ctx, NemesisConfig(beta=0.5, positions=2), 0, 4, counter)
    penalty.value.backward()
    assert ctx.grad.shape == ctx.shape and penalty.alpha.shape == (M,)
    assert penalty.alpha.sum() == 2


@pytest.mark.parametrize(("norm", "order"), [("1", 1), ("2", 2), ("inf", math.inf)])
def test_norm_p(norm, order):
    ctx = random_ctx()
    penalty = norm_loss(ctx, NemesisConfig(norm=norm, schedule="constant"), 0, 1)
    expected = torch.linalg.vector_norm(ctx.detach(), ord=order, dim=-1).mean()
    torch.testing.assert_close(penalty.value.detach(), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beta": 1.5}, "beta must be between 0 and 1"),
        ({"weight": -1.0}, "weight must be 0 or more"),
        ({"positions": 0}, "positions"),
        ({"norm": "3"}, "unknown norm '3'; choose one of 1, 2, inf"),
        ({"schedule": "step"}, "unknown schedule 'step'"),
        ({"corrupt_weight": -0.5}, "corrupt_weight"),
    ],
)
def test_bad_nemesis_options_are_refused(options, message):
    with pytest.raises(NemesisError, match=message):
        NemesisConfig(**options)


def test_pan_refuses_more_positions_than_ctx_has():
    ctx = random_ctx()
    with pytest.raises(NemesisError, match="between 1 and n_ctx = 6"):
        pan(ctx, PenaltyInputs(positions=M + 1, count_correct=lambda v: torch.zeros(len(v))))


def test_official_override_only_on_food101_and_oxford_pets():
    config = NemesisConfig(beta=0.0, official_override=True)
    pets = config.for_dataset("oxford_pets")
    assert (pets.weight, pets.pan_weight, pets.schedule.value, pets.beta) == (1.0, 50.0, "constant", 0.0)
    assert config.for_dataset("dtd") is config
    assert NemesisConfig().for_dataset("food101").pan_weight is None


def test_official_override_weights_pan_only():
    """The official code scales PAN by 50 on Food101/OxfordPets; PUN keeps A."""
    ctx = torch.ones(4, 8)  # every position has L2 norm sqrt(8)
    pun_only = NemesisConfig(beta=1.0, official_override=True).for_dataset("oxford_pets")
    loss = norm_loss(ctx, pun_only, epoch=0, epochs=10)
    assert loss.value.item() == pytest.approx(8**0.5)  # constant schedule, A = 1, PUN = mean norm
    mixed = NemesisConfig(beta=0.5, weight=2.0, pan_weight=50.0, schedule="constant")
    always = lambda variants: torch.arange(len(variants), dtype=torch.float)  # noqa: E731  copies beat the original
    value = norm_loss(ctx, mixed, 0, 10, count_correct=always, generator=torch.Generator().manual_seed(0)).value
    assert value.item() == pytest.approx(0.5 * 2.0 * 8**0.5 + 0.5 * 50.0 * 8**0.5)
