"""`nemesis demo`: the whole pipeline on the embedded default (the `tiny` model, Fashion-MNIST), on a CPU.

Steps: pretrain `tiny` (once, cached), train CoOp and Nemesis (PUN) prompts for shots 1-16 and three
seeds with reduced epochs on cached augmented views, and PLOT, PLOT+Nemesis, KgCoOp and ProGrad on
the first seed, IVLP, IVLP+Nemesis, MaPLe and VPT (prompts inside both towers) and prefix tuning
with and without Nemesis on the first seed with 16 shots; train CoCoOp and CoCoOp+Nemesis (PUN and
PAN, weight 20) on the 5 base classes and test them on base and new classes (the base-to-new
protocol with CoCoOp's settings, on cached flipped views); sweep every few-shot prompt and the
base-class CoCoOp prompt over the default corruption grid (the cross-method Low-Norm Effect figure, and
the effect by tower and layer); then draw every figure and table. Each step resumes: finished runs
are kept, the sweep computes only missing cells, evaluated prompts are not evaluated again, so an
interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

import analysis
from analysis.layout import DEFAULT_LAYOUT, PaperLayout
from analysis.low_norm_effect import has_depth_sites
from corrupt.engine import run_sweep
from corrupt.grid import parse_grid
from corrupt.inputs import resolve_inputs
from corrupt.results import ResultsFile
from nemesis.constants import RUN_PROMPT
from nemesis.errors import NemesisError
from nemesis.evaluation.evaluate import append_record, evaluate_base_to_new, resolve_target
from nemesis.files.checkpoint import load_checkpoint
from nemesis.methods import preset
from nemesis.model.backbone import load_clip
from nemesis.training.configs import TrainConfig
from nemesis.training.train_grid import run_folder as grid_run_folder
from nemesis.training.trainer import train

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from analysis.results import Run

SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)
METHODS = ("coop", "nemesis")
# On the first seed only: PLOT and PLOT+Nemesis (their sweeps cost 4 text passes a cell), and CoOp's
# regularised successors KgCoOp and ProGrad, for the cross-method comparison of the Low-Norm Effect.
FIRST_SEED_METHODS = ("plot", "plot-nemesis", "kgcoop", "prograd")
# Prompts inside the towers and in attention, on the first seed and the most shots, with their prompt lengths:
# IVLP with and without Nemesis, MaPLe and VPT (2 tokens per layer in both of tiny's layers; their image cells
# re-encode the test images), prefix tuning with and without Nemesis (8 keys and values per layer).
DEEP_METHODS = {"ivlp": 2, "ivlp-nemesis": 2, "maple": 2, "vpt": 2, "prefix": 8, "prefix-nemesis": 8}
# Prefix tuning's keys and values come from an MLP whose SGD steps need a larger rate than CoOp's 0.002 here
# (16 shots: 61.9% at 0.02, 55.7% at 0.002, zero-shot 55.3%).
DEEP_LEARNING_RATES = {"prefix": 0.02, "prefix-nemesis": 0.02}
# Base-to-new: run name -> (method, beta, weight); weight 20 as the paper's best CoCoOp+Nemesis rows.
BASE_TO_NEW_RUNS = {
    "cocoop": ("cocoop", 1.0, 1.0),
    "cocoop-nemesis-pen": ("cocoop-nemesis", 1.0, 20.0),
    "cocoop-nemesis-pan": ("cocoop-nemesis", 0.0, 20.0),
}
MODEL, WEIGHTS, DATASET = "tiny", "fmnist", "fashion_mnist"


@dataclass(frozen=True)
class DemoSettings:
    """Reduced CoOp settings that keep the 30 runs within minutes on two CPU cores."""

    epochs: int = 40  # instead of CoOp's 50-200
    train_views: int = 8  # cached augmented views per training image instead of live augmentation
    n_ctx: int = 16
    weight: float = 1.0  # Nemesis A; PUN only (beta 1): the paper's PEN
    shots: tuple[int, ...] = SHOTS
    seeds: tuple[int, ...] = SEEDS
    base_to_new_shots: int = 16  # CoCoOp's shots, on the 5 base classes
    base_to_new_epochs: int = 10  # CoCoOp's (batch 1: 80 steps per epoch; the first is warm-up)
    base_to_new_views: int = 4  # cached augmented views per training image
    # Flips only: on 28-pixel images CoOp's crops down to 8% of the area (8 x 8 pixels, about one of
    # the tiny model's 7-pixel patches) leave little of the garment; trained on them, CoCoOp stays
    # at zero-shot level on the base classes (71.1% vs 72.0% after 10 epochs).
    base_to_new_crop_scale: float = 1.0
    # Sweep the base-class CoCoOp prompt too (about 3.5 min here: CoCoOp scores every image with its own
    # prompts, a text pass per image and cell), so the cross-method figure has every method of the demo.
    sweep_cocoop: bool = True
    deep_methods: tuple[str, ...] = tuple(DEEP_METHODS)


@dataclass
class DemoOutputs:
    runs: list[Path] = field(default_factory=list)
    sweep: Path | None = None
    base_to_new: Path | None = None  # the eval records of the base-to-new runs
    figures: list[Path] = field(default_factory=list)
    report: list[Path] = field(default_factory=list)


def run_config(method: str, shots: int, seed: int, settings: DemoSettings) -> TrainConfig:
    options = preset(method)
    if method in settings.deep_methods:
        options |= {"n_ctx": DEEP_METHODS[method], "batch_size": 32}  # batch 32 as CoOp's, not their 4: fewer steps
        options |= {"lr": DEEP_LEARNING_RATES[method]} if method in DEEP_LEARNING_RATES else {}
    elif "ctx_init" not in options:  # an init phrase sets the prompt's length (KgCoOp: "a photo of a", 4 vectors)
        options["n_ctx"] = settings.n_ctx
    return TrainConfig(
        dataset=DATASET,
        shots=shots,
        seed=seed,
        **options,
        model=MODEL,
        pretrained=WEIGHTS,
        epochs=settings.epochs,
        train_views=settings.train_views,
        weight=settings.weight,
        device="cpu",
    )


def run_folder(out_dir: Path, method: str, shots: int, seed: int, settings: DemoSettings) -> Path:
    """Where `nemesis train --out DIR/runs` with lists puts a run:
    runs/<dataset>/<method>/<model>_<K>shots/<settings>/seed<S>."""
    return grid_run_folder(out_dir / "runs", method, run_config(method, shots, seed, settings))


def demo_runs(settings: DemoSettings) -> list[tuple[str, int, int]]:
    """(method, shots, seed) of every few-shot run: CoOp and Nemesis on every seed, the others on the first,
    the deep-prompt methods on the first seed with the most shots."""
    seeds = {method: settings.seeds for method in METHODS}
    seeds |= {method: settings.seeds[:1] for method in FIRST_SEED_METHODS}
    runs = [(method, shots, seed) for method in seeds for shots in settings.shots for seed in seeds[method]]
    return runs + [(method, max(settings.shots), settings.seeds[0]) for method in settings.deep_methods]


def train_runs(out_dir: Path, settings: DemoSettings, console: Console) -> list[Path]:
    folders = []
    for method, shots, seed in demo_runs(settings):
        folder = run_folder(out_dir, method, shots, seed, settings)
        folders.append(folder)
        if (folder / RUN_PROMPT).is_file():
            continue  # finished in an earlier demo
        console.print(f"[bold]train[/bold] {method} {shots}-shot seed {seed}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        train(run_config(method, shots, seed, settings), folder, resume=folder.exists())
    return folders


def sweep_runs(out_dir: Path, runs: list[Path], console: Console) -> Path:
    """Every prompt of `runs` over the default grid: each method's Low-Norm Effect, with and without Nemesis."""
    table = out_dir / "sweep" / "lne.parquet"
    table.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]corrupt[/bold] {len(runs)} prompts of every method over the default grid")
    summary = run_sweep(resolve_inputs(runs), parse_grid(), ResultsFile(table), device="cpu", console=console)
    console.print(f"norm-reducing cells that raised accuracy: {summary.reducing_raised} of {len(summary.reducing)}")
    return table


