"""The paper's figures from frames: LNE frequency, position heat map, norm trajectories, few-shot curve.

Every function builds a `matplotlib.figure.Figure` on an Agg canvas without pyplot, so the
user's pyplot backend is neither needed nor changed, and returns it so tests can inspect the
artists. `save_figure` writes PNG and PDF atomically.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TABLEAU_COLORS
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from nemesis.atomic import atomic_path
from nemesis.errors import NemesisError

from .labels import dataset_name, shots_label
from .low_norm_effect import (
    DEFAULT_ALPHA,
    DEFAULT_BY,
    lne_frequency,
    mean_change_by_position,
    parse_by,
    require_rates,
)
from .results import Run
from .trajectories import epoch_frame

FIGURE_SUFFIXES = (".png", ".pdf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
METHOD_MARKERS = {"coop": "o", "nemesis": "^"}
DPI = 150


# ----------------------------------------------------------------------------- saving


def figure_paths(out: str | os.PathLike) -> list[Path]:
    """FIG, FIG.png or FIG.pdf -> [FIG.png, FIG.pdf]."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in FIGURE_SUFFIXES else out
    return [stem.with_name(stem.name + suffix) for suffix in FIGURE_SUFFIXES]


def save_figure(figure: Figure, out: str | os.PathLike) -> list[Path]:
    """Write `figure` as FIG.png and FIG.pdf; both appear together or neither does."""
    paths = figure_paths(out)
    with contextlib.ExitStack() as stack:
        temporaries = [stack.enter_context(atomic_path(path)) for path in paths]
        for temporary, path in zip(temporaries, paths, strict=True):
            figure.savefig(temporary, format=path.suffix[1:], dpi=DPI, bbox_inches="tight")
    return paths


# ----------------------------------------------------------------------------- helpers


def new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    """A figure drawn by Agg (headless), independent of pyplot's global state."""
    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _palette(count: int) -> list:
    """Tableau colours while they last, then evenly spaced hues."""
    if count <= len(TABLEAU_COLORS):
        return list(TABLEAU_COLORS.values())[:count]
    return [matplotlib.colormaps["hsv"](index / count) for index in range(count)]


def _category_order(values: pd.Series) -> list:
    """Distinct values in numeric order when numeric, missing values last."""
    present = values.dropna().unique().tolist()
    ordered = sorted(present)
    return ordered + ([None] if values.isna().any() else [])


def _category_label(column: str, value) -> str:
    if column == "shots":
        return shots_label(value)
    if column in ("dataset", "train_dataset"):
        return dataset_name(value)
    return "n/a" if value is None or pd.isna(value) else str(value)


def _same(value, other) -> bool:
    if value is None or pd.isna(value):
        return other is None or pd.isna(other)
    return other is not None and not pd.isna(other) and other == value


