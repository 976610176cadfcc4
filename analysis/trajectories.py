"""Per-epoch and per-step frames of training runs: prompt norms and accuracy over training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .labels import dataset_name, shots_label
from .results import Run

RUN_COLUMNS = ("run", "label", "method", "penalty", "dataset", "shots", "seed")


def _detail(field: str, value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return f"{field} n/a"
    if field == "dataset":
        return dataset_name(value)
    if field == "shots":
        return f"{shots_label(value)} shot{'' if str(value) == '1' else 's'}"
    return f"seed {value}"


def _colliding(labels: list[str]) -> dict[str, list[int]]:
    """label -> indices of the runs that share it, for labels held by more than one run."""
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    return {label: indices for label, indices in groups.items() if len(indices) > 1}


def _distinguishing_parts(paths: list[Path]) -> list[str] | None:
    """The shortest trailing path parts that tell different `paths` apart ("exp1/coop" vs
    "exp2/coop"); None when they are all the same folder."""
    distinct = len(set(paths))
    if distinct == 1:
        return None
    parts = [path.parts for path in paths]
    for count in range(1, max(len(items) for items in parts) + 1):
        tails = ["/".join(items[-count:]) for items in parts]
        if len(set(tails)) == distinct:
            return tails
    return [str(path) for path in paths]


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Legend labels, one per run and all distinct.

    The method label; where runs share it, the dataset, shots and seed that differ between them;
    where that is not enough, the path parts that tell their folders apart; the same folder
    twice gets a number.
    """
    labels = [run.label for run in runs]
    for label, indices in _colliding(labels).items():
        details = [[] for _ in indices]
        for field in ("dataset", "shots", "seed"):
            values = [runs[index].config.get(field) for index in indices]
            if len({str(value) for value in values}) > 1:
                for detail, value in zip(details, values, strict=True):
                    detail.append(_detail(field, value))
        for index, detail in zip(indices, details, strict=True):
            if detail:
                labels[index] = f"{label} ({', '.join(detail)})"
    for label, indices in _colliding(labels).items():
        tails = _distinguishing_parts([runs[index].path.resolve() for index in indices])
        for index, tail in zip(indices, tails or [], strict=False):
            labels[index] = f"{label} [{tail}]"
    for label, indices in _colliding(labels).items():
        for number, index in enumerate(indices, start=1):
            labels[index] = f"{label} #{number}"
    return labels


def _identity(run: Run, label: str) -> dict:
    return {
        "run": str(run.path),
        "label": label,
        "method": run.method,
        "penalty": run.penalty,
        "dataset": run.config.get("dataset"),
        "shots": run.config.get("shots"),
        "seed": run.config.get("seed"),
    }


def epoch_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run and epoch: identity columns, epoch, test_acc, mean_norm, fro_norm.

    test_acc is NaN for epochs without evaluation. A missing mean_norm is recomputed as the mean
    of the per-position norms.
    """
    frames = []
    for run, label in zip(runs, run_labels(runs), strict=True):
        if run.epochs.empty:
            continue
        epochs = run.epochs
        frame = pd.DataFrame(
            {
                **_identity(run, label),
                "epoch": pd.to_numeric(epochs["epoch"]),
                "test_acc": epochs["test_acc"].astype(float),
                "mean_norm": epochs["mean_norm"].astype(float),
                "fro_norm": epochs["fro_norm"].astype(float),
            }
        )
        if "norms" in epochs:
            fallback = epochs["norms"].map(lambda norms: float(np.mean(norms)) if norms else np.nan)
            frame["mean_norm"] = frame["mean_norm"].fillna(fallback)
        frames.append(frame)
    columns = [*RUN_COLUMNS, "epoch", "test_acc", "mean_norm", "fro_norm"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def position_norm_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """Long frame of the per-position norms after each epoch: identity columns, epoch, position, norm."""
    rows = []
    for run, label in zip(runs, run_labels(runs), strict=True):
        if run.epochs.empty or "norms" not in run.epochs:
            continue
        identity = _identity(run, label)
        for epoch, norms in zip(run.epochs["epoch"], run.epochs["norms"], strict=True):
            for position, norm in enumerate(norms or []):
                rows.append({**identity, "epoch": epoch, "position": position, "norm": float(norm)})
    return pd.DataFrame(rows, columns=[*RUN_COLUMNS, "epoch", "position", "norm"])


def step_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per logged step: identity columns, epoch, step, lr, ce_loss, norm_loss, train_acc."""
    frames = []
    value_columns = ["epoch", "step", "lr", "ce_loss", "norm_loss", "train_acc"]
    for run, label in zip(runs, run_labels(runs), strict=True):
        if run.steps.empty:
            continue
        frame = run.steps.reindex(columns=value_columns).copy()
        for key, value in reversed(_identity(run, label).items()):
            frame.insert(0, key, value)
        frames.append(frame)
    columns = [*RUN_COLUMNS, *value_columns]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
