"""Builders of the files `analysis` reads, with answers known by construction.

Sweep tables come with per-sample correctness; a corrupted cell is described by how many samples
it gains (wrong -> right) and loses (right -> wrong) against its checkpoint's original row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Cell:
    """One corrupted cell: op, position, factor, norms, and samples gained / lost vs the original."""

    op: str = "rescale"
    position: int = 0
    factor: float = 0.001
    norm_before: float = 1.0
    norm_after: float = 0.001
    gained: int = 0
    lost: int = 0


def reducing(gained: int = 0, lost: int = 0, position: int = 0, factor: float = 0.001, op: str = "rescale") -> Cell:
    return Cell(op=op, position=position, factor=factor, norm_after=0.5, gained=gained, lost=lost)


def increasing(gained: int = 0, lost: int = 0, position: int = 0, factor: float = 5.0, op: str = "rescale") -> Cell:
    return Cell(op=op, position=position, factor=factor, norm_after=5.0, gained=gained, lost=lost)


def _flip(original: np.ndarray, gained: int, lost: int) -> np.ndarray:
    after = original.copy()
    wrong, right = np.flatnonzero(~original), np.flatnonzero(original)
    assert gained <= len(wrong) and lost <= len(right), "not enough samples to flip"
    after[wrong[:gained]] = True
    after[right[len(right) - lost :]] = False
    return after


def checkpoint_rows(
    checkpoint: str,
    cells: list[Cell],
    dataset: str = "oxford_pets",
    shots: int | None = 1,
    seed: int | None = 1,
    n: int = 100,
    correct: int = 50,
    method: str = "coop",
    model: str = "tiny",
    key: str | None = None,
    first_number: int = 0,
    subsample: str = "all",
    train_dataset: str | None = None,
    n_classes: int = 37,
    method_variant: str | None = None,
    weights: str | None = None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Rows of one checkpoint (its original row first) and their per-sample correctness.

    Cell ids follow the sweep format, `<checkpoint key>:<op>:<position>:<factor>:<last>`, with the
    key defaulting to `checkpoint`; the cell's number (from `first_number`) fills the last slot so
    repeated settings stay distinct, and the same cells built twice get the same ids.
    """
    key = checkpoint if key is None else key
    original = np.zeros(n, dtype=bool)
    original[:correct] = True
    base = {"checkpoint": checkpoint, "model": model, "weights": weights, "dataset": dataset, "shots": shots}
    base |= {"seed": seed}
    base |= {"method": method, "method_variant": method_variant}
    base |= {"subsample": subsample, "train_dataset": train_dataset or dataset, "n_classes": n_classes}
    rows = [
        {
            "cell_id": f"{key}:original:-:-:-",
            **base,
            "op": "original",
            "position": None,
            "factor": np.nan,
            "noise_seed": None,
            "n": n,
            "correct": correct,
            "accuracy": 100.0 * correct / n,
            "delta_acc": 0.0,
            "norm_before": np.nan,
            "norm_after": np.nan,
        }
    ]
    correctness = {rows[0]["cell_id"]: original}
    for number, cell in enumerate(cells, start=first_number):
        after = _flip(original, cell.gained, cell.lost)
        cell_id = f"{key}:{cell.op}:{cell.position}:{cell.factor:g}:{number}"
        count = int(after.sum())
        rows.append(
            {
                "cell_id": cell_id,
                **base,
                "op": cell.op,
                "position": cell.position,
                "factor": cell.factor,
                "noise_seed": 0 if cell.op == "replace" else None,
                "n": n,
                "correct": count,
                "accuracy": 100.0 * count / n,
                "delta_acc": 100.0 * count / n - 100.0 * correct / n,
                "norm_before": cell.norm_before,
                "norm_after": cell.norm_after,
            }
        )
        correctness[cell_id] = after
    return rows, correctness


def sweep_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in ("shots", "seed", "position", "noise_seed", "n_classes"):
        frame[column] = pd.array(frame[column], dtype="Int64")
    return frame


def write_sweep(path: Path, parts: list[tuple[list[dict], dict[str, np.ndarray]]]) -> Path:
    """Write the checkpoints' rows as a sweep table (.parquet or .csv) and X.correct.parquet beside it."""
    rows = [row for part_rows, _ in parts for row in part_rows]
    correctness = {cell_id: values for _, part_correctness in parts for cell_id, values in part_correctness.items()}
    frame = sweep_frame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    pd.DataFrame(
        {"cell_id": list(correctness), "correct": [values.tolist() for values in correctness.values()]}
    ).to_parquet(path.with_name(path.stem + ".correct.parquet"), index=False)
    return path


