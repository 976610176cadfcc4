"""The sweep table's parts: appends that write only themselves, reads that see every part once,
merges that equal one process's table, concurrent writers that lose nothing, damage named."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import corrupt.results as results_module
from analysis import lne_frequency, load_sweeps, read_correctness
from corrupt.engine import CellOutcome, cell_rows, run_sweep
from corrupt.grid import parse_grid
from corrupt.inputs import resolve_inputs
from corrupt.results import ResultsFile, merge_parts
from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError
from nemesis.files.checkpoint import PromptMetadata, save_prompt
from nemesis.files.sweep_format import SWEEP_COLUMNS, correctness_path, lock_path, part_files, parts_folder, sort_cells
from nemesis_cli.main import app

from .conftest import cached_backbone, fails_with_one_line

GRID = parse_grid(rescale="0.5,2", replace="0,0.1", noise_seeds="0,1")
N_CTX = 3
SAMPLES = 12


def _identity(number: int) -> dict:
    return {"checkpoint": f"/runs/p{number}.safetensors", "model": "tiny", "pretrained": None,
            "weights": "random-seed0", "dataset": "oxford_pets", "subsample": None, "shots": 2, "seed": number,
            "method": "coop"}  # fmt: skip


def checkpoint_cells(number: int) -> tuple[list[dict], list[np.ndarray]]:
    """One checkpoint's rows (the original first, grid order) and their correctness, drawn from `number`."""
    cells = GRID.cells(N_CTX)
    generator = torch.Generator().manual_seed(number)
    correct = torch.rand(len(cells), SAMPLES, generator=generator) > 0.5
    norms = torch.rand(len(cells), generator=generator).tolist()
    outcome = CellOutcome(correct, norms, [norm / 2 for norm in norms])
    original = 100.0 * correct[0].float().mean().item()
    return cell_rows(_identity(number), cells, outcome, original), [row.numpy() for row in correct]


def _table_and_correctness(path) -> tuple[pd.DataFrame, dict[str, list[bool]]]:
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    correct = pq.read_table(correctness_path(path)).to_pydict()
    return table, dict(zip(correct["cell_id"], correct["correct"], strict=True))


def _one_process_table(folder, numbers) -> tuple[pd.DataFrame, dict]:
    """The table one process writes for these checkpoints, in this order."""
    results = ResultsFile(folder / "one.parquet")
    for number in numbers:
        results.append(*checkpoint_cells(number))
    results.compact()
    return _table_and_correctness(folder / "one.parquet")


def _assert_same_table(path, expected) -> None:
    table, correct = _table_and_correctness(path)
    pd.testing.assert_frame_equal(table, expected[0])
    assert correct.keys() == expected[1].keys()
    assert all(correct[key] == expected[1][key] for key in correct)


def test_appends_write_parts_that_every_reader_sees_once(tmp_path):
    path = tmp_path / "r.parquet"
    results = ResultsFile(path)
    assert not any(tmp_path.iterdir())  # opening writes nothing
    first_rows, first_correct = checkpoint_cells(1)
    results.append(first_rows, first_correct)
    results.append(*checkpoint_cells(2))
    results.append(first_rows, first_correct)  # known cells: nothing is written twice
    assert len(part_files(path)) == 2
    assert len(pd.read_parquet(path)) == 0  # the base file exists (folder searches find it) and is untouched
    cells = len(GRID.cells(N_CTX))
    reopened = ResultsFile(path)
    assert len(reopened.table) == 2 * cells and reopened.table["cell_id"].is_unique
    assert reopened.cell_ids == results.cell_ids
    loaded = load_sweeps([tmp_path])  # analysis: a folder search, the file and its parts
    assert len(loaded) == 2 * cells and loaded["cell_id"].is_unique
    correctness = read_correctness(path)
    assert len(correctness) == 2 * cells
    for row, values in zip(first_rows, first_correct, strict=True):
        assert np.array_equal(correctness[row["cell_id"]], values)
        assert reopened.accuracy_of(row["cell_id"]) == row["accuracy"]


