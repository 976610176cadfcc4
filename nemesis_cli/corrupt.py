"""`nemesis corrupt`: corrupt checkpoints position by position and re-evaluate every cell."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from nemesis.wording import plural

from .common import ActivationOption, CtxInitOption, MethodOptionOption, ModelOption, WeightsOption, reports_errors

if TYPE_CHECKING:  # torch and pandas are imported inside the command, so `--help` answers at once
    from rich.console import Console
    from rich.table import Table

    from corrupt.engine import SweepSummary
    from corrupt.results import ResultsFile

Option = typer.Option


@reports_errors
def corrupt(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Our prompt files or run folders, CoOp/Nemesis (Dassl) files or run folders, or whole CoOp "
            "output trees (dataset, shots and seed are read from their paths)."
        ),
    ],
    out: Annotated[Path, Option(help="Results table (.parquet; .csv with --csv); reruns resume it.")],
    csv: Annotated[bool, Option("--csv", help="Write the table as CSV instead of Parquet.")] = False,
    root: Annotated[Path | None, Option(help="Folder holding the CoOp-format datasets.")] = None,
    dataset: Annotated[str | None, Option(help="Dataset key for every checkpoint (default: metadata or path).")] = None,
    model: ModelOption = None,
    pretrained: WeightsOption = None,
    activation: ActivationOption = None,
    ctx_init: CtxInitOption = None,
    cache_dir: Annotated[Path | None, Option(help="Feature cache folder, shared with eval and train.")] = None,
    device: Annotated[str | None, Option(help="cpu, cuda or cuda:N (default: cuda when available).")] = None,
    rescale: Annotated[str | None, Option(help="RESCALE factors tau, e.g. 0.001,0.01,0.1.")] = None,
    replace: Annotated[str | None, Option(help="REPLACE noise levels sigma, e.g. 0,0.01 (0: zero vector).")] = None,
    op: Annotated[list[str] | None, Option("--op", help="Any registered operator as NAME=F1,F2 (repeatable).")] = None,
    positions: Annotated[str, Option(help="Context positions: all, or a list like 0,3,7.")] = "all",
    noise_seeds: Annotated[str | None, Option(help="Noise seeds of REPLACE, e.g. 0,1,2 (default 0).")] = None,
    paper_preset: Annotated[
        bool, Option("--paper-preset", help="REPLACE sigma 0 and RESCALE tau 0.001 at every position.")
    ] = False,
    epoch: Annotated[int | None, Option(help="Epoch of CoOp run folders (default: the latest).")] = None,
    prompt_method: Annotated[
        str | None,
        Option(help="The prompt method: names Dassl files' (e.g. plot), refuses our files of another (default: any)."),
    ] = None,
    method_option: MethodOptionOption = None,
    all_sites: Annotated[
        bool,
        Option("--all-sites", help="Also the optional corruption sites of the method (PLOT: each prompt alone)."),
    ] = False,
) -> None:
    """Corrupt every context position of each checkpoint (RESCALE, REPLACE) and re-evaluate on the test split.

    Without operator flags the default grid runs: RESCALE tau 0.001, 0.01, 0.1, 0.5, 2, 5, 10 and
    REPLACE sigma 0, 0.001, 0.01, 0.1, 1 (noise seed 0) at every position, at each corruption site the
    prompt method declares (CoOp: one, the whole ctx; its `site` column is empty). One row per cell goes to
    --out, per-sample correctness beside it (X.correct.parquet); rerunning the command computes only
    the missing cells. Under `torchrun --nproc-per-node N` the ranks split the cells and rank 0 writes the
    one table.

    Example: nemesis corrupt output/ --model RN50 --pretrained openai --root ~/data --paper-preset
    --out lne.parquet
    """
    from rich.console import Console

    from corrupt.grid import parse_grid
    from corrupt.results import ResultsFile
    from corrupt.sweep import sweep
    from nemesis.atomic import prepare_output
    from nemesis.methods import option_pairs

    # Everything that can be checked is checked before any work, so bad input writes nothing.
    grid = parse_grid(rescale, replace, positions, noise_seeds, paper_preset, op or ())
    prepare_output(out)
    results = ResultsFile(out, csv=csv)
    console = Console(highlight=False)  # paths and method names from files are printed as they are
    try:
        summary = sweep(
            checkpoints,
            results,
            grid=grid,
            root=root,
            cache_dir=cache_dir,
            device=device,
            epoch=epoch,
            model=model,
            pretrained=pretrained,
            dataset=dataset,
            activation=activation,
            ctx_init=ctx_init,
            prompt_method=prompt_method,
            method_options=option_pairs(method_option or []),
            all_sites=all_sites,
            console=console,
        )
    except KeyboardInterrupt:
        typer.echo(_interrupted_line(results), err=True)
        raise typer.Exit(code=130) from None
    if summary.main:  # under torchrun, rank 0 speaks for the merged table
        print_summary(summary, results, console)


def _interrupted_line(results) -> str:
    """What Ctrl-C leaves: the cells in the table, or nothing at all when it came before the first."""
    if not results.cell_ids:
        return f"interrupted before the first cell; nothing was written to {results.path}; rerun the same command"
    cells = plural(len(results.cell_ids), "cell")
    return f"interrupted; the table in {results.path} keeps {cells}; rerun the same command to finish"


def _run_folder(checkpoint: str) -> str:
    """The run a checkpoint belongs to, as the user would name it: its folder, relative when below here."""
    from nemesis.constants import RUN_CHECKPOINTS
    from nemesis.files.checkpoint import dassl_folders

    path = Path(checkpoint)
    folder = path.parent
    if folder.name in (*dassl_folders(), RUN_CHECKPOINTS):
        folder = folder.parent
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(folder)


def _run_label(row) -> str:
    import pandas as pd

    epoch = Path(str(row.checkpoint)).name
    details = [str(row.method)] + (
        [f"{row.subsample} classes"] if not pd.isna(row.subsample) and row.subsample != "all" else []
    )
    return f"{_run_folder(str(row.checkpoint))} ({', '.join(details)}; {epoch})"


def _cell_label(row) -> str:
    import pandas as pd

    label = f"{row.op} {row.factor:g} @{row.position}"
    label = label if pd.isna(row.noise_seed) else f"{label} seed {row.noise_seed}"
    site = getattr(row, "site", "")
    return f"{label}, {site}" if isinstance(site, str) and site else label  # a named corruption site


def _cells_table(title: str, cells) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("run", "cell", "acc", "delta", "norm"):
        table.add_column(column, justify="left" if column in ("run", "cell") else "right", no_wrap=column != "run")
    for row in cells.itertuples():
        norm = f"{row.norm_before:.3g}->{row.norm_after:.3g}"
        table.add_row(_run_label(row), _cell_label(row), f"{row.accuracy:.2f}", f"{row.delta_acc:+.2f}", norm)
    return table


def print_summary(summary: SweepSummary, results: ResultsFile, console: Console) -> None:
    """One screen: what ran, where it went, the Low-Norm Effect count per kind of prompt, best and worst cells."""
    from analysis.labels import kind_label, site_label, weights_names
    from analysis.low_norm_effect import PROMPT_KIND, SITE, several_sites, with_prompt_kind

    total = summary.computed + summary.skipped
    console.print(
        f"{plural(summary.checkpoints, 'checkpoint')}, {plural(total, 'cell')}: {summary.computed:,} computed in "
        f"{summary.seconds:.1f} s ({summary.cells_per_second:.1f} cells/s), "
        f"{summary.skipped} already in the results",
        soft_wrap=True,
        markup=False,
    )
    console.print(
        f"results: {results.path} (per-sample correctness: {results.correctness_path})", soft_wrap=True, markup=False
    )
    # One count per kind of prompt: the Low-Norm Effect of CoOp and Nemesis prompts is never pooled,
    # nor that of different corruption sites. Labels as the LNE tables give them: random weights
    # marked, several real weights named.
    weights = weights_names(with_prompt_kind(summary.cells)["weights"])
    reducing = with_prompt_kind(summary.reducing)
    columns = [*PROMPT_KIND, *([SITE] if several_sites(summary.corrupted) else [])]
    for kind, group in reducing.groupby(columns, dropna=False, sort=True):
        values = dict(zip(columns, kind, strict=True))
        label = kind_label(values, weights) + (f", {site_label(values[SITE])}" if SITE in values else "")
        raised = int((group["delta_acc"] > 0).sum())
        console.print(
            f"norm-reducing cells that raised accuracy, {label}: {raised} of {len(group)}", soft_wrap=True, markup=False
        )
    if len(summary.corrupted):
        console.print(_cells_table("best cells", summary.best()))
        console.print(_cells_table("worst cells", summary.worst()))
