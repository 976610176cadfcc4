"""`nemesis report`: every table (and the few-shot curve) the inputs support, built, then written.

Everything is built in memory first, so bad input fails before a single file is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from nemesis.errors import NemesisError

from .defaults import DEFAULT_ALPHA, DEFAULT_BY
from .layout import DEFAULT_LAYOUT, PaperLayout
from .low_norm_effect import has_depth_sites
from .plots import figure_paths, plot_few_shot_curve, plot_lne_by_depth, save_figure
from .results import Inputs, load_inputs
from .tables import (
    LNE_BY_DEPTH,
    Table,
    base_to_new_results,
    base_to_new_table,
    domain_generalization_results,
    domain_generalization_table,
    few_shot_averages,
    few_shot_results,
    few_shot_table,
    lne_depth_table,
    lne_frequency_table,
    table_paths,
    unfinished_runs,
    weights_conflicts,
    write_table,
)

FEW_SHOT_CURVE = "few_shot_curve"


@dataclass
class Report:
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the inputs held that changed a table (`note:` lines)

    def paths(self, out_dir: str | os.PathLike) -> list[Path]:
        tables = [path for table in self.tables for path in table_paths(table, out_dir)]
        figures = [path for name in self.figures for path in figure_paths(Path(out_dir) / name)]
        return tables + figures


def build_report(
    inputs: Inputs,
    by: str | Sequence[str] = DEFAULT_BY,
    margin: float = 0.0,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    paper: bool = True,
    pool: bool = False,
    layout: PaperLayout = DEFAULT_LAYOUT,
) -> Report:
    """The tables the inputs support: few-shot (+ curve, sized by `layout`) from finished runs or
    own-dataset eval records, base-to-new and domain generalisation from eval records, LNE
    frequency (grouped by `by` and the kind of prompt, unless `pool`) from sweep tables, and where
    they hold (tower, layer) sites the LNE by tower, layer and position with its figure."""
    report = Report()
    skipped = len(unfinished_runs(inputs.runs))
    results = few_shot_results(inputs.runs, inputs.evals)
    if not results.empty:
        table = few_shot_table(results, paper=paper, skipped_runs=skipped)
        report.tables.append(table)
        averages = few_shot_averages(table)
        if not averages.dropna(subset=["mean", "shots"]).empty:  # a curve needs shots and a complete average
            report.figures[FEW_SHOT_CURVE] = plot_few_shot_curve(averages, layout)
    if inputs.evals is not None:
        if not base_to_new_results(inputs.evals).empty:
            report.tables.append(base_to_new_table(inputs.evals, paper=paper))
        if not domain_generalization_results(inputs.evals).empty:
            report.tables.append(domain_generalization_table(inputs.evals, paper=paper, runs=inputs.runs))
    if inputs.cells is not None:
        report.tables.append(
            lne_frequency_table(
                inputs.cells,
                by,
                margin=margin,
                significant=significant,
                alpha=alpha,
                paper=paper,
                duplicate_cells=inputs.duplicate_cells,
                pool=pool,
            )
        )
        if has_depth_sites(inputs.cells):  # prompts inside the towers: the LNE by tower, layer and position
            depth = lne_depth_table(inputs.cells, margin=margin, significant=significant, alpha=alpha, pool=pool)
            report.tables.append(depth)
            report.figures[depth.name] = plot_lne_by_depth(depth.data, pool=pool, layout=layout)
    conflicts = weights_conflicts(inputs.evals)
    for table in report.tables:
        if table.name not in ("lne_frequency", LNE_BY_DEPTH):  # the tables built from eval records
            table.notes.extend(conflicts)
    report.notes = [finding for table in report.tables for finding in table.findings] + conflicts
    if not report.tables:
        raise NemesisError(
            "the inputs support no report table: runs need to finish their epochs"
            + (f" ({skipped} unfinished skipped)" if skipped else "")
            + ", eval records need base+new or cross-dataset evaluations, or pass sweep tables"
        )
    return report


def write_report(report: Report, out_dir: str | os.PathLike) -> list[Path]:
    """Write every table as .md, .csv and .tex and every figure as .png and .pdf into `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NemesisError(f"--out {out_dir} is a file; pass a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in report.tables:
        written.extend(write_table(table, out_dir))
    for name, figure in report.figures.items():
        written.extend(save_figure(figure, out_dir / name))
    return written


def make_report(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    by: str | Sequence[str] = DEFAULT_BY,
    margin: float = 0.0,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    paper: bool = True,
    layout: PaperLayout = DEFAULT_LAYOUT,
) -> list[Path]:
    """Load `paths`, build every supported table and figure (sized by `layout`), write them into `out_dir`."""
    built = build_report(
        load_inputs(paths), by, margin=margin, significant=significant, alpha=alpha, paper=paper, layout=layout
    )
    return write_report(built, out_dir)
