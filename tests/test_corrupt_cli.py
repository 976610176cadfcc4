"""`nemesis corrupt` through typer's runner: a sweep, its resume, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from nemesis.data.testing import make_coop_folder
from nemesis.files.checkpoint import PromptMetadata, load_prompt, save_prompt
from nemesis_cli.main import app

from .conftest import fails_with_one_line
from .test_checkpoint import write_dassl_checkpoint

runner = CliRunner()
CLASSES = ["red square", "green circle", "blue star"]


@pytest.fixture
def setting(tmp_path):
    make_coop_folder(tmp_path / "data", "oxford_pets", classnames=CLASSES, per_class=(1, 1, 4))
    ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.5
    metadata = PromptMetadata(model="tiny", dataset="oxford_pets", shots=2, seed=1, prompt_method="coop")
    prompt = save_prompt(tmp_path / "prompt.safetensors", ctx, metadata)
    (tmp_path / "out").mkdir()
    return tmp_path, prompt


def _args(tmp_path, prompt, *extra, out="out/r.parquet"):
    return ["corrupt", str(prompt), "--out", str(tmp_path / out), "--root", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--pretrained", "none", *extra]  # fmt: skip


def test_sweep_writes_table_and_correctness_then_resumes(setting):
    tmp_path, prompt = setting
    args = _args(tmp_path, prompt, "--paper-preset", "--positions", "0,2")
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "norm-reducing cells that raised accuracy" in first.output and "best cells" in first.output
    table = pd.read_parquet(tmp_path / "out" / "r.parquet")
    assert len(table) == 1 + 2 * 2 and set(table.op) == {"original", "replace", "rescale"}
    correct = pd.read_parquet(tmp_path / "out" / "r.correct.parquet")
    assert list(correct.columns) == ["cell_id", "correct"] and all(len(row) == 12 for row in correct.correct)
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "0 computed" in second.output and "5 already in the results" in second.output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "r.parquet"), table)


def test_csv_output(setting):
    tmp_path, prompt = setting
    args = _args(tmp_path, prompt, "--csv", "--rescale", "0.5", out="out/r.csv")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "r.csv")
    assert len(table) == 1 + 4 and list(table.columns)[:3] == ["cell_id", "checkpoint", "model"]
    assert (tmp_path / "out" / "r.correct.parquet").is_file()
    again = runner.invoke(app, [*args, "--rescale", "0.5,2"])  # the last --rescale wins: 4 new cells
    assert again.exit_code == 0, again.output
    assert "4 computed" in again.output and "5 already in the results" in again.output
    assert len(pd.read_csv(tmp_path / "out" / "r.csv")) == 1 + 8


def test_csv_numbers_have_no_float_noise(setting):
    # norms are float32 values and accuracy changes multiples of 100 / n: written as their short decimals
    tmp_path, prompt = setting
    ctx = load_prompt(prompt).ctx
    result = runner.invoke(app, _args(tmp_path, prompt, "--csv", "--rescale", "0.3,3", out="out/r.csv"))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "out" / "r.csv").open()))
    for row in rows[1:]:
        norm = torch.linalg.vector_norm(ctx[int(row["position"])]).item()
        assert np.float32(row["norm_before"]) == np.float32(norm)
        for column in ("norm_before", "norm_after", "delta_acc"):
            assert len(row[column].lstrip("-").replace(".", "").lstrip("0")) <= 9, (column, row[column])


def _fails_with_one_line(tmp_path, args, expected):
    result = fails_with_one_line(args, expected)
    assert result.output.strip().startswith("error: ")
    assert list((tmp_path / "out").iterdir()) == []  # nothing written
    assert not (tmp_path / "cache").exists()


def test_bad_input_exits_2_with_one_line_and_writes_nothing(setting):
    tmp_path, prompt = setting
    cases = [
        (["--op", "scale=0.5"], "unknown operator 'scale'; available: rescale, replace"),
        (["--positions", "0,4"], "position 4 is outside 0..3"),
        (["--replace=-0.1"], "replace sigma must be a finite number >= 0, got -0.1"),
        (["--rescale", "0.1,-2"], "rescale tau must be a finite number >= 0, got -2.0"),
        (["--rescale", "abc"], "'abc' is not a number"),
        (["--dataset", "pets"], "unknown dataset 'pets'"),
        (["--model", "ViT-B-33"], "unknown model 'ViT-B-33'"),
        (["--csv"], "must end in .csv"),
    ]
    for extra, expected in cases:
        _fails_with_one_line(tmp_path, _args(tmp_path, prompt, *extra), expected)
    _fails_with_one_line(tmp_path, _args(tmp_path, tmp_path / "nope.safetensors"), "checkpoint not found")
    bogus_device = _args(tmp_path, prompt, "--device", "bogus")  # the last --device wins
    _fails_with_one_line(tmp_path, bogus_device, "unknown device 'bogus'")
    other_root = tmp_path / "other-data"
    make_coop_folder(other_root, "dtd", classnames=CLASSES, per_class=(1, 1, 1))
    elsewhere = [arg if arg != str(tmp_path / "data") else str(other_root) for arg in _args(tmp_path, prompt)]
    _fails_with_one_line(tmp_path, elsewhere, "dataset 'oxford_pets' not found")
    no_root = [arg for arg in _args(tmp_path, prompt) if arg not in ("--root", str(tmp_path / "data"))]
    _fails_with_one_line(tmp_path, no_root, "needs a data folder; pass --root DATA")


def test_checkpoint_width_must_match_the_model(setting):
    tmp_path, _ = setting
    write_dassl_checkpoint(tmp_path / "coop" / "seed1", torch.zeros(16, 512), epoch=5)
    args = _args(tmp_path, tmp_path / "coop", "--model", "tiny", "--dataset", "oxford_pets")
    _fails_with_one_line(tmp_path, args, "ctx width 512 does not match the text width 64 of model 'tiny'")
    _fails_with_one_line(tmp_path, _args(tmp_path, tmp_path / "coop"), "does not name its model; pass --model")
    empty = tmp_path / "empty_tree"
    empty.mkdir()
    _fails_with_one_line(tmp_path, _args(tmp_path, empty, "--model", "tiny"), "no prompt checkpoints under")


def test_another_activation_is_another_sweep_and_a_coop_prompt_is_noted(setting):
    tmp_path, prompt = setting
    args = _args(tmp_path, prompt, "--rescale", "0.5", "--positions", "0")
    assert runner.invoke(app, args).exit_code == 0
    quick = runner.invoke(app, [*args, "--activation", "quickgelu"])
    assert quick.exit_code == 0, quick.output
    assert "2 computed" in quick.output and "0 already in the results" in quick.output
    dassl = write_dassl_checkpoint(tmp_path / "coop", torch.zeros(4, 64))
    coop = runner.invoke(app, [*_args(tmp_path, dassl, "--rescale", "0.5", "--positions", "0"), "--model", "tiny",
                               "--dataset", "oxford_pets"])  # fmt: skip
    assert coop.exit_code == 0, coop.output
    assert "does not record the activation it was trained under; it runs under GELU" in coop.output


def test_summary_names_each_kind_of_prompt(setting):
    tmp_path, coop = setting
    ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 0.5
    pun = PromptMetadata(model="tiny", dataset="oxford_pets", shots=2, seed=1, prompt_method="coop",
                         penalty="nemesis", penalty_config={"beta": 1.0, "weight": 1.0})  # fmt: skip
    nemesis = save_prompt(tmp_path / "pun.safetensors", ctx, pun)
    base = PromptMetadata(model="tiny", dataset="oxford_pets", shots=2, seed=1, prompt_method="coop", subsample="base")
    base_prompt = save_prompt(tmp_path / "base.safetensors", ctx, base)
    args = _args(tmp_path, coop, "--rescale", "0.5", "--positions", "0,1")
    result = runner.invoke(app, [*args[:2], str(nemesis), str(base_prompt), *args[2:]])
    assert result.exit_code == 0, result.output
    lines = [line.split(":")[0] for line in result.output.splitlines() if line.startswith("norm-reducing")]
    prefix = "norm-reducing cells that raised accuracy, "
    kinds = (
        "CoOp (random weights)",
        "CoOp (random weights), base classes",
        "CoOp+Nemesis (PUN, weight 1) (random weights)",
    )
    assert sorted(lines) == sorted(prefix + kind for kind in kinds), result.output


def _weights_files(folder) -> list:
    """Two weights files of tiny (its random weights, logit scale changed): two real weights ids, cheaply."""
    from .conftest import cached_backbone

    state = cached_backbone("tiny").model.state_dict()
    files = []
    for number in (1, 2):
        path = folder / f"weights{number}.pt"
        torch.save(state | {"logit_scale": state["logit_scale"] + number}, path)
        files.append(path)
    return files


def test_sweeps_on_other_weights_stay_apart_and_random_weights_are_marked(setting):
    from analysis import lne_frequency, lne_frequency_table, load_sweeps
    from nemesis.model.backbone import file_sha256

    tmp_path, prompt = setting
    files = _weights_files(tmp_path)
    ids = [f"sha256:{file_sha256(path)}" for path in files]
    out = tmp_path / "out" / "r.parquet"
    args = _args(tmp_path, prompt, "--rescale", "0.001,0.5", "--positions", "0,1")  # with --pretrained none
    summary = "norm-reducing cells that raised accuracy, "
    random = runner.invoke(app, args)
    assert random.exit_code == 0, random.output
    assert f"{summary}CoOp (random weights): " in random.output
    real = runner.invoke(app, [*args, "--pretrained", str(files[0])])  # the same prompt on real weights
    assert real.exit_code == 0, real.output
    assert "5 computed" in real.output and f"{summary}CoOp: " in real.output  # one real id: nothing added

    table = pd.read_parquet(out)
    assert list(table.columns[:4]) == ["cell_id", "checkpoint", "model", "weights"]
    assert table.groupby("weights").size().to_dict() == {"random-seed0": 5, ids[0]: 5}
    frequency = lne_frequency(load_sweeps([out]))
    assert sorted(frequency["weights"]) == ["random-seed0", ids[0]] and set(frequency["cells"]) == {4}
    display = lne_frequency_table(load_sweeps([out])).display
    rows = list(zip(display["Dataset"], display["Prompts"], strict=True))
    assert rows == [
        ("OxfordPets", "CoOp (random weights)"),  # no paper row beside it
        ("OxfordPets", "CoOp"),
        ("OxfordPets [paper]", "CoOp"),
    ]

    other = runner.invoke(app, [*args, "--pretrained", str(files[1])])
    assert other.exit_code == 0, other.output
    report = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    written = (tmp_path / "report" / "lne_frequency.md").read_text()
    named = [f"| OxfordPets | CoOp (weights {weights_id[: len('sha256:') + 12]}) |" for weights_id in ids]
    assert all(name in written for name in named), written  # two real ids: each named
    assert "| OxfordPets | CoOp (random weights) |" in written and "| OxfordPets | CoOp |" not in written


def test_a_run_folder_gives_its_data_folder(setting):
    tmp_path, prompt = setting
    run = tmp_path / "run"
    run.mkdir()
    prompt.rename(run / "prompt.safetensors")
    (run / "config.json").write_text(json.dumps({"root": str(tmp_path / "data")}))  # what run_root reads
    args = [arg for arg in _args(tmp_path, run, "--rescale", "0.5") if arg not in ("--root", str(tmp_path / "data"))]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(tmp_path / "out" / "r.parquet")) == 1 + 4
    other = tmp_path / "other"
    other.mkdir()
    (other / "prompt.safetensors").write_bytes((run / "prompt.safetensors").read_bytes())
    (other / "config.json").write_text(json.dumps({"root": str(tmp_path / "elsewhere")}))
    both = [arg if arg != str(tmp_path / "out" / "r.parquet") else str(tmp_path / "two.parquet") for arg in args]
    fails_with_one_line([*both[:2], str(other), *both[2:]], "the runs were trained on data in")
    assert not (tmp_path / "two.parquet").exists()


def test_progress_lines_name_the_method(setting):
    tmp_path, prompt = setting
    result = runner.invoke(app, _args(tmp_path, prompt, "--rescale", "0.5", "--positions", "0"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("corrupting")]
    assert lines and all(line.startswith("corrupting oxford_pets coop shots 2 seed 1") for line in lines), lines


def test_a_run_folder_copied_without_its_config_is_read_by_its_prompt(setting):
    tmp_path, prompt = setting
    folder = tmp_path / "copied" / "seed1"
    folder.mkdir(parents=True)
    prompt.rename(folder / "prompt.safetensors")
    for given in (folder, tmp_path / "copied"):  # the folder itself, and a tree holding it
        result = runner.invoke(app, _args(tmp_path, given, "--rescale", "0.5", "--positions", "0"))
        assert result.exit_code == 0, result.output
    assert "0 computed" in result.output  # the second call found the same prompt


def test_ctrl_c_after_some_cells_says_how_many_the_table_keeps(tmp_path):
    from types import SimpleNamespace

    from nemesis_cli.corrupt import _interrupted_line

    for cells, kept in ((["a"], "keeps 1 cell;"), (["a", "b"], "keeps 2 cells;")):
        line = _interrupted_line(SimpleNamespace(cell_ids=set(cells), path=tmp_path / "lne.parquet"))
        assert line.startswith("interrupted; the table in") and kept in line, line
