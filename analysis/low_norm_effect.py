"""The Low-Norm Effect: which corrupted cells shrink the norm and gain accuracy, and how often.

Definitions (DESIGN section 5): a cell *reduces* the norm when the corrupted position's norm is
lower after than before, *increases* it when higher. The LNE occurs in a reducing cell when its
accuracy change exceeds the margin; the significance-aware mode also asks the exact McNemar test
on paired per-sample correctness for p < alpha. Frequency of a group = number of occurrences;
rate = occurrences / reducing cells. The companion: share of increasing cells that lose accuracy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from nemesis.errors import NemesisError
from nemesis.files.sweep_format import ORIGINAL_OP, checkpoint_key_of
from nemesis.wording import plural

from .defaults import DEFAULT_ALPHA, DEFAULT_BY
from .labels import OWN_DATASET
from .results import SOURCE_COLUMN, load_sweeps, read_correctness

# Accuracy changes smaller than this (percentage points) are float noise, not a change.
CHANGE_TOLERANCE = 1e-9

# Columns the paired test adds: samples the corrupted cell gets right where the original was
# wrong (gained) and the reverse (lost), and the exact McNemar p-value.
GAINED, LOST, P_VALUE = "gained", "lost", "p_value"


# Columns saying what kind of prompt a cell corrupts; groups never mix kinds unless pooling is asked.
# `trained_on` is derived from the sweep's train_dataset: "own" for a prompt tested on its own dataset.
# `weights`: the backbone's weights id, so a prompt on random weights is never counted with real ones.
PROMPT_KIND = ("method", "penalty", "method_variant", "subsample", "trained_on", "weights")
POOLED_NOTE = "pooled over methods and prompt kinds (--pool)"
# The corruption site of a cell (e.g. "prompt 0", "every prompt"; "" for a method's whole ctx). Cells
# at different sites of one prompt are different corruptions of it: groups never pool them, so where
# the corrupted cells hold several sites, `site` is a group column too, with or without --pool.
SITE = "site"


def parse_by(by: str | Sequence[str]) -> list[str]:
    """ "dataset,shots" or ["dataset", "shots"] -> ["dataset", "shots"]."""
    columns = [part.strip() for part in by.split(",")] if isinstance(by, str) else [str(part) for part in by]
    columns = [column for column in columns if column]
    if not columns:
        raise NemesisError("--by names no column; pass e.g. --by dataset,shots or --by position")
    return columns


def several_sites(cells: pd.DataFrame) -> bool:
    """Whether the corrupted cells of `cells` (all rows of a frame without `op`) hold more than one site."""
    if SITE not in cells.columns:
        return False
    corrupted = cells[cells["op"] != ORIGINAL_OP] if "op" in cells.columns else cells
    return corrupted[SITE].fillna("").nunique() > 1


def group_columns(by: str | Sequence[str], pool: bool = False, sites: bool = False) -> list[str]:
    """The `by` columns, then `site` with `sites` (the cells hold several: `several_sites`), then,
    unless `pool`, the prompt-kind columns (`PROMPT_KIND`) they lack.

    The Low-Norm Effect is a property of one kind of prompt: CoOp and Nemesis prompts, base-class
    and all-class prompts, a prompt tested on another dataset than its own, or on other weights are
    separate groups; so are corruption sites.
    """
    columns = parse_by(by)
    columns += [SITE] if sites and SITE not in columns else []
    return columns if pool else columns + [column for column in PROMPT_KIND if column not in columns]


def apart_columns(cells: pd.DataFrame, pool: bool = False) -> list[str]:
    """What keeps groups of `cells` apart besides the grouping asked for: `site` where they hold
    several sites, then (unless `pool`) the prompt-kind columns they have."""
    kinds = [] if pool else [column for column in PROMPT_KIND if column in cells.columns]
    return ([SITE] if several_sites(cells) else []) + kinds


def with_prompt_kind(cells: pd.DataFrame) -> pd.DataFrame:
    """A copy with `trained_on`: "own" where a prompt is tested on the dataset it was trained on,
    else that training dataset (domain shift); <NA> where the table does not say. Rows of unknown
    `weights` (written before the column existed) take those of their checkpoint key's other rows
    (a sweep that resumed an older table), so one prompt on one backbone stays one group."""
    marked = cells.copy()
    if "weights" in marked:
        keys = marked["cell_id"].map(lambda value: checkpoint_key_of(str(value)))
        known = marked["weights"].notna()
        of_key = marked["weights"][known].groupby(keys[known]).first()
        weights = marked["weights"].astype("string")
        marked["weights"] = weights.fillna(keys.map(of_key).astype("string"))
    train = marked["train_dataset"].astype("string") if "train_dataset" in marked else pd.NA
    own = train == marked["dataset"].astype("string")
    marked["trained_on"] = pd.Series(train, index=marked.index, dtype="string").where(~own.fillna(False), OWN_DATASET)
    return marked


def load_sweep(path: str | os.PathLike) -> pd.DataFrame:
    """A sweep table (`nemesis corrupt --out`) as a tidy frame: one row per cell, with its prompt's kind
    (the PROMPT_KIND columns: method, penalty, variant, classes, `trained_on`, weights), which the
    LNE tables and figures never pool."""
    return with_prompt_kind(load_sweeps([path]))


def check_by(cells: pd.DataFrame, by: Sequence[str]) -> list[str]:
    """Make sure every grouping column exists and holds at least one value among the corrupted cells."""
    columns = parse_by(by)
    unknown = [column for column in columns if column not in cells.columns]
    if unknown:
        raise NemesisError(
            f"--by column {unknown[0]!r} is not in the results; available: {', '.join(map(str, cells.columns))}"
        )
    corrupted = corrupted_cells(cells)
    if corrupted.empty:
        raise NemesisError("the results hold no corrupted cells; run `nemesis corrupt` with a non-empty grid")
    for column in columns:
        if corrupted[column].isna().all():
            raise NemesisError(f"--by column {column!r} has no values in the corrupted cells; group by another column")
    return columns


def corrupted_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The rows that corrupt something (every op except `original`)."""
    return cells[cells["op"] != ORIGINAL_OP]