def test_an_append_reads_and_rewrites_nothing_that_exists(tmp_path, monkeypatch):
    path = tmp_path / "r.parquet"
    results = ResultsFile(path)
    for number in range(5):
        results.append(*checkpoint_cells(number))
    results.compact()
    base = (path.stat().st_ino, path.read_bytes(), correctness_path(path).read_bytes())
    written = []
    original_write = results_module._write_table
    monkeypatch.setattr(
        results_module, "_write_table", lambda target, *a: (written.append(target), original_write(target, *a))
    )

    def no_reading(*args, **kwargs):
        raise AssertionError("an append read a file")

    for reader in ("read_parquet", "read_csv"):
        monkeypatch.setattr(pd, reader, no_reading)
    monkeypatch.setattr(pq, "read_table", no_reading)
    for number in range(5, 8):
        results.append(*checkpoint_cells(number))
    assert all(target.parent == parts_folder(path) for target in written) and len(written) == 3
    assert (path.stat().st_ino, path.read_bytes(), correctness_path(path).read_bytes()) == base
    assert len(results.cell_ids) == 8 * len(GRID.cells(N_CTX))


def test_the_merged_table_does_not_depend_on_the_writers(tmp_path):
    numbers = [3, 1, 2, 5]
    expected = _one_process_table(tmp_path, numbers)
    table = expected[0]
    assert tuple(table.columns) == SWEEP_COLUMNS and table["cell_id"].is_unique
    pd.testing.assert_frame_equal(table, sort_cells(table))
    assert table.groupby("checkpoint", sort=False)["op"].first().eq("original").all()  # each block starts there
    assert list(table["checkpoint"].drop_duplicates()) == sorted(f"/runs/p{number}.safetensors" for number in numbers)

    # Three writers with cells of every checkpoint, in another order, some appended twice.
    rows = [(row, values) for number in numbers for row, values in zip(*checkpoint_cells(number), strict=True)]
    random.Random(0).shuffle(rows)
    path = tmp_path / "shared.parquet"
    writers = [ResultsFile(path) for _ in range(3)]
    for start in range(0, len(rows), 7):
        chunk = rows[start : start + 7]
        writers[start % 3].append([row for row, _ in chunk], [values for _, values in chunk])
        writers[(start + 1) % 3].append([row for row, _ in chunk[:2]], [values for _, values in chunk[:2]])
    merge_parts(path)
    assert not parts_folder(path).exists()
    _assert_same_table(path, expected)
    assert merge_parts(path) is None  # nothing left to merge


def test_a_crash_during_the_merge_loses_and_doubles_nothing(tmp_path):
    expected = _one_process_table(tmp_path, [1, 2])
    path = tmp_path / "r.parquet"
    results = ResultsFile(path)
    results.append(*checkpoint_cells(1))
    results.append(*checkpoint_cells(2))
    saved = tmp_path / "saved"
    shutil.copytree(parts_folder(path), saved)
    merge_parts(path)
    shutil.copytree(saved, parts_folder(path))  # killed after writing the table, before deleting the parts
    # ... and a writer killed between its correctness and its rows, and one inside a write
    (parts_folder(path) / "00000000000000000009-1-ffff.correct.parquet").write_bytes(b"half a write")
    (parts_folder(path) / ".00000000000000000010-1-ffff.parquet.x.tmp").write_bytes(b"half a write")
    (tmp_path / ".r.parquet.x.tmp").write_bytes(b"half a write")  # ... and a merge killed while writing the table
    reopened = ResultsFile(path)
    assert len(reopened.table) == len(expected[0]) and reopened.table["cell_id"].is_unique
    assert len(load_sweeps([path])) == len(expected[0])
    reopened.compact()
    assert not parts_folder(path).exists()  # the leftovers of killed writers are gone
    assert not (tmp_path / ".r.parquet.x.tmp").exists()
    _assert_same_table(path, expected)