def _legend_outside(axes, title: str | None = None, handles=None) -> None:
    axes.legend(handles=handles, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


# ----------------------------------------------------------------------------- LNE frequency


def check_frequency_options(
    by: str | Sequence[str] = DEFAULT_BY,
    rate: bool = False,
    degradation: bool = False,
    significant: bool = False,
    margin: float = 0.0,
) -> list[str]:
    """The `by` columns, after refusing options the chosen figure would silently ignore."""
    columns = parse_by(by)
    if rate and degradation:
        raise NemesisError("--rate and --degradation plot different values; pass one of them")
    if columns == ["position"]:
        flags = {"--rate": rate, "--degradation": degradation, "--significant": significant, "--margin": margin != 0}
        given = [flag for flag, on in flags.items() if on]
        if given:
            raise NemesisError(
                f"--by position draws the mean accuracy change per position and factor and does not use "
                f"{', '.join(given)}; drop {'it' if len(given) == 1 else 'them'} or group by other columns"
            )
    if degradation and (significant or margin != 0):
        raise NemesisError(
            "--degradation plots the share of norm-increasing cells that lose accuracy; --significant and "
            "--margin only apply to LNE occurrences, drop them"
        )
    return columns


def frequency_table_and_figure(
    cells: pd.DataFrame,
    by: str | Sequence[str] = DEFAULT_BY,
    rate: bool = False,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    margin: float = 0.0,
    degradation: bool = False,
) -> tuple[pd.DataFrame, Figure]:
    """The frequency table of `lne_frequency` and its figure: the paper's LNE figure, the companion
    figure with `degradation` (share of norm-increasing cells that lower accuracy), or with
    `by="position"` the position x factor heat map of the mean accuracy change."""
    columns = check_frequency_options(by, rate=rate, degradation=degradation, significant=significant, margin=margin)
    table = lne_frequency(cells, columns, margin=margin, significant=significant, alpha=alpha)
    if columns == ["position"]:
        return table, plot_position_heatmap(cells)
    figure = plot_frequency_table(
        table, columns, rate=rate, significant=significant, alpha=alpha, margin=margin, degradation=degradation
    )
    return table, figure


def plot_frequency(
    cells: pd.DataFrame,
    by: str | Sequence[str] = DEFAULT_BY,
    rate: bool = False,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    margin: float = 0.0,
    degradation: bool = False,
) -> Figure:
    """The figure of `frequency_table_and_figure`."""
    return frequency_table_and_figure(cells, by, rate, significant, alpha, margin, degradation)[1]


def plot_frequency_table(
    table: pd.DataFrame,
    by: str | Sequence[str] = DEFAULT_BY,
    rate: bool = False,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    margin: float = 0.0,
    degradation: bool = False,
) -> Figure:
    """Draw a table from `lne_frequency`: x = shots (else the last `by` column) on a categorical
    axis, y = frequency, rate or (with `degradation`) degradation rate, one line with its own
    marker and colour per value of the other `by` columns (default: per dataset), legend outside
    the axes."""
    columns = parse_by(by)
    if rate and degradation:
        raise NemesisError("--rate and --degradation plot different values; pass one of them")
    if rate:
        require_rates(table, columns)
    if degradation:
        require_rates(table, columns, "degradation_rate")
    x_column = "shots" if "shots" in columns else columns[-1]
    series_columns = [column for column in columns if column != x_column]
    y_column = "degradation_rate" if degradation else "rate" if rate else "frequency"
    x_values = _category_order(table[x_column])
    if series_columns:
        keys = table[series_columns].drop_duplicates().sort_values(series_columns, na_position="last")
        series = [tuple(key) for key in keys.itertuples(index=False)]
    else:
        series = [()]
    colours = _palette(len(series))

    figure = new_figure(7.5, 4.5)
    axes = figure.subplots()
    for number, key in enumerate(series):
        rows = table
        for column, value in zip(series_columns, key, strict=True):
            rows = rows[rows[column].map(lambda other, value=value: _same(value, other))]
        positions, values = [], []
        for position, x_value in enumerate(x_values):
            match = rows[rows[x_column].map(lambda other, x_value=x_value: _same(x_value, other))]
            if not match.empty:
                positions.append(position)
                values.append(float(match[y_column].iloc[0]))  # one row: the table is grouped by exactly these
        label = " / ".join(_category_label(column, value) for column, value in zip(series_columns, key, strict=True))
        axes.plot(
            positions,
            values,
            marker=MARKERS[number % len(MARKERS)],
            color=colours[number],
            label=label or "all cells",
        )
    axes.set_xticks(range(len(x_values)), [_category_label(x_column, value) for value in x_values])
    axes.set_xlim(-0.5, len(x_values) - 0.5)
    axes.set_xlabel("shots per class" if x_column == "shots" else x_column)
    if degradation:
        axes.set_ylabel("share of norm-increasing cells that lower accuracy")
    elif rate:
        axes.set_ylabel("LNE rate (occurrences / norm-reducing cells)")
    else:
        axes.set_ylabel("LNE frequency (number of occurrences)")
    axes.set_ylim(bottom=0)
    if y_column == "frequency":
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
    axes.grid(axis="y", alpha=0.3)
    if degradation:
        axes.set_title("Norm-increasing cells that lower accuracy (Δacc < 0)")
    else:
        criterion = f"Δacc > {margin:g} pp" + (f", McNemar p < {alpha:g}" if significant else "")
        axes.set_title(f"Low-Norm Effect {'rate' if rate else 'frequency'} ({criterion})")
    legend_title = " / ".join(series_columns) if series_columns else None
    _legend_outside(axes, title=legend_title)
    figure.tight_layout()
    return figure


def plot_position_heatmap(cells: pd.DataFrame) -> Figure:
    """Mean accuracy change (delta_acc, pp) per position (rows) and factor (columns), one panel per op."""
    maps = mean_change_by_position(cells)
    largest = max(float(np.nanmax(np.abs(frame.to_numpy(dtype=float)), initial=0.0)) for frame in maps.values())
    largest = largest if largest > 0 else 1.0  # a symmetric colour scale around "no change"
    rows = max(len(frame) for frame in maps.values())
    figure = new_figure(4.5 * len(maps) + 1.5, 0.35 * rows + 2.0, layout="constrained")
    panels = figure.subplots(1, len(maps), squeeze=False)[0]
    factor_names = {"rescale": "tau", "replace": "sigma"}
    image = None
    for axes, (op, frame) in zip(panels, maps.items(), strict=True):
        values = frame.to_numpy(dtype=float)  # [positions, factors]
        image = axes.imshow(values, cmap="RdBu", vmin=-largest, vmax=largest, aspect="auto")
        axes.set_xticks(range(values.shape[1]), [f"{factor:g}" for factor in frame.columns])
        axes.set_yticks(range(values.shape[0]), [str(int(position)) for position in frame.index])
        if values.size <= 160:  # numbers stay legible only on small grids
            for (row, column), value in np.ndenumerate(values):
                if np.isfinite(value):
                    axes.text(column, row, f"{value:.1f}", ha="center", va="center", fontsize=7)
        axes.set_title(op)
        axes.set_xlabel(f"factor ({factor_names.get(op, 'factor')})")
        axes.set_ylabel("position")
    figure.colorbar(image, ax=list(panels), label="mean accuracy change (pp)")
    figure.suptitle("Mean accuracy change by corrupted position")
    return figure


# ----------------------------------------------------------------------------- norm trajectories


def plot_norms(runs: Sequence[Run]) -> Figure:
    """Test accuracy (left axis, solid) and mean prompt norm (right axis, dashed) against epoch.

    One series and colour per run, labelled with its method label (plus what tells it apart from
    runs sharing that label); CoOp runs use circles, Nemesis runs triangles.
    """
    if not runs:
        raise NemesisError("no runs to plot; pass run folders written by `nemesis train --out DIR`")
    frame = epoch_frame(runs)
    if frame.empty:
        raise NemesisError("the runs logged no epochs yet; wait for the first epoch to finish")
    # Grouped by run (the label is unique per run too, even for a folder passed twice): runs
    # sharing a method label must not merge into one line.
    series = list(frame.groupby(["run", "label"], sort=False))
    colours = _palette(len(series))
    figure = new_figure(8.0, 4.8)
    accuracy_axes = figure.subplots()
    norm_axes = accuracy_axes.twinx()
    handles = []
    for colour, ((_run, label), rows) in zip(colours, series, strict=True):
        marker = METHOD_MARKERS.get(str(rows["method"].iloc[0]), "s")
        evaluated = rows.dropna(subset=["test_acc"])
        style = {"color": colour, "marker": marker, "markersize": 4, "markevery": max(1, len(rows) // 15)}
        if not evaluated.empty:
            accuracy_axes.plot(evaluated["epoch"], evaluated["test_acc"], **style)
        norm_axes.plot(rows["epoch"], rows["mean_norm"], linestyle="--", fillstyle="none", **style)
        handles.append(Line2D([], [], color=colour, marker=marker, label=label))
    handles.append(Line2D([], [], color="black", linestyle="-", label="test accuracy (left)"))
    handles.append(Line2D([], [], color="black", linestyle="--", label="mean prompt norm (right)"))
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("test accuracy (%)")
    norm_axes.set_ylabel("mean prompt norm (L2)")
    datasets = sorted({dataset_name(value) for value in frame["dataset"]})
    accuracy_axes.set_title(f"Prompt norm and accuracy over training ({', '.join(datasets)})")
    accuracy_axes.grid(alpha=0.3)
    accuracy_axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.12, 1.0), borderaxespad=0.0)
    figure.tight_layout()
    return figure


# ----------------------------------------------------------------------------- few-shot curve


def plot_few_shot_curve(averages: pd.DataFrame) -> Figure:
    """Accuracy (averaged over datasets) against shots per class, one line per method.

    `averages` has columns method, shots, mean and optionally model and std (the few-shot table's
    average rows); a std is drawn as a band of +-1 std.
    """
    rows = averages.dropna(subset=["mean", "shots"])
    if rows.empty:
        raise NemesisError("no complete few-shot averages to plot; every method needs every dataset")
    group_columns = ["model", "method"] if "model" in rows and rows["model"].nunique() > 1 else ["method"]
    shots = _category_order(rows["shots"])
    keys = rows[group_columns].drop_duplicates().itertuples(index=False)
    keys = [tuple(key) for key in keys]
    colours = _palette(len(keys))
    figure = new_figure(7.0, 4.5)
    axes = figure.subplots()
    for number, key in enumerate(keys):
        selected = rows
        for column, value in zip(group_columns, key, strict=True):
            selected = selected[selected[column] == value]
        positions = np.array([shots.index(value) for value in selected["shots"]])
        order = np.argsort(positions)
        means = selected["mean"].to_numpy(dtype=float)[order]
        axes.plot(
            positions[order],
            means,
            marker=MARKERS[number % len(MARKERS)],
            color=colours[number],
            label=" / ".join(str(part) for part in key),
        )
        if "std" in selected and selected["std"].notna().any():
            spread = np.nan_to_num(selected["std"].to_numpy(dtype=float)[order])
            axes.fill_between(positions[order], means - spread, means + spread, color=colours[number], alpha=0.15)
    axes.set_xticks(range(len(shots)), [shots_label(value) for value in shots])
    axes.set_xlim(-0.5, len(shots) - 0.5)
    axes.set_xlabel("shots per class")
    axes.set_ylabel("test accuracy (%), average over datasets")
    axes.set_title("Few-shot classification")
    axes.grid(alpha=0.3)
    _legend_outside(axes)
    figure.tight_layout()
    return figure
