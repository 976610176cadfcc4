"""Counts in messages agree with their nouns."""

from __future__ import annotations

from typer.testing import CliRunner

from nemesis.data.testing import make_coop_folder
from nemesis.wording import plural
from nemesis_cli.main import app


def test_plural():
    assert plural(1, "epoch") == "1 epoch" and plural(2, "epoch") == "2 epochs" and plural(0, "run") == "0 runs"
    assert plural(1, "class", "classes") == "1 class" and plural(1200, "cell") == "1,200 cells"


def test_a_one_epoch_run_says_epoch(tmp_path):
    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", ["red apple", "green leaf"], per_class=(1, 1, 1), image_size=28)
    args = ["train", "--dataset", "oxford_pets", "--root", str(root), "--shots", "1", "--epochs", "1",
            "--model", "tiny", "--pretrained", "none", "--n-ctx", "4", "--device", "cpu"]  # fmt: skip
    args += ["--out", str(tmp_path / "run")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "1 shot, " in first.output and "1 epoch, " in first.output and "1 epochs" not in first.output
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert "finished its 1 epoch before" in again.output
