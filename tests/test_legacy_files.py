"""Files written by older code (commit 1b58f29) still read, and give the numbers that code gave.

The fixtures in tests/data/legacy/ were written once by `make_legacy_fixtures.py` there: prompt files
(CoOp, class-specific CoOp, CoCoOp), Dassl exports in CoOp/CoCoOp output trees, two run folders of
`nemesis train` (one interrupted, to resume) and a sweep table (Parquet and CSV). `expected.json`
holds what that code read from them. A change of format must keep these files working: do not
regenerate them, teach the readers the old format instead.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import analysis
from analysis.results import read_correctness
from nemesis.checksum import tensors_sha256
from nemesis.data.testing import make_coop_folder
from nemesis.files.checkpoint import PromptCheckpoint, PromptMetadata, load_checkpoint
from nemesis.files.sweep_format import read_sweep_table
from nemesis.methods import legacy_name
from nemesis.training.configs import read_run_config
from nemesis.training.trainer import train
from nemesis_cli.main import app

LEGACY = Path(__file__).parent / "data" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text(encoding="utf-8"))

# Metadata a future prompt format must keep meaning the same (format_version, toolkit_version and the
# like may change).
KEPT_METADATA = (
    "model", "pretrained", "dataset", "shots", "seed", "subsample", "method", "n_ctx",
    "class_specific", "class_position", "method_config", "epoch", "classnames",
)  # fmt: skip
# Options of config.json a future config format must keep (the Nemesis ones are compared on their own).
KEPT_CONFIG = (
    "dataset", "root", "shots", "seed", "method", "subsample", "model", "pretrained", "n_ctx", "ctx_init",
    "class_specific", "class_position", "epochs", "batch_size", "lr", "momentum", "weight_decay",
    "warmup_epochs", "warmup_lr", "train_views", "crop_scale", "precision", "eval_every", "save_every",
)  # fmt: skip
PROMPTS = sorted(EXPECTED["prompts"])
DASSL_PROMPTS = [name for name in PROMPTS if EXPECTED["prompts"][name]["metadata"]["source_format"] == "dassl"]


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Path:
    """A copy of the fixtures, so no reader or resumed run can write into the repository."""
    copy = tmp_path_factory.mktemp("legacy") / "files"
    shutil.copytree(LEGACY, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return copy


@pytest.fixture(scope="module")
def data_parent(tmp_path_factory) -> Path:
    """The folder holding the dataset the fixtures' numbers were computed on, rebuilt (make_coop_folder is
    deterministic). The run folders record their root relative to this folder, so runs resume from here."""
    recipe = EXPECTED["dataset"]
    parent = tmp_path_factory.mktemp("legacy-data")
    make_coop_folder(
        parent / recipe["folder"],
        recipe["name"],
        recipe["classnames"],
        per_class=tuple(recipe["per_class"]),
        image_size=recipe["image_size"],
    )
    return parent


@pytest.fixture(scope="module")
def data_root(data_parent) -> Path:
    return data_parent / EXPECTED["dataset"]["folder"]


# --- helpers ----------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A table value as expected.json holds it: missing values (NA, NaN) as None, numpy scalars as Python ones."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return plain(value.item())
    return value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{key: plain(value) for key, value in row.items()} for row in frame.to_dict("records")]


def version_1_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of a sweep table (or a table grouped from one) with version 1's columns: one word for method
    and penalty."""
    rows = records(frame)
    for row in rows:
        row["method"] = legacy_name(row["method"], row.pop("penalty"))
        assert row.pop("site", "") == ""  # before corruption sites, every cell corrupted the whole ctx
        assert row.pop("tower", "") == "" and row.pop("layer", None) is None  # ... and no prompt was in a tower
    return rows


