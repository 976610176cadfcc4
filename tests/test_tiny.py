"""The embedded `tiny` model: deterministic pretraining, a file open_clip loads, the cache and its command."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from nemesis.model.backbone import file_sha256, load_clip
from nemesis.model.tiny import TinyRecipe, pretrain_tiny, read_tiny_info, weights_path
from nemesis_cli.main import app

SHORT = TinyRecipe(steps=2, batch_size=16, warmup_steps=1)


def test_pretraining_is_deterministic_and_open_clip_loads_it(tmp_path):
    first = pretrain_tiny(SHORT, out=tmp_path / "a.safetensors", progress=False)
    second = pretrain_tiny(SHORT, out=tmp_path / "b.safetensors", progress=False)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert 0 <= first.zero_shot_accuracy <= 100 and first.zero_shot_accuracy == second.zero_shot_accuracy
    info = read_tiny_info(first.path)
    assert info["recipe"]["steps"] == 2 and info["zero_shot_template"] == "a photo of a {}."
    backbone = load_clip("tiny", str(first.path))
    assert backbone.weights_id == f"sha256:{file_sha256(first.path)}"
    assert not torch.equal(backbone.model.visual.conv1.weight, load_clip("tiny").model.visual.conv1.weight)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_weights_are_cached_per_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMESIS_CACHE", str(tmp_path))
    assert weights_path() == tmp_path / "models" / "tiny-fmnist-v1.safetensors"
    assert weights_path(SHORT).parent == tmp_path / "models" and weights_path(SHORT) != weights_path()


def test_fmnist_tag_uses_the_cached_weights(pretrained_tiny):
    assert pretrained_tiny == weights_path()
    info = read_tiny_info(pretrained_tiny)
    assert 50 <= info["zero_shot_accuracy"] <= 85
    backbone = load_clip("tiny", "fmnist")  # cached: no second pretraining
    assert backbone.weights_id == f"sha256:{file_sha256(pretrained_tiny)}"
    result = CliRunner().invoke(app, ["pretrain-tiny"])
    assert result.exit_code == 0 and f"{info['zero_shot_accuracy']:.2f}%" in result.output