def mark_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """A copy with boolean columns `reduces` and `increases` (both False for original rows) and the
    prompt kind's `trained_on` (`with_prompt_kind`)."""
    marked = with_prompt_kind(cells)
    corrupted = marked["op"] != ORIGINAL_OP
    # NaN norms compare False on both sides, so original rows are neither.
    marked["reduces"] = corrupted & (marked["norm_after"] < marked["norm_before"])
    marked["increases"] = corrupted & (marked["norm_after"] > marked["norm_before"])
    return marked


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    p = min(1, 2 * P[X <= min(b, c)]) with X ~ Binomial(b + c, 1/2); p = 1 without discordant pairs.
    """
    gained, lost = int(gained), int(lost)
    if gained < 0 or lost < 0:
        raise ValueError(f"discordant counts must be >= 0, got gained={gained}, lost={lost}")
    trials = gained + lost
    if trials == 0:
        return 1.0
    smaller = min(gained, lost)
    # Sum the binomial terms in log space: exact integers would get slow for large test sets.
    k = np.arange(smaller + 1)
    log_terms = (
        math.lgamma(trials + 1)
        - np.array([math.lgamma(value + 1) + math.lgamma(trials - value + 1) for value in k])
        - trials * math.log(2.0)
    )
    peak = log_terms.max()
    log_cdf = peak + math.log(float(np.exp(log_terms - peak).sum()))
    return float(min(1.0, 2.0 * math.exp(log_cdf)))


def _original_rows(cells: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Checkpoint key -> (cell_id, results file) of that checkpoint's original row.

    The key is the cell id's first part: it names the checkpoint file, model, weights and data, so
    a cell pairs with its own original even when the table has no column telling them apart
    (weights) or the two come from different files.
    """
    originals = cells[cells["op"] == ORIGINAL_OP]
    pairs: dict[str, tuple[str, str]] = {}
    for cell_id, results_file in zip(originals["cell_id"], originals[SOURCE_COLUMN], strict=True):
        pairs.setdefault(checkpoint_key_of(str(cell_id)), (str(cell_id), str(results_file)))
    return pairs


def _original_correctness(cells: pd.DataFrame, originals: dict[str, tuple[str, str]]) -> dict[str, np.ndarray]:
    """Checkpoint key -> per-sample correctness of the original row, for the keys `cells` use.

    Each file is read once and only the originals' vectors are kept, so memory stays at one file.
    """
    needed: dict[str, dict[str, str]] = {}  # results file -> {original cell_id: checkpoint key}
    for cell_id, results_file in zip(cells["cell_id"], cells[SOURCE_COLUMN], strict=True):
        key = checkpoint_key_of(str(cell_id))
        if key not in originals:
            raise NemesisError(
                f"{results_file}: cell {cell_id} has no original row of its checkpoint (key {key}) in the "
                "results; pass the table holding it or rerun the sweep"
            )
        original_id, original_file = originals[key]
        needed.setdefault(original_file, {})[original_id] = key
    vectors = {}
    for results_file, wanted in needed.items():
        correctness = read_correctness(results_file)
        for original_id, key in wanted.items():
            vectors[key] = _correctness_of(correctness, original_id, results_file)
    return vectors


