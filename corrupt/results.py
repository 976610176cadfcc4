"""The sweep results table (DESIGN section 6) and the per-sample correctness stored beside it.

`X.parquet` (or `X.csv`) holds one row per cell with exactly `COLUMNS`; `X.correct.parquet`
holds `cell_id` and `correct` (list<bool>, one entry per test sample) for paired tests. The
layout of a table and its parts is in `nemesis.files.sweep_format`; this module writes them.

Public API (what the sweep engine, torchrun ranks and tools build on):

- `ResultsFile(path, csv=False)` opens a table: it reads the base file and every part
  (`read_sweep_table`), refuses rows without their correctness, and keeps the known cell ids.
  `cell_ids`, `accuracy_of(id)`, `table` and `rows_of(ids)` answer from memory.
- `ResultsFile.append(rows, correct)` writes one part: the correctness, then the rows, each
  atomically, under the table's lock held *shared*, so any number of processes append at once
  and a row never exists without its correctness. An append costs the same with 50 checkpoints
  in the table as with none: nothing existing is read or rewritten. Rows of cell ids already
  known are dropped (a table never holds a cell twice; nothing is replaced).
- `merge_parts(path)` (and `ResultsFile.compact()`, which also refreshes the open file) takes the
  lock *exclusively* (waiting for appends in flight), writes base file + parts as the one
  `X.parquet` (or `X.csv`) and `X.correct.parquet`, atomically and correctness first, in
  `sort_cells` order (checkpoint, then the original row, then operator, factor, position, noise
  seed), then deletes the merged parts and the leftovers of killed writers. The merged table
  depends only on which cells were computed, not on how many processes computed them or in
  which order: a torchrun sweep merged by rank 0 after a barrier equals the one-process table.
  `run_sweep` merges at its end (also when interrupted).
- Sharded sweeps (torchrun): every rank opens its own `ResultsFile` on the same path, computes
  its share of the cells (those missing from the table it read, so a rerun with another number
  of ranks resumes), appends with `run_sweep(..., compact=False)`, and after a barrier rank 0
  calls `merge_parts(path)`. Nothing here depends on ranks: the parts of any set of processes
  merge into the same table.

A killed writer leaves complete parts (or a correctness part without its rows, ignored), which
the next open reads and the next merge folds in. CSV tables: parts are Parquet (exact dtypes);
the CSV file is written by the merge. The column set is `SWEEP_COLUMNS`; nothing here names a
column except `cell_id` and `accuracy`.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nemesis.atomic import atomic_path, file_lock
from nemesis.errors import NemesisError
from nemesis.files.sweep_format import (
    CORRECTNESS_SCHEMA,
    correctness_path,
    lock_path,
    parts_folder,
    read_sweep_table,
    typed_sweep_frame,
)
from nemesis.files.sweep_format import SWEEP_COLUMNS as COLUMNS

from .grid import Cell

TABLE_SUFFIXES = {"parquet": ".parquet", "csv": ".csv"}


def _value(value: Any) -> str:
    return "-" if value is None else repr(value)


def checkpoint_key(identity: dict[str, Any]) -> str:
    """12 hex digits naming what was evaluated: the checkpoint file and the model, weights, data it ran on."""
    fields = [identity.get(key) for key in ("checkpoint", "model", "pretrained", "dataset", "subsample")]
    # A named activation or init phrase changes what is evaluated; keys without them stay as before.
    fields += [f"{key}={identity[key]}" for key in ("activation", "ctx_init") if identity.get(key) is not None]
    return hashlib.sha256("|".join(map(_value, fields)).encode()).hexdigest()[:12]


def cell_id(identity: dict[str, Any], cell: Cell) -> str:
    """Unique, deterministic and readable: `<checkpoint key>:<op>:<position>:<factor>:<noise seed>`, then
    `:<site>` for a named corruption site (a whole-ctx site adds nothing: CoOp's ids are as before)."""
    fields = [checkpoint_key(identity), cell.op, *map(_value, (cell.position, cell.factor, cell.noise_seed))]
    return ":".join(fields + ([cell.site.name] if cell.site.name else []))


def table_frame(rows: Iterable[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Rows in the table's column order and dtypes (nullable integers, NaN floats)."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(COLUMNS))
    return typed_sweep_frame(frame, "results table")


def _correctness_table(cell_ids: list[str], correct: list[np.ndarray]) -> pa.Table:
    arrays = pa.array([np.asarray(row, dtype=bool) for row in correct], type=pa.list_(pa.bool_()))
    return pa.table({"cell_id": pa.array(cell_ids, type=pa.string()), "correct": arrays}, schema=CORRECTNESS_SCHEMA)


def _write_table(path: Path, frame: pd.DataFrame, correctness: pa.Table) -> None:
    """Correctness first, then the rows, each atomically: a crash between them leaves extra correctness, no bare row."""
    with atomic_path(correctness_path(path)) as temporary:
        pq.write_table(correctness, temporary)
    with atomic_path(path) as temporary:
        if path.suffix.lower() == TABLE_SUFFIXES["csv"]:
            frame.to_csv(temporary, index=False)
        else:
            frame.to_parquet(temporary, index=False)


def _create_folder(folder: Path) -> None:
    """Missing folders of --out are created at the first write, as for every other output."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NemesisError(f"cannot create the output folder {folder} ({error.strerror or error})") from None


def _part_name() -> str:
    # Sorts by writing time; the process id and random digits keep concurrent writers (other hosts too) apart.
    return f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"


def write_part(path: str | os.PathLike, frame: pd.DataFrame, correctness: pa.Table) -> Path:
    """Append `frame` (typed rows) and their correctness to the table at `path` as one new part; its rows file."""
    path = Path(path)
    if not path.exists():
        _create_folder(path.parent)  # the lock file lives beside the table: its folder first
        # An empty base file at the first append, so folder searches find the table before its first merge.
        with file_lock(lock_path(path)):
            if not path.exists():
                _write_table(path, table_frame([]), CORRECTNESS_SCHEMA.empty_table())
    with file_lock(lock_path(path), shared=True):
        folder = parts_folder(path)
        folder.mkdir(exist_ok=True)  # under the lock: the merge removes the folder only while it holds it alone
        part = folder / f"{_part_name()}.parquet"
        _write_table(part, frame, correctness)
    return part


def merge_parts(path: str | os.PathLike) -> pd.DataFrame | None:
    """Merge the parts of the table at `path` into its base file (see the module docstring); the merged rows.

    None when there was nothing to merge. Safe to call from any process at any time: it waits for
    appends in flight, and a crash at any point loses nothing (merged parts are deleted last, and
    a cell found both in the base file and in a part is read once).
    """
    path = Path(path)
    folder = parts_folder(path)
    if not folder.is_dir():
        return None
    with file_lock(lock_path(path)):
        if not folder.is_dir():  # another process merged meanwhile
            return None
        contents = read_sweep_table(path, correctness=True, require_correctness=True, locked=True, sort=True)
        merged = None
        if contents.parts:
            merged = contents.table
            _write_table(path, merged, contents.correctness)
        for part in contents.parts:
            part.unlink()  # the rows first: a correctness file without rows is ignored, rows without it are not
            correctness_path(part).unlink(missing_ok=True)
        for leftover in folder.iterdir():  # nobody writes while the lock is held: what is left is a killed writer's
            leftover.unlink()
        folder.rmdir()
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # the table is written under the lock
            leftover.unlink(missing_ok=True)
    return merged


class ResultsFile:
    """A results table and its correctness file: read what exists, append checkpoint by checkpoint."""

    def __init__(self, path: str | os.PathLike, csv: bool = False) -> None:
        self.path = Path(path)
        self.csv = csv
        self.correctness_path = correctness_path(self.path)
        suffix = TABLE_SUFFIXES["csv" if csv else "parquet"]
        if self.path.suffix.lower() != suffix:
            hint = "drop --csv or name a .csv file" if csv else "name a .parquet file, or pass --csv for .csv"
            raise NemesisError(f"results file {self.path} must end in {suffix}; {hint}")
        if self.path.is_dir():
            raise NemesisError(f"results file {self.path} is a folder; pass a file name such as {self.path}{suffix}")
        # Correctness is written before the rows, so a row without it means a file was moved or deleted:
        # merging would keep that row without its correctness, so refuse instead.
        self._load(read_sweep_table(self.path, require_correctness=True).table)

    def _load(self, table: pd.DataFrame) -> None:
        self._frames = [table]  # the table read, then each part this process appended
        self._table: pd.DataFrame | None = table
        self._accuracy = dict(zip(table["cell_id"].tolist(), table["accuracy"].tolist(), strict=True))

    @property
    def cell_ids(self) -> set[str]:
        """Cells already computed: a rerun skips them."""
        return set(self._accuracy)

    @property
    def table(self) -> pd.DataFrame:
        """Every row known to this process: the table as read (or merged), then the rows it appended since."""
        if self._table is None:
            self._table = pd.concat(self._frames, ignore_index=True)
            self._frames = [self._table]
        return self._table

    def rows_of(self, cell_ids: Sequence[str]) -> pd.DataFrame:
        """The rows of `cell_ids` in that order (ids not in the table left out)."""
        table = self.table
        position = pd.Series(range(len(table)), index=table["cell_id"].astype(str))
        return table.iloc[position.reindex(list(cell_ids)).dropna().astype(int).tolist()].reset_index(drop=True)

    def accuracy_of(self, identifier: str) -> float:
        return float(self._accuracy[identifier])

    def append(self, rows: list[dict[str, Any]], correct: list[np.ndarray]) -> None:
        """Add rows and their per-sample correctness as one part (see the module docstring)."""
        keep = {}
        for row, values in zip(rows, correct, strict=True):
            if row["cell_id"] not in self._accuracy:
                keep.setdefault(row["cell_id"], (row, values))
        if not keep:
            return
        frame = table_frame([row for row, _ in keep.values()])
        write_part(self.path, frame, _correctness_table(list(keep), [values for _, values in keep.values()]))
        self._frames.append(frame)
        self._table = None
        self._accuracy.update(zip(frame["cell_id"].tolist(), frame["accuracy"].tolist(), strict=True))

    def compact(self) -> None:
        """Merge every part of the table (this process's and others') into its base file: `merge_parts`."""
        merged = merge_parts(self.path)
        if merged is not None:
            self._load(merged)


def accuracy_percent(correct: int, n: int) -> float:
    return 100.0 * correct / n if n else math.nan
