"""Say what would surprise: one warning line each, Ctrl-C that says how to go on, plain progress lines."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import corrupt.engine
import nemesis.training.train_grid
from nemesis.data.testing import make_coop_folder
from nemesis.files.checkpoint import PromptMetadata, save_prompt
from nemesis.progress import PlainProgress, progress_bar
from nemesis_cli.main import app

from .conftest import fails_with_one_line

CLASSNAMES = ["red apple", "green leaf", "blue sky", "yellow sun"]


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(4, 2, 3), image_size=28)
    return root


def _train_args(pets, out, *extra) -> list[str]:
    base = ["train", "--dataset", "oxford_pets", "--root", str(pets), "--model", "tiny", "--pretrained", "none"]
    return [*base, "--n-ctx", "4", "--shots", "4", "--batch-size", "4", "--device", "cpu", "--out", str(out), *extra]


def _warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def run(pets, tmp_path_factory):
    """A finished CoOp run of 1 epoch; its CLI output is kept for the progress-line check."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = CliRunner().invoke(app, _train_args(pets, out, "--epochs", "1", "--beta", "0.5", "--weight", "2"))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_nemesis_only_options_with_coop_warn_in_one_line(run):
    _, output = run
    assert _warnings(output) == ["warning: --beta, --weight only apply to Nemesis methods; ignored for --method coop"]


def test_plain_progress_lines_when_stdout_is_not_a_terminal(run):
    _, output = run
    epoch_lines = [line for line in output.splitlines() if line.startswith("epoch 1 test_acc")]
    assert len(epoch_lines) == 1 and "1/1" in epoch_lines[0] and "elapsed" in epoch_lines[0]
    assert "\x1b[" not in output and "━" not in output  # no bar residue


def test_plain_progress_reports_each_step_with_an_eta(capsys):
    with PlainProgress() as bar:
        task = bar.add_task("training", total=4)
        for epoch in (1, 2):
            bar.update(task, completed=epoch, description=f"epoch {epoch}")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 1: 1/4, ") and "ETA" in lines[0]
    assert isinstance(progress_bar(), PlainProgress)  # pytest captures stdout: not a terminal


def test_resume_refuses_other_options_naming_only_those_passed(pets, run, tmp_path):
    out, _ = run
    result = fails_with_one_line(_train_args(pets, out, "--resume", "--seed", "5", "--epochs", "2"), "cannot resume")
    assert "--seed 5 (the run has 1)" in result.output
    assert "--epochs" not in result.output and "--n-ctx" not in result.output  # passed but unchanged or allowed


def test_resume_applies_more_epochs_with_a_warning(pets, run, tmp_path):
    source, _ = run
    out = tmp_path / "longer"
    out.mkdir()
    for path in source.iterdir():
        if path.is_file():
            (out / path.name).write_bytes(path.read_bytes())
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert _warnings(result.output) == [
        f"warning: --resume continues {out} to 2 epochs (was 1); the cosine learning-rate schedule now spans 2 epochs"
    ]
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(epochs) == 2 and "resumed after epoch 1" in result.output


def test_ctrl_c_in_training_says_how_to_go_on(pets, tmp_path, monkeypatch):
    real_train = nemesis.training.train_grid.train  # the CLI trains through the grid runner

    def interrupted(*args, **kwargs):
        def stop(epoch):
            raise KeyboardInterrupt

        return real_train(*args, **kwargs, on_epoch_end=stop)

    monkeypatch.setattr(nemesis.training.train_grid, "train", interrupted)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, _train_args(pets, out, "--epochs", "2"))
    assert result.exit_code == 130, result.output
    assert result.output.splitlines()[-1] == "interrupted after epoch 1; rerun with --resume"
    monkeypatch.setattr(nemesis.training.train_grid, "train", real_train)
    resumed = CliRunner().invoke(app, ["train", "--out", str(out), "--resume"])
    assert resumed.exit_code == 0 and "resumed after epoch 1" in resumed.output


def test_ctrl_c_before_the_first_cell_says_nothing_was_written(tmp_path, monkeypatch):
    prompt = save_prompt(tmp_path / "p.safetensors", torch.zeros(4, 64), PromptMetadata(model="tiny", dataset="dtd"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corrupt.engine, "run_sweep", interrupted)
    out = tmp_path / "lne.parquet"
    result = CliRunner().invoke(app, ["corrupt", str(prompt), "--pretrained", "none", "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"interrupted before the first cell; nothing was written to {out}; rerun the same command"
    )
    assert not out.exists()


def test_subsample_new_on_an_all_class_prompt_warns_and_eval_takes_the_runs_root(run):
    out, _ = run
    args = ["eval", str(out), "--subsample", "new", "--device", "cpu"]  # no --root: the run's config.json has it
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert _warnings(result.output) == [
        "warning: --subsample new on a prompt trained on all classes: its 'new' classes were seen in training, "
        "so this is not a base-to-new result"
    ]
