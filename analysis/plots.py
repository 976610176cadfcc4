"""The paper's figures from frames: LNE frequency, position heat map, norm trajectories, few-shot curve.

Every function builds a `matplotlib.figure.Figure` on an Agg canvas without pyplot, so the
user's pyplot backend is neither needed nor changed, and returns it so tests can inspect the
artists. Each takes a `PaperLayout` (default: the double-column width): the figure is drawn as
wide as it is printed, with no text below 7 pt and its legend below the axes. `save_figure`
writes PNG and PDF atomically, at exactly that size.
"""

from __future__ import annotations

import contextlib
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TABLEAU_COLORS
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from nemesis.atomic import atomic_path
from nemesis.errors import NemesisError
from nemesis.penalties import NEMESIS, NO_PENALTY
from nemesis.wording import plural

from .defaults import DEFAULT_ALPHA, DEFAULT_BY
from .labels import dataset_name, kind_label, shots_label, site_label, weights_names
from .layout import DEFAULT_LAYOUT, PaperLayout
from .low_norm_effect import (
    DEGRADATION_RATE,
    DEPTH_COLUMNS,
    DEPTH_POOLED_NOTE,
    LAYER,
    MEAN_CHANGE,
    POOLED_NOTE,
    PROMPT_KIND,
    RATE,
    SITE,
    TOWER,
    apart_columns,
    group_columns,
    lne_by_depth,
    lne_by_layer,
    lne_frequency,
    mean_change_by_position,
    parse_by,
    reducing_share_by_factor,
    require_rates,
    with_prompt_kind,
)
from .results import Run
from .trajectories import epoch_frame

FIGURE_SUFFIXES = (".png", ".pdf")
SINGLE_SUFFIXES = (".svg",)  # `--out fig.svg` writes that one file
# Conferences require embedded TrueType (Type 42) fonts in PDFs, not Type 3 bitmaps.
SAVE_SETTINGS = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "path"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
PENALTY_MARKERS = {NO_PENALTY: "o", NEMESIS: "^"}  # norm trajectories: runs with Nemesis stand apart
DPI = 150


# ----------------------------------------------------------------------------- saving


def figure_paths(out: str | os.PathLike) -> list[Path]:
    """FIG, FIG.png or FIG.pdf -> [FIG.png, FIG.pdf]; FIG.svg -> [FIG.svg]."""
    out = Path(out)
    if out.suffix.lower() in SINGLE_SUFFIXES:
        return [out]
    stem = out.with_suffix("") if out.suffix.lower() in FIGURE_SUFFIXES else out
    return [stem.with_name(stem.name + suffix) for suffix in FIGURE_SUFFIXES]


def save_figure(figure: Figure, out: str | os.PathLike) -> list[Path]:
    """Write `figure` as FIG.png and FIG.pdf (Type 42 fonts), or only FIG.svg; all appear or none does."""
    paths = figure_paths(out)
    with contextlib.ExitStack() as stack:
        temporaries = [stack.enter_context(atomic_path(path)) for path in paths]
        with matplotlib.rc_context(SAVE_SETTINGS):
            for temporary, path in zip(temporaries, paths, strict=True):
                # No tight bounding box: the file keeps the layout's width, the one its fonts were sized for.
                figure.savefig(temporary, format=path.suffix[1:].lower(), dpi=DPI)
    return paths


# ----------------------------------------------------------------------------- helpers


