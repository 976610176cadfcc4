"""Per-epoch and per-step frames of training runs: prompt norms and accuracy over training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .results import Run

RUN_COLUMNS = ("run", "label", "method", "dataset", "shots", "seed")


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Legend labels: the method label, plus the folder name where two runs share a label."""
    labels = [run.label for run in runs]
    return [
        f"{label} ({run.name})" if labels.count(label) > 1 else label for label, run in zip(labels, runs, strict=True)
    ]


def _identity(run: Run, label: str) -> dict:
    return {
        "run": str(run.path),
        "label": label,
        "method": run.config.get("method"),
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
