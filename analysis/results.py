"""Reading what the other commands write into tidy pandas frames.

Three kinds of input: sweep tables (`nemesis corrupt`, one row per cell, with per-sample
correctness beside them), training run folders (`nemesis train --out DIR`) and evaluation
records (`nemesis eval --out FILE.jsonl`). Files of another schema fail with a NemesisError
naming what is missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors import SafetensorError, safe_open

from nemesis.constants import METADATA_KEY, RUN_PROMPT
from nemesis.errors import NemesisError
from nemesis.files.sweep_format import CORRECTNESS_SUFFIX, correctness_path, read_sweep_table
from nemesis.methods import split_method

from .coop_logs import is_dassl_log, read_dassl_log
from .labels import (
    RANDOM_WEIGHTS_MARK,
    is_missing,
    is_random_weights,
    method_label,
    method_label_from_config,
    weights_label,
)

SWEEP_SUFFIXES = (".parquet", ".csv")

# Column added by the loader: which file a row came from (cell ids are unique within a file).
SOURCE_COLUMN = "results_file"
# `load_sweeps` puts here (in the frame's `attrs`) how many rows it dropped as copies of a cell
# already read from an earlier file.
DUPLICATE_CELLS = "duplicate_cells"

# Run folder files.
RUN_CONFIG = "config.json"
RUN_METRICS = "metrics.jsonl"
RUN_REQUIRED_CONFIG_KEYS = ("dataset",)

# Evaluation records.
EVAL_SUFFIX = ".jsonl"
EVAL_KIND = "eval"
EVAL_COLUMNS = (
    "checkpoint",
    "model",
    "dataset",
    "train_dataset",
    "subsample",
    "shots",
    "seed",
    "method",
    "n",
    "accuracy",
)
EVAL_OPTIONAL_COLUMNS = ("pretrained", "weights_id", "activation", "method_label", "macro_f1", "penalty")


def prompt_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What a prompt file of ours records about itself (model, weights_id, activation...), read from its
    safetensors header without loading a tensor; {} when the file is missing or not such a file."""
    try:
        with safe_open(str(path), framework="numpy") as handle:  # the header only; no torch
            metadata = json.loads((handle.metadata() or {})[METADATA_KEY])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


@dataclass
class Run:
    """One training run folder: its resolved config and its metrics, split by row kind."""

    path: Path
    config: dict[str, Any]
    epochs: pd.DataFrame  # one row per epoch: epoch, test_acc, norms, mean_norm, fro_norm
    steps: pd.DataFrame  # one row per logged step: epoch, step, lr, ce_loss, norm_loss, ...

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        random = "pretrained" in self.config and is_random_weights(self.config["pretrained"])
        return method_label_from_config(self.config) + (RANDOM_WEIGHTS_MARK if random else "")

    @cached_property
    def _method_and_penalty(self) -> tuple[str | None, str]:
        """(method, penalty); a config written before the two were options names both in one word."""
        return split_method(self.config.get("prompt_method", self.config.get("method")), self.config.get("penalty"))

    @property
    def method(self) -> str | None:
        return self._method_and_penalty[0]

    @property
    def penalty(self) -> str:
        return self._method_and_penalty[1]

    @cached_property
    def _prompt_metadata(self) -> dict[str, Any]:
        return prompt_metadata(self.path / RUN_PROMPT)

    @property
    def weights_id(self) -> str:
        """What tells the run's weights apart, as eval records' `weights_id` does: the backbone's id its
        prompt records (tag or file hash, and the activation), else the config's weights and activation
        as a note names them (`weights_label`, as `eval_frame` does for records without an id)."""
        recorded = self._prompt_metadata.get("weights_id")
        if isinstance(recorded, str) and recorded:
            return recorded
        return weights_label(self.config.get("pretrained", np.nan), self.config.get("activation"))

    @property
    def activation(self) -> str | None:
        """The activation the run trained under, where its prompt or config records it."""
        return self._prompt_metadata.get("activation") or self.config.get("activation")

    def _evaluated(self) -> pd.DataFrame:
        if self.epochs.empty or "test_acc" not in self.epochs:
            return pd.DataFrame(columns=["epoch", "test_acc"])
        return self.epochs.dropna(subset=["test_acc"])

    @property
    def final_test_acc(self) -> float:
        """The last epoch row's non-null test accuracy (NaN if the run never evaluated)."""
        evaluated = self._evaluated()
        return float(evaluated["test_acc"].iloc[-1]) if len(evaluated) else float("nan")

    @property
    def finished(self) -> bool:
        """Whether training ran to its end: prompt.safetensors is written and the last evaluated
        epoch reaches the configured epoch count (the trainer always evaluates after the last one)."""
        if not (self.path / RUN_PROMPT).is_file():
            return False
        evaluated = self._evaluated()
        if evaluated.empty:
            return False
        planned = self.config.get("epochs")
        if planned is None:  # a config without the count: the final prompt is all there is to go by
            return True
        last = pd.to_numeric(evaluated["epoch"], errors="coerce").max()
        return bool(pd.notna(last) and last >= int(planned))


