"""The `nemesis` application: one typer app, each command group in its own module.

Command modules import torch, open_clip, pandas and matplotlib inside their commands, so `--help`
answers without loading them (a test checks this in a fresh process).
"""

from __future__ import annotations

from typing import Annotated

import typer

from nemesis import __version__

from . import analysis_commands, corrupt, data, demo, evaluate, models, prompt
from . import train as train_commands
from .common import OneLineErrorsGroup

app = typer.Typer(
    name="nemesis",
    cls=OneLineErrorsGroup,
    help="Soft prompts for CLIP-like models: train CoOp/Nemesis prompts, corrupt them, measure the Low-Norm Effect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"nemesis {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the toolkit's version."),
    ] = False,
) -> None:
    """Soft prompts for CLIP-like models: train CoOp/Nemesis prompts, corrupt them, measure the Low-Norm Effect."""


app.add_typer(prompt.app, name="prompt")
app.command("eval")(evaluate.eval_command)
app.command("corrupt")(corrupt.corrupt)
app.add_typer(data.app, name="data", help="Check CoOp-format data folders.")
app.command("plot-frequency")(analysis_commands.plot_frequency)
app.command("plot-depth")(analysis_commands.plot_depth)
app.command("plot-norms")(analysis_commands.plot_norms)
app.command("plot-transport")(analysis_commands.plot_transport)
app.command("report")(analysis_commands.report)
app.command("train")(train_commands.train)
app.command("pretrain-tiny")(train_commands.pretrain_tiny_command)
app.command("demo")(demo.demo)
app.command("models")(models.models)
