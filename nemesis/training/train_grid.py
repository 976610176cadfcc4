"""Experiment grids: datasets x shots x seeds x method presets trained as one resumable job.

`plan_grid` turns the lists given to `nemesis train` into one run per combination and checks all
of them before anything is written; `run_grid` trains them in one process, loading each backbone
once (image features come from the shared feature cache), skipping finished runs, resuming
unfinished ones and carrying on past a failed one. Under torchrun the ranks split the runs by
position in the plan; a plan of one run is instead trained by all ranks, each batch sharded.

A grid writes Dassl's tree, `<out>/<dataset>/<method>/<model>_<shots>shots/<settings>/seed<seed>`
(settings: the method's, CoOp's `nctx16_cscFalse_ctpend`), which `nemesis corrupt`, `plot-norms` and
`report` read as they are.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import distributed
from ..atomic import prepare_output
from ..constants import RUN_CONFIG, RUN_PROMPT
from ..data.dataset_records import resolve_name
from ..distributed import SINGLE_PROCESS, Ranks, rank_device
from ..errors import NemesisError
from ..methods import method_spec, preset, setting_name
from ..wording import plural
from .configs import TrainConfig, read_run_config
from .trainer import check_config, check_run_folder, train

AXES = ("dataset", "method", "shots", "seed")  # the listable options, in the order runs are planned


def parse_values(text: str | None, option: str, kind: type = str) -> list | None:
    """`"1,2,4"` -> [1, 2, 4] for `--option`; None when the option was not given; an empty list is refused."""
    if text is None:
        return None
    values = [part.strip() for part in str(text).split(",")]
    if not any(values):
        raise NemesisError(f"--{option} is empty; give one value or a comma-separated list, e.g. --{option} 1,2")
    if not all(values):
        raise NemesisError(f"--{option} '{text}' has an empty entry; separate values with single commas")
    try:
        return [kind(value) for value in values]
    except ValueError:
        raise NemesisError(f"--{option} '{text}' must be a comma-separated list of {kind.__name__}s") from None


def run_folder(out: str | Path, method: str, config: TrainConfig) -> Path:
    """Dassl's layout: `<out>/<dataset>/<method>/<model>_<shots>shots/<settings>/seed<seed>`, the settings
    folder the method's (CoOp: `nctx16_cscFalse_ctpend`), so grids that differ in them share an --out.

    A run of a grid written before settings folders (`.../<model>_<shots>shots/seed<seed>`) stays there."""
    setting = Path(out) / config.dataset / method / f"{config.model}_{config.shots}shots"
    earlier = setting / f"seed{config.seed}"
    if (earlier / RUN_CONFIG).is_file():
        return earlier
    settings = method_spec(config.prompt_method).settings_folder(config.prompt_config())
    return setting / settings / f"seed{config.seed}" if settings else earlier


@dataclass(frozen=True)
class GridRun:
    """One combination of the grid: its config and its run folder."""

    dataset: str
    method: str  # the preset name, which names its folder
    shots: int
    seed: int
    config: TrainConfig
    folder: Path
    saved_epochs: int | None = None  # the epochs of the run already in `folder` (None: none), read once when planned

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.method} {plural(self.shots, 'shot')} seed {self.seed}"

    @property
    def finished(self) -> bool:
        """Trained to its epochs: a run extended to more epochs (a warning at planning) is not finished."""
        return (self.folder / RUN_PROMPT).is_file() and self.saved_epochs == self.config.resolved().epochs


def _saved_epochs(folder: Path) -> int | None:
    """The epochs the run in `folder` was trained for or is training to (None: no run there yet)."""
    return read_run_config(folder).epochs if (folder / RUN_CONFIG).is_file() else None


@dataclass
class TrainGrid:
    """The runs of one `nemesis train` call, checked; `tree` is False for one run written to --out itself."""

    runs: list[GridRun]
    tree: bool
    resume: bool = False  # a single run (not a tree) resumes only when asked, as `nemesis train --resume`
    warnings: list[str] = field(default_factory=list)  # what the plan changed in what was asked or in runs it continues
    checked: bool = False  # every run checked when planned (`plan_grid`), so training does not check it again


def _preset(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """What `--method NAME` sets, with the options given; an option given otherwise than the preset sets
    it is refused (options by name, `method_options`, name by name)."""
    key = name.lower()
    values = preset(key)  # a registered method's name, or a preset of nemesis.methods
    for option, value in values.items():
        given = options.get(option)
        if isinstance(value, dict) and isinstance(given, dict):  # --method-option NAME=VALUE, one name each
            clashes = {name: given[name] for name in value if name in given and given[name] != value[name]}
            shown = ", ".join(f"--method-option {name}={item}" for name, item in clashes.items())
            sets = ", ".join(f"{name}={value[name]}" for name in clashes)
            values[option] = given | value
        else:
            clashes = {option: given} if option in options and given != value else {}
            shown, sets = f"--{option.replace('_', '-')} {given}", f"{option} {value}"
        if clashes:
            plain = setting_name(values["prompt_method"], values["penalty"])
            raise NemesisError(f"--method {key} sets {sets}, but {shown} was given; drop it or use --method {plain}")
    return values


def _distinct_presets(
    methods: Sequence[str], options: dict[str, Any], example: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """The presets that train different settings, in the order given, and a warning per preset that
    resolves to the settings of an earlier one (`--method nemesis,pen` without --beta: both PUN,
    beta 1). Such a preset is trained once, under the first name: twice, the report would count one
    seed as two. `example` is one (dataset, shots, seed): presets do not depend on them."""
    kept: dict[str, TrainConfig] = {}
    warnings = []
    for method in methods:
        config = TrainConfig(**(options | _preset(method, options) | example))  # checks every option
        same = next((name for name, other in kept.items() if other == config and name != method.lower()), None)
        if same is None:
            kept.setdefault(method.lower(), config)  # a name listed twice is refused with its folder below
            continue
        warnings.append(
            f"--method {same} and {method.lower()} resolve to the same settings; their runs are trained once, "
            f"under {same}"
        )
    repeated = [method for method in methods if method.lower() not in kept]
    return [method for method in methods if method not in repeated], warnings


def plan_grid(
    out: str | Path,
    options: dict[str, Any],
    datasets: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    shots: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    tree: bool = False,
    resume: bool = False,
) -> TrainGrid:
    """Every run of the grid, checked before anything is written (bad input raises a NemesisError).

    `options` are the other TrainConfig fields, the same for every run. Axes left as None take
    TrainConfig's default. With one value per axis and `tree=False` the run is written to `out`
    itself (as a plain `nemesis train`); otherwise each run gets its folder in the tree under `out`.
    """
    defaults = {spec.name: spec.default for spec in dataclasses.fields(TrainConfig)}
    if not datasets:
        raise NemesisError("--dataset is required (e.g. --dataset fashion_mnist or --dataset oxford_pets,dtd)")
    methods = list(methods) if methods else [defaults["prompt_method"]]
    shots = list(shots) if shots else [defaults["shots"]]
    seeds = list(seeds) if seeds else [defaults["seed"]]
    tree = tree or any(len(values) > 1 for values in (datasets, methods, shots, seeds))
    example = {"dataset": datasets[0], "shots": shots[0], "seed": seeds[0]}
    methods, warnings = _distinct_presets(methods, options, example)
    out = Path(out)
    runs, folders = [], {}
    for dataset, method, count, seed in itertools.product(datasets, methods, shots, seeds):
        values = options | _preset(method, options) | {"dataset": dataset, "shots": count, "seed": seed}
        config = TrainConfig(**values)  # checks every option
        name = resolve_name(dataset)
        folder = run_folder(out, method.lower(), config) if tree else out
        saved = _saved_epochs(folder)
        if options.get("epochs") is None and saved is not None:
            config = dataclasses.replace(config, epochs=saved)  # not given: a run keeps its own, as --resume does
        run = GridRun(name, method.lower(), count, seed, config, folder, saved)
        if folder in folders:
            raise NemesisError(
                f"runs '{folders[folder].label}' and '{run.label}' would both write {folder}; "
                "list each dataset, method, shots and seed once"
            )
        folders[folder] = run
        runs.append(run)
    _check_runs(runs, out if tree else None, resume)
    return TrainGrid(runs, tree, resume, warnings + _check_epochs(runs), checked=True)


def single_run_options(given: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig options of `nemesis train` arguments naming one run (`--resume` of a run folder):
    each listable axis parsed to its one value, a method preset to what it sets."""
    options = dict(given)
    for axis, kind in (("dataset", str), ("method", str), ("shots", int), ("seed", int)):
        if axis in options:
            values = parse_values(options.pop(axis), axis, kind)
            if len(values) > 1:
                raise NemesisError(f"--resume continues one run; --{axis} lists {len(values)} values (add --tree)")
            options[axis] = values[0]
    if "method" in options:
        options |= _preset(options.pop("method"), options)
    return options