def base_to_new_config(name: str, settings: DemoSettings) -> TrainConfig:
    """The base-class run `name` of `BASE_TO_NEW_RUNS`, with CoCoOp's settings."""
    method, beta, weight = BASE_TO_NEW_RUNS[name]
    return TrainConfig(
        dataset=DATASET,
        shots=settings.base_to_new_shots,
        seed=min(settings.seeds),
        **preset(method),
        subsample="base",
        model=MODEL,
        pretrained=WEIGHTS,
        epochs=settings.base_to_new_epochs,
        train_views=settings.base_to_new_views,
        crop_scale=settings.base_to_new_crop_scale,
        eval_every=0,
        beta=beta,
        weight=weight,
        device="cpu",
    )


def base_to_new_folder(out_dir: Path, name: str, settings: DemoSettings) -> Path:
    return grid_run_folder(out_dir / "base_to_new", name, base_to_new_config(name, settings))


def base_to_new(out_dir: Path, settings: DemoSettings, console: Console) -> Path:
    """CoCoOp and CoCoOp+Nemesis (PEN, PAN) trained on the base classes, each tested on base and new classes."""
    records = out_dir / "evals" / "base_to_new.jsonl"
    records.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if records.is_file():
        done = {json.loads(line)["checkpoint"] for line in records.read_text(encoding="utf-8").splitlines() if line}
    for name in BASE_TO_NEW_RUNS:
        config = base_to_new_config(name, settings)
        folder = base_to_new_folder(out_dir, name, settings)
        if not (folder / RUN_PROMPT).is_file():
            console.print(f"[bold]train[/bold] {name} on the base classes")
            folder.parent.mkdir(parents=True, exist_ok=True)
            train(config, folder, resume=folder.exists())
        checkpoint = load_checkpoint(folder)
        if str(Path(checkpoint.path).resolve()) in done:
            continue  # evaluated in an earlier demo
        results = evaluate_base_to_new(resolve_target(checkpoint), device="cpu")
        for result in results:
            append_record(records, result.record())
        console.print(f"{name}: base {results[0].accuracy:.1f}%, new {results[1].accuracy:.1f}%")
    return records