def invoke(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def evaluate_with_cli(location: Path, data_root: Path, out: Path, dassl: bool) -> dict[str, Any]:
    """`nemesis eval` of one checkpoint or run folder, as the fixtures' numbers were taken; its record."""
    args = ["eval", str(location), "--root", str(data_root), "--pretrained", "none", "--device", "cpu"]
    args += ["--out", str(out)] + (["--model", "tiny", "--dataset", EXPECTED["dataset"]["name"]] if dassl else [])
    invoke(args)
    return json.loads(out.read_text(encoding="utf-8").splitlines()[-1])


def version_1_fields(metadata: PromptMetadata) -> dict[str, Any]:
    """What version 1 called the fields of a (version 2) metadata: one word for method and penalty,
    CoOp's options as fields, the Nemesis settings as `method_config`."""
    options = metadata.prompt_config
    return vars(metadata) | {
        "method": legacy_name(metadata.prompt_method, metadata.penalty),
        "n_ctx": options["n_ctx"],
        "class_specific": options.get("class_specific", False),
        "class_position": options["class_position"],
        "method_config": metadata.penalty_config,
    }


def assert_same_prompt(checkpoint: PromptCheckpoint, expected: dict[str, Any]) -> None:
    """Bit-identical tensors, the same learner, and the metadata fields that must keep their meaning."""
    assert tensors_sha256({"ctx": checkpoint.ctx}) == expected["ctx_sha256"]
    assert list(checkpoint.ctx.shape) == expected["ctx_shape"]
    assert checkpoint.prompt_method == expected["prompt_method"]
    assert {name: list(tensor.shape) for name, tensor in checkpoint.extra.items()} == expected["extra_shapes"]
    assert (tensors_sha256(checkpoint.extra) if checkpoint.extra else None) == expected["extra_sha256"]
    fields = version_1_fields(checkpoint.metadata)
    for field in KEPT_METADATA:
        assert fields[field] == expected["metadata"][field], field


def assert_same_accuracy(record: dict[str, Any], expected: dict[str, Any]) -> None:
    record = record | {"method": legacy_name(record["method"], record["penalty"])}  # version 1's one word
    for key in ("accuracy", "n", "macro_f1", "subsample", "dataset", "method"):
        assert record[key] == expected[key], key


def epoch_rows(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [row for row in rows if row["kind"] == "epoch"]


def assert_resumed_as_before(folder: Path) -> None:
    resumed = EXPECTED["runs"]["run_nemesis"]["resumed"]
    assert epoch_rows(folder)[-1] == resumed["final_epoch_row"]  # test accuracy and norms of the last epoch
    assert_same_prompt(load_checkpoint(folder / "prompt.safetensors"), resumed["prompt"])


# --- prompt files and Dassl files -------------------------------------------------------------------


@pytest.mark.parametrize("name", PROMPTS)
def test_prompt_file_reads_with_the_same_tensors_and_metadata(legacy, name):
    expected = EXPECTED["prompts"][name]
    assert_same_prompt(load_checkpoint(legacy / expected["path"]), expected)


@pytest.mark.parametrize("name", PROMPTS)
def test_prompt_file_evaluates_to_the_same_accuracy(legacy, data_root, tmp_path, name):
    expected = EXPECTED["prompts"][name]
    dassl = name in DASSL_PROMPTS  # Dassl files name no model or dataset: the user does
    record = evaluate_with_cli(legacy / expected["path"], data_root, tmp_path / "evals.jsonl", dassl)
    assert_same_accuracy(record, expected["eval"])


# --- run folders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["run_nemesis", "run_cocoop"])
def test_run_config_reads_with_the_same_options(legacy, run):
    saved = EXPECTED["runs"][run]["config"]  # config.json as the old code read it (its `to_json()`)
    config = read_run_config(legacy / run)
    for key in KEPT_CONFIG:
        value = legacy_name(config.prompt_method, config.penalty) if key == "method" else getattr(config, key)
        assert getattr(value, "value", value) == saved[key], key
    assert (config.nemesis_config().to_json() if config.uses_nemesis else None) == saved["nemesis"]


def test_run_folders_load_the_same_prompts(legacy):
    runs = EXPECTED["runs"]
    # The interrupted run has no prompt.safetensors yet: its folder loads the checkpoint of epoch 1.
    assert_same_prompt(load_checkpoint(legacy / "run_nemesis"), runs["run_nemesis"]["saved_checkpoint"])
    assert_same_prompt(load_checkpoint(legacy / "run_cocoop"), runs["run_cocoop"]["prompt"])
    assert epoch_rows(legacy / "run_cocoop")[-1] == runs["run_cocoop"]["final_epoch_row"]


@pytest.mark.parametrize("run", ["run_nemesis", "run_cocoop"])
def test_run_folder_evaluates_to_the_same_accuracy(legacy, data_root, tmp_path, run):
    record = evaluate_with_cli(legacy / run, data_root, tmp_path / "evals.jsonl", dassl=False)
    assert_same_accuracy(record, EXPECTED["runs"][run]["eval"])


def test_interrupted_run_resumes_to_the_same_prompt(legacy, data_parent, tmp_path, monkeypatch):
    run = shutil.copytree(legacy / "run_nemesis", tmp_path / "run")
    monkeypatch.chdir(data_parent)  # config.json records the data root relative to this folder
    train(read_run_config(run), run, resume=True, progress=False)
    assert_resumed_as_before(run)


def test_interrupted_run_resumes_from_the_cli(legacy, data_parent, tmp_path, monkeypatch):
    run = shutil.copytree(legacy / "run_nemesis", tmp_path / "run")
    monkeypatch.chdir(data_parent)
    output = invoke(["train", "--resume", "--out", str(run)])
    assert "resumed after epoch 1" in output
    assert_resumed_as_before(run)


def test_finished_run_has_nothing_left_to_resume(legacy, data_parent, tmp_path, monkeypatch):
    # Reads config.json and the resume state (its epoch and its digest of the config) and stops there.
    run = shutil.copytree(legacy / "run_cocoop", tmp_path / "run")
    before = (run / "prompt.safetensors").read_bytes()
    monkeypatch.chdir(data_parent)
    output = invoke(["train", "--resume", "--out", str(run)])
    assert "finished its 1 epoch before; nothing left to do" in output
    assert (run / "prompt.safetensors").read_bytes() == before


# --- sweep tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize("table_format", ["parquet", "csv"])
def test_sweep_table_reads_the_same_rows_and_correctness(legacy, table_format):
    expected = EXPECTED["sweeps"][table_format]
    table = legacy / expected["path"]
    assert version_1_records(read_sweep_table(table).table) == expected["records"]
    correctness = {cell: flags.tolist() for cell, flags in sorted(read_correctness(table).items())}
    assert correctness == expected["correctness"]


@pytest.mark.parametrize("table_format", ["parquet", "csv"])
def test_sweep_table_gives_the_same_lne_numbers(legacy, table_format):
    expected = EXPECTED["sweeps"][table_format]
    cells = analysis.load_sweeps([legacy / expected["path"]])
    marks = analysis.mark_occurrences(cells)[["cell_id", "reduces", "increases", "lne", "degrades"]]
    assert records(marks) == expected["marks"]
    paired = analysis.mark_occurrences(cells, significant=True)[["cell_id", "gained", "lost", "p_value", "lne"]]
    assert records(paired) == expected["significant_marks"]
    assert version_1_records(analysis.lne_frequency(cells, "dataset,shots")) == expected["lne_frequency"]


@pytest.mark.parametrize("table_format", ["parquet", "csv"])
def test_report_cli_reads_the_sweep_table(legacy, tmp_path, table_format):
    expected = EXPECTED["sweeps"][table_format]
    invoke(["report", str(legacy / expected["path"]), "--out", str(tmp_path / "report")])
    written = pd.read_csv(tmp_path / "report" / "lne_frequency.csv")
    counts = ["cells", "reducing", "frequency", "increasing", "degrading"]
    wanted = [{key: row[key] for key in counts} for row in expected["lne_frequency"]]
    assert written[counts].to_dict("records") == wanted
