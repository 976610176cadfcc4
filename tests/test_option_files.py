"""`nemesis train --config FILE`: a run's config.json or a YAML grid gives the same runs as the flags."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from nemesis.constants import RUN_CONFIG, RUN_PROMPT
from nemesis.errors import NemesisError
from nemesis.files.checkpoint import load_prompt
from nemesis.training.option_files import read_train_options
from nemesis_cli.main import app

from .conftest import fails_with_one_line
from .distributed_helpers import run_folders
from .test_train_grid import SMALL, data_root  # noqa: F401  (data_root: the data fixture)


def _train(*arguments) -> None:
    result = CliRunner().invoke(app, ["train", *map(str, arguments)])
    assert result.exit_code == 0, result.output


def _same_run(first, second) -> None:
    """Two run folders that trained the same: equal prompts and configs."""
    assert torch.equal(load_prompt(first / RUN_PROMPT).ctx, load_prompt(second / RUN_PROMPT).ctx)
    assert json.loads((first / RUN_CONFIG).read_text()) == json.loads((second / RUN_CONFIG).read_text())


def test_a_runs_config_with_another_seed_reproduces_that_seed(data_root, tmp_path):  # noqa: F811
    flags = ["--dataset", "oxford_pets", "--root", data_root, "--shots", "2", "--method", "pan", *SMALL]
    _train(*flags, "--seed", "1", "--out", tmp_path / "seed1")
    _train(*flags, "--seed", "2", "--out", tmp_path / "seed2")
    _train("--config", tmp_path / "seed1" / RUN_CONFIG, "--seed", "2", "--out", tmp_path / "again")
    _same_run(tmp_path / "seed2", tmp_path / "again")
    assert not torch.equal(
        load_prompt(tmp_path / "seed1" / RUN_PROMPT).ctx, load_prompt(tmp_path / "again" / RUN_PROMPT).ctx
    )  # the flag overrode the file's seed


def test_a_yaml_grid_equals_the_same_grid_from_flags(data_root, tmp_path):  # noqa: F811
    _train("--dataset", "oxford_pets", "--root", data_root, "--shots", "1,2", "--method", "coop,pen", *SMALL,
           "--out", tmp_path / "flags")  # fmt: skip
    small = dict(zip(SMALL[::2], SMALL[1::2], strict=True))
    lines = [f"{flag[2:].replace('-', '_')}: {value}" for flag, value in small.items()]
    header = ["dataset: oxford_pets", f"root: {data_root}", "shots: [1, 2]", "method:", "  - coop", "  - pen"]
    (tmp_path / "grid.yaml").write_text("\n".join([*header, *lines]) + "\n")
    _train("--config", tmp_path / "grid.yaml", "--out", tmp_path / "yaml")
    folders = run_folders(tmp_path / "flags")
    assert len(folders) == 4 and run_folders(tmp_path / "yaml") == folders
    for folder in folders:
        _same_run(tmp_path / "flags" / folder, tmp_path / "yaml" / folder)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n_ctxx: 4\n", "unknown option 'n_ctxx'; did you mean 'n_ctx'?"),
        ("learning_rate: 0.1\n", "unknown option 'learning_rate'; did you mean"),
        ("lr: fast\n", "lr must be a number, got 'fast'"),
        ("lr: [0.1, 0.2]\n", "lr takes one value; only dataset, method, shots, seed take lists"),
        ("shots: [1, two]\n", "shots must be a whole number, got 'two'"),
        ("- dataset\n", "must hold a mapping"),
        ("nemesis: 5\n", "nemesis must be a mapping of Nemesis options, got 5"),
        ("dataset: [oxford_pets\n", "is not valid YAML"),
    ],
)
def test_a_bad_file_is_one_line_exit_2(tmp_path, text, expected):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    fails_with_one_line(["train", "--config", str(path), "--out", str(tmp_path / "out")], expected)
    assert not (tmp_path / "out").exists()


def test_values_read_as_the_command_line_takes_them(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("lr: 2e-3\nepochs: 3\nclass_specific: true\nseed: [1, 2]\npretrained: none\nnorm: inf\n"
                    "method_options: {n_prompts: 2}\n")  # fmt: skip
    assert read_train_options(path) == {
        "lr": 0.002, "epochs": 3, "class_specific": True, "seed": "1,2", "pretrained": "none", "norm": "inf",
        "method_options": {"n_prompts": 2},
    }  # fmt: skip
    record = tmp_path / "config.json"  # a run record of random weights, trained with Nemesis
    recorded = {"prompt_method": "coop", "penalty": "nemesis", "pretrained": None, "nemesis": {"beta": 0.0}}
    record.write_text(json.dumps(recorded | {"toolkit_version": "0.1.0", "warmup_lr": 1e-05}))
    expected = {"method": "coop+nemesis", "pretrained": "none", "beta": 0.0, "warmup_lr": 1e-05}
    assert read_train_options(record) == expected
    with pytest.raises(NemesisError, match="epochs must be a whole number"):
        path.write_text("epochs: 2.5\n")
        read_train_options(path)
