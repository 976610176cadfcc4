"""The sweep results format, shared by its writer (`corrupt`) and its readers (`analysis`).

`X.parquet` (or `X.csv`) holds one row per cell with exactly `SWEEP_COLUMNS`, in that order and
with those dtypes; `X.correct.parquet` beside it holds each cell's per-sample correctness
(`cell_id`, `correct`: list<bool>, the same sample order for every cell of a checkpoint).

Writers do not rewrite those two files for every checkpoint: each append is one *part* in the
hidden folder `.X.parquet.parts/` (`.X.csv.parts/` for a CSV table) beside the table: a pair
`<name>.correct.parquet` + `<name>.parquet` (always Parquet, whatever the table's format), the
correctness written first. `<name>` starts with the writing time in nanoseconds, so parts sort in
the order they were written. A table is therefore the base file plus its parts, and every reader
goes through `read_sweep_table`, which reads both and keeps the first row of each cell id (the base
file first, then the parts by name), so a sweep killed before its parts were merged loses nothing
and counts nothing twice. `.X.parquet.lock` beside the table is the lock file writers and the merge
share (`nemesis.atomic.file_lock`): appends hold it shared, the merge (`corrupt.results.merge_parts`)
exclusively, and readers shared where it exists. A merged table is in `sort_cells` order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..atomic import file_lock
from ..errors import NemesisError
from ..methods import split_method
from ..wording import plural

SWEEP_DTYPES = {
    "cell_id": "string",
    "checkpoint": "string",
    "model": "string",
    # The backbone's weights identity (`Backbone.weights_id`): "random-seed0" for random weights,
    # "tag:openai", "sha256:<hex>" for a file, "+quickgelu" appended for QuickGELU builds.
    "weights": "string",
    "dataset": "string",
    "shots": "Int64",
    "seed": "Int64",
    "method": "string",  # the prompt method (nemesis.methods): coop, cocoop, ...
    "penalty": "string",  # none, nemesis, ... (tables written before it: from their one-word method)
    "method_variant": "string",  # Nemesis prompts: e.g. "PUN, weight 1" (nemesis.choices.nemesis_variant)
    # What kind of prompt it is, so analysis never pools kinds unasked: the classes it was trained
    # and evaluated on (all, base or new), the dataset it was trained on (differs from `dataset`
    # under domain shift) and the number of classes evaluated.
    "subsample": "string",
    "train_dataset": "string",
    "n_classes": "Int64",
    # The corruption site of the cell (`PromptMethod.corruption_sites`), e.g. "prompt 0"; "" for a
    # method's whole-ctx site (CoOp, CoCoOp) and for the original row.
    "site": "string",
    # Prompts inside the towers: the tower ("text", "vision"; prefix tuning's "text keys", "text values") and
    # layer of the site's prompt; "" and null for methods whose prompt is one ctx (CoOp, CoCoOp, PLOT) and for
    # the original row.
    "tower": "string",
    "layer": "Int64",
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
# Columns added after the first tables were written: an older table reads with them unknown (<NA>),
# and analysis then shows its prompts as a kind of their own, never beside the paper's numbers
# (unknown weights alone are shown as before: no mark).
KIND_COLUMNS = ("weights", "penalty", "method_variant", "subsample", "train_dataset", "n_classes")
# Columns added later whose value in an older table is known: every sweep before corruption sites
# corrupted the whole ctx, so such a table reads with site "" (as a new table writes it).
DEFAULTED_COLUMNS = {"site": "", "tower": ""}
LATER_COLUMNS = ("layer",)  # added later too; null in an older table, as it is for its methods
CORRECTNESS_COLUMNS = ("cell_id", "correct")
CORRECTNESS_SUFFIX = ".correct.parquet"
CORRECTNESS_SCHEMA = pa.schema([("cell_id", pa.string()), ("correct", pa.list_(pa.bool_()))])
ORIGINAL_OP = "original"
PARTS_SUFFIX = ".parts"
LOCK_SUFFIX = ".lock"
PART_SUFFIX = ".parquet"  # a part's rows, whatever the table's format
# Where a merged table's rows go: by checkpoint, then the original row, then each cell by site,
# operator, factor, position and noise seed (the cell id breaks any tie, so the order is total).
CELL_ORDER = ("checkpoint", "checkpoint_key", "corrupted", "site", "op", "factor", "position", "noise_seed", "cell_id")
_READ_ATTEMPTS = 5  # a part merged away while it was being read: read again (the base now holds it)


def checkpoint_key_of(cell_id: str) -> str:
    """The part of a cell id naming what was evaluated (checkpoint file, model, weights, dataset, classes).

    Cell ids read `<checkpoint key>:<op>:<position>:<factor>:<noise seed>` (then `:<site>` for a
    named corruption site); a cell and its checkpoint's original row share the key, whatever file
    they were written to.
    """
    return cell_id.split(":", 1)[0]


def correctness_path(table: str | os.PathLike) -> Path:
    """Where a sweep table keeps its per-sample correctness: X.parquet or X.csv -> X.correct.parquet."""
    table = Path(table)
    return table.with_name(table.stem + CORRECTNESS_SUFFIX)


def parts_folder(table: str | os.PathLike) -> Path:
    """The hidden folder of a table's unmerged parts: X.parquet -> .X.parquet.parts."""
    table = Path(table)
    return table.with_name(f".{table.name}{PARTS_SUFFIX}")


