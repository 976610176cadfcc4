"""`nemesis demo`: the whole pipeline on the embedded default, on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from analysis.layout import PaperLayout
from nemesis.atomic import prepare_output

from .common import ColumnOption, WidthOption, reports_errors


@reports_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for runs, sweep, figures and report.")] = Path("nemesis-demo"),
    width: WidthOption = None,
    column: ColumnOption = None,
) -> None:
    """Pretrain the tiny model, train CoOp and Nemesis prompts on Fashion-MNIST, sweep, base-to-new, plot, report.

    Example: nemesis demo --out nemesis-demo   (a few minutes on two CPU cores; reruns resume)
    """
    from figures.demo_pipeline import run_demo

    layout = PaperLayout.from_options(width, column)
    prepare_output(out, folder=True)

    outputs = run_demo(out, layout=layout)
    typer.echo(f"runs:    {len(outputs.runs)} run folders under {out / 'runs'}")
    typer.echo(f"sweep:   {outputs.sweep}")
    typer.echo(f"base-to-new: {outputs.base_to_new}")
    for path in outputs.figures:
        typer.echo(f"figure:  {path}")
    for path in outputs.report:
        typer.echo(f"report:  {path}")