def new_figure(layout: PaperLayout, height: float) -> Figure:
    """A figure `layout.width_in` wide drawn by Agg (headless), independent of pyplot's global state.

    Constrained layout fits labels, colour bars and a legend below the axes inside this size.
    """
    figure = Figure(figsize=(layout.width_in, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _finish(figure: Figure, layout: PaperLayout) -> Figure:
    """Tick labels made while drawing, after the build's font settings are gone, keep the small size."""
    for axes in figure.axes:
        axes.tick_params(labelsize=layout.small_size)
    return figure


def _legend_below(figure: Figure, handles: list, title: str | None = None) -> None:
    """One legend under the axes, in as many columns as the figure's width holds.

    Below, not beside: a legend to the right makes the figure wider than the column it was sized for.
    """
    renderer = figure.canvas.get_renderer()
    for columns in range(len(handles), 0, -1):
        legend = figure.legend(handles=handles, title=title, loc="outside lower center", ncols=columns, frameon=False)
        if columns == 1 or legend.get_window_extent(renderer).width <= 0.98 * figure.bbox.width:
            return
        legend.remove()


def _palette(count: int) -> list:
    """Tableau colours while they last, then evenly spaced hues."""
    if count <= len(TABLEAU_COLORS):
        return list(TABLEAU_COLORS.values())[:count]
    return [matplotlib.colormaps["hsv"](index / count) for index in range(count)]


def _category_order(values: pd.Series) -> list:
    """Distinct values in numeric order when numeric (a categorical column: its own order), missing values last."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        return [category for category in values.cat.categories if (values == category).any()]
    present = values.dropna().unique().tolist()
    ordered = sorted(present)
    return ordered + ([None] if values.isna().any() else [])


def _category_label(column: str, value) -> str:
    if column == "shots":
        return shots_label(value)
    if column == "seed":  # a bare "1" in a legend reads as anything
        return "seed n/a" if value is None or pd.isna(value) else f"seed {int(value)}"
    if column in ("dataset", "train_dataset", "trained_on"):
        return dataset_name(value)
    if column == SITE:
        return site_label(value)
    return "n/a" if value is None or pd.isna(value) else str(value)


def _series_label(columns: Sequence[str], key: Sequence, fixed: dict | None = None, weights: dict | None = None) -> str:
    """A legend label: the grouping values, the kind of prompt (with the `fixed` kind values) as one
    phrase; `weights`: `weights_names` of the plotted table."""
    values = dict(zip(columns, key, strict=True))
    parts = [_category_label(column, value) for column, value in values.items() if column not in PROMPT_KIND]
    if any(column in values for column in PROMPT_KIND):
        parts.append(kind_label((fixed or {}) | values, weights))  # a column not grouped by is not a distinction
    return " / ".join(parts)


def _weights_names(table: pd.DataFrame) -> dict:
    return weights_names(table["weights"]) if "weights" in table else {}


def _single_kind(table: pd.DataFrame, columns: Sequence[str]) -> dict:
    """The prompt-kind columns among `columns` that hold one value only: said once, not in every label."""
    return {
        column: table[column].iloc[0]
        for column in columns
        if column in PROMPT_KIND and len(table) and table[column].nunique(dropna=False) == 1
    }


def _same(value, other) -> bool:
    if value is None or pd.isna(value):
        return other is None or pd.isna(other)
    return other is not None and not pd.isna(other) and other == value


def _rows_where(rows: pd.DataFrame, column: str, value) -> pd.DataFrame:
    """The rows whose `column` is `value` (missing matches missing). The mask is made boolean: on no rows
    `map` gives an object Series, which pandas would read as column labels."""
    return rows[rows[column].map(lambda other: _same(value, other)).astype(bool)]


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
    pool: bool = False,
    layout: PaperLayout = DEFAULT_LAYOUT,
) -> tuple[pd.DataFrame, Figure]:
    """The frequency table of `lne_frequency` and its figure: the paper's LNE figure, the companion
    figure with `degradation` (share of norm-increasing cells that lower accuracy), or with
    `by="position"` the position x factor heat map of the mean accuracy change. Kinds of prompt
    (method, class subset, training dataset, weights) stay apart unless `pool`; `layout` sizes the figure."""
    columns = check_frequency_options(by, rate=rate, degradation=degradation, significant=significant, margin=margin)
    table = lne_frequency(cells, columns, margin=margin, significant=significant, alpha=alpha, pool=pool)
    if columns == ["position"]:
        return table, plot_position_heatmap(cells, pool=pool, layout=layout)
    figure = plot_frequency_table(
        table, columns, rate=rate, significant=significant, alpha=alpha, margin=margin, degradation=degradation,
        pool=pool, layout=layout,
    )  # fmt: skip
    return table, figure


def plot_frequency(cells: pd.DataFrame, by: str | Sequence[str] = DEFAULT_BY, **options: Any) -> Figure:
    """The figure of `frequency_table_and_figure` (same options: rate, significant, alpha, margin,
    degradation, pool, layout)."""
    return frequency_table_and_figure(cells, by, **options)[1]


def plot_frequency_table(
    table: pd.DataFrame,
    by: str | Sequence[str] = DEFAULT_BY,
    rate: bool = False,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    margin: float = 0.0,
    degradation: bool = False,
    pool: bool = False,
    layout: PaperLayout = DEFAULT_LAYOUT,
) -> Figure:
    """Draw a table from `lne_frequency`: x = shots (else the last `by` column) on a categorical
    axis, y = frequency, rate or (with `degradation`) degradation rate in percent, one line with
    its own marker and colour per value of the other `by` columns and kind of prompt (default: per
    dataset and method, and per corruption site where the table has them apart), legend below the axes."""
    columns = group_columns(by, pool, sites=SITE in table.columns)
    columns = [column for column in columns if column in table.columns]
    if rate and degradation:
        raise NemesisError("--rate and --degradation plot different values; pass one of them")
    if rate:
        require_rates(table, columns)
    if degradation:
        require_rates(table, columns, DEGRADATION_RATE)
    fixed = _single_kind(table, columns)
    weights = _weights_names(table)
    asked = [column for column in parse_by(by) if column in columns]  # without the prompt-kind columns
    if METHOD in asked:  # the cross-method figure: one category per kind of prompt, series by the rest
        table, columns, fixed = _kinds_as_methods(table, columns, weights), _without_kinds(columns), {}
        x_column = METHOD
    else:
        x_column = "shots" if "shots" in asked else asked[-1]
    series_columns = [column for column in columns if column != x_column and column not in fixed]
    y_column = DEGRADATION_RATE if degradation else RATE if rate else "frequency"
    x_values = _category_order(table[x_column])
    if series_columns:
        keys = table[series_columns].drop_duplicates().sort_values(series_columns, na_position="last")
        series = [tuple(key) for key in keys.itertuples(index=False)]
    else:
        series = [()]
    colours = _palette(len(series))
    with layout.fonts():
        figure = new_figure(layout, layout.height_in(0.62, most=3.6))
        axes = figure.subplots()
        for number, key in enumerate(series):
            rows = table
            for column, value in zip(series_columns, key, strict=True):
                rows = _rows_where(rows, column, value)
            positions, values = [], []
            for position, x_value in enumerate(x_values):
                match = _rows_where(rows, x_column, x_value)
                if not match.empty:
                    positions.append(position)
                    values.append(float(match[y_column].iloc[0]))  # one row: the table is grouped by exactly these
            label = _series_label(series_columns, key, fixed, weights)
            if x_column == METHOD:  # series side by side within each method's slot, so equal values stay visible
                positions = [position + _dodge(number, len(series)) for position in positions]
            axes.plot(
                positions,
                values,
                marker=MARKERS[number % len(MARKERS)],
                color=colours[number],
                label=label or "all cells",
                linestyle="" if x_column == METHOD else "-",  # methods are categories, not a progression
            )
        ticks = [_category_label(x_column, value) for value in x_values]
        if x_column == METHOD:  # long labels ("CoOp+Nemesis (PUN, weight 1)") on lines of their own
            ticks = [textwrap.fill(tick, width=max(12, int(90 / max(len(ticks), 1)))) for tick in ticks]
        axes.set_xticks(range(len(x_values)), ticks)
        axes.set_xlim(-0.5, len(x_values) - 0.5)
        axes.set_xlabel({"shots": "shots per class", METHOD: "prompts"}.get(x_column, x_column))
        if degradation:
            axes.set_ylabel("norm-increasing cells that lower accuracy (%)")
        elif rate:
            axes.set_ylabel("LNE rate (% of norm-reducing cells)")
        else:
            axes.set_ylabel("LNE frequency (number of occurrences)")
        plotted = table[y_column].astype(float)
        _y_headroom(axes, float(plotted.max()) if len(plotted) else 0.0, percent=y_column != "frequency")
        if y_column == "frequency":
            axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
        axes.grid(axis="y", alpha=0.3)
        title = _frequency_title(table, columns, fixed, weights, rate, significant, alpha, margin, degradation, pool)
        axes.set_title(layout.wrap(title), loc="left")
        names = [column for column in series_columns if column not in PROMPT_KIND]
        if len(names) < len(series_columns):
            names.append("prompts")
        _legend_below(figure, axes.get_lines(), title=" / ".join(names) if names else None)
    return _finish(figure, layout)


METHOD = "method"


def _dodge(number: int, count: int) -> float:
    """The x offset of series `number` of `count` in a category's slot (together at most 0.6 wide)."""
    return (number - (count - 1) / 2) * min(0.12, 0.6 / max(count, 1))


def _kinds_as_methods(table: pd.DataFrame, columns: Sequence[str], weights: dict) -> pd.DataFrame:
    """`table` with its `method` column holding each row's kind of prompt as one label ("CoOp+KgCoOp",
    "PLOT", "CoOp (base classes)"), in the order the methods come, so `--by method` compares methods."""
    kinds = [column for column in columns if column in PROMPT_KIND]
    labels = [
        kind_label(dict(zip(kinds, values, strict=True)), weights) for values in table[kinds].itertuples(index=False)
    ]
    order = list(dict.fromkeys(label for _, label in sorted(zip(table[METHOD].astype(str), labels, strict=True))))
    return table.assign(**{METHOD: pd.Categorical(labels, categories=order, ordered=True)})


def _without_kinds(columns: Sequence[str]) -> list[str]:
    """The grouping columns besides the prompt-kind ones, then `method`: the kinds' label."""
    return [column for column in columns if column not in PROMPT_KIND] + [METHOD]


def _frequency_title(table, columns, fixed, weights, rate, significant, alpha, margin, degradation, pool) -> str:
    """What is plotted and what each point pools (cells, norm-reducing or -increasing ones, summed columns)."""
    if degradation:
        title = "Norm-increasing cells that lower accuracy (Δacc < 0)"
    else:
        criterion = f"Δacc > {margin:g} pp" + (f", McNemar p < {alpha:g}" if significant else "")
        title = f"Low-Norm Effect {'rate' if rate else 'frequency'} ({criterion})"
    counted = "increasing" if degradation else "reducing"
    pooled = f"; {POOLED_NOTE}" if pool else ""
    if fixed and len(fixed) == len([column for column in columns if column in PROMPT_KIND]):
        pooled = f"; prompts: {_series_label(list(fixed), list(fixed.values()), weights=weights)}" + pooled
    return (
        f"{title}\neach point: {_count_range(table['cells'])} corrupted cells ({_count_range(table[counted])} "
        f"norm-{counted}), {_summed_over(columns)}{pooled}"
    )


# What a frequency point can sum over, unless grouped by it: (column, as the title names it).
SUMMED_COLUMNS = (("dataset", "datasets"), ("shots", "shots"), ("seed", "seeds"), ("position", "positions"))


def _summed_over(columns: Sequence[str]) -> str:
    """ "summed over seeds, positions and factors" for the default grouping: what the points pool."""
    names = [name for column, name in SUMMED_COLUMNS if column not in columns]
    names += [] if "factor" in columns else ["factors"]
    if not names:
        return "one setting each"
    return "summed over " + (f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0])


def _count_range(counts: pd.Series) -> str:
    """ "480" when every point pools as many, else "120-480"."""
    low, high = int(counts.min()), int(counts.max())
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def _y_headroom(axes, top: float, percent: bool = False, bottom: float = 0.0) -> None:
    """Room above the highest value so no line or marker sits on the frame; percents stop at 100 (+ room)."""
    if not np.isfinite(top) or top <= bottom:
        top = bottom + (10.0 if percent else 1.0)
    axes.set_ylim(bottom, top + 0.12 * (top - bottom))


# Narrower than this a heat-map panel has no room for its factor labels and cell numbers.
HEATMAP_PANEL_PT = 180.0
CELL_NUMBER = "-00.0"  # the widest number a heat-map cell shows


def plot_position_heatmap(cells: pd.DataFrame, pool: bool = False, layout: PaperLayout = DEFAULT_LAYOUT) -> Figure:
    """Mean accuracy change (delta_acc, pp) per position (rows) and factor (columns), one panel per
    op, corruption site (where there are several) and kind of prompt (unless `pool`), in rows of as
    many panels as `layout`'s width holds. Cell text is dark on light cells and light on dark ones,
    shown where it fits; a vertical rule separates the factors that reduce the norm (left) from
    those that increase it."""
    maps = mean_change_by_position(cells, pool=pool)
    largest = max(float(np.nanmax(np.abs(frame.to_numpy(dtype=float)), initial=0.0)) for frame in maps.values())
    largest = largest if largest > 0 else 1.0  # a symmetric colour scale around "no change"
    positions = max(len(frame) for frame in maps.values())
    columns = max(1, min(len(maps), int(layout.width_pt // HEATMAP_PANEL_PT)))
    rows_count = math.ceil(len(maps) / columns)
    panel_height = min(max(0.13 * positions + 1.2, 2.0), 4.5)  # inches: about 9 pt a position, plus labels
    corrupted = with_prompt_kind(cells[cells["op"] != "original"])
    kind_columns = apart_columns(corrupted, pool)  # the key order of `mean_change_by_position`
    single = _single_kind(corrupted, kind_columns)
    weights = _weights_names(corrupted)
    share = 0.85 / columns  # of the figure's width, left for one panel beside the colour bar
    with layout.fonts():
        figure = new_figure(layout, panel_height * rows_count + 0.4)
        grid = figure.subplots(rows_count, columns, squeeze=False).ravel()
        for axes in grid[len(maps) :]:
            axes.remove()  # an empty slot of the last row
        image = None
        for axes, (key, frame) in zip(grid, maps.items(), strict=False):
            op, kind = key[0], dict(zip(kind_columns, key[1:], strict=True))
            panel_cells = corrupted[corrupted["op"] == op]
            for column, value in kind.items():
                panel_cells = _rows_where(panel_cells, column, value)
            image = _heatmap_panel(axes, frame, largest, layout, share)
            _rule_between_reducing_and_increasing(axes, reducing_share_by_factor(panel_cells).reindex(frame.columns))
            varying = {column: value for column, value in kind.items() if column not in single}
            title = f"{op}, {_series_label(list(varying), list(varying.values()), single, weights)}" if varying else op
            axes.set_title(layout.wrap(title, share))
            rule = "; norm-reducing factors left of the rule" if axes.lines else ""
            factor_name = {"rescale": "tau", "replace": "sigma"}.get(op, "factor")
            label = f"factor ({factor_name})\n{plural(len(panel_cells), 'cell')}{rule}"
            axes.set_xlabel(layout.wrap(label, share))
            axes.set_ylabel("position")
        figure.colorbar(image, ax=list(grid[: len(maps)]), label="mean accuracy change (pp)")
        pooled = f" ({POOLED_NOTE})" if pool else ""
        if single and len(single) == len([column for column in kind_columns if column in PROMPT_KIND]):
            pooled = f" (prompts: {_series_label(list(single), list(single.values()), weights=weights)})"
        figure.suptitle(layout.wrap(f"Mean accuracy change by corrupted position{pooled}", size=layout.title_size))
    return _finish(figure, layout)


def _heatmap_panel(axes, frame: pd.DataFrame, largest: float, layout: PaperLayout, share: float):
    """One op's position x factor map on a colour scale symmetric around 0, numbers in the cells that hold them."""
    colour_map = matplotlib.colormaps["RdBu"]
    values = frame.to_numpy(dtype=float)  # [positions, factors]
    image = axes.imshow(values, cmap=colour_map, vmin=-largest, vmax=largest, aspect="auto")
    factors = [f"{factor:g}" for factor in frame.columns]
    cell_width = layout.width_pt * share / max(1, values.shape[1])  # points
    # Labels that leave less than a character's gap in their cell would run into each other: stand them up.
    crowded = max(map(len, factors), default=0) + 1 > layout.characters(cell_width, layout.small_size)
    axes.set_xticks(range(values.shape[1]), factors, rotation=90 if crowded else 0)
    axes.set_yticks(range(values.shape[0]), [str(int(position)) for position in frame.index])
    if values.size <= 160 and len(CELL_NUMBER) <= layout.characters(cell_width, layout.small_size):
        for (row, column), value in np.ndenumerate(values):
            if np.isfinite(value):
                red, green, blue, _ = colour_map(0.5 + 0.5 * value / largest)
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # perceived brightness
                shown = round(value, 1) + 0.0  # + 0.0 turns -0.0 (a change that rounds away) into 0.0
                axes.text(column, row, f"{shown:.1f}", ha="center", va="center", fontsize=layout.small_size,
                          color="white" if dark else "black")  # fmt: skip
    return image


def _rule_between_reducing_and_increasing(axes, reducing_share: pd.Series) -> None:
    """A vertical rule after the factors that mostly reduce the norm, when they all come first."""
    reducing = [index for index, value in enumerate(reducing_share.to_numpy(dtype=float)) if value >= 0.5]
    if reducing and len(reducing) < len(reducing_share) and reducing == list(range(len(reducing))):
        axes.axvline(len(reducing) - 0.5, color="black", linewidth=1.5)


# ----------------------------------------------------------------------------- norm trajectories


def _norm_series(frame: pd.DataFrame) -> list[tuple[tuple, str, pd.DataFrame, int]]:
    """(panel key, legend label, epoch rows, seeds) per series: runs that differ only by seed are one
    series (their mean, a band for the spread); any other runs keep a series each."""
    series = []
    for (dataset, shots, _method, _penalty, label), rows in frame.groupby(
        ["dataset", "shots", "method", "penalty", "method_label"], sort=False, dropna=False
    ):
        runs = rows[["run", "seed"]].drop_duplicates()
        if len(runs) > 1 and runs["seed"].is_unique and runs["seed"].notna().all():
            series.append(((dataset, shots), str(label), rows, len(runs)))
            continue
        for _run, run_rows in rows.groupby("run", sort=False):
            series.append(((dataset, shots), str(run_rows["label"].iloc[0]), run_rows, 1))
    return series


def _panel_title(dataset, shots, seeds: set[int]) -> str:
    shots_text = f"{shots_label(shots)} shot{'' if str(shots) == '1' else 's'}"
    seeds_text = plural(max(seeds), "seed") if len(seeds) == 1 else "seeds vary"
    return f"{dataset_name(dataset)}, {shots_text} ({seeds_text} per line)"


# Narrower than this a pair of norm panels crowds its epoch ticks; more than three a row are unreadable.
NORM_PANEL_PT = 190.0
MOST_NORM_COLUMNS = 3
LINE_STYLES = ("-", "--", "-.", ":")  # with colour and marker, a series stays apart in grey print too


def plot_norms(runs: Sequence[Run], layout: PaperLayout = DEFAULT_LAYOUT) -> Figure:
    """Test accuracy (upper panel) and mean prompt norm (lower panel) against a shared epoch axis.

    Runs that differ only by seed become one series: the mean over seeds, with a band of ±1 std.
    One pair of panels per dataset and shot count when the runs differ in them, as many pairs a row
    as `layout`'s width holds; every accuracy panel has the same y range, and every norm panel, so
    panels compare at a glance. Each method label has its colour, marker and line style (CoOp
    circles, Nemesis triangles), the same in both panels; the legend sits below the panels.
    """
    if not runs:
        raise NemesisError("no runs to plot; pass run folders written by `nemesis train --out DIR`")
    frame = epoch_frame(runs)
    if frame.empty:
        raise NemesisError("the runs logged no epochs yet; wait for the first epoch to finish")
    labels_by_run = {str(run.path): run.label for run in runs}
    frame["method_label"] = frame["run"].map(labels_by_run).fillna(frame["label"])
    series = _norm_series(frame)
    panels = list(dict.fromkeys(key for key, _, _, _ in series))
    labels = list(dict.fromkeys(label for _, label, _, _ in series))
    styles = {
        label: {"color": colour, "linestyle": LINE_STYLES[number % len(LINE_STYLES)]}
        for number, (label, colour) in enumerate(zip(labels, _palette(len(labels)), strict=True))
    }
    columns = max(1, min(len(panels), MOST_NORM_COLUMNS, int(layout.width_pt // NORM_PANEL_PT)))
    blocks = math.ceil(len(panels) / columns)
    with layout.fonts():
        figure = new_figure(layout, blocks * layout.height_in(0.55, most=3.2) + 0.6)
        grid = figure.subplots(2 * blocks, columns, squeeze=False)
        pairs = [(grid[2 * (index // columns)][index % columns], grid[2 * (index // columns) + 1][index % columns])
                 for index in range(len(panels))]  # fmt: skip
        for index in range(len(panels), blocks * columns):  # empty slots of the last row
            grid[2 * (index // columns)][index % columns].remove()
            grid[2 * (index // columns) + 1][index % columns].remove()
        handles, banded, tops = {}, False, {"test_acc": [0.0], "mean_norm": [0.0]}
        for (accuracy_axes, norm_axes), key in zip(pairs, panels, strict=True):
            accuracy_axes.sharex(norm_axes)  # one epoch axis for the pair
            seeds = set()
            for panel, label, rows, count in series:
                if panel != key:
                    continue
                seeds.add(count)
                banded |= count > 1
                style = styles[label] | {"marker": PENALTY_MARKERS.get(str(rows["penalty"].iloc[0]), "s")}
                tops["test_acc"].append(_draw_mean_and_band(accuracy_axes, rows, "test_acc", style))
                tops["mean_norm"].append(_draw_mean_and_band(norm_axes, rows, "mean_norm", style))
                handles.setdefault(label, Line2D([], [], **style, label=label))
            accuracy_axes.set_title(layout.wrap(_panel_title(*key, seeds), 0.95 / columns))
        _label_norm_panels(pairs, columns, max(tops["test_acc"]), max(tops["mean_norm"]))
        keys = list(handles.values())
        if banded:
            keys.append(Patch(color="grey", alpha=0.3, label="band: ±1 std over seeds"))
        _legend_below(figure, keys)
        title = (
            f"Prompt norm and accuracy over training: {plural(len(runs), 'run')}, "
            f"{plural(frame['seed'].nunique(), 'seed')}; lines are means over seeds"
        )
        figure.suptitle(layout.wrap(title, size=layout.title_size))
    return _finish(figure, layout)


def _draw_mean_and_band(axes, rows: pd.DataFrame, column: str, style: dict) -> float:
    """The mean of `column` per epoch over the series' runs, and a ±1 std band where there are several;
    returns the highest value drawn (0 when the runs logged none)."""
    values = rows.groupby("epoch", sort=True)[column].agg(["mean", "std"]).dropna(subset=["mean"])
    if values.empty:
        return 0.0
    axes.plot(values.index, values["mean"], markevery=max(1, len(values) // 12), **style)
    spread = values["std"].fillna(0)
    if spread.any():
        axes.fill_between(values.index, values["mean"] - spread, values["mean"] + spread,
                          color=style["color"], alpha=0.15, linewidth=0)  # fmt: skip
    return float((values["mean"] + spread).max())


def _label_norm_panels(pairs: list, columns: int, accuracy_top: float, norm_top: float) -> None:
    """Accuracy panels share one y range up to `accuracy_top` (+ room), norm panels another up to
    `norm_top`; axis labels only where they are not repeated."""
    accuracy_panels = [accuracy_axes for accuracy_axes, _ in pairs]
    norm_panels = [norm_axes for _, norm_axes in pairs]
    for panels in (accuracy_panels, norm_panels):
        for axes in panels[1:]:
            axes.sharey(panels[0])
    for index, (accuracy_axes, norm_axes) in enumerate(pairs):
        accuracy_axes.tick_params(labelbottom=False)  # the norm panel below shows the epochs
        norm_axes.set_xlabel("epoch")
        norm_axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 2.5
        if index % columns == 0:
            accuracy_axes.set_ylabel("test accuracy (%)")
            norm_axes.set_ylabel("mean prompt norm (L2)")
        else:
            accuracy_axes.tick_params(labelleft=False)
            norm_axes.tick_params(labelleft=False)
        for axes in (accuracy_axes, norm_axes):
            axes.grid(alpha=0.3)
    first_accuracy, first_norm = accuracy_panels[0], norm_panels[0]
    _y_headroom(first_accuracy, accuracy_top, percent=True, bottom=max(0.0, min(first_accuracy.get_ylim()[0], 100.0)))
    _y_headroom(first_norm, norm_top, bottom=max(0.0, first_norm.get_ylim()[0]))


def axes_width_share(figure: Figure) -> float:
    """Width of the panels (leftmost to rightmost axes) over the width of everything drawn (its tight
    bounding box): a legend must not squeeze the axes."""
    renderer = figure.canvas.get_renderer()
    visible = [axes for axes in figure.axes if axes.get_visible()]
    left = min(axes.get_window_extent(renderer).x0 for axes in visible)
    right = max(axes.get_window_extent(renderer).x1 for axes in visible)
    drawn = figure.get_tightbbox(renderer)  # inches
    return (right - left) / figure.dpi / drawn.width


# ----------------------------------------------------------------------------- few-shot curve


def plot_few_shot_curve(averages: pd.DataFrame, layout: PaperLayout = DEFAULT_LAYOUT) -> Figure:
    """Accuracy (averaged over datasets) against shots per class, one line per method.

    `averages` has columns method, shots, mean and optionally model and std (the few-shot table's
    average rows); a std is drawn as a band of +-1 std. `layout` sizes the figure; the legend sits below.
    """
    rows = averages.dropna(subset=["mean", "shots"])
    if rows.empty:
        raise NemesisError("no complete few-shot averages to plot; every method needs every dataset")
    group_columns = ["model", "method"] if "model" in rows and rows["model"].nunique() > 1 else ["method"]
    shots = _category_order(rows["shots"])
    keys = rows[group_columns].drop_duplicates().itertuples(index=False)
    keys = [tuple(key) for key in keys]
    colours = _palette(len(keys))
    with layout.fonts():
        figure = new_figure(layout, layout.height_in(0.62, most=3.6))
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
                linestyle=LINE_STYLES[number % len(LINE_STYLES)],  # lines inside overlapping bands stay apart
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
        seeds = sorted({int(value) for value in rows["seeds"].dropna()}) if "seeds" in rows else []
        pooled = "each point: mean over the row's datasets"
        if seeds:
            count = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
            pooled += f", {count} seed{'' if seeds == [1] else 's'}"
        title = f"Few-shot classification\n{pooled}; band: ±1 std over per-seed averages"
        axes.set_title(layout.wrap(title))
        top = float((rows["mean"] + rows["std"].fillna(0)).max()) if "std" in rows else float(rows["mean"].max())
        _y_headroom(axes, top, percent=True, bottom=max(0.0, axes.get_ylim()[0]))
        axes.grid(alpha=0.3)
        _legend_below(figure, axes.get_lines())
    return _finish(figure, layout)


# ----------------------------------------------------------------------------- the LNE by depth


def depth_table_and_figure(
    cells: pd.DataFrame,
    margin: float = 0.0,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    pool: bool = False,
    layout: PaperLayout = DEFAULT_LAYOUT,
) -> tuple[pd.DataFrame, Figure]:
    """The LNE by (method, tower, layer) and position (`lne_by_depth`) and its figure (`plot_lne_by_depth`)."""
    table = lne_by_depth(cells, margin=margin, significant=significant, alpha=alpha, pool=pool)
    return table, plot_lne_by_depth(table, pool=pool, layout=layout)


def plot_lne_by_depth(table: pd.DataFrame, pool: bool = False, layout: PaperLayout = DEFAULT_LAYOUT) -> Figure:
    """A table of `lne_by_depth`, summed over positions (`lne_by_layer`): one column of panels per tower,
    x = layer; the top row the LNE frequency, the bottom row the mean accuracy change of the cells (pp);
    grouped bars, one series per kind of prompt (method first)."""
    layers = lne_by_layer(table)
    kinds = [column for column in layers.columns if column not in (*DEPTH_COLUMNS, TOWER, LAYER)]
    towers = list(dict.fromkeys(layers[TOWER]))
    weights = _weights_names(layers)
    single = _single_kind(layers, kinds) if len(kinds) > 1 else {}
    series = list(dict.fromkeys(tuple(row) for row in layers[kinds].itertuples(index=False)))
    colours = list(TABLEAU_COLORS.values())
    width = 0.8 / max(1, len(series))
    with layout.fonts():
        figure = new_figure(layout, 4.2)
        grid = figure.subplots(2, len(towers), squeeze=False, sharex="col")
        for column, tower in enumerate(towers):
            in_tower = layers[layers[TOWER] == tower]
            all_layers = sorted(int(layer) for layer in in_tower[LAYER].dropna().unique())
            for row, (value, name) in enumerate(
                (("frequency", "LNE frequency"), (MEAN_CHANGE, "mean accuracy change (pp)"))
            ):
                axes = grid[row, column]
                for index, key in enumerate(series):
                    rows = in_tower
                    for kind, kind_value in zip(kinds, key, strict=True):
                        rows = _rows_where(rows, kind, kind_value)
                    if rows.empty:
                        continue
                    x = np.array([all_layers.index(int(layer)) for layer in rows[LAYER]], dtype=float)
                    label = _series_label(kinds, key, single, weights)
                    axes.bar(x + (index - (len(series) - 1) / 2) * width, rows[value].to_numpy(dtype=float),
                             width=width, color=colours[index % len(colours)], label=label)  # fmt: skip
                axes.set_xticks(range(len(all_layers)), [str(layer) for layer in all_layers])
                axes.set_xlim(-0.75, len(all_layers) - 0.25)  # a lone layer's bars stay bars, not a wall
                if row == 0:
                    axes.set_title(tower if " " in tower else f"{tower} tower")  # "text keys" names its tower
                    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
                else:
                    axes.axhline(0.0, color="black", linewidth=0.6)
                    axes.set_xlabel("layer")
                if column == 0:
                    axes.set_ylabel(layout.wrap(name, 0.3))
        handles, labels = grid[0, 0].get_legend_handles_labels()
        for axes in grid.ravel()[1:]:
            for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
                if label not in labels:
                    handles.append(handle)
                    labels.append(label)
        if len(labels) > 1:
            figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)))
        pooled = f" ({DEPTH_POOLED_NOTE})" if pool else ""
        if len(labels) == 1:  # one kind of prompt: named in the title, no legend
            pooled = f" (prompts: {labels[0]}){pooled}"
        title = f"Low-Norm Effect by tower and layer, summed over positions{pooled}"
        figure.suptitle(layout.wrap(title, size=layout.title_size))
    return _finish(figure, layout)