def test_a_killed_sweep_leaves_parts_that_the_next_run_reads_and_merges(tmp_path):
    expected = _one_process_table(tmp_path, [1, 2, 3])
    path = tmp_path / "r.parquet"
    first = ResultsFile(path)
    first.append(*checkpoint_cells(1))
    first.append(*checkpoint_cells(2))  # killed here: no merge
    again = ResultsFile(path)
    missing = [row for row in checkpoint_cells(3)[0] if row["cell_id"] not in again.cell_ids]
    assert len(missing) == len(GRID.cells(N_CTX))  # only checkpoint 3 is left to compute
    again.append(*checkpoint_cells(3))
    again.compact()
    _assert_same_table(path, expected)
    assert list(again.table["cell_id"]) == list(expected[0]["cell_id"])


def test_csv_tables_keep_parquet_parts_and_are_written_by_the_merge(tmp_path):
    expected = _one_process_table(tmp_path, [1, 2])
    path = tmp_path / "r.csv"
    results = ResultsFile(path, csv=True)
    results.append(*checkpoint_cells(2))
    results.append(*checkpoint_cells(1))
    assert all(part.suffix == ".parquet" for part in part_files(path))
    assert len(pd.read_csv(path)) == 0
    results.compact()
    table = ResultsFile(path, csv=True).table
    pd.testing.assert_frame_equal(table, ResultsFile(tmp_path / "one.parquet").table)
    assert len(pd.read_csv(path)) == len(expected[0])


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_an_older_table_without_the_kind_columns_merges_with_new_parts(tmp_path, suffix):
    """A table written before `weights` (and the other kind columns) existed: read with them unknown,
    resumed with parts that have them, merged into one table of every column (CSV alike)."""
    from corrupt.results import table_frame
    from nemesis.files.sweep_format import KIND_COLUMNS, read_sweep_table

    path = tmp_path / f"old{suffix}"
    rows, correct = checkpoint_cells(1)
    old = table_frame(rows).drop(columns=list(KIND_COLUMNS))
    old.to_csv(path, index=False) if suffix == ".csv" else old.to_parquet(path, index=False)
    pd.DataFrame({"cell_id": old["cell_id"], "correct": [values.tolist() for values in correct]}).to_parquet(
        correctness_path(path), index=False
    )
    results = ResultsFile(path, csv=suffix == ".csv")
    assert results.table["weights"].isna().all()
    results.append(*checkpoint_cells(2))
    results.compact()
    written = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    assert list(written.columns) == list(SWEEP_COLUMNS) and list(SWEEP_COLUMNS[:4]) == [
        "cell_id",
        "checkpoint",
        "model",
        "weights",
    ]
    table = read_sweep_table(path).table
    assert table.loc[table["seed"] == 1, "weights"].isna().all()  # the older rows: weights unknown
    assert (table.loc[table["seed"] == 2, "weights"] == "random-seed0").all()
    assert len(load_sweeps([path])) == 2 * len(GRID.cells(N_CTX))


def _garbage(path) -> None:
    path.write_bytes(b"PAR1 this is not a parquet file PAR1")


