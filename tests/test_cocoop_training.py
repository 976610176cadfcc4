"""Training CoCoOp and CoCoOp+Nemesis: defaults, I5 (frozen CLIP), meta-net in the prompt file, exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import nemesis.training.trainer as trainer
from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError
from nemesis.files.checkpoint import load_checkpoint, load_prompt
from nemesis.methods import preset
from nemesis.training.configs import TrainConfig
from nemesis.training.trainer import train

from .test_trainer import CLASSNAMES, rows, small_config, train_leaving_the_backbone_unchanged, train_until_interrupted


@pytest.fixture
def pets(tmp_path):
    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(3, 2, 3), image_size=28)
    return root


def small_cocoop(root, **options) -> TrainConfig:
    """Seconds of CoCoOp training: tiny with random weights, 4 classes x 3 shots, batch 2, "a photo of a"."""
    return small_config(root, **({"prompt_method": "cocoop", "shots": 3, "batch_size": 2, "n_ctx": None} | options))


def test_cocoop_defaults_are_its_base_to_new_config():
    config = TrainConfig(dataset="oxford_pets", prompt_method="cocoop").resolved()
    assert (config.n_ctx, config.ctx_init, config.batch_size, config.epochs, config.shots) == (
        4,
        "a photo of a",
        1,
        10,
        16,
    )
    assert (config.lr, config.momentum, config.weight_decay, config.warmup_epochs, config.warmup_lr) == (
        0.002,
        0.9,
        5e-4,
        1,
        1e-5,
    )
    coop = TrainConfig(dataset="oxford_pets").resolved()
    assert (coop.n_ctx, coop.ctx_init, coop.batch_size, coop.epochs) == (16, None, 32, 200)
    assert TrainConfig(dataset="dtd", prompt_method="cocoop", n_ctx=8).ctx_init is None  # random init when M is named
    assert TrainConfig(dataset="dtd", **preset("cocoop-nemesis")).to_json()["nemesis"]["beta"] == 1.0
    with pytest.raises(NemesisError, match="--class-specific is not an option of cocoop"):
        TrainConfig(dataset="dtd", prompt_method="cocoop", class_specific=True)


def test_cocoop_trains_ctx_and_meta_net_only_i5(pets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = small_cocoop(pets, **preset("cocoop-nemesis"), beta=0.0, corrupt_weight=0.01)
    backbone = train_leaving_the_backbone_unchanged(config, out, monkeypatch)

    prompt = load_prompt(out / "prompt.safetensors")
    assert (prompt.prompt_method, prompt.metadata.penalty) == ("cocoop", "nemesis")
    assert prompt.ctx.shape == (4, 64) and prompt.metadata.prompt_config["ctx_init"] == "a photo of a"
    assert set(prompt.extra) == {f"meta_net.linear{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}
    untrained = trainer.build_learner("cocoop", backbone, CLASSNAMES, ctx_init="a photo of a", seed=2)
    assert not torch.equal(prompt.extra["meta_net.linear2.weight"], untrained.meta_net.linear2.weight.detach())
    assert not torch.equal(prompt.ctx, untrained.ctx.detach())
    steps = rows(out, "step")
    assert len(steps) == 3 * 6 and all(len(row["alpha"]) == 4 for row in steps)
    assert any(line.startswith("* accuracy: ") for line in (out / "log.txt").read_text().splitlines())


def test_cocoop_resume_ends_with_the_uninterrupted_prompt(pets, tmp_path):
    config = small_cocoop(pets, epochs=4)
    train(config, tmp_path / "whole", progress=False)
    train_until_interrupted(config, tmp_path / "cut", after_epoch=2)
    train(config, tmp_path / "cut", resume=True, progress=False)
    whole = load_file(str(tmp_path / "whole" / "prompt.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "prompt.safetensors"))
    assert set(whole) == set(resumed) and len(whole) == 5
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_cocoop_run_folder_evaluates_as_cocoop_and_refuses_coop(pets, tmp_path):
    from nemesis.evaluation.evaluate import evaluate, resolve_target

    out = tmp_path / "run"
    train(small_cocoop(pets, epochs=1), out, progress=False)
    result = evaluate(resolve_target(load_checkpoint(out)), root=pets, device="cpu", progress=False)
    assert result.source["method"] == "cocoop" and result.n == 12
    final_accuracy = [line for line in (out / "log.txt").read_text().splitlines() if line.startswith("* accuracy: ")][
        -1
    ]
    assert final_accuracy == f"* accuracy: {result.accuracy:.1f}%"
    with pytest.raises(NemesisError, match="is a cocoop checkpoint, not coop"):
        load_checkpoint(out, prompt_method="coop")
