"""The sweep: every cell of a grid on every checkpoint, at the cost of text passes alone.

Per checkpoint: `prepare_evaluation` (cached test features; backbones reused across checkpoints),
then the cells still missing from the results file are turned into ctx variants chunk by chunk
and classified with `predictions` (batched, chunked text passes, one matrix product per variant).
The checkpoint's rows are appended to the results file as soon as it is done. Nothing here keeps
global state, so a future distributed rank can run any subset of inputs and cells.

Cells are planned before any learner is built: at the corruption sites the checkpoint's method
declares for its ctx shape (`SweepInput.sites`). `sweep_learner` runs a grid on a learner that is
already built instead (its own `corruption_sites()`), e.g. one made in memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from nemesis import distributed
from nemesis.data.datasets import FASHION_MNIST, dataset_dir
from nemesis.distributed import SINGLE_PROCESS, Ranks, rank_device
from nemesis.errors import NemesisError
from nemesis.evaluation.evaluate import EvaluationSetup, predictions, prepare_evaluation
from nemesis.methods import setting_name
from nemesis.model.backbone import Backbone, resolve_device
from nemesis.progress import progress_bar
from nemesis.tensors import WHOLE_CTX

from .grid import Cell, Grid
from .inputs import SweepInput, check_against_data, check_factors
from .operators import ORIGINAL, corrupted_variants, position_norm
from .results import ResultsFile, accuracy_percent, cell_id

VARIANTS_PER_PASS = 32  # ctx variants per text pass: bounds memory (n_cls prompts each)
SUMMARY_CELLS = 5  # best and worst cells shown at the end


@dataclass
class CellOutcome:
    """What evaluating a batch of cells on one checkpoint gives."""

    correct: torch.Tensor  # [K, N] bool: sample i classified correctly under cell k
    norms_before: list[float]  # [K] L2 norm of the corrupted position before (NaN for the original)
    norms_after: list[float]  # [K] ... and after corruption


def evaluate_cells(
    setup: EvaluationSetup,
    ctx: torch.Tensor,
    cells: Sequence[Cell],
    variants_per_pass: int = VARIANTS_PER_PASS,
    on_chunk: Callable[[int], None] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> CellOutcome:
    """Classify the cached test features under every cell's variant of `ctx` (or of the learned tensor its
    site names, among `tensors`), `variants_per_pass` at a time.

    Variants are built chunk by chunk, so memory holds one chunk of copies at a time. A learner that
    scores sites (`scores_sites`: prompts inside the towers) gets each run of cells at one site together
    with that site. `on_chunk(k)` is called after each chunk of k cells (progress bars).
    """
    learned = {WHOLE_CTX.tensor: ctx, **(tensors or {})}
    by_site = getattr(setup.learner, "scores_sites", False)
    rows, before, after = [], [], []
    labels = setup.labels
    for start in range(0, len(cells), variants_per_pass):
        chunk = list(cells[start : start + variants_per_pass])
        for group in _runs(chunk, (lambda cell: cell.site) if by_site else (lambda cell: cell.site.tensor)):
            site = group[0].site
            if site.tensor not in learned:
                raise NemesisError(
                    f"corruption site {site.name!r} acts on {site.tensor!r}, which this prompt does not learn "
                    f"(it learns {', '.join(learned)})"
                )
            tensor = learned[site.tensor]
            variants = corrupted_variants(tensor, group)  # [k, *tensor.shape]
            predicted = predictions(
                setup.learner, setup.features, variants, variants_per_pass, site if by_site else None
            )  # [k, N]
            rows.append((predicted == labels.to(predicted.device)).cpu())
            for cell, variant in zip(group, variants, strict=True):
                original = cell.op == ORIGINAL
                before.append(math.nan if original else position_norm(tensor, cell.position, cell.site))
                after.append(math.nan if original else position_norm(variant, cell.position, cell.site))
        if on_chunk is not None:
            on_chunk(len(chunk))
    n = labels.numel()
    correct = torch.cat(rows) if rows else torch.zeros(0, n, dtype=torch.bool)
    return CellOutcome(correct, before, after)


def _runs(cells: list[Cell], key: Callable[[Cell], Any]) -> list[list[Cell]]:
    """`cells` cut into runs of consecutive cells with the same key, in order."""
    runs: list[list[Cell]] = []
    for cell in cells:
        if runs and key(runs[-1][0]) == key(cell):
            runs[-1].append(cell)
        else:
            runs.append([cell])
    return runs


def _decimal(points: float) -> float:
    """A difference of two percentages without float noise (49.07 - 48.5 is 0.5700000000000003): accuracy
    steps are 100 / n, far coarser than 1e-9, so rounding there never changes a comparison."""
    return round(points, 9)


def _float32_decimal(norm: float) -> float:
    """A float32 norm as its shortest decimal (0.16213356, not 0.16213355958461761): the same float32
    value, and distinct norms keep their order."""
    return norm if math.isnan(norm) else float(str(np.float32(norm)))


def cell_rows(
    identity: dict[str, Any], cells: Sequence[Cell], outcome: CellOutcome, original_accuracy: float
) -> list[dict[str, Any]]:
    """Table rows (DESIGN section 6) for `cells`; delta_acc is against `original_accuracy`."""
    rows = []
    n = outcome.correct.shape[1]
    for index, cell in enumerate(cells):
        correct = int(outcome.correct[index].sum())
        accuracy = accuracy_percent(correct, n)
        rows.append(
            {
                "cell_id": cell_id(identity, cell),
                "checkpoint": identity["checkpoint"],
                "model": identity["model"],
                "weights": identity.get("weights"),
                "dataset": identity["dataset"],
                "shots": identity["shots"],
                "seed": identity["seed"],
                "method": identity["method"],
                "penalty": identity.get("penalty"),
                "method_variant": identity.get("method_variant"),
                "subsample": identity.get("subsample"),
                "train_dataset": identity.get("train_dataset"),
                "n_classes": identity.get("n_classes"),
                "site": cell.site.name,
                "tower": cell.site.tower,
                "layer": cell.site.layer,
                "op": cell.op,
                "position": cell.position,
                "factor": math.nan if cell.factor is None else cell.factor,
                "noise_seed": cell.noise_seed,
                "n": n,
                "correct": correct,
                "accuracy": accuracy,
                "delta_acc": 0.0 if cell.op == ORIGINAL else _decimal(accuracy - original_accuracy),
                "norm_before": _float32_decimal(outcome.norms_before[index]),
                "norm_after": _float32_decimal(outcome.norms_after[index]),
            }
        )
    return rows


def check_sweep(
    inputs: Sequence[SweepInput], grid: Grid, root: str | os.PathLike | None = None, device: str | None = None
) -> None:
    """Refuse before any work what would fail later: positions a checkpoint lacks, no --root, no CUDA."""
    if not inputs:
        raise NemesisError("no checkpoints given; pass checkpoint files, run folders or a CoOp output tree")
    for item in inputs:
        grid.check_positions(item.n_ctx, str(item.file))
    check_factors(inputs, grid)
    needs_root = sorted({item.identity["dataset"] for item in inputs} - {FASHION_MNIST})
    if needs_root and root is None:
        raise NemesisError(f"dataset {', '.join(needs_root)} needs a data folder; pass --root DATA")
    if root is not None and not os.path.isdir(root):
        raise NemesisError(f"data folder {root} does not exist; pass the folder holding the datasets with --root")
    resolve_device(device)
    if root is not None:
        for dataset in sorted({item.identity["dataset"] for item in inputs} - {FASHION_MNIST}):
            folder = dataset_dir(dataset, root)
            if not folder.is_dir():
                raise NemesisError(f"dataset '{dataset}' not found: no folder {folder}; check --root")
    check_against_data(inputs, root)


# --- the sweep ----------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    checkpoints: int  # checkpoints of the sweep
    computed: int  # cells computed by this run
    skipped: int  # cells found in the results file already
    seconds: float
    cells: pd.DataFrame  # every row of this sweep's cells (resumed ones included)
    main: bool = True  # False on torchrun ranks other than 0: their summary holds only their own cells

    @property
    def cells_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else math.nan

    @property
    def corrupted(self) -> pd.DataFrame:
        return self.cells[self.cells["op"] != ORIGINAL]

    @property
    def reducing(self) -> pd.DataFrame:
        """Cells whose corrupted position's norm went down (DESIGN section 5)."""
        corrupted = self.corrupted
        return corrupted[corrupted["norm_after"] < corrupted["norm_before"]]

    @property
    def reducing_raised(self) -> int:
        """Norm-reducing cells that raised accuracy: the Low-Norm Effect at margin 0."""
        return int((self.reducing["delta_acc"] > 0).sum())

    def best(self, count: int = SUMMARY_CELLS) -> pd.DataFrame:
        return self.corrupted.sort_values(["delta_acc", "cell_id"], ascending=[False, True]).head(count)

    def worst(self, count: int = SUMMARY_CELLS) -> pd.DataFrame:
        return self.corrupted.sort_values(["delta_acc", "cell_id"], ascending=[True, True]).head(count)