def write_run(
    folder: Path,
    test_accs: list[float | None],
    mean_norms: list[float] | None = None,
    dataset: str = "oxford_pets",
    shots: int = 1,
    seed: int = 1,
    method: str = "coop",
    beta: float = 1.0,
    weight: float = 1.0,
    model: str = "tiny",
    subsample: str = "all",
    epochs: int | None = None,
    prompt: bool = True,
) -> Path:
    """A run folder like `nemesis train --out` writes: config.json, metrics.jsonl (M = 4 positions,
    epochs numbered from 1 as the trainer does) and, with `prompt`, prompt.safetensors (a stand-in:
    analysis only checks that it exists). `epochs` (default: one per test accuracy) is the configured
    count; more than the logged epochs makes an unfinished run."""
    folder.mkdir(parents=True)
    nemesis = None
    if method == "nemesis":
        nemesis = {"beta": beta, "weight": weight, "norm": 2, "schedule": "logistic", "positions": 1}
        nemesis["corrupt_weight"] = 0.5
    config = {
        "dataset": dataset,
        "shots": shots,
        "seed": seed,
        "method": method,
        "model": model,
        "pretrained": "random-seed0",
        "subsample": subsample,
        "epochs": len(test_accs) if epochs is None else epochs,
        "nemesis": nemesis,
    }
    (folder / "config.json").write_text(json.dumps(config))
    mean_norms = mean_norms or [1.0 + 0.1 * epoch for epoch in range(len(test_accs))]
    lines = []
    for epoch, (accuracy, norm) in enumerate(zip(test_accs, mean_norms, strict=True), start=1):
        norms = [norm] * 4
        step = {"kind": "step", "epoch": epoch, "step": epoch, "lr": 0.002, "ce_loss": 1.0, "norm_loss": 0.1}
        step |= {"train_acc": 50.0, "norms": norms, "alpha": [0, 0, 0, 0]}
        lines.append(step)
        lines.append(
            {"kind": "epoch", "epoch": epoch, "test_acc": accuracy, "norms": norms, "mean_norm": norm}
            | {"fro_norm": 2 * norm}
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if prompt:
        (folder / "prompt.safetensors").write_bytes(b"stand-in")
    return folder


def eval_record(**overrides) -> dict:
    record = {
        "kind": "eval",
        "checkpoint": "ckpt/a.safetensors",
        "model": "tiny",
        "pretrained": "random-seed0",
        "dataset": "oxford_pets",
        "train_dataset": "oxford_pets",
        "subsample": "all",
        "shots": 16,
        "seed": 1,
        "method": "coop",
        "method_label": "CoOp",
        "n": 100,
        "accuracy": 50.0,
        "macro_f1": 0.5,
    }
    return record | overrides


def write_evals(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_dassl_log(folder: Path, accuracy: float | None, total: int = 3669, backbone: str = "RN50") -> Path:
    """A Dassl run's log.txt as CoOp's `train.py` leaves it: arguments, the config dump, epoch lines,
    and (unless `accuracy` is None: a run still training) the final test result block."""
    correct = round(total * (accuracy or 0) / 100)
    lines = [
        "Setting fixed seed: 1",
        "***************",
        "** Arguments **",
        "***************",
        "backbone: ",
        "config_file: configs/trainers/CoOp/rn50.yaml",
        "************",
        "** Config **",
        "************",
        "DATASET:",
        "  NAME: OxfordPets",
        "  NUM_SHOTS: 16",
        "MODEL:",
        "  BACKBONE:",
        f"    NAME: {backbone}",
        "  HEAD:",
        "    NAME: ",
        "OPTIM:",
        "  MAX_EPOCH: 200",
        "Loading trainer: CoOp",
        "epoch [1/200] batch [5/18] time 0.081 (0.262) data 0.000 (0.172) loss 1.3652 (1.5024) acc 62.5000 (56.2500) "
        "lr 1.0000e-05 eta 0:15:42",
    ]
    if accuracy is not None:
        lines += [
            "Checkpoint saved to output/prompt_learner/model.pth.tar-200",
            "Finish training",
            "Deploy the last-epoch model",
            "Evaluate on the *test* set",
            "=> result",
            f"* total: {total:,}",
            f"* correct: {correct:,}",
            f"* accuracy: {accuracy:.1f}%",
            f"* error: {100 - accuracy:.1f}%",
            f"* macro_f1: {accuracy - 0.4:.1f}%",
            "Elapsed: 0:17:09",
        ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text("\n".join(lines) + "\n")
    return folder / "log.txt"
