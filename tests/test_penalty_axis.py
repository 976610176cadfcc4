"""The penalty axis takes regularisers besides Nemesis: one registered here adds to the loss or edits
the gradients, alone or with Nemesis, and files and labels name it (KgCoOp and ProGrad come this way).
The last tests are the penalties' conformance suite: every registered penalty trains alone and with
Nemesis, records its settings, and (with an official trainer) reads back from that trainer's tree.

Each check trains one SGD step from the same start with and without the penalty, so the difference
of the two prompts is known in closed form from the step's learning rate."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nemesis.constants import RUN_METRICS, RUN_PROMPT
from nemesis.errors import NemesisError
from nemesis.files.checkpoint import PromptMetadata, export_dassl, load_checkpoint, load_prompt, save_prompt
from nemesis.methods import method_of_dassl_path
from nemesis.methods.protocol import build_learner
from nemesis.penalties import (
    NEMESIS,
    PENALTIES,
    PenaltySpec,
    checked_penalty,
    penalty_label,
    penalty_settings,
    register_penalty,
)
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


# --- conformance: every registered penalty -------------------------------------------------------------------

REGISTERED_PENALTIES = list(PENALTIES)  # at collection: nemesis, kgcoop, prograd


def _runs_on(name: str) -> str:
    methods = PENALTIES[name].methods
    return methods[0] if methods else "coop"


@pytest.mark.parametrize("name", REGISTERED_PENALTIES)
def test_every_penalty_trains_alone_and_with_nemesis_and_records_itself(pets, tmp_path, name):  # noqa: F811
    penalties = [name] if name == NEMESIS else [name, f"{name}+{NEMESIS}"]
    for penalty in penalties:
        config = small_config(pets, prompt_method=_runs_on(name), penalty=penalty, epochs=1, batch_size=8)
        train(config, tmp_path / penalty, progress=False)
        prompt = load_prompt(tmp_path / penalty / RUN_PROMPT)
        assert prompt.metadata.penalty == penalty and torch.isfinite(prompt.ctx).all()
        assert prompt.metadata.penalty_config == penalty_settings(config.resolved())
        expected_label = "".join(f"+{PENALTIES[part].label}" for part in penalty.split("+"))
        assert penalty_label(penalty) == expected_label


def test_penalties_settings_and_options_have_distinct_names():
    """Prompt files record every penalty's settings in one dict, and `--penalty-option` names are global."""
    config = small_config("data", penalty="+".join(REGISTERED_PENALTIES))
    seen: dict[str, str] = {}
    for name in REGISTERED_PENALTIES:
        spec = PENALTIES[name]
        names = set(spec.settings(config) if spec.settings else {})
        names |= {field.name for field in dataclasses.fields(spec.options)} if spec.options else set()
        for key in names:
            assert seen.setdefault(key, name) == name, f"{key} of {name} is also {seen[key]}'s"


@pytest.mark.parametrize("name", [name for name in REGISTERED_PENALTIES if PENALTIES[name].dassl is not None])
def test_a_penalty_trainers_tree_reads_as_its_method_and_penalty(tmp_path, name):
    """A prompt exported into the penalty's official trainer folder reads back with (method, penalty)."""
    trainer = PENALTIES[name].dassl
    ctx = torch.randn(16, 64) * 0.02
    checkpoint = load_checkpoint(save_prompt(tmp_path / "p.safetensors", ctx, PromptMetadata(prompt_method="coop")))
    run = tmp_path / "output" / "dtd" / trainer.folder / "rn50_2shots" / "nctx16_cscFalse_ctpend" / "seed3"
    export_dassl(checkpoint, run, epoch=7)
    back = load_checkpoint(run)
    assert (back.prompt_method, back.metadata.penalty) == (trainer.method, name)
    assert (back.metadata.dataset, back.metadata.shots, back.metadata.seed) == ("dtd", 2, 3)
    assert method_of_dassl_path(f"{trainer.folder}_Nemesis", True) == (trainer.method, f"{name}+{NEMESIS}")
