"""`nemesis plot-frequency`, `nemesis plot-depth`, `nemesis plot-norms`, `nemesis plot-transport`,
`nemesis report`: wiring to `analysis`, no logic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from analysis.defaults import DEFAULT_ALPHA
from analysis.layout import PaperLayout
from nemesis.atomic import prepare_output
from nemesis.wording import plural

from .common import (
    ActivationOption,
    ColumnOption,
    MethodOptionOption,
    ModelOption,
    WeightsOption,
    WidthOption,
    reports_errors,
)

# pandas and matplotlib are imported inside the commands, so `--help` answers at once.

ResultsArgument = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Sweep tables (.parquet/.csv from `nemesis corrupt`) or folders searched for .parquet tables.",
        show_default=False,
    ),
]
FigureOption = Annotated[
    Path, typer.Option("--out", help="Figure path; FIG, FIG.png or FIG.pdf all write FIG.png and FIG.pdf.")
]
MarginOption = Annotated[
    float, typer.Option(help="An occurrence needs an accuracy gain above this many percentage points.")
]
SignificantOption = Annotated[
    bool,
    typer.Option("--significant", help="Also require the exact McNemar test on per-sample correctness: p < --alpha."),
]
AlphaOption = Annotated[float, typer.Option(help="Significance level of --significant.")]
PoolOption = Annotated[
    bool,
    typer.Option(
        "--pool",
        help="Count CoOp and Nemesis prompts, base-class and all-class prompts, random and real weights together "
        "(the title says so); "
        "by default each method and kind of prompt is its own group.",
    ),
]
ByOption = Annotated[
    str,
    typer.Option(
        help="Group columns of the LNE frequency, comma-separated (any sweep column, e.g. dataset,seed, position "
        "or site); corruption sites are kept apart even when not named."
    ),
]


def _echo_duplicates(count: int) -> None:
    if count:
        typer.echo(
            f"note: {plural(count, 'cell')} found in more than one results table {'was' if count == 1 else 'were'} "
            "counted once (first file's row)"
        )


@reports_errors
def plot_frequency(
    results: ResultsArgument = None,
    out: FigureOption = ...,
    rate: Annotated[
        bool, typer.Option("--rate", help="Plot occurrences / norm-reducing cells instead of the count.")
    ] = False,
    significant: SignificantOption = False,
    alpha: AlphaOption = DEFAULT_ALPHA,
    margin: MarginOption = 0.0,
    by: Annotated[
        str,
        typer.Option(
            help="Group columns, comma-separated: x axis = shots, one line per value of the others (and per "
            "corruption site where a table has several); "
            "'position' draws a position x factor heat map of the mean accuracy change "
            "(no --rate, --degradation, --significant or --margin there)."
        ),
    ] = "dataset,shots",
    degradation: Annotated[
        bool,
        typer.Option(
            "--degradation",
            help="Plot the companion figure: the share of norm-increasing cells that lower accuracy.",
        ),
    ] = False,
    pool: PoolOption = False,
    width: WidthOption = None,
    column: ColumnOption = None,
) -> None:
    """Plot how often the Low-Norm Effect occurs, the paper's figure; print the frequency table.

    Example: nemesis plot-frequency sweeps/ --out figures/lne_frequency --significant --column single
    """
    import analysis
    from analysis.plots import check_frequency_options
    from analysis.results import DUPLICATE_CELLS
    from analysis.tables import rounded

    check_frequency_options(by, rate=rate, degradation=degradation, significant=significant, margin=margin)
    layout = PaperLayout.from_options(width, column)
    prepare_output(out)
    cells = analysis.load_sweeps(results or [])
    table, figure = analysis.frequency_table_and_figure(
        cells, by, rate, significant, alpha, margin, degradation, pool, layout
    )
    paths = analysis.save_figure(figure, out)
    _echo_duplicates(cells.attrs.get(DUPLICATE_CELLS, 0))
    typer.echo(rounded(table, 2).to_string(index=False))
    for path in paths:
        typer.echo(f"wrote {path}")


@reports_errors
def plot_depth(
    results: ResultsArgument = None,
    out: FigureOption = ...,
    significant: SignificantOption = False,
    alpha: AlphaOption = DEFAULT_ALPHA,
    margin: MarginOption = 0.0,
    pool: PoolOption = False,
    width: WidthOption = None,
    column: ColumnOption = None,
) -> None:
    """Plot the Low-Norm Effect by tower and layer (prompts inside the towers: VPT, IVLP, MaPLe, PromptSRC);
    print its table by tower, layer and position.

    Example: nemesis plot-depth sweeps/maple.parquet --out figures/lne_by_depth --column single
    """
    import analysis
    from analysis.plots import depth_table_and_figure
    from analysis.results import DUPLICATE_CELLS
    from analysis.tables import rounded

    layout = PaperLayout.from_options(width, column)
    prepare_output(out)
    cells = analysis.load_sweeps(results or [])
    table, figure = depth_table_and_figure(cells, margin, significant, alpha, pool, layout)
    paths = analysis.save_figure(figure, out)
    _echo_duplicates(cells.attrs.get(DUPLICATE_CELLS, 0))
    typer.echo(rounded(table, 2).to_string(index=False))
    for path in paths:
        typer.echo(f"wrote {path}")


@reports_errors
def plot_norms(
    runs: Annotated[
        list[Path] | None,
        typer.Argument(help="Run folders of `nemesis train --out`, or folders holding them.", show_default=False),
    ] = None,
    out: FigureOption = ...,
    width: WidthOption = None,
    column: ColumnOption = None,
) -> None:
    """Plot test accuracy over mean prompt norm, two panels on one epoch axis, CoOp vs Nemesis, as in the paper.

    Example: nemesis plot-norms runs/cars-coop runs/cars-nemesis --out figures/norms --column single
    """
    import analysis

    layout = PaperLayout.from_options(width, column)
    prepare_output(out)
    loaded = analysis.load_runs(runs or [])
    paths = analysis.save_figure(analysis.plot_norms(loaded, layout), out)
    for path in paths:
        typer.echo(f"wrote {path}")


@reports_errors
def plot_transport(
    checkpoint: Annotated[
        Path, typer.Argument(help="A PLOT prompt: our prompt file or run folder, or an official PLOT Dassl file.")
    ],
    image: Annotated[int, typer.Option("--image", help="Index of the test image, in the test split's order.")],
    out: FigureOption = ...,
    dataset: Annotated[str | None, typer.Option(help="Dataset key (default: the checkpoint's own).")] = None,
    root: Annotated[
        Path | None, typer.Option(help="Folder holding the CoOp-format datasets (default: a run folder's own).")
    ] = None,
    model: ModelOption = None,
    pretrained: WeightsOption = None,
    activation: ActivationOption = None,
    epoch: Annotated[int | None, typer.Option(help="Epoch of a Dassl run folder (default: the latest).")] = None,
    prompt_method: Annotated[
        str | None, typer.Option(help="The prompt method: plot names a PLOT Dassl file (default: any).")
    ] = None,
    method_option: MethodOptionOption = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache folder (default: the user cache).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    width: WidthOption = None,
    column: ColumnOption = None,
) -> None:
    """Draw a test image's PLOT transport plans for its true and predicted class: one panel per prompt.

    Example: nemesis plot-transport runs/dtd-plot --image 12 --out figures/transport --column single
    """
    import analysis
    from analysis.transport import transport_figure
    from nemesis.methods import option_pairs

    layout = PaperLayout.from_options(width, column)
    prepare_output(out)
    figure = transport_figure(
        checkpoint, image, layout=layout, root=root, cache_dir=cache_dir, device=device, epoch=epoch,
        prompt_method=prompt_method, model=model, pretrained=pretrained, dataset=dataset, activation=activation,
        method_options=option_pairs(method_option or []),
    )  # fmt: skip
    for path in analysis.save_figure(figure, out):
        typer.echo(f"wrote {path}")


@reports_errors
def report(
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Run folders, sweep tables (.parquet/.csv), eval records (.jsonl), or folders holding them.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the tables (.md, .csv, .tex) and figures.")] = ...,
    by: ByOption = "dataset,shots",
    margin: MarginOption = 0.0,
    significant: SignificantOption = False,
    alpha: AlphaOption = DEFAULT_ALPHA,
    # "\\[" keeps rich from reading "[paper]" as markup and dropping the word.
    paper: Annotated[
        bool, typer.Option("--paper/--no-paper", help="Add the paper's published numbers as \\[paper] rows.")
    ] = True,
    pool: PoolOption = False,
    width: WidthOption = None,
    column: ColumnOption = None,
) -> None:
    """Write the few-shot, base-to-new, domain-generalisation and LNE frequency tables the inputs support.

    Example: nemesis report runs/ sweeps/ evals.jsonl --out report/ --by dataset,shots
    """
    import analysis
    from analysis.low_norm_effect import parse_by

    layout = PaperLayout.from_options(width, column)
    prepare_output(out, folder=True)
    loaded = analysis.load_inputs(inputs or [])
    built = analysis.build_report(
        loaded, parse_by(by), margin=margin, significant=significant, alpha=alpha, paper=paper, pool=pool,
        layout=layout,
    )  # fmt: skip
    _echo_duplicates(loaded.duplicate_cells)
    for note in built.notes:
        typer.echo(f"note: {note}", err=True)
    for path in analysis.write_report(built, out):
        typer.echo(f"wrote {path}")