@pytest.mark.parametrize(
    "damaged",
    ["part rows", "part correctness", "missing part correctness", "typed part correctness", "base correctness"],
)
def test_a_damaged_file_is_named_and_nothing_is_dropped(tmp_path, damaged):
    path = tmp_path / "r.parquet"
    results = ResultsFile(path)
    results.append(*checkpoint_cells(1))
    results.compact()
    results.append(*checkpoint_cells(2))
    (part,) = part_files(path)
    target = {"part rows": part, "base correctness": correctness_path(path)}.get(damaged, correctness_path(part))
    if damaged == "missing part correctness":
        target.unlink()
        expected = f"{target} lacks the per-sample correctness of {len(GRID.cells(N_CTX))} rows of {part}"
    elif damaged == "typed part correctness":
        pd.DataFrame({"cell_id": pd.read_parquet(part)["cell_id"], "correct": 1}).to_parquet(target)
        expected = f"{target}: correct does not hold lists of booleans"
    else:
        _garbage(target)
        expected = f"cannot read {'sweep table' if damaged == 'part rows' else 'per-sample correctness'} {target}"
    before = sorted(p.name for p in parts_folder(path).iterdir())
    for attempt in (lambda: ResultsFile(path), lambda: merge_parts(path)):
        with pytest.raises(NemesisError) as error:
            attempt()
        message = str(error.value)
        assert expected in message and "\n" not in message
        assert "delete" in message or "move it away" in message or "restore it" in message  # what to do
    assert sorted(p.name for p in parts_folder(path).iterdir()) == before  # the merge deleted nothing
    if damaged != "missing part correctness":  # analysis names it too (a missing entry it reports per cell)
        with pytest.raises(NemesisError, match=re.escape(expected)):
            load_sweeps([path]) if damaged == "part rows" else read_correctness(path)


def test_the_commands_refuse_a_damaged_part_with_one_line(tmp_path):
    path = tmp_path / "r.parquet"
    results = ResultsFile(path)
    results.append(*checkpoint_cells(1))
    (part,) = part_files(path)
    _garbage(part)
    prompt = save_prompt(tmp_path / "p.safetensors", torch.zeros(N_CTX, 64), PromptMetadata(model="tiny"))
    before = sorted(tmp_path.rglob("*"))
    fails_with_one_line(
        ["corrupt", str(prompt), "--out", str(path), "--device", "cpu"], f"cannot read sweep table {part}"
    )
    fails_with_one_line(["report", str(path), "--out", str(tmp_path / "report")], f"cannot read sweep table {part}")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing deleted


def _writer(path: str, checkpoints: list[tuple[list[dict], list[np.ndarray]]], merge_every: int) -> None:
    results = ResultsFile(path)
    for index, (rows, correct) in enumerate(checkpoints):
        for start in range(0, len(rows), 5):  # several appends per checkpoint: more chances to interleave
            results.append(rows[start : start + 5], correct[start : start + 5])
        if index % merge_every == 0:
            merge_parts(path)  # merges others' parts while they append