@dataclass
class Inputs:
    """Everything `nemesis report` was given, sorted by kind."""

    cells: pd.DataFrame | None = None
    runs: list[Run] = field(default_factory=list)
    evals: pd.DataFrame | None = None
    duplicate_cells: int = 0  # sweep rows dropped as copies of a cell read from an earlier file

    @property
    def empty(self) -> bool:
        return self.cells is None and not self.runs and self.evals is None


# ----------------------------------------------------------------------------- finding files


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and (path / RUN_CONFIG).is_file()


def _is_sweep_file(path: Path) -> bool:
    return path.suffix.lower() in SWEEP_SUFFIXES and not path.name.endswith(CORRECTNESS_SUFFIX)


def _walk(folder: Path) -> Iterable[Path]:
    """Run folders, sweep tables (.parquet) and eval records (.jsonl) under `folder`.

    Run folders are not entered (their metrics.jsonl is not an eval file). CSV files are only
    read when named, so tables a report wrote into the same tree are not mistaken for sweeps.
    """
    for root, folders, files in os.walk(folder):
        root_path = Path(root)
        kept = []
        for name in sorted(folders):
            if name.startswith("."):
                continue
            if _is_run_folder(root_path / name):
                yield root_path / name
            else:
                kept.append(name)
        folders[:] = kept
        for name in sorted(files):
            path = root_path / name
            if name.startswith("."):
                continue
            if (path.suffix == ".parquet" and _is_sweep_file(path)) or path.suffix == EVAL_SUFFIX or is_dassl_log(path):
                yield path


def _is_correctness_file(path: Path) -> bool:
    return path.name.endswith(CORRECTNESS_SUFFIX)


def _check_companion(sidecar: Path, paths: Sequence[Path]) -> None:
    """A per-sample correctness file named among the inputs needs its table there too."""
    stem = sidecar.name[: -len(CORRECTNESS_SUFFIX)]
    tables = [sidecar.with_name(stem + suffix).resolve() for suffix in SWEEP_SUFFIXES]
    named = {path.resolve() for path in paths}
    if not any(table == path or path in table.parents for table in tables for path in named):
        raise NemesisError(
            f"{sidecar} is the per-sample correctness of {sidecar.with_name(stem + '.parquet')}; "
            "pass that table (its correctness is read beside it)"
        )


def _expand(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, bool]]:
    """(path, named) pairs: named files and run folders as they are, other folders searched.

    `named` tells whether the user named the path (a wrong kind is then an error) or a folder
    search found it (a loader skips kinds it does not read). Duplicates are dropped. A sweep
    table's per-sample correctness file (`X.correct.parquet`, as a glob like `sweeps/*` names it)
    is its table's companion, read beside the table when needed: it is not an input of its own.
    """
    found: list[tuple[Path, bool]] = []
    given = [Path(raw) for raw in paths]
    for path in given:
        if not path.exists():
            raise NemesisError(f"no such file or folder: {path}")
        if path.is_file() and _is_correctness_file(path):
            _check_companion(path, given)
            continue
        if path.is_dir() and not _is_run_folder(path):
            found.extend((child, False) for child in _walk(path))
        else:
            found.append((path, True))
    unique: dict[Path, tuple[Path, bool]] = {}
    for path, named in found:
        unique.setdefault(path.resolve(), (path, named))
    return list(unique.values())


