"""The base-to-new protocol in one command: `nemesis eval RUNS --base-to-new`, then `nemesis report`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from figures.demo_pipeline import DemoSettings
from nemesis.data.datasets import load_dataset
from nemesis.data.testing import make_coop_folder
from nemesis.evaluation.evaluate import evaluate, resolve_target
from nemesis.files.checkpoint import PromptMetadata, load_checkpoint, save_prompt
from nemesis.methods.cocoop.learner import CoCoOp
from nemesis.methods.coop.learner import PromptLearner
from nemesis.model.backbone import load_clip
from nemesis_cli.main import app

from .conftest import fails_with_one_line

CLASSNAMES = ["red apple", "green leaf", "blue sky", "yellow sun"]


def _train(args: list[str], out) -> None:
    result = CliRunner().invoke(app, ["train", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output


def test_base_to_new_is_one_eval_call_and_a_report_table(tmp_path):
    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(2, 1, 3), image_size=28)
    common = ["--dataset", "oxford_pets", "--root", str(root), "--model", "tiny", "--pretrained", "none"]
    common += ["--shots", "2", "--epochs", "1", "--subsample", "base", "--device", "cpu"]
    _train([*common, "--method", "cocoop"], tmp_path / "cocoop")
    _train([*common, "--method", "cocoop-nemesis", "--beta", "0", "--weight", "20"], tmp_path / "pan")
    _train([*common, "--method", "coop", "--n-ctx", "4"], tmp_path / "coop")
    records = tmp_path / "evals.jsonl"
    result = CliRunner().invoke(
        app,
        ["eval", str(tmp_path / "cocoop"), str(tmp_path / "pan"), str(tmp_path / "coop"), "--base-to-new",
         "--root", str(root), "--device", "cpu", "--out", str(records)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert [(row["method"], row["penalty"], row["subsample"], row["n"]) for row in rows] == [
        ("cocoop", "none", "base", 6),
        ("cocoop", "none", "new", 6),
        ("cocoop", "nemesis", "base", 6),
        ("cocoop", "nemesis", "new", 6),
        ("coop", "none", "base", 6),
        ("coop", "none", "new", 6),
    ]
    assert result.output.count(", H ") == 3

    report = CliRunner().invoke(app, ["report", str(records), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    table = pd.read_csv(tmp_path / "report" / "base_to_new.csv")
    ours = table[(table["origin"] == "ours") & (table["dataset"] == "oxford_pets")].set_index("method")
    random = " (random weights)"  # trained and evaluated with --pretrained none, and labelled so
    assert sorted(ours.index) == [f"CoCoOp{random}", f"CoCoOp+Nemesis (PAN, weight 20){random}", f"CoOp{random}"]
    base = {row["method"]: row["accuracy"] for row in rows if row["subsample"] == "base"}
    assert ours.loc[f"CoCoOp{random}", "base"] == pytest.approx(base["cocoop"])
    assert ours.loc[f"CoOp{random}", "base"] == pytest.approx(base["coop"])
    assert ours["H"].notna().all() and ours["new"].notna().all()

    fails_with_one_line(["eval", str(tmp_path / "cocoop"), "--base-to-new", "--subsample", "new"], "drop --subsample")


@pytest.mark.slow
def test_fashion_mnist_cocoop_beats_zero_shot_on_base_classes_and_the_table_has_every_method(pretrained_tiny, tmp_path):
    """CoCoOp and CoCoOp+Nemesis (PAN, weight 20) trained on the 5 base classes with the pretrained
    tiny model, with the demo's settings (CoCoOp's 16 shots, 10 epochs, batch 1; views flipped, not
    cropped): CoCoOp beats zero-shot on the base classes (73.2% vs 72.0% here) and its own start."""
    settings = DemoSettings()
    common = ["--dataset", "fashion_mnist", "--model", "tiny", "--pretrained", "fmnist", "--subsample", "base"]
    common += ["--shots", str(settings.base_to_new_shots), "--epochs", str(settings.base_to_new_epochs)]
    common += ["--train-views", str(settings.base_to_new_views), "--crop-scale", str(settings.base_to_new_crop_scale)]
    common += ["--eval-every", "0", "--device", "cpu"]
    _train([*common, "--method", "cocoop"], tmp_path / "cocoop")
    _train([*common, "--method", "cocoop-nemesis", "--beta", "0", "--weight", "20"], tmp_path / "pan")
    records = tmp_path / "evals.jsonl"
    result = CliRunner().invoke(
        app, ["eval", str(tmp_path / "cocoop"), str(tmp_path / "pan"), "--base-to-new", "--out", str(records)]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    trained = next(row["accuracy"] for row in rows if row["method"] == "cocoop" and row["subsample"] == "base")

    clip = load_clip("tiny", "fmnist")
    data = load_dataset("fashion_mnist", subsample="base")
    start = CoCoOp(clip, data.classnames, ctx_init="a photo of a", seed=1)  # the run's initial prompt and meta-net
    metadata = PromptMetadata(model="tiny", pretrained="fmnist", dataset="fashion_mnist")
    start_file = save_prompt(tmp_path / "start.safetensors", start.ctx, metadata, start.extra_parameters())
    base = {"device": "cpu", "progress": False}
    untrained = evaluate(resolve_target(load_checkpoint(start_file), subsample="base"), **base).accuracy
    hand = PromptLearner(clip, ["x"], ctx_init="a photo of a").ctx.detach()  # I1: the zero-shot prompt
    metadata = PromptMetadata(model="tiny", pretrained="fmnist", dataset="fashion_mnist")  # a CoOp prompt's
    zero_shot_file = save_prompt(tmp_path / "zero_shot.safetensors", hand, metadata)
    zero_shot = evaluate(resolve_target(load_checkpoint(zero_shot_file), subsample="base"), **base).accuracy
    assert trained > zero_shot + 0.5 and trained > untrained + 0.5, (trained, zero_shot, untrained)

    report = CliRunner().invoke(app, ["report", str(records), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    table = pd.read_csv(tmp_path / "report" / "base_to_new.csv")
    ours = table[table["dataset"] == "fashion_mnist"].set_index("method")
    assert sorted(ours.index) == ["CoCoOp", "CoCoOp+Nemesis (PAN, weight 20)"]
    assert ours[["base", "new", "H"]].notna().all().all()


def test_cocoop_labels_match_the_paper_rows():
    from analysis.labels import method_label
    from analysis.paper_numbers import BASE_TO_NEW_AVERAGE

    assert method_label("cocoop") == "CoCoOp"
    assert method_label("cocoop-nemesis", 0.0, 20.0) in BASE_TO_NEW_AVERAGE
    assert method_label("cocoop-nemesis", 1.0, 10.0) == "CoCoOp+Nemesis (PUN, weight 10)"
    assert method_label("nemesis", 0.0, 1.0) == "CoOp+Nemesis (PAN, weight 1)"


def _eval_records(runs: list, root, out, *extra: str) -> tuple[list[dict], str]:
    args = ["eval", *map(str, runs), "--model", "tiny", "--pretrained", "none", "--root", str(root), "--device", "cpu"]
    args += ["--out", str(out)]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in out.read_text().splitlines()], result.output


def test_symlinked_cocoop_base_to_new_tree_keeps_the_identity_its_path_says(tmp_path):
    """Seed folders of a CoCoOp base-to-new tree that are links to runs stored elsewhere: the path as
    given names dataset, shots, seed and the base classes, as a tree of real folders does."""
    from .test_cocoop_checkpoint import write_cocoop_dassl_checkpoint

    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(1, 1, 2))
    store = tmp_path / "store"  # where the runs really are: a path that says nothing
    for name in ("run-a", "run-b"):
        torch.manual_seed(len(name))
        write_cocoop_dassl_checkpoint(store / name, n_cls=2, half=False)
    config = Path("output/base2new/train_base/oxford_pets/shots_16/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1")
    linked, copied = tmp_path / "linked" / config, tmp_path / "copied" / config
    linked.mkdir(parents=True)
    for seed, name in ((1, "run-a"), (2, "run-b")):
        (linked / f"seed{seed}").symlink_to(store / name, target_is_directory=True)
        shutil.copytree(store / name, copied / f"seed{seed}")
    seeds = ("seed1", "seed2")
    with_links, output = _eval_records([linked / seed for seed in seeds], root, tmp_path / "linked.jsonl")
    without, _ = _eval_records([copied / seed for seed in seeds], root, tmp_path / "copied.jsonl")
    identity = ("dataset", "shots", "seed", "subsample", "method", "n")
    assert [tuple(row[key] for key in identity) for row in with_links] == [
        ("oxford_pets", 16, 1, "base", "cocoop", 4),
        ("oxford_pets", 16, 2, "base", "cocoop", 4),
    ]
    drop_path = [{key: value for key, value in row.items() if key != "checkpoint"} for row in with_links]
    assert drop_path == [{key: value for key, value in row.items() if key != "checkpoint"} for row in without]
    assert "base classes only" not in output
    whole_tree, _ = _eval_records([tmp_path / "linked"], root, tmp_path / "tree.jsonl")  # links found in the tree
    assert whole_tree == with_links

    # --base-to-new on the links: no false note that they were not trained on the base classes
    _, output = _eval_records([linked / seed for seed in seeds], root, tmp_path / "b2n.jsonl", "--base-to-new")
    assert "base classes only" not in output
