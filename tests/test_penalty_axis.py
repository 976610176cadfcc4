"""The penalty axis takes regularisers besides Nemesis: one registered here adds to the loss or edits
the gradients, alone or with Nemesis, and files and labels name it (KgCoOp and ProGrad come this way).

Each check trains one SGD step from the same start with and without the penalty, so the difference
of the two prompts is known in closed form from the step's learning rate."""

from __future__ import annotations

import json

import pytest
import torch

from nemesis.constants import RUN_METRICS, RUN_PROMPT
from nemesis.errors import NemesisError
from nemesis.files.checkpoint import load_prompt
from nemesis.methods.protocol import build_learner
from nemesis.penalties import PENALTIES, PenaltySpec, checked_penalty, penalty_label, register_penalty
from nemesis.penalties.base import PenaltyPart, PenaltyTerm, TrainingStep
from nemesis.training.trainer import train

from .conftest import cached_backbone
from .test_trainer import CLASSNAMES, pets, small_config  # noqa: F401  (pets: the data fixture)

RIDGE = 1000.0  # large, so the penalty's share of one warm step stands far above float rounding


class Ridge(PenaltyTerm):
    """RIDGE * sum(ctx^2): its gradient 2 * RIDGE * ctx."""

    def loss(self, step: TrainingStep) -> PenaltyPart:
        return PenaltyPart(RIDGE * step.learner.ctx.pow(2).sum(), {"ridge": 1.0})


class Freeze(PenaltyTerm):
    """No loss; sets every learned gradient to zero, as a gradient projection edits them."""

    edits_gradients = True

    def after_backward(self, learner) -> None:
        learner.ctx.grad.zero_()


@pytest.fixture(autouse=True)
def _registered():
    """Registering a penalty: one call each (undone after each test)."""
    register_penalty(PenaltySpec("ridge", "Ridge", lambda config, learner: Ridge()))
    register_penalty(PenaltySpec("freeze", "Freeze", lambda config, learner: Freeze()))
    yield
    del PENALTIES["ridge"], PENALTIES["freeze"]


def _one_step(root, out, penalty: str) -> tuple[torch.Tensor, dict]:
    """One SGD step (16 images, one batch, no warm-up) of CoOp with `penalty`: the prompt and the step's row."""
    config = small_config(root, penalty=penalty, epochs=1, batch_size=16, warmup_epochs=0)
    train(config, out, progress=False)
    rows = [json.loads(line) for line in (out / RUN_METRICS).read_text().splitlines()]
    steps = [row for row in rows if row.get("kind") == "step"]
    assert len(steps) == 1
    return load_prompt(out / RUN_PROMPT), steps[0]


def _start(root) -> torch.Tensor:
    config = small_config(root)
    return build_learner("coop", cached_backbone("tiny"), CLASSNAMES, n_ctx=config.n_ctx, seed=config.seed).ctx.detach()


@pytest.mark.parametrize("others", ["", "+nemesis"])
def test_a_registered_penalty_adds_its_gradient(pets, tmp_path, others):  # noqa: F811
    plain, _ = _one_step(pets, tmp_path / "plain", "none" if not others else others[1:])
    ridged, row = _one_step(pets, tmp_path / "ridge", "ridge" + others)
    start = _start(pets)
    # Same batch and start: the SGD steps differ by lr times the ridge's gradient (momentum's first
    # buffer is the gradient itself; weight decay adds the same in both).
    expected = plain.ctx - row["lr"] * 2 * RIDGE * start
    torch.testing.assert_close(ridged.ctx, expected, rtol=0, atol=2e-6)
    assert (ridged.ctx - plain.ctx).abs().max() > 1e-3  # the penalty moved the prompt far beyond the bound
    assert ridged.metadata.penalty == "ridge" + others
    assert penalty_label(ridged.metadata.penalty) == "+Ridge" + ("+Nemesis" if others else "")
    assert (row["norm_loss"] > 0) == bool(others)  # Nemesis's own logs, when it is one of the penalties


@pytest.mark.parametrize("penalty", ["freeze", "nemesis+freeze"])
def test_a_registered_penalty_edits_the_gradients(pets, tmp_path, penalty):  # noqa: F811
    frozen, row = _one_step(pets, tmp_path / "frozen", penalty)
    config = small_config(pets)
    # Zero gradient: only SGD's weight decay moves the prompt.
    expected = _start(pets) * (1 - row["lr"] * config.weight_decay)
    torch.testing.assert_close(frozen.ctx, expected, rtol=0, atol=1e-7)
    assert (row["norm_loss"] > 0) == ("nemesis" in penalty)  # Nemesis still computed its loss


def test_penalty_names_are_checked():
    assert checked_penalty("Ridge+Nemesis") == "ridge+nemesis"
    with pytest.raises(NemesisError, match="unknown penalty 'lasso'"):
        checked_penalty("lasso")
