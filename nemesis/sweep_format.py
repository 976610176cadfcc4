"""The sweep results format, shared by its writer (`corrupt`) and its readers (`analysis`).

`X.parquet` (or `X.csv`) holds one row per cell with exactly `SWEEP_COLUMNS`, in that order and
with those dtypes; `X.correct.parquet` beside it holds each cell's per-sample correctness
(`cell_id`, `correct`: list<bool>, the same sample order for every cell of a checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .errors import NemesisError

SWEEP_DTYPES = {
    "cell_id": "string",
    "checkpoint": "string",
    "model": "string",
    "dataset": "string",
    "shots": "Int64",
    "seed": "Int64",
    "method": "string",
    "op": "string",  # original | replace | rescale
    "position": "Int64",  # null for the original row
    "factor": "float64",  # tau (rescale) or sigma (replace); NaN for the original row
    "noise_seed": "Int64",  # null unless the operator draws noise
    "n": "int64",
    "correct": "int64",
    "accuracy": "float64",  # percent
    "delta_acc": "float64",  # percentage points vs the same checkpoint's original row
    "norm_before": "float64",  # L2 norm of the corrupted position (class-specific: class mean)
    "norm_after": "float64",
}
SWEEP_COLUMNS = tuple(SWEEP_DTYPES)
CORRECTNESS_COLUMNS = ("cell_id", "correct")
CORRECTNESS_SUFFIX = ".correct.parquet"
ORIGINAL_OP = "original"


def checkpoint_key_of(cell_id: str) -> str:
    """The part of a cell id naming what was evaluated (checkpoint file, model, weights, dataset, classes).

    Cell ids read `<checkpoint key>:<op>:<position>:<factor>:<noise seed>`; a cell and its
    checkpoint's original row share the key, whatever file they were written to.
    """
    return cell_id.split(":", 1)[0]


def correctness_path(table: str | os.PathLike) -> Path:
    """Where a sweep table keeps its per-sample correctness: X.parquet or X.csv -> X.correct.parquet."""
    table = Path(table)
    return table.with_name(table.stem + CORRECTNESS_SUFFIX)


def typed_sweep_frame(frame: pd.DataFrame, origin: str) -> pd.DataFrame:
    """`frame` with exactly the sweep columns, in order, with their dtypes; NemesisError if it is not one."""
    missing = [column for column in SWEEP_COLUMNS if column not in frame.columns]
    if missing:
        raise NemesisError(
            f"{origin} is not a sweep results table: missing columns {', '.join(missing)}; "
            "pass the table `nemesis corrupt` wrote"
        )
    frame = frame[list(SWEEP_COLUMNS)].copy()
    try:
        for column, dtype in SWEEP_DTYPES.items():
            if dtype == "string":
                frame[column] = frame[column].astype("string")
            else:
                frame[column] = pd.to_numeric(frame[column]).astype(dtype)
    except (TypeError, ValueError) as error:
        raise NemesisError(f"{origin}: a numeric column holds other values ({error}); not a sweep table") from error
    return frame.reset_index(drop=True)
