"""`nemesis data check` through typer's runner: counts, missing files by name, exit codes."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from nemesis.data.datasets import load_dataset
from nemesis.data.testing import make_coop_folder
from nemesis_cli.main import app

from .conftest import fails_with_one_line

runner = CliRunner()
CLASSNAMES = ["red apple", "green leaf"]


def test_complete_dataset_shows_counts_and_exits_0(tmp_path):
    make_coop_folder(tmp_path, "oxford_pets", CLASSNAMES, per_class=(3, 2, 1), image_size=8)
    result = runner.invoke(app, ["data", "check", "--root", str(tmp_path), "--dataset", "oxford_pets"])
    assert result.exit_code == 0, result.output
    assert "oxford_pets" in result.output and "complete" in result.output
    assert "6" in result.output and "4" in result.output


def test_incomplete_dataset_names_the_missing_files_and_exits_2(tmp_path):
    make_coop_folder(tmp_path, "dtd", CLASSNAMES, per_class=(3, 2, 1), image_size=8)
    victim = load_dataset("dtd", tmp_path).train[4].path
    os.remove(victim)
    result = runner.invoke(app, ["data", "check", "--root", str(tmp_path), "--dataset", "dtd"])
    assert result.exit_code == 2, result.output
    assert os.path.relpath(victim, tmp_path) in result.output
    assert "error: dataset 'dtd' is incomplete (1 image files missing)" in result.output


def test_all_datasets_report_found_and_missing_without_failing(tmp_path):
    make_coop_folder(tmp_path, "eurosat", CLASSNAMES, per_class=(1, 1, 1), image_size=8)
    result = runner.invoke(app, ["data", "check", "--root", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if "│" in line and "dataset" not in line}
    assert "complete" in lines["eurosat"] and "missing" in lines["imagenet"]
    assert len(lines) == 16


def test_missing_named_dataset_exits_2(tmp_path):
    result = runner.invoke(app, ["data", "check", "--root", str(tmp_path), "--dataset", "imagenet_a"])
    assert result.exit_code == 2
    assert "imagenet-adversarial" in result.output and "error: dataset 'imagenet_a' is not found" in result.output


def test_bad_input_is_one_line_with_exit_2(tmp_path):
    fails_with_one_line(["data", "check", "--root", str(tmp_path), "--dataset", "pets"], "unknown dataset 'pets'")
    fails_with_one_line(["data", "check", "--root", str(tmp_path / "nope")], "does not exist")
    fails_with_one_line(["data", "check"], "--root")


def test_fashion_mnist_needs_no_root():
    result = runner.invoke(app, ["data", "check", "--dataset", "fashion_mnist"])
    assert result.exit_code == 0, result.output
    assert "54000" in result.output and "10000" in result.output