def test_concurrent_writers_and_merges_lose_nothing(tmp_path):
    numbers = list(range(12))
    expected = _one_process_table(tmp_path, numbers)
    path = tmp_path / "r.parquet"
    context = multiprocessing.get_context("fork")
    checkpoints = [checkpoint_cells(number) for number in numbers]  # built here: the forked writers run no torch
    workers = [context.Process(target=_writer, args=(str(path), checkpoints[k::4], 1 + k % 2)) for k in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    merge_parts(path)
    _assert_same_table(path, expected)
    assert lock_path(path).is_file() and not parts_folder(path).exists()
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


# --- real `nemesis corrupt` processes ----------------------------------------------------------

SUBPROCESS_FLAGS = ("--rescale", "0.5", "--replace", "0", "--positions", "0,1", "--pretrained", "none")
SUBPROCESS_GRID = parse_grid(rescale="0.5", replace="0", positions="0,1")


def _start_corrupt(tmp_path, prompts, out, cache) -> subprocess.Popen:
    args = [sys.executable, "-m", "nemesis_cli", "corrupt", *map(str, prompts), "--out", str(out),
            "--root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / cache), "--device", "cpu",
            *SUBPROCESS_FLAGS]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(args, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_a_part(out, process) -> None:
    deadline = time.monotonic() + 120
    while not part_files(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def _finished(process) -> None:
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output


@pytest.fixture
def prompts(tmp_path):
    """Six prompt files of the tiny model, a 3-class test set, and the table one in-process sweep writes of them."""
    make_coop_folder(tmp_path / "data", "oxford_pets", classnames=["red square", "green circle", "blue star"],
                     per_class=(1, 1, 4))  # fmt: skip
    files = []
    for seed in range(6):
        ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) * 0.5
        metadata = PromptMetadata(model="tiny", dataset="oxford_pets", shots=2, seed=seed, prompt_method="coop")
        files.append(save_prompt(tmp_path / f"p{seed}.safetensors", ctx, metadata))
    (tmp_path / "alone").mkdir()
    alone = tmp_path / "alone" / "r.parquet"
    inputs = resolve_inputs(files, pretrained="none")
    run_sweep(inputs, SUBPROCESS_GRID, ResultsFile(alone), root=tmp_path / "data", device="cpu",
              backbones={("tiny", None): cached_backbone("tiny")}, progress=False)  # fmt: skip
    expected = _table_and_correctness(alone)
    assert len(expected[0]) == 6 * 5
    return files, expected


def _corrupt_here(tmp_path, files, out) -> None:
    args = ["corrupt", *map(str, files), "--out", str(out), "--root", str(tmp_path / "data"), "--device", "cpu",
            *SUBPROCESS_FLAGS]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_concurrent_and_killed_corrupt_processes_lose_and_double_nothing(tmp_path, prompts):
    """Two processes started together and a third one started once they write, on different checkpoints of
    one --out; a fourth killed mid-sweep, then rerun."""
    files, expected = prompts
    shared, killed = tmp_path / "shared" / "r.parquet", tmp_path / "killed" / "r.parquet"
    shared.parent.mkdir(), killed.parent.mkdir()
    together = [_start_corrupt(tmp_path, files[:2], shared, "c1"), _start_corrupt(tmp_path, files[2:4], shared, "c2")]
    victim = _start_corrupt(tmp_path, files, killed, "c3")
    _wait_for_a_part(killed, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert victim.returncode == -signal.SIGKILL and part_files(killed)  # killed before its merge
    killed_rows = sum(len(pd.read_parquet(part)) for part in part_files(killed))
    assert len(load_sweeps([killed.parent])) == killed_rows  # a folder search finds the unmerged rows
    _wait_for_a_part(shared, together[0])
    _corrupt_here(tmp_path, files[4:], shared)  # a staggered start, while the other two write
    for process in together:
        _finished(process)
    _assert_same_table(shared, expected)
    _corrupt_here(tmp_path, files, killed)  # the rerun reads the killed run's parts and merges them
    _assert_same_table(killed, expected)
    assert not parts_folder(shared).exists() and not parts_folder(killed).exists()


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_table_written_before_sites_reads_as_the_whole_ctx_with_the_same_numbers(tmp_path, suffix):
    """A table without the `site` column (every sweep before corruption sites): read with site "" (the
    whole ctx), the same rows, cell ids and LNE counts as the table written now, and resumed as is."""
    from corrupt.results import table_frame
    from nemesis.files.sweep_format import read_sweep_table

    rows, correct = checkpoint_cells(1)
    csv = suffix == ".csv"
    new = ResultsFile(tmp_path / f"new{suffix}", csv=csv)
    new.append(rows, correct)
    new.compact()
    path = tmp_path / f"old{suffix}"
    old = table_frame(rows).drop(columns=["site"])
    old.to_csv(path, index=False) if csv else old.to_parquet(path, index=False)
    pd.DataFrame({"cell_id": old["cell_id"], "correct": [values.tolist() for values in correct]}).to_parquet(
        correctness_path(path), index=False
    )
    read_old = read_sweep_table(path).table
    assert list(read_old.columns) == list(SWEEP_COLUMNS) and (read_old["site"] == "").all()
    by_id = read_sweep_table(new.path).table.set_index("cell_id")
    pd.testing.assert_frame_equal(read_old.set_index("cell_id"), by_id.loc[read_old["cell_id"]])
    pd.testing.assert_frame_equal(lne_frequency(load_sweeps([path])), lne_frequency(load_sweeps([new.path])))
    results = ResultsFile(path, csv=csv)
    results.append(rows, correct)  # the same cells: their ids are those of before, so nothing is added
    assert part_files(path) == [] and len(results.table) == len(rows)