# ----------------------------------------------------------------------------- sweep tables


def _missing(columns: Iterable[str], required: Iterable[str]) -> list[str]:
    present = set(columns)
    return [column for column in required if column not in present]


def read_sweep(path: str | os.PathLike) -> pd.DataFrame:
    """One sweep table (.parquet or .csv), checked and with normalised dtypes."""
    path = Path(path)
    if not _is_sweep_file(path):
        raise NemesisError(f"{path} is not a sweep table; pass the .parquet or .csv `nemesis corrupt` wrote")
    frame = read_sweep_table(path).table  # the file and the parts a sweep has not merged yet
    frame[SOURCE_COLUMN] = str(path)
    return frame


def combine_sweeps(frames: Sequence[pd.DataFrame]) -> tuple[pd.DataFrame, int]:
    """Sweep tables as one frame with one row per cell_id, and how many rows were dropped.

    The same cell can sit in several tables (a paper-preset and a default-grid sweep of the same
    checkpoints, or an old copy a folder search finds); counting it twice would inflate every
    frequency, so the first file's row is kept.
    """
    combined = pd.concat(frames, ignore_index=True)
    repeated = combined["cell_id"].duplicated(keep="first")
    return combined[~repeated].reset_index(drop=True), int(repeated.sum())


def _find(
    paths: Sequence[str | os.PathLike], accepts: Callable[[Path], bool], not_one: str, none_found: str
) -> list[Path]:
    """The paths among `paths` (and in the folders among them) that `accepts`; a named path it does not
    accept fails with "<path> <not_one>", and finding none with `none_found`."""
    found = []
    for path, named in _expand(paths):
        if accepts(path):
            found.append(path)
        elif named:
            raise NemesisError(f"{path} {not_one}")
    if not found:
        raise NemesisError(none_found)
    return found