def single_run_grid(config: TrainConfig, out: str | Path) -> TrainGrid:
    """The grid of one run that `nemesis train --out RUN --resume` continues from its own config.json."""
    run = GridRun(config.dataset, config.method_name, config.shots, config.seed, config, Path(out), _saved_epochs(out))
    return TrainGrid([run], tree=False, resume=True)


def _check_runs(runs: list[GridRun], tree_out: Path | None, resume: bool) -> None:
    """What can refuse a run, for every run: folders that hold other runs, data, shots, model, positions.
    `tree_out` is the grid's --out when it writes a tree (None: one run written to --out itself)."""
    if tree_out is not None and tree_out.exists() and not tree_out.is_dir():
        raise NemesisError(f"--out {tree_out} is a file; name a folder for the grid's run folders")
    for run in runs:
        resolved = run.config.resolved()
        check_run_folder(run.folder, resolved, resume=resume or tree_out is not None)
    # Loading data is the slow check: once per dataset and method, with its largest shots.
    largest: dict[tuple[str, str], GridRun] = {}
    for run in runs:
        key = (run.dataset, run.method)
        if key not in largest or run.shots > largest[key].shots:
            largest[key] = run
    for run in largest.values():
        check_config(run.config.resolved())


def _check_epochs(runs: list[GridRun]) -> list[str]:
    """The rule of `nemesis train --resume` for every run the grid continues: fewer epochs than a run
    has are refused, more extend it (its cosine schedule then spans the new count), said as warnings."""
    extended: dict[tuple[int, int], int] = {}  # (saved, new epochs) -> runs
    for run in runs:
        saved, wanted = run.saved_epochs, run.config.resolved().epochs
        if saved is None or saved == wanted:
            continue
        if wanted < saved:
            raise NemesisError(
                f"cannot continue {run.folder} with --epochs {wanted} (the run has {saved}): a rerun continues "
                f"the same runs; pass --epochs {saved} or more, or train a new grid with another --out"
            )
        extended[saved, wanted] = extended.get((saved, wanted), 0) + 1
    return [
        f"{plural(count, 'run')} of the grid continue{'' if count > 1 else 's'} to {plural(wanted, 'epoch')} "
        f"(trained for {saved}); the cosine learning-rate schedule now spans {plural(wanted, 'epoch')}"
        for (saved, wanted), count in sorted(extended.items())
    ]