class _CellsPerSecond(ProgressColumn):
    """Cells per second since the bar started (image encoding of each checkpoint included)."""

    def render(self, task) -> Text:
        elapsed = task.finished_time or task.elapsed
        rate = f"{task.completed / elapsed:.1f}" if elapsed else "-"
        return Text(f"{rate} cells/s", style="progress.data.speed")


def _label(identity: dict[str, Any]) -> str:
    """What a progress line names: dataset, method (and its Nemesis variant), shots, seed."""
    variant = identity.get("method_variant")
    penalty = identity.get("penalty")
    method = identity.get("method") or "unknown method"
    parts = [identity["dataset"], setting_name(method, penalty)]
    parts += [f"({variant})"] if variant else []
    parts += [f"{key} {identity[key]}" for key in ("shots", "seed") if identity.get(key) is not None]
    return " ".join(str(part) for part in parts)


def run_sweep(
    inputs: Sequence[SweepInput],
    grid: Grid,
    results: ResultsFile,
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    backbones: dict[tuple[str, str | None], Backbone] | None = None,
    variants_per_pass: int = VARIANTS_PER_PASS,
    progress: bool = True,
    console: Console | None = None,
    compact: bool = True,
    ranks: Ranks = SINGLE_PROCESS,
) -> SweepSummary:
    """Run `grid` on every input, appending each checkpoint's rows to `results` as soon as it is done.

    Cells already in `results` (by cell_id) are skipped, so rerunning an interrupted sweep computes
    only what is missing. `backbones` is reused across checkpoints (and across calls, if passed).
    With `compact`, the table's parts are merged into its one file at the end, also when the sweep
    is interrupted (`ResultsFile.compact`); a rank that leaves this to rank 0 passes False.

    Under torchrun (`ranks`) the sweep's cells, in input then grid order, are cut into one
    contiguous block per rank; each rank computes the missing cells of its block and appends them
    as its own parts, and after all ranks are done rank 0 merges the parts into the one table, the
    table one process writes. Blocks depend only on the inputs, the grid and the number of ranks,
    so a rerun with any number of ranks computes exactly the cells still missing.
    """
    check_sweep(inputs, grid, root, device)
    console = console or Console()
    random_models = sorted({item.identity["model"] for item in inputs if item.identity["pretrained"] is None})
    if random_models:
        console.print(
            f"note: {', '.join(random_models)} with random weights; pass --pretrained TAG or FILE for real ones"
        )
    backbones = {} if backbones is None else backbones
    done = results.cell_ids
    plan = []  # (input, ids of all its cells, cells of this rank still missing)
    first, last = _block(sum(len(grid.cells(item.n_ctx, item.sites)) for item in inputs), ranks)
    position = 0
    for item in inputs:
        cells = grid.cells(item.n_ctx, item.sites)
        ids = [cell_id(item.identity, cell) for cell in cells]
        missing = [
            cell
            for index, (cell, identifier) in enumerate(zip(cells, ids, strict=True), start=position)
            if first <= index < last and identifier not in done
        ]
        position += len(cells)
        plan.append((item, ids, missing))
    total_missing = sum(len(missing) for _, _, missing in plan)
    all_ids = [identifier for _, ids, _ in plan for identifier in ids]

    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _CellsPerSecond(),
               TimeRemainingColumn())  # fmt: skip
    with contextlib.ExitStack() as stack:
        if compact and not ranks.distributed:
            stack.callback(results.compact)
        bar = stack.enter_context(progress_bar(*columns, console=console, disable=not (progress and ranks.is_main)))
        task = bar.add_task("corrupting", total=total_missing)
        for item, _, missing in plan:
            if not missing:
                continue
            bar.update(task, description=f"corrupting {_label(item.identity)}")
            checkpoint = item.target.checkpoint  # read and checked once, by resolve_inputs
            setup = prepare_evaluation(
                item.target,
                root=root,
                cache_dir=cache_dir,
                device=device,
                backbones=backbones,
                progress=progress,
            )
            _append_cells(
                setup,
                checkpoint.tensors,
                item.identity,
                missing,
                results,
                variants_per_pass,
                lambda k: bar.advance(task, k),
            )
    if ranks.distributed:
        ranks.barrier()  # every rank's parts are written
        computed = int(ranks.all_reduce_sum(torch.tensor([total_missing], device=_collective_device()))[0])
        if ranks.is_main and compact:
            results.compact()
        total_missing = computed
    seconds = time.perf_counter() - start
    cells = results.rows_of(all_ids)
    return SweepSummary(len(inputs), total_missing, len(all_ids) - total_missing, seconds, cells, ranks.is_main)


