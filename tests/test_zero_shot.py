"""The zero-shot baseline and what CoOp output paths tell `eval` and `prompt info`."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from nemesis.data.datasets import load_dataset
from nemesis.data.feature_cache import encode_split
from nemesis.data.testing import make_coop_folder
from nemesis.evaluation.zero_shot import TEMPLATES, zero_shot_evaluate
from nemesis.files.checkpoint import PromptCheckpoint, PromptMetadata, export_dassl
from nemesis.model.backbone import load_clip
from nemesis_cli.main import app

CLASSNAMES = ["red_apple", "green leaf", "blue sky", "yellow sun"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_coop_folder(root, "dtd", CLASSNAMES, per_class=(2, 1, 3), image_size=28)
    return root


def test_templates_are_coops():
    assert TEMPLATES["dtd"] == "{} texture."
    assert TEMPLATES["eurosat"] == "a centered satellite photo of {}."
    assert TEMPLATES["oxford_pets"] == "a photo of a {}, a type of pet."
    assert TEMPLATES["imagenet"] == "a photo of a {}."


def test_zero_shot_matches_open_clips_own_encode_text(root, tmp_path):
    result = zero_shot_evaluate("tiny", None, "dtd", root, cache_dir=tmp_path)
    clip = load_clip("tiny")
    data = load_dataset("dtd", root)
    features, labels = encode_split(clip, data, "test", cache_dir=tmp_path, progress=False)
    texts = open_clip.get_tokenizer("tiny")([f"{name.replace('_', ' ')} texture." for name in CLASSNAMES])
    with torch.no_grad():
        text = F.normalize(clip.model.encode_text(texts), dim=-1)
    expected = (F.normalize(features, dim=-1) @ text.T).argmax(dim=-1)
    assert result.correct == int((expected == labels).sum()) and result.n == len(labels) == 12
    assert result.source["method"] == "zero-shot" and result.source["shots"] == 0


def test_cli_zero_shot_is_recorded_and_reported(root, tmp_path):
    evals = tmp_path / "evals.jsonl"
    args = ["eval", "--zero-shot", "--model", "tiny", "--pretrained", "none", "--dataset", "dtd"]
    result = CliRunner().invoke(app, [*args, "--root", str(root), "--out", str(evals), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "* accuracy: " in result.output
    record = json.loads(evals.read_text())
    assert record["method_label"] == "Zero-shot CLIP" and record["prompt_config"]["template"] == "{} texture."
    report = CliRunner().invoke(app, ["report", str(evals), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    assert "| Zero-shot CLIP (random weights) | 0 |" in (tmp_path / "report" / "few_shot.md").read_text()


def test_zero_shot_needs_model_and_dataset_and_no_checkpoint(tmp_path):
    from .conftest import fails_with_one_line

    fails_with_one_line(["eval", "--zero-shot", "--dataset", "dtd"], "--zero-shot needs --model and --dataset")
    fails_with_one_line(["eval", str(tmp_path), "--zero-shot"], "drop the checkpoint argument")
    fails_with_one_line(["eval"], "pass a prompt checkpoint or run folder, or --zero-shot")


def test_eval_and_prompt_info_read_a_coop_output_path(root, tmp_path):
    run = tmp_path / "output" / "dtd" / "CoOp" / "rn50_2shots" / "nctx4_cscFalse_ctpmiddle" / "seed3"
    run.mkdir(parents=True)
    export_dassl(PromptCheckpoint(torch.randn(4, 64) * 0.1, PromptMetadata()), run, epoch=5)
    info = CliRunner().invoke(app, ["prompt", "info", str(run)])
    assert info.exit_code == 0, info.output
    shown = dict(parts for line in info.output.splitlines() if len(parts := line.split(None, 1)) == 2)
    assert shown["dataset"].strip() == "dtd" and shown["shots"].strip() == "2" and shown["seed"].strip() == "3"
    assert shown["class_position"].strip() == "middle" and shown["prompt_method"].strip() == "coop"
    evals = tmp_path / "evals.jsonl"
    args = ["eval", str(run), "--model", "tiny", "--pretrained", "none", "--root", str(root), "--device", "cpu"]
    args += ["--out", str(evals)]
    result = CliRunner().invoke(app, args)  # no --dataset, --shots or --seed: the path says them
    assert result.exit_code == 0, result.output
    record = json.loads(evals.read_text())
    assert (record["dataset"], record["shots"], record["seed"], record["method"]) == ("dtd", 2, 3, "coop")


def test_zero_shot_base_to_new_tests_base_then_new_classes_and_prints_h(root, tmp_path):
    """`eval --zero-shot --base-to-new`: the hand prompt on the 2 base, then the 2 new classes, one
    record each in the shape of prompted base-to-new records, and H."""
    from analysis.tables import harmonic_mean

    evals = tmp_path / "evals.jsonl"
    args = ["eval", "--zero-shot", "--base-to-new", "--model", "tiny", "--pretrained", "none", "--dataset", "dtd"]
    result = CliRunner().invoke(app, [*args, "--root", str(root), "--device", "cpu", "--out", str(evals)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in evals.read_text().splitlines()]
    assert [(row["subsample"], row["n"], row["method"]) for row in records] == [
        ("base", 6, "zero-shot"),
        ("new", 6, "zero-shot"),
    ]
    assert records[0]["checkpoint"] == records[1]["checkpoint"] and records[0]["pretrained"] is None
    for record in records:
        alone = zero_shot_evaluate("tiny", None, "dtd", root, subsample=record["subsample"], device="cpu")
        assert record["accuracy"] == pytest.approx(alone.accuracy)
    base, new = (record["accuracy"] for record in records)
    assert f"base {base:.2f}%, new {new:.2f}%, H {harmonic_mean(base, new):.2f}%" in result.output
    assert "appended 2 records" in result.output

    from .conftest import fails_with_one_line

    fails_with_one_line([*args, "--subsample", "new"], "drop --subsample")