# --- running -------------------------------------------------------------------------------------


@dataclass
class GridSummary:
    """What a grid call did (this rank's share under torchrun)."""

    done: list[GridRun] = field(default_factory=list)  # trained (or resumed to the end) now
    skipped: list[GridRun] = field(default_factory=list)  # finished before this call
    failed: list[tuple[GridRun, str]] = field(default_factory=list)  # with the error
    seconds: float = 0.0
    totals: tuple[int, int, int] | None = None  # trained, skipped, failed over all ranks of a torchrun job
    main: bool = True  # False on ranks other than 0, which leave the grid's summary to rank 0

    @property
    def counts(self) -> tuple[int, int, int]:
        return self.totals or (len(self.done), len(self.skipped), len(self.failed))

    def line(self) -> str:
        done, skipped, failed = self.counts
        return f"grid: {done} trained, {skipped} skipped (finished before), {failed} failed in {self.seconds:.1f} s"


def run_grid(
    grid: TrainGrid,
    ranks: Ranks = SINGLE_PROCESS,
    progress: bool = True,
    console: Console | None = None,
    backbones: dict | None = None,
    on_run_end: Callable[[GridRun], None] | None = None,
) -> GridSummary:
    """Train the grid's runs; a plan of one run trains in `grid.runs[0].folder` (batch-sharded under torchrun).

    Runs of a grid that fail are reported in the summary with their error and do not stop the
    others; a single run's error is raised as it is. `backbones` (model, weights) -> Backbone is
    shared by the runs (and by calls, if passed). `on_run_end(run)` follows each run (tests).
    """
    console = console or Console()
    backbones = {} if backbones is None else backbones
    summary = GridSummary(main=ranks.is_main)
    start = time.perf_counter()
    prefix = f"[rank {ranks.rank}] " if ranks.distributed and grid.tree else ""
    progress = progress and ranks.is_main  # one bar on the terminal the ranks share

    def say(line: str) -> None:
        console.print(prefix + line, markup=False, highlight=False, soft_wrap=True)

    if not grid.tree:
        run = grid.runs[0]
        resume = grid.resume or run.finished  # (only reachable finished with --resume: checked in the plan)
        options = dict(progress=progress, echo=say, backbones=backbones, ranks=ranks, checked=grid.checked)
        train(run.config, run.folder, resume=resume, **options)
        summary.done.append(run)
        summary.seconds = time.perf_counter() - start
        return summary

    mine = ranks.share(grid.runs)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("grid", total=len(mine))
        for run in mine:
            bar.update(task, description=f"grid: {run.label}")
            if run.finished:
                summary.skipped.append(run)
            else:
                try:
                    train(
                        dataclasses.replace(run.config, device=rank_device(ranks, run.config.device)),  # its GPU
                        run.folder,
                        resume=(run.folder / RUN_CONFIG).is_file(),
                        progress=False,
                        echo=say,
                        backbones=backbones,
                        checked=grid.checked,
                    )
                    summary.done.append(run)
                except Exception as error:  # a failed run is reported at the end; the others go on
                    reason = " ".join(str(error).split()) or type(error).__name__
                    summary.failed.append((run, f"{type(error).__name__}: {reason}"))
                    say(f"failed: {run.label}: {reason}")
            bar.advance(task)
            if on_run_end is not None:
                on_run_end(run)
    summary.seconds = time.perf_counter() - start
    return summary


