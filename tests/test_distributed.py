"""torchrun (gloo, 2 CPU processes) against one process: grids split over ranks, batch-sharded training, kills.

Each torchrun call costs a few seconds of start-up per rank, so the grids are small: one step per
epoch, few epochs.
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import analysis
import nemesis.training.trainer as trainer
from corrupt.inputs import identity_from_path, resolve_inputs
from nemesis.data.testing import make_coop_folder
from nemesis.distributed import Ranks, ranks_from_environment
from nemesis.files.checkpoint import PromptMetadata, load_prompt, save_prompt
from nemesis.files.sweep_format import correctness_path, part_files
from nemesis_cli.main import app

from .distributed_helpers import kill_torchrun_when, prompt_ctx, run_folders, run_torchrun

CLASSNAMES = ["red apple", "green leaf", "blue sky", "yellow sun"]
SMALL = ["--model", "tiny", "--pretrained", "none", "--n-ctx", "4", "--lr", "0.05", "--device", "cpu",
         "--eval-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed-data")
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(4, 1, 3), image_size=28)
    return root


def test_ranks_split_any_list_once():
    assert ranks_from_environment({}) == Ranks(0, 1, 0)
    assert ranks_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    items = list(range(11))
    for world_size in (1, 2, 3, 5):
        shares = [Ranks(rank, world_size).share(items) for rank in range(world_size)]
        assert sorted(item for share in shares for item in share) == items


def metric_rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_runs(expected, actual):
    """Same run folders, prompts within 1e-6 (ranks run one CPU thread each, so sums may round otherwise)."""
    folders = run_folders(expected)
    assert folders and run_folders(actual) == folders
    for folder in folders:
        difference = (prompt_ctx(expected / folder) - prompt_ctx(actual / folder)).abs().max().item()
        assert difference <= 1e-6, (folder, difference)
        assert (expected / folder / "config.json").read_text() == (actual / folder / "config.json").read_text()
        rows, other = metric_rows(expected / folder), metric_rows(actual / folder)
        # every step and epoch row once: nothing lost, nothing doubled
        assert [(row["kind"], row["epoch"], row.get("step")) for row in rows] == [
            (row["kind"], row["epoch"], row.get("step")) for row in other
        ], folder
        assert [row.get("ce_loss") for row in other] == pytest.approx([row.get("ce_loss") for row in rows], abs=1e-5)


# --- the acceptance grid: fashion_mnist and a CoOp folder x 2 shots x 2 seeds x 2 methods ----------


def acceptance_grid(root, out) -> list[str]:
    return ["train", "--dataset", "fashion_mnist,oxford_pets", "--root", str(root), "--shots", "1,2",
            "--seed", "1,2", "--method", "coop,pan", "--epochs", "1", "--batch-size", "32", *SMALL,
            "--out", str(out)]  # fmt: skip


@pytest.fixture(scope="module")
def one_process_grid(data_root, tmp_path_factory):
    """The grid in one process, counting backbone loads."""
    out = tmp_path_factory.mktemp("one-process") / "runs"
    loads = []
    real_load_clip = trainer.load_clip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            trainer, "load_clip", lambda *args, **kwargs: loads.append(args) or real_load_clip(*args, **kwargs)
        )
        result = CliRunner().invoke(app, acceptance_grid(data_root, out))
    assert result.exit_code == 0, result.output
    assert "grid: 16 trained, 0 skipped (finished before), 0 failed" in result.output
    return out, len(loads)


@pytest.mark.slow
def test_one_call_loads_the_backbone_once_and_its_tree_reads_everywhere(data_root, one_process_grid):
    out, loads = one_process_grid
    assert loads == 1
    folders = run_folders(out)
    assert len(folders) == 16 and str(folders[0]) == "fashion_mnist/coop/tiny_1shots/nctx4_cscFalse_ctpend/seed1"
    pan = out / "oxford_pets" / "pan" / "tiny_2shots" / "nctx4_cscFalse_ctpend" / "seed1"
    assert trainer.read_run_config(pan).nemesis_config().beta == 0.0
    from_path = identity_from_path(pan)
    assert (from_path.dataset, from_path.shots, from_path.seed) == ("oxford_pets", 2, 1)
    inputs = resolve_inputs([out])  # what `nemesis corrupt` reads
    assert len(inputs) == 16 and {(item.identity["method"], item.identity["penalty"]) for item in inputs} == {
        ("coop", "none"),
        ("coop", "nemesis"),
    }
    runs = analysis.load_runs([out])  # what plot-norms and report read
    assert len(runs) == 16 and {run.label for run in runs} == {
        "CoOp (random weights)",
        "CoOp+Nemesis (PAN, weight 1) (random weights)",
    }
    again = CliRunner().invoke(app, acceptance_grid(data_root, out))
    assert again.exit_code == 0 and "grid: 0 trained, 16 skipped" in again.output, again.output


@pytest.mark.slow
def test_torchrun_ranks_split_the_grid_into_the_same_run_folders(data_root, one_process_grid, tmp_path):
    expected, _ = one_process_grid
    result = run_torchrun(2, acceptance_grid(data_root, tmp_path / "runs"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("grid: 16 trained, 0 skipped (finished before), 0 failed") == 1, result.stdout
    assert_same_runs(expected, tmp_path / "runs")


# --- killed mid-grid, rerun with the same or another number of ranks --------------------------------


def kill_grid(root, out) -> list[str]:
    return ["train", "--dataset", "oxford_pets", "--root", str(root), "--shots", "1,2", "--seed", "1,2",
            "--method", "coop,pan", "--epochs", "4", "--batch-size", "4", *SMALL, "--out", str(out)]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted_grid(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "runs"
    result = CliRunner().invoke(app, kill_grid(data_root, out))
    assert result.exit_code == 0, result.output
    return out


def mid_grid(out):
    """Some runs finished and one in the middle of its epochs."""

    def ready() -> bool:
        states = list(out.rglob("state.safetensors"))
        finished = [state for state in states if (state.parent / "prompt.safetensors").is_file()]
        return len(finished) >= 2 and len(states) > len(finished)

    return ready


@pytest.mark.slow
@pytest.mark.parametrize(("whole_job", "rerun_ranks"), [(True, 1), (False, 2)], ids=["job-then-1", "rank-then-2"])
def test_a_killed_grid_reruns_to_the_uninterrupted_one(data_root, uninterrupted_grid, tmp_path, whole_job, rerun_ranks):
    out = tmp_path / "runs"
    killed = kill_torchrun_when(2, kill_grid(data_root, out), mid_grid(out), whole_job=whole_job)
    assert killed.returncode != 0
    assert len(list(out.rglob("prompt.safetensors"))) < 8, "the kill came after the grid finished"
    if rerun_ranks == 1:
        result = CliRunner().invoke(app, kill_grid(data_root, out))
        output, code = result.output, result.exit_code
    else:
        finished = run_torchrun(rerun_ranks, kill_grid(data_root, out))
        output, code = finished.stdout + finished.stderr, finished.returncode
    assert code == 0, output
    assert "skipped (finished before)" in output and "0 failed" in output
    assert_same_runs(uninterrupted_grid, out)


# --- one run, each batch sharded over the ranks ---------------------------------------------------------


@pytest.mark.slow
# PAN: its per-batch counts are summed over the ranks too; PLOT: its Sinkhorn stops as on the whole batch;
# MaPLe: prompts in both towers, the vision ones projected (every learned tensor's gradient summed);
# prefix tuning: what is trained (the embedding and MLP) is not what the prompt file holds.
@pytest.mark.parametrize("method", ["pan", "plot-nemesis", "maple-nemesis", "prefix-nemesis"])
def test_batch_sharded_training_matches_one_process_with_the_global_batch(data_root, tmp_path, method):
    """8 images per step split 4 + 4 over two ranks, live CoOp augmentation, 3 epochs: same ctx (<= 1e-5)."""
    arguments = ["train", "--dataset", "oxford_pets", "--root", str(data_root), "--shots", "4", "--seed", "1",
                 "--method", method, "--beta", "0", "--epochs", "3", "--batch-size", "8", *SMALL]  # fmt: skip
    one = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = run_torchrun(2, [*arguments, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stdout + two.stderr
    one_prompt, two_prompt = (load_prompt(tmp_path / run / "prompt.safetensors") for run in ("one", "two"))
    for name, tensor in one_prompt.tensors.items():
        assert (tensor - two_prompt.tensors[name]).abs().max().item() <= 1e-5, name
    assert "each batch sharded over 2 ranks" in (tmp_path / "two" / "log.txt").read_text()
    steps = [line for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert len(steps) == 3 * 2  # the run's folder is written once, by rank 0


# --- sweeps: ranks split the cells, rank 0 merges the table ---------------------------------------------


def sweep_args(root, runs, table) -> list[str]:
    return ["corrupt", str(runs), "--out", str(table), "--root", str(root), "--rescale", "0.5,2", "--replace", "0",
            "--positions", "0,1,2", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process_sweep(data_root, one_process_grid, tmp_path_factory):
    runs, _ = one_process_grid
    table = tmp_path_factory.mktemp("one-process-sweep") / "lne.parquet"
    result = CliRunner().invoke(app, sweep_args(data_root, runs, table))
    assert result.exit_code == 0, result.output
    return table


def assert_same_table(expected, actual):
    """Rows, values and per-sample correctness as one process writes them; no parts left over."""
    pd.testing.assert_frame_equal(pd.read_parquet(expected), pd.read_parquet(actual))
    mine, theirs = (pq.read_table(correctness_path(path)).to_pylist() for path in (expected, actual))
    assert mine == theirs
    assert not part_files(actual)


@pytest.mark.slow
def test_torchrun_sweep_writes_the_one_process_table(data_root, one_process_grid, one_process_sweep, tmp_path):
    runs, _ = one_process_grid
    table = tmp_path / "lne.parquet"
    result = run_torchrun(2, sweep_args(data_root, runs, table))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("16 checkpoints, 160 cells: 160 computed") == 1, result.stdout
    assert_same_table(one_process_sweep, table)


@pytest.mark.slow
@pytest.mark.parametrize(("whole_job", "rerun_ranks"), [(True, 1), (False, 2)], ids=["job-then-1", "rank-then-2"])
def test_a_killed_sweep_reruns_to_the_uninterrupted_table(
    data_root, one_process_grid, one_process_sweep, tmp_path, whole_job, rerun_ranks
):
    runs, _ = one_process_grid
    table = tmp_path / "lne.parquet"
    arguments = sweep_args(data_root, runs, table)
    killed = kill_torchrun_when(2, arguments, lambda: len(part_files(table)) >= 2, whole_job=whole_job)
    assert killed.returncode != 0
    if rerun_ranks == 1:
        result = CliRunner().invoke(app, arguments)
        output, code = result.output, result.exit_code
    else:
        finished = run_torchrun(rerun_ranks, arguments)
        output, code = finished.stdout + finished.stderr, finished.returncode
    assert code == 0, output
    assert "already in the results" in output
    assert_same_table(one_process_sweep, table)


@pytest.mark.slow
def test_bad_input_under_torchrun_is_one_line_from_rank_0(tmp_path):
    prompt = save_prompt(tmp_path / "p.safetensors", torch.zeros(4, 64), PromptMetadata(model="tiny", dataset="dtd"))
    arguments = ["corrupt", str(prompt), "--out", str(tmp_path / "lne.parquet"), "--root", str(tmp_path / "nope"),
                 "--rescale", "0.5", "--device", "cpu", "--pretrained", "none"]  # fmt: skip
    result = run_torchrun(2, arguments)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: data folder {tmp_path / 'nope'} does not exist; pass the folder holding the "
                      "datasets with --root"], result.stderr  # fmt: skip
    assert "exitcode  : 2" in result.stderr  # rank 0 ended with the bad-input code, no traceback of ours
    assert result.stderr.count("Traceback") <= 1, result.stderr  # torchrun's own report only
    assert not (tmp_path / "lne.parquet").exists()