def _append_cells(
    setup: EvaluationSetup,
    tensors: dict[str, torch.Tensor],
    identity: dict[str, Any],
    missing: Sequence[Cell],
    results: ResultsFile,
    variants_per_pass: int,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Evaluate `missing` cells of one checkpoint (its learned `tensors`, ctx first) and append their rows
    (delta_acc against its original row)."""
    ctx, others = tensors[WHOLE_CTX.tensor], {name: t for name, t in tensors.items() if name != WHOLE_CTX.tensor}
    outcome = evaluate_cells(setup, ctx, missing, variants_per_pass, on_chunk=on_chunk, tensors=others)
    if missing[0].op == ORIGINAL:
        original_accuracy = accuracy_percent(int(outcome.correct[0].sum()), outcome.correct.shape[1])
    elif (original_id := cell_id(identity, Cell(ORIGINAL))) in results.cell_ids:
        original_accuracy = results.accuracy_of(original_id)  # written by an earlier run of a smaller grid
    else:  # another rank's cell: evaluated here too (one more variant), written by that rank only
        original = evaluate_cells(setup, ctx, [Cell(ORIGINAL)], variants_per_pass, tensors=others).correct[0]
        original_accuracy = accuracy_percent(int(original.sum()), original.numel())
    identity = {**identity, "weights": setup.backbone.weights_id, "n_classes": len(setup.dataset.classnames)}
    rows = cell_rows(identity, missing, outcome, original_accuracy)
    correctness = [row.numpy() for row in outcome.correct]
    results.append(rows, correctness)


def sweep_learner(
    setup: EvaluationSetup,
    identity: dict[str, Any],
    grid: Grid,
    results: ResultsFile,
    variants_per_pass: int = VARIANTS_PER_PASS,
) -> pd.DataFrame:
    """Run `grid` at every corruption site of a learner already built (`setup.learner`, e.g. one made in
    memory) and append the cells missing from `results`; the rows of all its cells, in grid order.

    `identity` says what is evaluated, as a checkpoint's does (`SweepInput.identity`: checkpoint, model,
    pretrained, dataset, subsample, shots, seed; method defaults to the learner's): cell ids come from it.
    """
    learner = setup.learner
    identity = {"method": learner.method, **identity}
    grid.check_positions(learner.n_ctx, str(identity["checkpoint"]))
    cells = grid.cells(learner.n_ctx, learner.corruption_sites())
    ids = [cell_id(identity, cell) for cell in cells]
    done = results.cell_ids
    missing = [cell for cell, identifier in zip(cells, ids, strict=True) if identifier not in done]
    if missing:
        learned = {WHOLE_CTX.tensor: learner.ctx, **learner.extra_parameters()}
        tensors = {name: tensor.detach() for name, tensor in learned.items()}
        _append_cells(setup, tensors, identity, missing, results, variants_per_pass)
    return results.rows_of(ids)


def _block(count: int, ranks: Ranks) -> tuple[int, int]:
    """This rank's contiguous share [first, last) of `count` cells (sizes differ by at most one)."""
    return count * ranks.rank // ranks.world_size, count * (ranks.rank + 1) // ranks.world_size


def _collective_device() -> str:
    return "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"


def run_sweep_job(
    inputs: Sequence[SweepInput], grid: Grid, results: ResultsFile, *, device: str | None = None, **options: Any
) -> SweepSummary:
    """`run_sweep` in one process, or as one rank of the torchrun job that started this process.

    Under torchrun each rank takes its own GPU and its block of the cells; the ranks wait for each
    other at the end, and rank 0's summary (`main`) covers the merged table.
    """
    ranks = distributed.start(device)
    summary = run_sweep(inputs, grid, results, device=rank_device(ranks, device), ranks=ranks, **options)
    distributed.stop()
    return summary
