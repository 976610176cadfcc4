"""`nemesis data ...`: check CoOp-format data folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from nemesis.data.datasets import DATASET_NAMES, FASHION_MNIST, DatasetReport, check_dataset, resolve_name
from nemesis.errors import NemesisError

from .common import fail, reports_errors

app = typer.Typer(help="Check CoOp-format data folders.", no_args_is_help=True)


def _status(report: DatasetReport) -> str:
    if not report.found:
        return "missing"
    return "complete" if report.complete else "incomplete"


def _table(reports: list[DatasetReport]) -> Table:
    table = Table("dataset", "status", "train", "val", "test", "missing files")
    for report in reports:
        counts = [str(report.counts[split]) if report.found else "-" for split in ("train", "val", "test")]
        table.add_row(report.name, _status(report), *counts, str(len(report.missing)) if report.found else "-")
    return table


@app.command()
@reports_errors
def check(
    root: Annotated[
        Path | None, typer.Option(help="The data folder holding CoOp's dataset folders (oxford_pets/, ...).")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help=f"Check only this dataset: {', '.join(DATASET_NAMES)}.")] = None,
    show: Annotated[int, typer.Option(help="How many missing files to name per dataset.")] = 5,
) -> None:
    """Which datasets a data folder holds, samples per split, and the first missing files by name.

    Exits with code 2 when the dataset named with --dataset is missing or incomplete.

    Example: nemesis data check --root ~/data --dataset oxford_pets
    """
    names = [resolve_name(dataset)] if dataset else list(DATASET_NAMES)
    if root is None and names != [FASHION_MNIST]:
        raise NemesisError("pass --root DATA, the folder holding CoOp's dataset folders")
    if root is not None and not root.is_dir():
        raise NemesisError(f"data folder {root} does not exist; pass the folder holding CoOp's dataset folders")
    reports = [check_dataset(name, root) for name in names]
    Console().print(_table(reports))
    for report in reports:
        if not report.found and dataset:
            typer.echo(f"{report.name}: {report.problem}")
        elif report.missing:
            shown = ", ".join(report.missing[:show])
            more = f" and {len(report.missing) - show} more" if len(report.missing) > show else ""
            typer.echo(f"{report.name}: {len(report.missing)} missing: {shown}{more}")
    if dataset and not reports[0].complete:
        report = reports[0]
        reason = "not found" if not report.found else f"incomplete ({len(report.missing)} image files missing)"
        where = f" under {root}" if root is not None else ""
        raise fail(f"dataset '{report.name}' is {reason}{where}")
