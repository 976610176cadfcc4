"""Appending a checkpoint's rows to a sweep table: append-only parts against rewriting the table, in one run.

Setting: the default grid on 16 context positions (193 cells per checkpoint), 10,000 test samples
per cell (its per-sample correctness), 50 checkpoints already in the table (9,650 rows).

- Ours: `ResultsFile.append` writes the checkpoint as one part (its correctness, then its rows);
  nothing already in the table is read or rewritten. The parts are merged once, at the end.
- Slow (the toolkit before parts): every append filters the existing rows and correctness by the
  new cell ids and rewrites the whole table and its correctness file, atomically.

Each way appends the same 3 checkpoints to the same 50-checkpoint table, timed one by one; the
first append into an empty table is timed too. Both must end with the same table (rows, values,
per-sample correctness) once ours is merged. The last line is `ratio: <slow / ours with 50
checkpoints present>`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from corrupt.engine import CellOutcome, cell_rows
from corrupt.grid import parse_grid
from corrupt.results import ResultsFile, _correctness_table, table_frame
from nemesis.atomic import atomic_path
from nemesis.files.sweep_format import correctness_path, sort_cells

N_CTX = 16
SAMPLES = 10_000
PRESENT = 50
APPENDED = 3


def checkpoint(number: int) -> tuple[list[dict], list[np.ndarray]]:
    """One checkpoint's 193 rows of the default grid and their per-sample correctness."""
    cells = parse_grid().cells(N_CTX)
    generator = torch.Generator().manual_seed(number)
    correct = torch.rand(len(cells), SAMPLES, generator=generator) > 0.5
    norms = torch.rand(len(cells), generator=generator).tolist()
    identity = {"checkpoint": f"/runs/seed{number}/prompt.safetensors", "model": "ViT-B-32", "pretrained": "openai",
                "dataset": "imagenet", "subsample": None, "shots": 16, "seed": number, "method": "coop"}  # fmt: skip
    rows = cell_rows(identity, cells, CellOutcome(correct, norms, [n / 2 for n in norms]), 50.0)
    return rows, [row.numpy() for row in correct]


class RewritingResults:
    """The slow way: the table and its correctness held in memory and rewritten whole at each append."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table = pd.read_parquet(path) if path.is_file() else table_frame([])
        self.correctness = (
            pq.read_table(correctness_path(path)) if path.is_file() else _correctness_table([], [])
        )  # fmt: skip

    def append(self, rows: list[dict], correct: list[np.ndarray]) -> None:
        new_ids = [row["cell_id"] for row in rows]
        keep = pc.invert(pc.is_in(self.correctness.column("cell_id"), value_set=pa.array(new_ids)))
        self.correctness = pa.concat_tables([self.correctness.filter(keep), _correctness_table(new_ids, correct)])
        self.table = table_frame(
            pd.concat([self.table[~self.table["cell_id"].isin(new_ids)], table_frame(rows)], ignore_index=True)
        )
        with atomic_path(correctness_path(self.path)) as temporary:
            pq.write_table(self.correctness, temporary)
        with atomic_path(self.path) as temporary:
            self.table.to_parquet(temporary, index=False)


def timed_appends(results, checkpoints) -> list[float]:
    seconds = []
    for rows, correct in checkpoints:
        start = time.perf_counter()
        results.append(rows, correct)
        seconds.append(time.perf_counter() - start)
    return seconds


def read_back(path: Path) -> tuple[pd.DataFrame, dict[str, list[bool]]]:
    correct = pq.read_table(correctness_path(path)).to_pydict()
    return pd.read_parquet(path), dict(zip(correct["cell_id"], correct["correct"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--present", type=int, default=PRESENT, help="checkpoints already in the table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        print(f"building {args.present + APPENDED} checkpoints x 193 cells x {SAMPLES} samples ...", flush=True)
        present = [checkpoint(number) for number in range(args.present)]
        appended = [checkpoint(number) for number in range(args.present, args.present + APPENDED)]
        base = folder / "base.parquet"
        results = ResultsFile(base)
        for rows, correct in present:
            results.append(rows, correct)
        results.compact()
        print(f"table with {args.present} checkpoints: {len(results.table)} rows", flush=True)

        first = {}
        for name, kind in (("slow", RewritingResults), ("ours", ResultsFile)):
            (folder / name).mkdir()
            first[name] = timed_appends(kind(folder / name / "first.parquet"), appended[:1])[0]
        seconds = {}
        for name, kind in (("slow", RewritingResults), ("ours", ResultsFile)):
            path = folder / name / "table.parquet"
            shutil.copy(base, path)
            shutil.copy(correctness_path(base), correctness_path(path))
            seconds[name] = timed_appends(kind(path), appended)
        start = time.perf_counter()
        ResultsFile(folder / "ours" / "table.parquet").compact()
        merge = time.perf_counter() - start

        slow_table, slow_correct = read_back(folder / "slow" / "table.parquet")
        ours_table, ours_correct = read_back(folder / "ours" / "table.parquet")
        pd.testing.assert_frame_equal(sort_cells(slow_table), ours_table)
        assert slow_correct == ours_correct, "the two ways disagree on the per-sample correctness"
        print(f"both tables: {len(ours_table)} rows, the same values and per-sample correctness")

        for name in ("slow", "ours"):
            each = ", ".join(f"{value:.3f}" for value in seconds[name])
            print(f"{name}: first append {first[name]:.3f} s; with {args.present} present: {each} s per append")
        print(f"ours: one merge at the end of the sweep {merge:.2f} s")
        ratio = statistics.median(seconds["slow"]) / statistics.median(seconds["ours"])
        print(f"ratio: {ratio:.1f}")


if __name__ == "__main__":
    main()