def demo_figures(cells: pd.DataFrame, trajectory: list[Run], layout: PaperLayout = DEFAULT_LAYOUT) -> dict[str, Figure]:
    """The demo's figures by file name: LNE frequency, degradation, by position and by method from the
    sweep's `cells`, the norm trajectory of the `trajectory` runs (the report adds the few-shot curve)."""
    return {
        "lne_frequency": analysis.plot_frequency(cells, layout=layout),
        "lne_by_method": analysis.plot_frequency(cells, by="method,shots", rate=True, layout=layout),
        "lne_degradation": analysis.plot_frequency(cells, degradation=True, layout=layout),
        "lne_by_position": analysis.plot_frequency(cells, by="position", layout=layout),
        "norm_trajectory": analysis.plot_norms(trajectory, layout=layout),
        **(
            {"lne_by_depth": analysis.depth_table_and_figure(cells, layout=layout)[1]} if has_depth_sites(cells) else {}
        ),
    }


def draw(
    out_dir: Path, runs: list[Path], table: Path, records: Path, settings: DemoSettings, layout: PaperLayout
) -> tuple[list[Path], list[Path]]:
    folder = out_dir / "figures"
    folder.mkdir(exist_ok=True)
    trajectory = [run_folder(out_dir, method, max(settings.shots), min(settings.seeds), settings) for method in METHODS]
    drawn = demo_figures(analysis.load_sweeps([table]), analysis.load_runs(trajectory), layout)
    figures = [path for name, figure in drawn.items() for path in analysis.save_figure(figure, folder / name)]
    report = analysis.make_report([*runs, table, records], out_dir / "report", layout=layout)
    return figures, report


def run_demo(
    out_dir: str | os.PathLike = "nemesis-demo",
    settings: DemoSettings | None = None,
    layout: PaperLayout = DEFAULT_LAYOUT,
) -> DemoOutputs:
    """Run the demo into `out_dir`, its figures sized by `layout`, and return where everything went."""
    settings = settings or DemoSettings()
    console = Console()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NemesisError(f"--out {out_dir} is a file; name a folder for the demo's outputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print("[bold]pretrained tiny model[/bold] (trained on Fashion-MNIST once, then cached)")
    load_clip(MODEL, WEIGHTS)
    outputs = DemoOutputs()
    outputs.runs = train_runs(out_dir, settings, console)
    outputs.base_to_new = base_to_new(out_dir, settings, console)
    swept = [*outputs.runs, *([base_to_new_folder(out_dir, "cocoop", settings)] if settings.sweep_cocoop else [])]
    outputs.sweep = sweep_runs(out_dir, swept, console)
    outputs.figures, outputs.report = draw(out_dir, outputs.runs, outputs.sweep, outputs.base_to_new, settings, layout)
    return outputs