def add_mcnemar(cells: pd.DataFrame) -> pd.DataFrame:
    """A copy with `gained`, `lost` and `p_value` for every corrupted cell (NaN for original rows).

    Frames that already hold `gained` and `lost` are only given p-values; otherwise each corrupted
    cell is paired with the original row of its checkpoint key (`checkpoint_key_of(cell_id)`), and
    each row's per-sample correctness is read from the file beside its own results table.
    """
    marked = cells.copy()
    corrupted = marked["op"] != ORIGINAL_OP
    if GAINED not in marked or LOST not in marked:
        if SOURCE_COLUMN not in marked:
            raise NemesisError("the significance test needs per-sample correctness; load the results with load_sweeps")
        before_of = _original_correctness(marked[corrupted], _original_rows(marked))
        gained = pd.Series(np.nan, index=marked.index)
        lost = pd.Series(np.nan, index=marked.index)
        for results_file, group in marked[corrupted].groupby(SOURCE_COLUMN, sort=False):
            correctness = read_correctness(results_file)
            for index, cell_id in zip(group.index, group["cell_id"], strict=True):
                cell_id = str(cell_id)
                before = before_of[checkpoint_key_of(cell_id)]
                after = _correctness_of(correctness, cell_id, results_file)
                if before.shape != after.shape:
                    raise NemesisError(
                        f"{results_file}: cell {cell_id} has {plural(after.size, 'sample')} but its original "
                        f"has {before.size}; the pairs must cover the same test samples"
                    )
                gained[index] = int(np.count_nonzero(after & ~before))
                lost[index] = int(np.count_nonzero(before & ~after))
        marked[GAINED], marked[LOST] = gained, lost
    p_values = [
        mcnemar_exact_p(g, lo) if is_corrupted and not (pd.isna(g) or pd.isna(lo)) else np.nan
        for g, lo, is_corrupted in zip(marked[GAINED], marked[LOST], corrupted, strict=True)
    ]
    marked[P_VALUE] = p_values
    return marked


def _correctness_of(correctness: dict[str, np.ndarray], cell_id: str, results_file: str) -> np.ndarray:
    if cell_id not in correctness:
        raise NemesisError(f"cell {cell_id} of {results_file} is missing from its per-sample correctness file")
    return correctness[cell_id]


def mark_occurrences(
    cells: pd.DataFrame,
    margin: float = 0.0,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
) -> pd.DataFrame:
    """A copy with `reduces`, `increases`, `lne` (an occurrence) and `degrades` (increasing, lower accuracy).

    With `significant`, an occurrence also needs the exact McNemar p-value below `alpha`.
    """
    if margin < 0:
        raise NemesisError(f"--margin must be >= 0 percentage points, got {margin}")
    if not 0 < alpha <= 1:
        raise NemesisError(f"--alpha must be in (0, 1], got {alpha}")
    marked = mark_cells(cells)
    marked["lne"] = marked["reduces"] & (marked["delta_acc"] > margin + CHANGE_TOLERANCE)
    if significant:
        marked = add_mcnemar(marked)
        marked["lne"] = marked["lne"] & (marked[P_VALUE] < alpha)
    marked["degrades"] = marked["increases"] & (marked["delta_acc"] < -CHANGE_TOLERANCE)
    return marked


# Rates are in percent everywhere (tables, CSV, stdout, figures), and their names say so.
RATE, DEGRADATION_RATE = "rate_percent", "degradation_rate_percent"
FREQUENCY_COLUMNS = (
    "seeds",
    "cells",
    "reducing",
    "frequency",
    RATE,
    "increasing",
    "degrading",
    DEGRADATION_RATE,
)