def run_grid_job(grid: TrainGrid, progress: bool = True, console: Console | None = None) -> GridSummary:
    """`run_grid` in one process, or as one rank of the torchrun job that started this process.

    Under torchrun the ranks wait for each other at the end (no rank's exit stops a busy one) and
    the summary's totals count the runs of all ranks and its time is the job's, until the slowest
    rank is done. An error escaping a rank ends the job.
    """
    start = time.perf_counter()
    ranks = distributed.start(grid.runs[0].config.device)
    summary = run_grid(grid, ranks, progress=progress, console=console)
    if ranks.distributed:
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        counts = torch.tensor([len(summary.done), len(summary.skipped), len(summary.failed)], device=device)
        summary.totals = tuple(int(value) for value in ranks.all_reduce_sum(counts).cpu())
        # The all-reduce waited for the slowest rank: the summary gives the job's time, not this rank's.
        summary.seconds = time.perf_counter() - start
    distributed.stop()
    return summary


def train_grid(
    out: str | Path,
    *,
    datasets: Sequence[str],
    methods: Sequence[str] | None = None,
    shots: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    tree: bool = True,
    progress: bool = True,
    **options: Any,
) -> GridSummary:
    """Train every combination of the lists, one run folder each in the tree under `out`, as
    `nemesis train` with lists does (finished runs skipped, unfinished ones resumed).

    `methods` are method names or presets (`coop`, `pan`, `cocoop-nemesis`); `options` are the other
    `TrainConfig` fields, the same for every run. The summary's `line()` says what happened.
    """
    grid = plan_grid(out, options, datasets, methods, shots, seeds, tree=tree)
    prepare_output(Path(out), folder=True)
    return run_grid_job(grid, progress=progress)