def lock_path(table: str | os.PathLike) -> Path:
    """The lock file of a table's writers: X.parquet -> .X.parquet.lock."""
    table = Path(table)
    return table.with_name(f".{table.name}{LOCK_SUFFIX}")


def _is_part_rows(name: str) -> bool:
    # Hidden names are temporary files of writes in flight (nemesis.atomic).
    return not name.startswith(".") and name.endswith(PART_SUFFIX) and not name.endswith(CORRECTNESS_SUFFIX)


def part_files(table: str | os.PathLike) -> list[Path]:
    """The rows files of a table's parts, in the order they were written (their correctness: `correctness_path`)."""
    folder = parts_folder(table)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if _is_part_rows(path.name))


def _split_legacy_methods(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows without a penalty (tables written when one word named method and penalty) get both from it."""
    missing = frame["penalty"].isna() & frame["method"].notna()
    if missing.any():
        pairs = [split_method(name) for name in frame.loc[missing, "method"]]
        frame.loc[missing, "method"] = [method for method, _ in pairs]
        frame.loc[missing, "penalty"] = [penalty for _, penalty in pairs]
    return frame


def typed_sweep_frame(frame: pd.DataFrame, origin: str) -> pd.DataFrame:
    """`frame` with exactly the sweep columns, in order, with their dtypes; NemesisError if it is not one."""
    optional = (*KIND_COLUMNS, *DEFAULTED_COLUMNS, *LATER_COLUMNS)
    missing = [column for column in SWEEP_COLUMNS if column not in frame.columns and column not in optional]
    if missing:
        raise NemesisError(
            f"{origin} is not a sweep results table: missing columns {', '.join(missing)}; "
            "pass the table `nemesis corrupt` wrote"
        )
    frame = frame.reindex(columns=list(SWEEP_COLUMNS))  # a copy; absent kind columns come back empty
    try:
        for column, dtype in SWEEP_DTYPES.items():
            if dtype == "string":
                frame[column] = frame[column].astype("string")
            else:
                frame[column] = pd.to_numeric(frame[column]).astype(dtype)
    except (TypeError, ValueError) as error:
        raise NemesisError(f"{origin}: a numeric column holds other values ({error}); not a sweep table") from error
    for column, value in DEFAULTED_COLUMNS.items():  # absent, or "" read back from a CSV file as empty
        frame[column] = frame[column].fillna(value)
    return _split_legacy_methods(frame).reset_index(drop=True)


def sort_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in `CELL_ORDER`: the one order of a merged table, whichever processes wrote its parts."""
    keys = pd.DataFrame(
        {
            "checkpoint": frame["checkpoint"],
            "checkpoint_key": frame["cell_id"].map(lambda value: checkpoint_key_of(str(value)), na_action="ignore"),
            "corrupted": (frame["op"] != ORIGINAL_OP).fillna(True).astype(bool),
            **{column: frame[column] for column in ("site", "op", "factor", "position", "noise_seed", "cell_id")},
        },
        index=frame.index,
    )
    order = keys.sort_values(list(CELL_ORDER), na_position="first", kind="stable").index
    return frame.loc[order].reset_index(drop=True)


# --- reading a table: base file and parts -------------------------------------------------------


@dataclass
class SweepContents:
    """What `read_sweep_table` found."""

    table: pd.DataFrame  # one row per cell id, typed: the base file's rows, then each part's
    correctness: pa.Table | None  # cell_id, correct of the table's rows, in their order (None: not read)
    parts: list[Path]  # the parts' rows files read


def _base_advice(table: Path) -> str:
    return f"move it away together with {correctness_path(table).name} and rerun the sweep, or pass another --out"


def _part_advice(part: Path) -> str:
    return (
        f"delete {part} and {correctness_path(part).name} beside it, then rerun the sweep to compute their cells again"
    )


def _read_rows(path: Path, advice: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, pa.ArrowException) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NemesisError(f"cannot read sweep table {path} ({first_line}); {advice}") from error
    frame = typed_sweep_frame(frame, str(path))
    repeated = frame["cell_id"].duplicated()
    if repeated.any():
        duplicate = frame.loc[repeated, "cell_id"].iloc[0]
        raise NemesisError(f"{path}: cell_id {duplicate!r} appears twice; each cell must have one row")
    return frame


def _read_correctness(path: Path, ids_only: bool, advice: str) -> pa.Table:
    try:
        schema = pq.read_schema(path)
        missing = [column for column in CORRECTNESS_COLUMNS if column not in schema.names]
        if missing:
            raise NemesisError(f"{path} is not a per-sample correctness file: missing columns {', '.join(missing)}")
        cell_ids, correct = schema.field("cell_id").type, schema.field("correct").type
        listed = pa.types.is_list(correct) or pa.types.is_large_list(correct)
        if not pa.types.is_string(cell_ids) and not pa.types.is_large_string(cell_ids):
            raise NemesisError(f"{path}: cell_id does not hold text; {advice}")
        if not listed or not pa.types.is_boolean(correct.value_type):
            raise NemesisError(f"{path}: correct does not hold lists of booleans; {advice}")
        if ids_only:  # the lists are the bulk of the file: leave them unread
            return pq.read_table(path, columns=["cell_id"]).cast(pa.schema([("cell_id", pa.string())]))
        return pq.read_table(path, columns=list(CORRECTNESS_COLUMNS)).cast(CORRECTNESS_SCHEMA)
    except (FileNotFoundError, NemesisError):
        raise
    except (OSError, ValueError, pa.ArrowException) as error:
        raise NemesisError(f"cannot read per-sample correctness {path} ({type(error).__name__}); {advice}") from error


def _correctness_of(rows: pd.DataFrame, path: Path, table: Path, ids_only: bool, required: bool, advice: str):
    """The correctness of `rows` (from `table`) read from `path`, first entry of each id kept."""
    if not len(rows):
        return None
    if not path.is_file():
        found = None
    else:
        found = _read_correctness(path, ids_only, advice)
        wanted = pa.array(rows["cell_id"].astype(str).tolist(), type=pa.string())
        wanted_mask = pc.is_in(found.column("cell_id"), value_set=wanted)
        if not pc.all(wanted_mask).as_py():  # copying the lists is the cost: only when some are not wanted
            found = found.filter(wanted_mask)
    count = 0 if found is None else len(set(found.column("cell_id").to_pylist()))
    if required and count < len(rows):
        raise NemesisError(
            f"{path} lacks the per-sample correctness of {plural(len(rows) - count, 'row')} of {table}; "
            f"restore it, or {advice}"
        )
    return found


def _read_once(table: Path, correctness: bool, require_correctness: bool, sort: bool) -> SweepContents:
    parts = part_files(table)  # listed before the base is read: a part merged meanwhile is then found in it
    sources = [(table, _base_advice(table))] if table.is_file() else []
    sources += [(part, _part_advice(part)) for part in parts]
    frames, seen = [], set()
    needs_correctness = correctness or require_correctness
    found_correctness = []
    for path, advice in sources:
        frame = _read_rows(path, advice)
        fresh = frame[~frame["cell_id"].isin(seen)]  # the first source of a cell id wins
        seen.update(fresh["cell_id"].tolist())
        frames.append(fresh)
        if needs_correctness:
            found = _correctness_of(fresh, correctness_path(path), path, not correctness, require_correctness, advice)
            if found is not None:
                found_correctness.append(found)
    merged = (
        pd.concat(frames, ignore_index=True)
        if frames
        else typed_sweep_frame(pd.DataFrame(columns=list(SWEEP_COLUMNS)), str(table))
    )
    if sort:
        merged = sort_cells(merged)
    ordered = None
    if correctness:
        ordered = _in_order(merged["cell_id"], found_correctness)
    return SweepContents(merged, ordered, parts)


def _in_order(cell_ids: pd.Series, tables: list[pa.Table]) -> pa.Table:
    """The correctness of `cell_ids` in their order, the first entry of each (ids without one left out)."""
    if not tables:
        return CORRECTNESS_SCHEMA.empty_table()
    combined = pa.concat_tables(tables)
    # index_in gives each cell id the index of its first entry
    positions = pc.index_in(pa.array(cell_ids.astype(str).tolist(), type=pa.string()), value_set=combined["cell_id"])
    positions = positions.drop_null()
    if len(positions) == len(combined) and pc.all(pc.equal(positions, pa.array(range(len(combined))))).as_py():
        return combined  # already in order: no copy of the lists
    return combined.take(positions)


def read_sweep_table(
    table: str | os.PathLike,
    *,
    correctness: bool = False,
    require_correctness: bool = False,
    locked: bool = False,
    sort: bool = False,
) -> SweepContents:
    """A sweep table's rows (base file and parts, one row per cell id) and, with `correctness`, theirs.

    `require_correctness` refuses rows whose per-sample correctness is missing (a resumed sweep
    would otherwise rewrite the table without them); without it such rows just have none.
    `locked`: the caller holds the table's lock already (the merge), so none is taken here.
    `sort`: rows (and correctness) in `sort_cells` order, as a merge writes them.
    A damaged file is a NemesisError naming it and what to do.
    """
    table = Path(table)
    for attempt in range(_READ_ATTEMPTS):
        try:
            if locked:
                return _read_once(table, correctness, require_correctness, sort)
            with file_lock(lock_path(table), shared=True, create=False):
                return _read_once(table, correctness, require_correctness, sort)
        except FileNotFoundError as error:  # a part merged away meanwhile (only where no lock file existed yet)
            if attempt == _READ_ATTEMPTS - 1:
                raise NemesisError(f"{table} kept changing while it was read ({error.filename}); try again") from error
    raise AssertionError("unreachable")