def lne_frequency(
    cells: pd.DataFrame,
    by: str | Sequence[str] = DEFAULT_BY,
    margin: float = 0.0,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    pool: bool = False,
) -> pd.DataFrame:
    """LNE frequency per group, summed over everything not in `by` (seeds, positions, settings).

    Groups are `by` plus the prompt kind (method, subsample, training dataset, weights) unless `pool`,
    and the corruption site where the cells hold several (`site`, even with `pool`).
    Columns: the group columns, then seeds (distinct seeds summed over; 1 when grouped by seed),
    cells (corrupted cells), reducing (norm-reducing cells),
    frequency (occurrences), rate_percent (100 * frequency / reducing; NaN without reducing cells),
    increasing, degrading (increasing cells with lower accuracy) and degradation_rate_percent
    (100 * degrading / increasing).
    """
    check_by(cells, by)
    marked = corrupted_cells(mark_occurrences(cells, margin, significant, alpha))
    columns = [column for column in group_columns(by, pool, several_sites(marked)) if column in marked.columns]
    table = (
        marked.groupby(columns, dropna=False, sort=True)
        .agg(
            seeds=("seed", "nunique"),
            cells=("cell_id", "size"),
            reducing=("reduces", "sum"),
            frequency=("lne", "sum"),
            increasing=("increases", "sum"),
            degrading=("degrades", "sum"),
        )
        .reset_index()
    )
    for column in ("seeds", "cells", "reducing", "frequency", "increasing", "degrading"):
        table[column] = table[column].astype("int64")
    table[RATE] = 100 * _ratio(table["frequency"], table["reducing"])
    table[DEGRADATION_RATE] = 100 * _ratio(table["degrading"], table["increasing"])
    return table[[*columns, *FREQUENCY_COLUMNS]]


def _ratio(numerator: pd.Series, denominator: pd.Series) -> pd.Series:
    return (numerator / denominator.where(denominator > 0)).astype(float)


def require_rates(table: pd.DataFrame, by: Sequence[str], column: str = RATE) -> None:
    """Fail naming the first group whose rate is undefined (no reducing or increasing cells)."""
    undefined = table[table[column].isna()]
    if undefined.empty:
        return
    first = undefined.iloc[0]
    group = ", ".join(f"{name}={first[name]}" for name in parse_by(by))
    if column == RATE:
        raise NemesisError(
            f"group {group} has no norm-reducing cells, so its rate is undefined; "
            "plot the frequency instead or regroup with --by"
        )
    raise NemesisError(
        f"group {group} has no norm-increasing cells, so its degradation rate is undefined; regroup with --by"
    )


def mean_change_by_position(cells: pd.DataFrame, pool: bool = False) -> dict[tuple, pd.DataFrame]:
    """(op, *apart) -> position x factor frame of the mean accuracy change (delta_acc) over everything
    else, `apart` being `apart_columns` (the site where there are several, the prompt kind); with
    `pool`, kinds of prompt are averaged together (sites never are)."""
    corrupted = with_prompt_kind(corrupted_cells(cells))
    if corrupted.empty:
        raise NemesisError("the results hold no corrupted cells; run `nemesis corrupt` with a non-empty grid")
    if corrupted["position"].isna().all():
        raise NemesisError("--by position: the corrupted cells carry no position")
    keys = ["op", *apart_columns(corrupted, pool)]
    maps = {}
    for key, group in corrupted.groupby(keys, sort=True, dropna=False):
        maps[tuple(key)] = (
            group.pivot_table(index="position", columns="factor", values="delta_acc", aggfunc="mean", dropna=False)
            .sort_index(axis=0)
            .sort_index(axis=1)
        )
    return maps


def reducing_share_by_factor(cells: pd.DataFrame) -> pd.Series:
    """factor -> share of the corrupted cells at that factor that reduce the norm (one op's cells)."""
    marked = mark_cells(corrupted_cells(cells))
    return marked.groupby("factor", sort=True)["reduces"].mean()


# --- prompts inside the towers: the LNE by tower, layer and position ----------------------------------

TOWER, LAYER = "tower", "layer"
# The depth table's groups: a method's (tower, layer) site and the position corrupted there.
DEPTH_BY = ("method", TOWER, LAYER, "position")
MEAN_CHANGE, MEAN_CHANGE_REDUCING = "mean_delta_acc", "mean_delta_acc_reducing"
DEPTH_COLUMNS = ("seeds", "cells", "reducing", "frequency", RATE, MEAN_CHANGE, MEAN_CHANGE_REDUCING)
TOWER_ORDER = {"text": 0, "vision": 1}
DEPTH_POOLED_NOTE = "kinds of prompt of each method pooled (--pool)"  # methods always stay apart there


def _tower_rows(cells: pd.DataFrame) -> pd.Series:
    """Which rows corrupt a (tower, layer) site: a tower named ("" for CoOp-like methods, original rows
    and tables from before the column)."""
    if TOWER not in cells.columns:
        return pd.Series(False, index=cells.index)
    return cells[TOWER].astype("string").fillna("") != ""


