"""Legacy fixtures: written by the code of commit 1b58f29; do not regenerate after the format changes.

This script froze, as the code of commit 1b58f29 wrote them:

- prompt files of our format (`save_prompt`): `coop_v1.safetensors` (unified ctx, method nemesis),
  `coop_csc_v1.safetensors` (class-specific ctx, class name in the middle), `cocoop_v1.safetensors`
  (ctx plus CoCoOp's meta-net);
- Dassl files (`export_dassl`) in CoOp's and CoCoOp's output-tree layouts, under `dassl/output/`;
- run folders of `nemesis train`: `run_nemesis/` stopped after epoch 1 of 2 (resumable: config.json,
  state.safetensors, checkpoints/, metrics.jsonl, log.txt) and `run_cocoop/` finished (1 epoch);
- a sweep table of `nemesis corrupt` on `coop_v1.safetensors`: `sweep_v1.parquet` and, as CSV,
  `csv/sweep_v1.csv` (its own folder: X.parquet and X.csv share the correctness file name
  X.correct.parquet), each with its per-sample correctness;
- `expected.json`: what that code read back from them (checksums, metadata, accuracies, LNE numbers)
  and the recipe of the test dataset the numbers were computed on.

`tests/test_legacy_files.py` checks that later code reads these files and gets the same numbers.
Regenerating them with later code would compare the new format with itself, so this script refuses
to overwrite them unless --force is given (only ever on a checkout of commit 1b58f29).

Everything runs on the CPU with the `tiny` model on random weights (`--pretrained none`) and a
small dataset that `nemesis.data.testing.make_coop_folder` draws deterministically, which the test
rebuilds. The run folders record the data root as the relative path `legacy_data`: the dataset
root is part of a run's identity (resume refuses another root, and the resume state holds a
digest of config.json), so the test rebuilds the dataset there and resumes from its parent folder.

Run from the repository root:
    HF_HUB_OFFLINE=1 PYTHONPATH=. python tests/data/legacy/make_legacy_fixtures.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from typer.testing import CliRunner

import analysis
from analysis.results import read_correctness
from nemesis.checksum import tensors_sha256
from nemesis.data.testing import make_coop_folder
from nemesis.files.checkpoint import PromptCheckpoint, PromptMetadata, export_dassl, load_checkpoint, save_prompt
from nemesis.files.sweep_format import read_sweep_table
from nemesis.methods.protocol import build_learner
from nemesis.model.backbone import Backbone, load_clip
from nemesis.training.configs import NemesisConfig, TrainConfig, read_run_config
from nemesis.training.trainer import train
from nemesis_cli.main import app

HERE = Path(__file__).resolve().parent
COMMIT = "1b58f29"

# The test dataset (rebuilt by the test from expected.json's "dataset" entry).
DATA_FOLDER = "legacy_data"  # the relative root recorded in the run folders' config.json
DATASET = "oxford_pets"
CLASSNAMES = ["red apple", "green leaf", "blue sky", "yellow sun"]
PER_CLASS = (4, 1, 6)  # train, val, test images per class
IMAGE_SIZE = 28

MODEL = "tiny"
N_CTX = 4
SHOTS = 2
SEED = 1
COOP_DASSL_RUN = "dassl/output/oxford_pets/CoOp/rn50_ep50_2shots/nctx4_cscFalse_ctpend/seed1"
COCOOP_DASSL_RUN = "dassl/output/base2new/train_base/oxford_pets/shots_2/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1/seed1"
SWEEP_GRID = ["--rescale", "0.5,3", "--positions", "0"]
# Seeds of the prompts' random ctx, picked among the first few dozen: with random weights most prompts
# give every image the same class, these give mixed predictions (so a misread tensor shows in the
# accuracy), and coop_v1 rescaled at position 0 gains accuracy by 0.5 (a Low-Norm Effect occurrence)
# and loses it by 3 (a degrading cell), so the LNE numbers are not all zero.
CTX_SEEDS = {"coop_v1": 24, "coop_csc_v1": 25, "cocoop_v1": 23}
OUTPUTS = [
    "coop_v1.safetensors",
    "coop_csc_v1.safetensors",
    "cocoop_v1.safetensors",
    "dassl",
    "run_nemesis",
    "run_cocoop",
    "sweep_v1.parquet",
    "sweep_v1.correct.parquet",
    "csv",
    "expected.json",
]


# --- helpers --------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A table value as JSON: missing values (NA, NaN) as None, numpy scalars as Python ones."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return plain(value.item())
    return value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{key: plain(value) for key, value in row.items()} for row in frame.to_dict("records")]


def random_ctx(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # Entries of size ~0.5, not the N(0, 0.02) init: rescaling a position then changes predictions.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def metadata(backbone: Backbone, **fields: Any) -> PromptMetadata:
    """What the trainer records for a prompt trained on `tiny` with random weights, plus `fields`."""
    values = dict(
        model=MODEL, pretrained=None, weights_id=backbone.weights_id, activation=backbone.activation.value,
        classnames=list(CLASSNAMES), dataset=DATASET, shots=SHOTS, seed=SEED, epoch=50,
    )  # fmt: skip
    return PromptMetadata(**(values | fields))


def relative(path: Path) -> str:
    return path.relative_to(HERE).as_posix()


def invoke(args: list[str]) -> str:
    """Run `nemesis ARGS` in this process; stop on failure."""
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise SystemExit(f"nemesis {' '.join(args)} failed ({result.exit_code}):\n{result.output}")
    return result.output


def evaluate_with_cli(location: Path, data_root: Path, work: Path, dassl: bool) -> dict[str, Any]:
    """`nemesis eval` of one checkpoint (Dassl files name no model or dataset: both passed); its record."""
    out = work / "evals.jsonl"  # each call appends one record: the last line is this checkpoint's
    args = ["eval", str(location), "--root", str(data_root), "--pretrained", "none", "--device", "cpu"]
    args += ["--out", str(out)] + (["--model", MODEL, "--dataset", DATASET] if dassl else [])
    invoke(args)
    record = json.loads(out.read_text().splitlines()[-1])
    return {key: record[key] for key in ("accuracy", "n", "macro_f1", "subsample", "dataset", "method")}


def prompt_summary(checkpoint: PromptCheckpoint) -> dict[str, Any]:
    """Checksums, shapes and metadata of a loaded prompt."""
    return {
        "ctx_sha256": tensors_sha256({"ctx": checkpoint.ctx}),
        "ctx_shape": list(checkpoint.ctx.shape),
        "extra_sha256": tensors_sha256(checkpoint.extra) if checkpoint.extra else None,
        "extra_shapes": {name: list(tensor.shape) for name, tensor in sorted(checkpoint.extra.items())},
        "prompt_method": checkpoint.prompt_method,
        "metadata": dataclasses.asdict(checkpoint.metadata),
    }


def epoch_rows(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "epoch"]


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def file_digests(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def make_dataset(parent: Path) -> Path:
    root = parent / DATA_FOLDER
    make_coop_folder(root, DATASET, CLASSNAMES, per_class=PER_CLASS, image_size=IMAGE_SIZE)
    return root


# --- the fixtures ---------------------------------------------------------------------------------


def write_prompt_files(backbone: Backbone) -> None:
    width = backbone.text_width
    nemesis = metadata(backbone, method="nemesis", method_config=NemesisConfig().to_json())
    save_prompt(HERE / "coop_v1.safetensors", random_ctx((N_CTX, width), CTX_SEEDS["coop_v1"]), nemesis)
    csc = metadata(backbone, method="coop", class_position="middle")
    save_prompt(
        HERE / "coop_csc_v1.safetensors", random_ctx((len(CLASSNAMES), N_CTX, width), CTX_SEEDS["coop_csc_v1"]), csc
    )
    learner = build_learner(
        "cocoop", backbone, CLASSNAMES, n_ctx=N_CTX, seed=SEED, ctx=random_ctx((N_CTX, width), CTX_SEEDS["cocoop_v1"])
    )
    cocoop = metadata(backbone, method="cocoop", epoch=10)
    save_prompt(HERE / "cocoop_v1.safetensors", learner.ctx.detach(), cocoop, learner.extra_parameters())


def write_dassl_files() -> dict[str, Path]:
    coop = export_dassl(load_checkpoint(HERE / "coop_v1.safetensors"), HERE / COOP_DASSL_RUN, epoch=50)
    cocoop = export_dassl(load_checkpoint(HERE / "cocoop_v1.safetensors"), HERE / COCOOP_DASSL_RUN, epoch=10)
    return {"dassl_coop": coop, "dassl_cocoop": cocoop}


def run_config(**options: Any) -> TrainConfig:
    values = dict(
        dataset=DATASET, root=DATA_FOLDER, shots=SHOTS, seed=SEED, model=MODEL, pretrained=None,
        n_ctx=N_CTX, batch_size=4, lr=0.05, device="cpu",
    )  # fmt: skip
    return TrainConfig(**(values | options))


class Interrupted(Exception):
    """Stops a run between epochs, its state saved, as a kill would."""


def stop_after(epoch: int):
    def stop(done: int) -> None:
        if done == epoch:
            raise Interrupted

    return stop


def write_runs(work: Path) -> dict[str, Any]:
    """The two run folders (trained from `work`, which holds the dataset) and what resuming gives."""
    # No warm-up epoch: both epochs move the prompt, so the state saved after epoch 1 matters to epoch 2.
    nemesis = run_config(method="nemesis", beta=0.5, epochs=2, save_every=1, warmup_epochs=0)
    with working_directory(work):
        try:
            train(nemesis, HERE / "run_nemesis", progress=False, on_epoch_end=stop_after(1))
        except Interrupted:
            pass
        else:
            raise SystemExit("the nemesis run was not interrupted")
        resumed = work / "resumed"
        shutil.copytree(HERE / "run_nemesis", resumed)
        train(read_run_config(resumed), resumed, resume=True, progress=False)
        whole = train(nemesis, work / "whole", progress=False)
        cocoop = train(run_config(method="cocoop", epochs=1), HERE / "run_cocoop", progress=False)
    resumed_prompt = load_checkpoint(resumed / "prompt.safetensors")
    if not torch.equal(resumed_prompt.ctx, load_checkpoint(whole / "prompt.safetensors").ctx):
        raise SystemExit("the resumed run does not end with the uninterrupted run's prompt")
    return {
        "run_nemesis": {
            "config": read_run_config(HERE / "run_nemesis").to_json(),
            "interrupted_after_epoch": 1,
            "epochs": 2,
            "saved_checkpoint": prompt_summary(load_checkpoint(HERE / "run_nemesis")),
            "resumed": {
                "final_epoch_row": epoch_rows(resumed)[-1],
                "prompt": prompt_summary(resumed_prompt),
            },
        },
        "run_cocoop": {
            "config": read_run_config(cocoop).to_json(),
            "final_epoch_row": epoch_rows(cocoop)[-1],
            "prompt": prompt_summary(load_checkpoint(cocoop)),
        },
    }


def remove_writer_leftovers(folder: Path) -> None:
    """The empty lock files and parts folders a sweep leaves beside its table: not part of the table."""
    for path in folder.glob(".*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def sweep_summary(table: Path) -> dict[str, Any]:
    """What the current readers give for a sweep table: typed rows, per-sample correctness, LNE numbers."""
    rows = read_sweep_table(table).table
    cells = analysis.load_sweeps([table])
    marks = analysis.mark_occurrences(cells)[["cell_id", "reduces", "increases", "lne", "degrades"]]
    # The significance-aware marks pair each cell's per-sample correctness with its original row's.
    paired = analysis.mark_occurrences(cells, significant=True)[["cell_id", "gained", "lost", "p_value", "lne"]]
    frequency = analysis.lne_frequency(cells, "dataset,shots")
    return {
        "path": relative(table),
        "records": records(rows),
        "correctness": {cell: flags.tolist() for cell, flags in sorted(read_correctness(table).items())},
        "marks": records(marks),
        "significant_marks": records(paired),
        "lne_frequency": records(frequency),
    }


def write_sweeps(data_root: Path) -> dict[str, Any]:
    checkpoint = HERE / "coop_v1.safetensors"
    base = ["corrupt", str(checkpoint), "--root", str(data_root), "--pretrained", "none", "--device", "cpu"]
    invoke([*base, *SWEEP_GRID, "--out", str(HERE / "sweep_v1.parquet")])
    invoke([*base, *SWEEP_GRID, "--csv", "--out", str(HERE / "csv" / "sweep_v1.csv")])
    remove_writer_leftovers(HERE)
    remove_writer_leftovers(HERE / "csv")
    return {
        "grid": SWEEP_GRID,
        "parquet": sweep_summary(HERE / "sweep_v1.parquet"),
        "csv": sweep_summary(HERE / "csv" / "sweep_v1.csv"),
    }


def check_dataset_is_deterministic(work: Path, data_root: Path) -> None:
    again = make_dataset(work / "again")
    if file_digests(again) != file_digests(data_root):
        raise SystemExit("make_coop_folder wrote different files twice; the test could not rebuild the data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="overwrite the frozen fixtures (only at " + COMMIT + ")")
    if not parser.parse_args().force and (HERE / "expected.json").exists():
        raise SystemExit(f"{HERE} already holds the legacy fixtures; they must stay as commit {COMMIT} wrote them")
    for name in OUTPUTS:
        path = HERE / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        os.environ["NEMESIS_CACHE"] = str(work / "cache")  # never the user's feature cache
        data_root = make_dataset(work)
        check_dataset_is_deterministic(work, data_root)
        backbone = load_clip(MODEL, None)
        write_prompt_files(backbone)
        files = {name: HERE / name for name in ("coop_v1", "coop_csc_v1", "cocoop_v1")}
        files = {name: path.with_suffix(".safetensors") for name, path in files.items()} | write_dassl_files()
        prompts = {}
        for name, path in files.items():
            dassl = name.startswith("dassl")
            prompts[name] = {"path": relative(path), **prompt_summary(load_checkpoint(path))}
            prompts[name]["eval"] = evaluate_with_cli(path, data_root, work, dassl)
        runs = write_runs(work)
        runs["run_nemesis"]["eval"] = evaluate_with_cli(HERE / "run_nemesis", data_root, work, dassl=False)
        runs["run_cocoop"]["eval"] = evaluate_with_cli(HERE / "run_cocoop", data_root, work, dassl=False)
        sweeps = write_sweeps(data_root)
    expected = {
        "written_by_commit": COMMIT,
        "torch": torch.__version__,
        "dataset": {
            "name": DATASET,
            "folder": DATA_FOLDER,
            "classnames": CLASSNAMES,
            "per_class": list(PER_CLASS),
            "image_size": IMAGE_SIZE,
        },
        "prompts": prompts,
        "runs": runs,
        "sweeps": sweeps,
    }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n", encoding="utf-8")
    size = sum(path.stat().st_size for path in HERE.rglob("*") if path.is_file() and path.suffix != ".py")
    print(f"wrote the legacy fixtures into {HERE} ({size / 1024:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
