"""The sweep results table (DESIGN section 6) and the per-sample correctness stored beside it.

`X.parquet` (or `X.csv`) holds one row per cell with exactly `COLUMNS`; `X.correct.parquet`
holds `cell_id` and `correct` (list<bool>, one entry per test sample) for paired tests. Both are
rewritten atomically each time a checkpoint's rows are appended, correctness first: a table row
never exists without its correctness, so a killed sweep loses at most the checkpoint in flight.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nemesis.atomic import atomic_path
from nemesis.errors import NemesisError
from nemesis.sweep_format import SWEEP_COLUMNS as COLUMNS
from nemesis.sweep_format import correctness_path, typed_sweep_frame

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
    """Unique, deterministic and readable: `<checkpoint key>:<op>:<position>:<factor>:<noise seed>`."""
    return ":".join([checkpoint_key(identity), cell.op, *map(_value, (cell.position, cell.factor, cell.noise_seed))])


def table_frame(rows: Iterable[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Rows in the table's column order and dtypes (nullable integers, NaN floats)."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(COLUMNS))
    return typed_sweep_frame(frame, "results table")


def _correctness_table(cell_ids: list[str], correct: list[np.ndarray]) -> pa.Table:
    arrays = pa.array([np.asarray(row, dtype=bool) for row in correct], type=pa.list_(pa.bool_()))
    return pa.table({"cell_id": pa.array(cell_ids, type=pa.string()), "correct": arrays})


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
        if not self.path.parent.is_dir():
            raise NemesisError(f"output folder {self.path.parent} does not exist; create it first")
        self.table = self._read_table()
        self.correctness = self._read_correctness()
        # Correctness is written before the table, so a row without it means the file was moved or
        # deleted: rewriting the table would drop those rows, so refuse instead.
        known = set(self.correctness.column("cell_id").to_pylist())
        bare = int((~self.table["cell_id"].isin(known)).sum())
        if bare:
            raise NemesisError(
                f"{self.correctness_path} lacks the per-sample correctness of {bare} rows of {self.path}; "
                "restore it, or pass another --out"
            )

    def _read_table(self) -> pd.DataFrame:
        if not self.path.is_file():
            return table_frame([])
        try:
            frame = pd.read_csv(self.path) if self.csv else pd.read_parquet(self.path)
        except (OSError, ValueError) as error:
            raise NemesisError(f"cannot read the existing results {self.path} ({type(error).__name__}); "
                               "move it away or pass another --out") from error  # fmt: skip
        return table_frame(frame).drop_duplicates("cell_id", keep="last")

    def _read_correctness(self) -> pa.Table:
        if not self.correctness_path.is_file():
            return _correctness_table([], [])
        try:
            return pq.read_table(self.correctness_path, columns=["cell_id", "correct"])
        except (OSError, ValueError, pa.ArrowException) as error:
            raise NemesisError(f"cannot read {self.correctness_path} ({type(error).__name__}); "
                               "move it away together with its table") from error  # fmt: skip

    @property
    def cell_ids(self) -> set[str]:
        """Cells already computed: a rerun skips them."""
        return set(self.table["cell_id"])

    def accuracy_of(self, identifier: str) -> float:
        return float(self.table.loc[self.table["cell_id"] == identifier, "accuracy"].iloc[0])

    def append(self, rows: list[dict[str, Any]], correct: list[np.ndarray]) -> None:
        """Add rows and their per-sample correctness; both files are replaced atomically."""
        if not rows:
            return
        new_ids = [row["cell_id"] for row in rows]
        keep = pc.invert(pc.is_in(self.correctness.column("cell_id"), value_set=pa.array(new_ids)))
        self.correctness = pa.concat_tables([self.correctness.filter(keep), _correctness_table(new_ids, correct)])
        self.table = table_frame(
            pd.concat([self.table[~self.table["cell_id"].isin(new_ids)], table_frame(rows)], ignore_index=True)
        )
        # Correctness first: a crash between the two renames leaves extra correctness, never a bare row.
        with atomic_path(self.correctness_path) as temporary:
            pq.write_table(self.correctness, temporary)
        with atomic_path(self.path) as temporary:
            if self.csv:
                self.table.to_csv(temporary, index=False)
            else:
                self.table.to_parquet(temporary, index=False)


def accuracy_percent(correct: int, n: int) -> float:
    return 100.0 * correct / n if n else math.nan