def load_sweeps(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """All sweep tables among `paths` (tables, or folders searched for .parquet) as one frame.

    One row per cell_id: a cell found in several files keeps the first file's row; the number of
    rows dropped is in `frame.attrs[DUPLICATE_CELLS]`.
    """
    files = _find(
        paths,
        _is_sweep_file,
        "is not a sweep table; pass .parquet or .csv results of `nemesis corrupt`",
        "no sweep result files found; pass the .parquet tables `nemesis corrupt` wrote",
    )
    cells, dropped = combine_sweeps([read_sweep(path) for path in files])
    cells.attrs[DUPLICATE_CELLS] = dropped
    return cells


def read_correctness(results_file: str | os.PathLike) -> dict[str, np.ndarray]:
    """cell_id -> per-sample correctness [n] (bool) of the rows of one sweep table (its parts included)."""
    path = correctness_path(results_file)
    if not path.is_file():
        raise NemesisError(
            f"per-sample correctness {path} not found; the significance test needs it beside {results_file}"
        )
    frame = read_sweep_table(results_file, correctness=True).correctness.to_pandas()
    return {
        str(cell_id): np.asarray(correct, dtype=bool)
        for cell_id, correct in zip(frame["cell_id"], frame["correct"], strict=True)
    }


# ----------------------------------------------------------------------------- run folders


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise NemesisError(f"{path} line {number} is not JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise NemesisError(f"{path} line {number} is not a JSON object")
            rows.append(row)
    return rows


def read_run(path: str | os.PathLike) -> Run:
    """One run folder written by `nemesis train --out DIR`."""
    path = Path(path)
    config_file, metrics_file = path / RUN_CONFIG, path / RUN_METRICS
    if not config_file.is_file():
        raise NemesisError(f"{path} is not a run folder: {RUN_CONFIG} not found")
    if not metrics_file.is_file():
        raise NemesisError(f"run folder {path} has no {RUN_METRICS}; did training start?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise NemesisError(f"{config_file} is not JSON ({error.msg})") from error
    if not isinstance(config, dict):
        raise NemesisError(f"{config_file} is not a JSON object")
    missing = _missing(config, RUN_REQUIRED_CONFIG_KEYS)
    if "prompt_method" not in config and "method" not in config:  # "method": written before the two axes
        missing.append("prompt_method")
    if missing:
        raise NemesisError(f"{config_file} lacks keys {', '.join(missing)}; is this a `nemesis train` run?")
    rows = _read_jsonl(metrics_file)
    epochs = pd.DataFrame([row for row in rows if row.get("kind") == "epoch"])
    steps = pd.DataFrame([row for row in rows if row.get("kind") == "step"])
    if not epochs.empty:
        if "epoch" not in epochs:
            raise NemesisError(f"{metrics_file}: epoch rows lack the 'epoch' key")
        for column in ("test_acc", "mean_norm", "fro_norm"):
            epochs[column] = pd.to_numeric(epochs[column], errors="coerce") if column in epochs else np.nan
        epochs = epochs.sort_values("epoch", kind="stable").reset_index(drop=True)
    return Run(path=path, config=config, epochs=epochs, steps=steps)


def load_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """All run folders among `paths` (run folders, or folders holding run folders)."""
    folders = _find(
        paths,
        _is_run_folder,
        "is not a run folder; pass folders written by `nemesis train --out DIR`",
        "no run folders found; pass folders written by `nemesis train --out DIR`",
    )
    return [read_run(folder) for folder in folders]


RUN_SUMMARY_COLUMNS = (
    "run",
    "name",
    "model",
    "dataset",
    "subsample",
    "shots",
    "seed",
    "method",
    "penalty",
    "method_label",
    "epochs",
    "test_acc",
    "finished",
    "weights_id",
    "activation",
)


def runs_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: identity, method label, final test accuracy and whether it finished training."""
    rows = [
        {
            "run": str(run.path),
            "name": run.name,
            "model": run.config.get("model"),
            "dataset": run.config.get("dataset"),
            "subsample": run.config.get("subsample") or "all",
            "shots": run.config.get("shots"),
            "seed": run.config.get("seed"),
            "method": run.method,
            "penalty": run.penalty,
            "method_label": run.label,
            "epochs": len(run.epochs),
            "test_acc": run.final_test_acc,
            "finished": run.finished,
            "weights_id": run.weights_id,
            "activation": run.activation,
        }
        for run in runs
    ]
    frame = pd.DataFrame(rows, columns=list(RUN_SUMMARY_COLUMNS))
    for column in ("shots", "seed"):
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    frame["test_acc"] = frame["test_acc"].astype(float)
    frame["finished"] = frame["finished"].astype(bool)
    return frame


# ----------------------------------------------------------------------------- evaluation records


def read_evals(path: str | os.PathLike) -> pd.DataFrame:
    """The `kind == "eval"` records of one JSON Lines file written by `nemesis eval --out`."""
    path = Path(path)
    rows = [row for row in _read_jsonl(path) if row.get("kind") == EVAL_KIND]
    if not rows:
        raise NemesisError(
            f"{path} holds no evaluation records (rows with kind 'eval'); pass files `nemesis eval --out` wrote"
        )
    return eval_frame(rows, path)


def eval_frame(rows: list[dict], path: str | os.PathLike) -> pd.DataFrame:
    """Evaluation records as a frame with every column analysis uses, normalised; `path` names their file."""
    frame = pd.DataFrame(rows)
    missing = _missing(frame.columns, EVAL_COLUMNS)
    if missing:
        raise NemesisError(f"{path}: evaluation records lack keys {', '.join(missing)}")
    for column in EVAL_OPTIONAL_COLUMNS:
        if column not in frame:
            frame[column] = np.nan  # missing, which `is_random_weights` does not read as "none"
    for column in ("shots", "seed"):
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    frame["accuracy"] = pd.to_numeric(frame["accuracy"]).astype(float)
    frame["subsample"] = frame["subsample"].fillna("all")
    frame["method"] = frame["method"].fillna("unknown")
    # Records written when one word named method and penalty ("nemesis"): both from that word.
    pairs = [
        split_method(method, None if is_missing(penalty) else penalty)
        for method, penalty in zip(frame["method"], frame["penalty"], strict=True)
    ]
    frame["method"] = [method for method, _ in pairs]
    frame["penalty"] = [penalty for _, penalty in pairs]
    frame["train_dataset"] = frame["train_dataset"].fillna(frame["dataset"])
    for column in ("checkpoint", "model", "dataset", "train_dataset", "method"):
        frame[column] = frame[column].astype(str)
    # Records carry their label; where a writer left it out, build it from the method and its
    # hyper-parameters (`penalty_config`, `method_config` before: beta, weight) when the record has them.
    configs = pd.Series(None, index=frame.index, dtype=object)
    for column in ("method_config", "penalty_config"):
        if column in frame:
            configs = frame[column].where(frame[column].notna(), configs)
    fallback = pd.Series(
        [
            method_label(method, *_beta_weight(config), penalty=penalty)
            for method, config, penalty in zip(frame["method"], configs, frame["penalty"], strict=True)
        ],
        index=frame.index,
    )
    frame["method_label"] = frame["method_label"].where(frame["method_label"].notna(), fallback)
    weights = list(zip(frame["pretrained"], frame["activation"], frame["weights_id"], strict=True))
    random = [is_random_weights(pretrained, weights_id) for pretrained, _, weights_id in weights]
    marks = [RANDOM_WEIGHTS_MARK if flag else "" for flag in random]
    frame["method_label"] = [label + mark for label, mark in zip(frame["method_label"], marks, strict=True)]
    frame["weights"] = [weights_label(*values) for values in weights]
    # What tells weights apart: the backbone's id (tag or file hash, and the activation) where recorded.
    frame["weights_id"] = frame["weights_id"].where(frame["weights_id"].notna(), frame["weights"])
    frame[SOURCE_COLUMN] = str(path)
    return frame


def _beta_weight(config: Any) -> tuple[float | None, float | None]:
    if not isinstance(config, dict):
        return None, None
    return config.get("beta"), config.get("weight")


def load_evals(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """All evaluation records among `paths` (.jsonl files, or folders searched for them)."""
    files = []
    for path, named in _expand(paths):
        if path.suffix == EVAL_SUFFIX and path.is_file():
            files.append(path)
        elif named:
            raise NemesisError(f"{path} is not an evaluation file; pass the .jsonl `nemesis eval --out` wrote")
    if not files:
        raise NemesisError("no evaluation records found; pass the .jsonl files `nemesis eval --out` wrote")
    return pd.concat([read_evals(path) for path in files], ignore_index=True)


# ----------------------------------------------------------------------------- everything


def load_inputs(paths: Sequence[str | os.PathLike]) -> Inputs:
    """Sort `paths` into sweep tables, run folders and evaluation records and load each."""
    if not paths:
        raise NemesisError("no inputs given; pass run folders, sweep tables (.parquet/.csv) or eval records (.jsonl)")
    sweeps, runs, evals, dassl = [], [], [], []
    for path, _named in _expand(paths):
        if is_dassl_log(path):
            if (record := read_dassl_log(path)) is not None:  # None: still training, or stopped
                dassl.append(record)
        elif _is_run_folder(path):
            runs.append(read_run(path))
        elif _is_sweep_file(path):
            sweeps.append(read_sweep(path))
        elif path.suffix == EVAL_SUFFIX and path.is_file():
            evals.append(read_evals(path))
        else:
            raise NemesisError(f"{path}: not a run folder, sweep table (.parquet/.csv) or eval records (.jsonl)")
    if dassl:
        evals.append(eval_frame(dassl, "CoOp output tree"))
    cells, dropped = combine_sweeps(sweeps) if sweeps else (None, 0)
    inputs = Inputs(
        cells=cells,
        runs=runs,
        evals=pd.concat(evals, ignore_index=True) if evals else None,
        duplicate_cells=dropped,
    )
    if inputs.empty:
        raise NemesisError("no result files found in the inputs; pass run folders, sweep tables or eval records")
    return inputs