def has_depth_sites(cells: pd.DataFrame) -> bool:
    """Whether `cells` hold corrupted cells at (tower, layer) sites (prompts inside the towers)."""
    return bool(_tower_rows(cells).any())


def lne_by_depth(
    cells: pd.DataFrame,
    margin: float = 0.0,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    pool: bool = False,
) -> pd.DataFrame:
    """LNE frequency and mean accuracy change per (method, tower, layer, position), summed over seeds and
    settings; rows of methods without tower sites (CoOp-like, tower "") are left out.

    Groups are DEPTH_BY plus the other prompt-kind columns unless `pool` (the method always stays).
    Columns: the group columns, then seeds, cells (corrupted cells), reducing, frequency (occurrences as
    `mark_occurrences` counts them), rate_percent (100 * frequency / reducing), mean_delta_acc (mean
    accuracy change of the group's cells, pp) and mean_delta_acc_reducing (of its norm-reducing cells).
    """
    towers = _tower_rows(cells)
    if not towers.any():
        raise NemesisError(
            "the results hold no cells at (tower, layer) sites; sweep a prompt inside the towers "
            "(vpt, ivlp, maple, promptsrc) to see the Low-Norm Effect by depth"
        )
    kept = cells[towers | (cells["op"] == ORIGINAL_OP)]  # the originals pair cells for --significant
    marked = corrupted_cells(mark_occurrences(kept, margin, significant, alpha))
    marked = marked[_tower_rows(marked)].copy()
    marked["reducing_change"] = marked["delta_acc"].where(marked["reduces"])
    columns = [column for column in group_columns(list(DEPTH_BY), pool) if column in marked.columns]
    table = (
        marked.groupby(columns, dropna=False, sort=False)
        .agg(
            seeds=("seed", "nunique"),
            cells=("cell_id", "size"),
            reducing=("reduces", "sum"),
            frequency=("lne", "sum"),
            mean_delta_acc=("delta_acc", "mean"),
            mean_delta_acc_reducing=("reducing_change", "mean"),
        )
        .reset_index()
    )
    for column in ("seeds", "cells", "reducing", "frequency"):
        table[column] = table[column].astype("int64")
    table[RATE] = 100 * _ratio(table["frequency"], table["reducing"])
    table = _sort_depth(table, [column for column in columns if column not in DEPTH_BY])
    return table[[*columns, *DEPTH_COLUMNS]].reset_index(drop=True)


def lne_by_layer(table: pd.DataFrame) -> pd.DataFrame:
    """A table of `lne_by_depth` summed over positions: one row per (method, kind, tower, layer); the
    rate from the sums, the mean changes weighted by each position's cells (reducing cells)."""
    columns = [column for column in table.columns if column not in (*DEPTH_COLUMNS, "position")]
    frame = table.assign(
        weighted=table[MEAN_CHANGE] * table["cells"],
        weighted_reducing=table[MEAN_CHANGE_REDUCING].fillna(0.0) * table["reducing"],
    )
    summed = (
        frame.groupby(columns, dropna=False, sort=False)
        .agg(
            seeds=("seeds", "max"),
            cells=("cells", "sum"),
            reducing=("reducing", "sum"),
            frequency=("frequency", "sum"),
            weighted=("weighted", "sum"),
            weighted_reducing=("weighted_reducing", "sum"),
        )
        .reset_index()
    )
    summed[RATE] = 100 * _ratio(summed["frequency"], summed["reducing"])
    summed[MEAN_CHANGE] = _ratio(summed["weighted"], summed["cells"])
    summed[MEAN_CHANGE_REDUCING] = _ratio(summed["weighted_reducing"], summed["reducing"])
    summed = _sort_depth(summed, [column for column in columns if column not in DEPTH_BY])
    return summed[[*columns, *DEPTH_COLUMNS]].reset_index(drop=True)


def _sort_depth(table: pd.DataFrame, kinds: Sequence[str]) -> pd.DataFrame:
    """Rows by method and kind, then text before vision, then layer and position in order."""
    keys = [column for column in ("method", *kinds, TOWER, LAYER, "position") if column in table.columns]

    def key(column: pd.Series) -> pd.Series:
        if column.name == TOWER:
            return column.map(lambda tower: (TOWER_ORDER.get(str(tower), len(TOWER_ORDER)), str(tower)))
        if column.name in (LAYER, "position"):
            return column
        return column.astype("string").fillna("")

    return table.sort_values(keys, key=key, kind="stable")
