"""Report tables: few-shot, base-to-new, domain generalisation and LNE frequency.

Each builder returns a `Table`: `data` is the tidy numeric frame written as CSV, `display` the
formatted frame written as Markdown and LaTeX. Means are over seeds; std is the sample std
(ddof=1) and is left blank (NaN in the CSV, no "±" in the display) for a single seed. Rows taken
from the paper are marked "[paper]" in the display and `origin == "paper"` in the CSV.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nemesis.atomic import write_text_atomic
from nemesis.constants import ZERO_SHOT_METHOD
from nemesis.errors import NemesisError
from nemesis.wording import plural

from . import paper_numbers
from .defaults import DEFAULT_ALPHA, DEFAULT_BY
from .labels import (
    IMAGENET_VARIANTS,
    MISSING_LABEL,
    PAPER_DATASETS,
    RANDOM_WEIGHTS_MARK,
    dataset_name,
    is_paper_kind,
    is_random_weights_id,
    kind_label,
    shots_label,
    site_label,
    weights_label,
    weights_names,
)
from .low_norm_effect import (
    DEGRADATION_RATE,
    DEPTH_BY,
    DEPTH_POOLED_NOTE,
    MEAN_CHANGE,
    MEAN_CHANGE_REDUCING,
    POOLED_NOTE,
    PROMPT_KIND,
    RATE,
    SITE,
    lne_by_depth,
    lne_frequency,
    parse_by,
)
from .results import Run, runs_frame

AVERAGE = "Average"
SEEDS = "Seeds"  # the display column saying how many seeds each row's means are over
PAPER_MARK = " [paper]"
OURS, PAPER = "ours", "paper"
TABLE_SUFFIXES = (".md", ".csv", ".tex")
# Decimals of the floats a CSV holds: percents from float32 accuracies (49.06999965508779) read 49.07.
CSV_DECIMALS = 4
DEGRADATION_MARK = "degr."


@dataclass
class Table:
    """One report table in two shapes: numeric data (CSV) and formatted display (Markdown, LaTeX)."""

    name: str  # file stem
    title: str
    data: pd.DataFrame
    display: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # what the inputs held that changed the table: also notes


# ----------------------------------------------------------------------------- small helpers


def harmonic_mean(base: float, new: float) -> float:
    """H = 2 * base * new / (base + new); 0 when both are 0."""
    if base + new == 0:
        return 0.0
    return 2.0 * base * new / (base + new)


def format_mean_std(mean: float, std: float) -> str:
    """ "73.10 ± 0.52"; a NaN std (one seed) shows the mean alone; a NaN mean shows nothing."""
    if mean is None or pd.isna(mean):
        return ""
    if std is None or pd.isna(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def _seeds_text(counts: Sequence[int]) -> str:
    """The seeds behind a row's cells, as its Seeds column shows them: "3", or "2-3" when they differ."""
    counts = [int(count) for count in counts if not pd.isna(count) and count > 0]
    if not counts:
        return ""
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}-{high}"


def _mean_std(values: pd.Series) -> pd.Series:
    values = values.dropna()
    std = float(values.std(ddof=1)) if len(values) > 1 else np.nan
    return pd.Series({"mean": float(values.mean()) if len(values) else np.nan, "std": std, "seeds": len(values)})


def _method_order(label: str) -> tuple:
    # CoOp first, as the paper's tables do, then the Nemesis variants alphabetically.
    return (label != "CoOp", label)


def _dataset_order(key: str) -> tuple:
    order = [*PAPER_DATASETS, *IMAGENET_VARIANTS]
    return (order.index(key) if key in order else len(order), str(key))


def _show_model(frame: pd.DataFrame) -> bool:
    return "model" in frame and frame["model"].nunique(dropna=False) > 1


def _row_sort(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    def key(series: pd.Series) -> pd.Series:
        if series.name == "method":
            return series.map(_method_order)
        if series.name in ("dataset", "source", "target"):
            return series.map(lambda value: (value == AVERAGE, _dataset_order(value)))
        return series

    return frame.sort_values(list(columns), key=key, kind="stable", na_position="last").reset_index(drop=True)


# ----------------------------------------------------------------------------- counting each result once


def _prompt_name(model, method, dataset, shots, seed) -> str:
    shots_text = "shots n/a" if pd.isna(shots) else plural(int(shots), "shot")
    seed_text = "" if pd.isna(seed) else f", seed {int(seed)}"
    return f"{dataset_name(dataset)}, {method}, {model}, {shots_text}{seed_text}"


def weights_identity(results: pd.DataFrame) -> pd.Series:
    """What tells a row's weights apart: its `weights_id` (the backbone's: tag or file hash, and the
    activation), or where that is missing its weights and activation as a note names them
    (`weights_label` of `pretrained` and `activation`)."""
    blank = pd.Series(np.nan, index=results.index, dtype=object)
    recorded = results.get("weights_id", blank)
    columns = [results.get(column, blank) for column in ("pretrained", "activation")]
    fallback = pd.Series([weights_label(*values) for values in zip(*columns, strict=True)], index=results.index)
    return recorded.where(recorded.notna(), fallback).astype(str)


def count_each_prompt_once(
    results: pd.DataFrame, keys: Sequence[str], origin: str, what: str
) -> tuple[pd.DataFrame, list[str]]:
    """One row per prompt and weights (`keys`: model, method label, dataset, shots, seed, and for domain
    generalisation the target; the weights identity is added where the rows record weights, see
    `weights_identity`): a copied run folder or checkpoint given beside its tree, or two grid presets
    that trained the same settings, is one seed, not two, while results on other weights stay apart.
    The first row is kept; a note names the copies (`origin`: the column naming where a row came from).
    Rows without a seed are kept, except the zero-shot baseline (0 shots), which has none and is the
    same every time."""
    keys = list(keys)
    if ("weights_id" in results or "pretrained" in results) and "weights_id" not in keys:
        results = results.assign(weights_id=weights_identity(results))
        keys.append("weights_id")
    known = results["seed"].notna() | (pd.to_numeric(results["shots"]) == 0).fillna(False)
    repeated = results.duplicated(subset=keys, keep=False) & known
    notes = []
    for _key, group in results[repeated].groupby(keys, dropna=False, sort=False):
        first = group.iloc[0]
        name = _prompt_name(first["model"], first["method"], first["dataset"], first["shots"], first["seed"])
        if "target" in group:
            name += f", tested on {dataset_name(first['target'])}"
        notes.append(
            f"{what}: {name} was given {len(group)} times ({', '.join(map(str, group[origin]))}); "
            f"counted once ({first[origin]})"
        )
    kept = results[~(results.duplicated(subset=keys, keep="first") & known)]
    return kept.reset_index(drop=True), notes


WEIGHTS_NAMED_NOTE = (
    "Results of one model on several real weights are rows of their own; each label names its weights "
    "(tag or file SHA-256, and the activation)."
)


def label_weights(results: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """`results` with each method label naming its weights where the rows of one model hold several
    real weights ids, as the LNE tables name them (`weights_names`: "CoOp (weights sha256:<12 hex>)"),
    so that results on different weights are different rows; and the note saying so, if any label
    changed. Random weights are marked by their label already ("(random weights)")."""
    if "weights_id" not in results or results.empty:
        return results, []
    methods = results["method"].astype(str)
    real = ~methods.str.endswith(RANDOM_WEIGHTS_MARK) & ~results["weights_id"].map(is_random_weights_id)
    labelled = methods.copy()
    for _model, rows in results[real].groupby("model", dropna=False, sort=False):
        names = weights_names(rows["weights_id"])
        for index, weights_id in rows["weights_id"].items():
            if names.get(weights_id):
                labelled[index] = f"{methods[index]} ({names[weights_id]})"
    if labelled.equals(methods):
        return results, []
    return results.assign(method=labelled), [WEIGHTS_NAMED_NOTE]


def latest_records(evals: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The last record per checkpoint, weights, `keys` and method label: a checkpoint evaluated again
    on the same weights counts its last record; records on other weights (a tag, file or activation;
    random weights carry their own label) are results of their own, never replacing each other."""
    return evals.drop_duplicates(subset=["checkpoint", *keys, "method_label", "weights_id"], keep="last")


def weights_conflicts(evals: pd.DataFrame | None) -> list[str]:
    """A note per checkpoint evaluated on one dataset and class subset under different real weights
    (tag, file or activation): each weights' result is a row of its own (`latest_records`), named by
    its weights (`label_weights`); the note says so."""
    if evals is None or evals.empty:
        return []
    notes = []
    keys = ["checkpoint", "model", "dataset", "subsample", "method_label"]
    for (checkpoint, model, dataset, subsample, _label), group in evals.groupby(keys, dropna=False, sort=False):
        if group["weights_id"].nunique(dropna=False) > 1:
            weights = list(dict.fromkeys(group["weights"]))
            classes = "" if subsample == "all" else f" ({subsample} classes)"
            notes.append(
                f"{checkpoint} was evaluated on {dataset_name(dataset)}{classes} with {model} under different "
                f"weights ({'; '.join(weights)}); each weights' result is a row of its own, its label naming "
                "the weights"
            )
    return notes


# ----------------------------------------------------------------------------- few-shot


FEW_SHOT_RESULT_COLUMNS = ("model", "method", "dataset", "shots", "seed", "accuracy", "source", "weights_id")


def few_shot_results(runs: Sequence[Run] = (), evals: pd.DataFrame | None = None) -> pd.DataFrame:
    """One accuracy per trained prompt and weights: finished runs' final test accuracy (see
    `unfinished_runs`), plus eval records of the prompt's own dataset (subsample "all"), except those
    that repeat the result of a run folder among `runs` (see `_repeats_a_run`): a run's prompt
    evaluated on other weights or under another activation is a result of its own."""
    rows = []
    summary = runs_frame(runs)
    finished = summary[(summary["subsample"] == "all") & summary["finished"] & summary["test_acc"].notna()]
    for row in finished.itertuples(index=False):
        rows.append(
            (row.model, row.method_label, row.dataset, row.shots, row.seed, row.test_acc, row.run, row.weights_id)
        )
    if evals is not None:
        own = evals[(evals["subsample"] == "all") & (evals["dataset"] == evals["train_dataset"])]
        # A checkpoint evaluated twice on the same weights counts once: its latest record.
        own = latest_records(own, ["model", "dataset"])
        for row in own.itertuples(index=False):
            if _repeats_a_run(row, summary):
                continue
            identity = (row.model, row.method_label, row.dataset, row.shots, row.seed)
            rows.append((*identity, row.accuracy, row.checkpoint, row.weights_id))
    frame = pd.DataFrame(rows, columns=list(FEW_SHOT_RESULT_COLUMNS))
    frame["shots"] = pd.to_numeric(frame["shots"]).astype("Int64")
    frame["accuracy"] = frame["accuracy"].astype(float)
    return frame


def _run_of(checkpoint: str, summary: pd.DataFrame) -> pd.Series | None:
    """The run (a `runs_frame` row) whose folder holds `checkpoint`, or None."""
    path = Path(checkpoint).resolve()
    for _, run in summary.iterrows():
        folder = Path(run["run"]).resolve()
        if folder == path or folder in path.parents:
            return run
    return None


def _repeats_a_run(record, summary: pd.DataFrame) -> bool:
    """Whether an own-dataset, all-class eval record repeats its run folder's own result: the checkpoint
    lies in a run folder among the inputs, evaluated on the run's weights (weights id, and activation
    where both record one) and the run's classes. A run trained on a class subset (base-to-new) has no
    few-shot result: records of its prompts are left to the base-to-new table."""
    run = _run_of(record.checkpoint, summary)
    if run is None:
        return False
    if run["subsample"] != "all":
        return True
    same_activation = pd.isna(record.activation) or not run["activation"] or record.activation == run["activation"]
    return record.weights_id == run["weights_id"] and same_activation and record.model == run["model"]


def unfinished_runs(runs: Sequence[Run]) -> list[Run]:
    """The few-shot runs (subsample "all") still training or stopped early: left out of the table,
    since an accuracy from before the last epoch is not the method's result."""
    return [run for run in runs if (run.config.get("subsample") or "all") == "all" and not run.finished]


def _average_over_datasets(group: pd.DataFrame, datasets: Sequence[str]) -> pd.Series:
    """Average of the per-dataset means; its std is over per-seed averages when every dataset has
    the same seeds (NaN otherwise). NaN when one of `datasets` is missing for this row."""
    present = set(group["dataset"])
    if any(dataset not in present for dataset in datasets):
        return pd.Series({"mean": np.nan, "std": np.nan, "seeds": 0})
    mean = float(group.groupby("dataset")["accuracy"].mean().mean())
    by_seed = group.pivot_table(index="seed", columns="dataset", values="accuracy", aggfunc="mean")
    seed_sets = {frozenset(group.loc[group["dataset"] == dataset, "seed"].dropna()) for dataset in datasets}
    std, seeds = np.nan, 0
    if len(seed_sets) == 1 and not by_seed.isna().any().any():
        seeds = len(by_seed)
        if seeds > 1:
            std = float(by_seed.mean(axis=1).std(ddof=1))
    return pd.Series({"mean": mean, "std": std, "seeds": seeds})


def few_shot_table(results: pd.DataFrame, paper: bool = True, skipped_runs: int = 0) -> Table:
    """Method x shots x dataset, mean ± std over seeds, plus the average over datasets.

    `skipped_runs`: how many unfinished runs `few_shot_results` left out, stated in the notes.
    """
    if results.empty:
        raise NemesisError(
            "no few-shot results: no run finished its epochs and no eval record is of its own dataset"
            + (f" ({skipped_runs} unfinished runs skipped)" if skipped_runs else "")
        )
    keys = ["model", "method", "shots"]
    results = results.assign(model=results["model"].fillna(MISSING_LABEL))
    results, repeated = count_each_prompt_once(results, [*keys, "dataset", "seed"], "source", "few-shot")
    results, weights_note = label_weights(results)
    datasets = sorted(results["dataset"].unique(), key=_dataset_order)
    per_dataset = results.groupby([*keys, "dataset"], dropna=False)["accuracy"].apply(_mean_std).unstack().reset_index()
    # A row's average covers every dataset its model has at its shots, or is left blank.
    expected = results.groupby(["model", "shots"], dropna=False)["dataset"].agg(set).to_dict()
    averages = pd.DataFrame(
        [
            {
                **dict(zip(keys, key, strict=True)),
                "dataset": AVERAGE,
                **_average_over_datasets(group, sorted(expected[(key[0], key[2])])).to_dict(),
            }
            for key, group in results.groupby(keys, dropna=False)
        ]
    )
    data = pd.concat([per_dataset, averages], ignore_index=True)
    data.insert(0, "origin", OURS)
    data["seeds"] = data["seeds"].astype(int)
    data = _row_sort(data, [*keys, "dataset"])

    show_model = _show_model(results)
    label_columns = (["Model"] if show_model else []) + ["Method", "Shots", SEEDS]
    value_columns = [dataset_name(dataset) for dataset in datasets] + [AVERAGE]
    display_rows = []
    for (model, method, shots), group in data.groupby(keys, dropna=False, sort=False):
        row = {"Model": model, "Method": method, "Shots": shots_label(shots)}
        row[SEEDS] = _seeds_text(group.loc[group["dataset"] != AVERAGE, "seeds"])
        for item in group.itertuples(index=False):
            name = AVERAGE if item.dataset == AVERAGE else dataset_name(item.dataset)
            row[name] = format_mean_std(item.mean, item.std)
        display_rows.append(row)
    notes = [
        "mean ± sample std (ddof=1) over seeds; one seed: mean only. Seeds: per dataset (a range where they differ).",
        "Average: mean over the datasets of the row's model and shots (blank if the row lacks one);"
        " its std is over per-seed averages.",
    ]
    if skipped_runs:
        notes.append(
            f"{plural(skipped_runs, 'unfinished run')} skipped "
            "(last evaluated epoch before the configured count, or no prompt.safetensors)."
        )
    notes.extend(repeated)
    notes.extend(weights_note)
    if paper and set(datasets) == set(PAPER_DATASETS):
        shots_present = set(results["shots"].dropna().astype(int))
        paper_rows = []
        for method, values in paper_numbers.FEW_SHOT_AVERAGE.items():
            for shots, value in values.items():
                if shots in shots_present:
                    paper_rows.append(
                        {"origin": PAPER, "method": method, "shots": shots, "dataset": AVERAGE, "mean": value}
                    )
                    display_rows.append({"Method": method + PAPER_MARK, "Shots": str(shots), AVERAGE: f"~{value:.1f}"})
        data = pd.concat([data, pd.DataFrame(paper_rows)], ignore_index=True)
        notes.append("[paper] rows: the published 11-dataset averages, read off a plot (~ +-0.5).")
    display = pd.DataFrame(display_rows).reindex(columns=label_columns + value_columns).fillna("")
    data = _integers(data, ["shots", "seeds"])
    return Table("few_shot", "Few-shot classification accuracy (%)", data, display, notes, repeated)


def few_shot_averages(table: Table) -> pd.DataFrame:
    """The average-over-datasets rows of our results (for the few-shot curve)."""
    data = table.data
    return data[(data["origin"] == OURS) & (data["dataset"] == AVERAGE)].reset_index(drop=True)


# ----------------------------------------------------------------------------- base-to-new


def base_to_new_results(evals: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint evaluated on both its base and its new classes. The zero-shot baseline
    (the hand-crafted prompt, `eval --zero-shot --subsample base` and `new`) is the table's reference
    row: it is kept with base or new alone too (the other value blank)."""
    keys = ["checkpoint", "model", "dataset", "method_label", "weights_id"]  # base and new on the same weights
    columns = ["checkpoint", "model", "dataset", "method", "shots", "seed", "weights_id", "base", "new"]
    split = latest_records(evals[evals["subsample"].isin(["base", "new"])], ["model", "dataset", "subsample"])
    if split.empty:
        return pd.DataFrame(columns=columns)
    pairs = split.pivot_table(index=keys, columns="subsample", values="accuracy", aggfunc="last")
    pairs = pairs.reindex(columns=["base", "new"]).reset_index()
    identity = split.drop_duplicates(subset=keys, keep="last")[[*keys, "method", "shots", "seed"]]
    pairs = pairs.merge(identity, on=keys, how="left")
    complete = pairs["base"].notna() & pairs["new"].notna()
    pairs = pairs[complete | (pairs["method"] == ZERO_SHOT_METHOD)]
    pairs = pairs.drop(columns="method").rename(columns={"method_label": "method"})
    return pairs[columns].reset_index(drop=True)


def base_to_new_table(evals: pd.DataFrame, paper: bool = True) -> Table:
    """Base, new and harmonic mean H per method and dataset, plus the average over datasets.

    Base and new are means over seeds; H is the harmonic mean of those means (the average row:
    of the average base and new), as CoCoOp reports it.
    """
    pairs = base_to_new_results(evals)
    if pairs.empty:
        raise NemesisError(
            "no checkpoint was evaluated on both its base and its new classes; "
            "run `nemesis eval` with --subsample base and new"
        )
    keys = ["model", "method", "shots"]
    pairs, repeated = count_each_prompt_once(pairs, [*keys, "dataset", "seed"], "checkpoint", "base-to-new")
    pairs, weights_note = label_weights(pairs)
    datasets = sorted(pairs["dataset"].unique(), key=_dataset_order)
    per_dataset = (
        pairs.groupby([*keys, "dataset"], dropna=False)
        .agg(base=("base", "mean"), new=("new", "mean"), seeds=("base", "size"))
        .reset_index()
    )
    rows = []
    for key, group in per_dataset.groupby(keys, dropna=False, sort=False):
        complete = set(group["dataset"]) == set(datasets)
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "dataset": AVERAGE,
                "base": group["base"].mean() if complete else np.nan,
                "new": group["new"].mean() if complete else np.nan,
                "seeds": int(group["seeds"].min()) if complete else 0,
            }
        )
    data = pd.concat([per_dataset, pd.DataFrame(rows)], ignore_index=True)
    data["H"] = [
        harmonic_mean(base, new) if not (pd.isna(base) or pd.isna(new)) else np.nan
        for base, new in zip(data["base"], data["new"], strict=True)
    ]
    data.insert(0, "origin", OURS)
    data = _row_sort(data, [*keys, "dataset"])
    notes = [
        "base and new: mean over seeds; H = 2*base*new/(base+new) of those means. Average: over datasets, "
        "its Seeds the fewest of any dataset.",
        *repeated,
        *weights_note,
    ]
    if paper and set(datasets) == set(PAPER_DATASETS):
        paper_rows = [
            {"origin": PAPER, "method": method, "dataset": AVERAGE, "base": base, "new": new, "H": h}
            for method, (base, new, h) in paper_numbers.BASE_TO_NEW_AVERAGE.items()
        ]
        data = pd.concat([data, pd.DataFrame(paper_rows)], ignore_index=True)
        notes.append("[paper] rows: the published CoCoOp-based averages over the 11 datasets.")
    show_model = _show_model(pairs)
    display = pd.DataFrame(
        {
            **({"Model": data["model"].fillna("")} if show_model else {}),
            "Method": [
                method + (PAPER_MARK if origin == PAPER else "")
                for method, origin in zip(data["method"], data["origin"], strict=True)
            ],
            "Shots": [
                shots_label(shots) if origin == OURS else ""
                for shots, origin in zip(data["shots"], data["origin"], strict=True)
            ],
            "Dataset": [AVERAGE if dataset == AVERAGE else dataset_name(dataset) for dataset in data["dataset"]],
            SEEDS: [_seeds_text([count]) for count in data["seeds"]],
            "Base": [_number(value) for value in data["base"]],
            "New": [_number(value) for value in data["new"]],
            "H": [_number(value) for value in data["H"]],
        }
    )
    data = _integers(data, ["shots", "seeds"])
    return Table("base_to_new", "Base-to-new generalisation accuracy (%)", data, display, notes, repeated)


def _integers(data: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Count columns as nullable integers (paper rows leave them empty)."""
    for column in columns:
        if column in data:
            data[column] = pd.to_numeric(data[column]).round().astype("Int64")
    return data


def _number(value: float) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.2f}"


# ----------------------------------------------------------------------------- domain generalisation


DG_COLUMNS = ["checkpoint", "model", "method", "shots", "seed", "weights_id", "source", "target", "accuracy"]


def domain_generalization_results(evals: pd.DataFrame, runs: Sequence[Run] = ()) -> pd.DataFrame:
    """Records of checkpoints (subsample "all") evaluated on at least one dataset besides their own.

    A checkpoint evaluated only on other datasets takes its own-dataset accuracy from its run
    folder among `runs` (the final test accuracy of a finished run on the same weights), so that cell
    is not blank. Records of one checkpoint on other weights are results of their own.
    """
    records = latest_records(evals[evals["subsample"] == "all"], ["model", "dataset"])
    identity = ["checkpoint", "model", "method_label", "weights_id"]
    crossed = records[records["dataset"] != records["train_dataset"]][identity].drop_duplicates()
    selected = records.merge(crossed, on=identity)
    selected = selected.drop(columns="method")  # the label names the method in tables
    selected = selected.rename(columns={"train_dataset": "source", "dataset": "target", "method_label": "method"})
    selected = selected[DG_COLUMNS].reset_index(drop=True)
    own = _own_results_of_runs(selected, runs)
    return pd.concat([selected, own], ignore_index=True) if not own.empty else selected


def _own_results_of_runs(records: pd.DataFrame, runs: Sequence[Run]) -> pd.DataFrame:
    """Own-dataset rows, from their finished run folders, of the checkpoints `records` lacks them for
    (records on the weights the run trained on: a run's accuracy is no result on other weights)."""
    summary = runs_frame(runs)
    summary = summary[(summary["subsample"] == "all") & summary["finished"] & summary["test_acc"].notna()]
    rows = []
    for (checkpoint, method, weights_id), group in records.groupby(["checkpoint", "method", "weights_id"], sort=False):
        if (group["target"] == group["source"]).any():
            continue
        path = Path(checkpoint).resolve()
        for run in summary.itertuples(index=False):
            folder = Path(run.run).resolve()
            inside = folder == path or folder in path.parents
            if inside and run.method_label == method and run.weights_id == weights_id:
                first = group.iloc[0]
                own = [weights_id, first["source"], first["source"], run.test_acc]  # weights, source, target, accuracy
                rows.append([checkpoint, first["model"], method, first["shots"], first["seed"], *own])
                break
    return pd.DataFrame(rows, columns=DG_COLUMNS)


def domain_generalization_table(evals: pd.DataFrame, paper: bool = True, runs: Sequence[Run] = ()) -> Table:
    """Source and target datasets per method: mean ± std over seeds of each evaluation (own-dataset
    cells of checkpoints not evaluated there: from their run folders among `runs`)."""
    records = domain_generalization_results(evals, runs)
    if records.empty:
        raise NemesisError(
            "no checkpoint was evaluated on a dataset besides its own; run `nemesis eval` on the target datasets"
        )
    keys = ["model", "method", "shots", "source"]
    records = records.assign(dataset=records["source"])  # the prompt's dataset, as the other tables name it
    identity = [*keys, "seed", "target"]
    records, repeated = count_each_prompt_once(records, identity, "checkpoint", "domain generalisation")
    records, weights_note = label_weights(records)
    data = records.groupby([*keys, "target"], dropna=False)["accuracy"].apply(_mean_std).unstack().reset_index()
    data["seeds"] = data["seeds"].astype(int)
    data.insert(0, "origin", OURS)
    data = _row_sort(data, [*keys, "target"])
    sources = sorted(records["source"].unique(), key=_dataset_order)
    targets = sorted(set(records["target"]) - set(sources), key=_dataset_order)
    columns = [*sources, *targets]
    show_model = _show_model(records)
    display_rows = []
    for (model, method, shots, source), group in data.groupby(keys, dropna=False, sort=False):
        row = {"Model": model, "Method": method, "Shots": shots_label(shots), "Source": dataset_name(source)}
        row[SEEDS] = _seeds_text(group["seeds"])
        for item in group.itertuples(index=False):
            row[dataset_name(item.target)] = format_mean_std(item.mean, item.std)
        display_rows.append(row)
    notes = [
        "mean ± sample std (ddof=1) over seeds; one seed: mean only. Seeds: per target (a range where they differ).",
        *repeated,
        *weights_note,
        *_own_cells_missing(records),
    ]
    setting = paper_numbers.DOMAIN_GENERALIZATION_SETTING
    if paper and setting["source"] in sources:
        paper_rows = []
        for method, values in paper_numbers.DOMAIN_GENERALIZATION.items():
            row = {"Model": setting["model"], "Method": method + PAPER_MARK, "Shots": str(setting["shots"])}
            row["Source"] = dataset_name(setting["source"])
            for target, value in values.items():
                row[dataset_name(target)] = f"{value:.2f}"
                paper_rows.append(
                    {
                        "origin": PAPER,
                        "model": setting["model"],
                        "method": method,
                        "shots": setting["shots"],
                        "source": setting["source"],
                        "target": target,
                        "mean": value,
                    }
                )
            display_rows.append(row)
        data = pd.concat([data, pd.DataFrame(paper_rows)], ignore_index=True)
        notes.append("[paper] rows: the published numbers (RN50, 16 shots, source ImageNet).")
    label_columns = (["Model"] if show_model else []) + ["Method", "Shots", "Source", SEEDS]
    display = pd.DataFrame(display_rows).reindex(columns=label_columns + [dataset_name(c) for c in columns])
    data = _integers(data, ["shots", "seeds"])
    title = "Domain generalisation accuracy (%)"
    display = display.astype(object).fillna("")  # a column no row fills (a blank source) is float NaN
    return Table("domain_generalization", title, data, display, notes, repeated)


def _own_cells_missing(records: pd.DataFrame) -> list[str]:
    """A note naming the checkpoints whose own-dataset cell is left out: neither an eval record nor a run."""
    prompts = list(zip(records["checkpoint"], records["weights_id"], strict=True))  # a prompt on its weights
    own = (records["target"] == records["source"]).tolist()
    tested_own = {prompt for prompt, is_own in zip(prompts, own, strict=True) if is_own}
    missing = list(dict.fromkeys(prompt[0] for prompt in prompts if prompt not in tested_own))
    if not missing:
        return []
    its, it = ("its", "it") if len(missing) == 1 else ("their", "them")
    return [
        f"{plural(len(missing), 'checkpoint')} without a result on {its} own dataset (the source column is blank "
        f"or over fewer seeds): {', '.join(map(str, missing))}; evaluate {it} there with `nemesis eval` or pass "
        f"{its} run folder."
    ]


# ----------------------------------------------------------------------------- LNE frequency


def lne_frequency_table(
    cells: pd.DataFrame,
    by: str | Sequence[str] = DEFAULT_BY,
    margin: float = 0.0,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    paper: bool = True,
    duplicate_cells: int = 0,
    pool: bool = False,
) -> Table:
    """LNE frequency (occurrences), rate and degradation rate per group; by dataset x shots it is
    laid out as the paper's figure: one row per dataset and kind of prompt, one column per shots
    value, cells "frequency (rate); degr. degradation rate". Groups never mix kinds of prompt
    (method, class subset, training dataset, weights) unless `pool`, which the title then states;
    groups on random weights are labelled so, several real weights ids are named; the paper's
    numbers appear only under the CoOp all-class row of one of its datasets, never on random weights.
    Corruption sites are never pooled: a table of several has a row (or group) per site.
    `duplicate_cells` (dropped by the loader) is stated in the notes."""
    columns = parse_by(by)
    frequency = lne_frequency(cells, columns, margin=margin, significant=significant, alpha=alpha, pool=pool)
    kind_columns = [column for column in PROMPT_KIND if column in frequency.columns]  # none when pooled
    sites_apart = SITE in frequency.columns and SITE not in columns  # several sites: kept apart unasked
    row_columns = kind_columns + ([SITE] if sites_apart else [])  # what a row of the paper's layout is

    def kind_of(item) -> tuple:  # missing values as None, so that kinds compare equal
        return tuple(None if pd.isna(value) else value for value in (getattr(item, column) for column in row_columns))

    weights = weights_names(frequency["weights"]) if "weights" in kind_columns else {}

    def label_of(kind: tuple) -> str:
        values = dict(zip(row_columns, kind, strict=True))
        label = "" if pool else kind_label({column: values[column] for column in kind_columns}, weights)
        site = site_label(values[SITE]) if sites_apart else ""
        return ", ".join(part for part in (label, site) if part)

    data = frequency.copy()
    data.insert(0, "origin", OURS)
    criterion = f"accuracy change > {margin:g} pp" + (f" and exact McNemar p < {alpha:g}" if significant else "")
    notes = [f"An occurrence: a norm-reducing cell with {criterion}."]
    pooled = f" ({POOLED_NOTE})" if pool else ""
    if pool:
        notes.append("Cells of every method and kind of prompt are counted together, as --pool asked.")
    if sites_apart:
        notes.append(
            "Cells at different corruption sites (site; whole ctx: the method corrupts all of its ctx at once) "
            "are counted apart, never together."
        )
    if duplicate_cells:
        were = "was" if duplicate_cells == 1 else "were"
        notes.append(
            f"{plural(duplicate_cells, 'cell')} found in more than one results table {were} counted once (first file)."
        )
    if columns != ["dataset", "shots"]:
        notes.append(
            f"{RATE} = frequency / reducing cells; {DEGRADATION_RATE} = degrading / increasing cells "
            "(norm-increasing cells that lower accuracy), both in percent."
        )
        display = frequency.copy()
        if SITE in display.columns:
            display[SITE] = [site_label(value) for value in display[SITE]]
        added = [column for column in kind_columns if column not in columns]
        if added:  # one readable label instead of the raw kind columns (the CSV keeps them)
            labels = [
                kind_label(dict(zip(kind_columns, values, strict=True)), weights)
                for values in display[kind_columns].itertuples(index=False)
            ]
            display = display.drop(columns=added)
            display.insert(len(columns), "prompts", labels)
        display[RATE] = [_percent(value) for value in display[RATE]]
        display[DEGRADATION_RATE] = [_percent(value) for value in display[DEGRADATION_RATE]]
        return Table("lne_frequency", f"Low-Norm Effect frequency{pooled}", data, display.astype(str), notes)

    datasets = sorted(frequency["dataset"].unique(), key=_dataset_order)
    shots_values = sorted(frequency["shots"].dropna().unique()) + ([pd.NA] if frequency["shots"].isna().any() else [])
    present_shots = {int(value) for value in frequency["shots"].dropna()}
    display_rows, paper_rows = [], []
    for dataset in datasets:
        rows = frequency[frequency["dataset"] == dataset]
        kinds = list(dict.fromkeys(kind_of(item) for item in rows.itertuples(index=False)))
        kinds.sort(key=lambda kind: tuple((pd.isna(value), str(value)) for value in kind))  # as the figure
        for kind in kinds:
            row = {"Dataset": dataset_name(dataset)}
            if not pool or sites_apart:
                row["Prompts"] = label_of(kind)
            row[SEEDS] = _seeds_text([item.seeds for item in rows.itertuples(index=False) if kind_of(item) == kind])
            for item in rows.itertuples(index=False):
                if kind_of(item) == kind:
                    rate, degradation = _percent(getattr(item, RATE)), _percent(getattr(item, DEGRADATION_RATE))
                    rates = f"({rate}); {DEGRADATION_MARK} {degradation}"
                    row[shots_label(item.shots)] = f"{item.frequency} {rates}"
            display_rows.append(row)
            values = dict(zip(row_columns, kind, strict=True))
            same_kind = not pool and is_paper_kind(values, dataset)
            same_kind = same_kind and not values.get(SITE)  # the paper corrupts the whole ctx
            published = paper_numbers.LNE_FREQUENCY.get(dataset) if paper and same_kind else None
            if published:
                row = {"Dataset": dataset_name(dataset) + PAPER_MARK, "Prompts": "CoOp"}
                for shots, value in published.items():
                    if shots in present_shots:
                        row[shots_label(shots)] = f"~{value}"
                        paper_rows.append({"origin": PAPER, "dataset": dataset, "shots": shots, "frequency": value})
                display_rows.append(row)
    notes.append(
        f"Cell: frequency (rate = frequency / reducing cells); {DEGRADATION_MARK} = share of norm-increasing "
        "cells that lower accuracy (n/a: no norm-increasing cell). Seeds: summed over in each cell (a range "
        "where they differ)."
    )
    if paper_rows:
        method, penalty = paper_numbers.LNE_PROMPTS
        paper_frame = pd.DataFrame(paper_rows).assign(method=method, penalty=penalty, subsample="all")
        data = pd.concat([data, paper_frame], ignore_index=True)
        data = _integers(data, ["shots", "cells", "reducing", "frequency", "increasing", "degrading"])
        notes.append(
            "[paper] rows: published frequencies of CoOp prompts (all classes) read off a plot; what the paper "
            "counts is not stated. They are shown only beside groups of the same kind."
        )
    shot_columns = [shots_label(value) for value in shots_values]
    label_columns = ["Dataset", SEEDS] if pool and not sites_apart else ["Dataset", "Prompts", SEEDS]
    display = pd.DataFrame(display_rows).reindex(columns=[*label_columns, *shot_columns]).fillna("")
    display = display.rename(columns={label: f"{label} shot{'' if label == '1' else 's'}" for label in shot_columns})
    return Table("lne_frequency", f"Low-Norm Effect frequency by dataset and shots{pooled}", data, display, notes)


LNE_BY_DEPTH = "lne_by_depth"


def lne_depth_table(
    cells: pd.DataFrame,
    margin: float = 0.0,
    significant: bool = False,
    alpha: float = DEFAULT_ALPHA,
    pool: bool = False,
) -> Table:
    """LNE frequency and mean accuracy change by (method, tower, layer) and position (`lne_by_depth`):
    one row per prompt kind, tower, layer and position; cells of CoOp-like methods (no tower) are not
    in it. The CSV keeps the raw columns; the display labels the kind of prompt in one column."""
    frequency = lne_by_depth(cells, margin=margin, significant=significant, alpha=alpha, pool=pool)
    kind_columns = [column for column in PROMPT_KIND if column in frequency.columns]
    weights = weights_names(frequency["weights"]) if "weights" in frequency.columns else {}
    display = pd.DataFrame(
        {
            "prompts": [
                kind_label(dict(zip(kind_columns, values, strict=True)), weights)
                for values in frequency[kind_columns].itertuples(index=False)
            ]
        }
    )
    for column in DEPTH_BY[1:]:
        display[column] = [str(value) for value in frequency[column]]
    for column in ("seeds", "cells", "reducing", "frequency"):
        display[column] = frequency[column].astype(str)
    display[RATE] = [_percent(value) for value in frequency[RATE]]
    for column in (MEAN_CHANGE, MEAN_CHANGE_REDUCING):
        display[column] = ["n/a" if pd.isna(value) else f"{value:+.2f}" for value in frequency[column]]
    criterion = f"accuracy change > {margin:g} pp" + (f" and exact McNemar p < {alpha:g}" if significant else "")
    notes = [
        f"An occurrence: a norm-reducing cell with {criterion}; summed over seeds and corruption settings.",
        f"{RATE} = frequency / reducing cells; {MEAN_CHANGE} = mean accuracy change (pp) of the group's cells, "
        f"{MEAN_CHANGE_REDUCING} of its norm-reducing cells (n/a: none).",
        "Only prompts inside the towers have (tower, layer) sites: cells of CoOp-like methods are not in this table.",
    ]
    if pool:
        notes.append("Kinds of prompt of one method are counted together, as --pool asked.")
    pooled = f" ({DEPTH_POOLED_NOTE})" if pool else ""
    return Table(LNE_BY_DEPTH, f"Low-Norm Effect by tower, layer and position{pooled}", frequency, display, notes)


def _percent(value: float) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{value:.1f}%"


# ----------------------------------------------------------------------------- writing


def rounded(frame: pd.DataFrame, decimals: int = CSV_DECIMALS) -> pd.DataFrame:
    """A copy with its float columns rounded: digits beyond float32's precision are noise, not results."""
    floats = frame.select_dtypes("float").columns
    return frame.assign(**{column: frame[column].round(decimals) for column in floats})


def _escape_markdown(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(table: Table) -> str:
    """A pipe table with the title as a heading and the notes below."""
    header = [_escape_markdown(column) for column in table.display.columns]
    lines = [f"## {table.title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table.display.itertuples(index=False):
        lines.append("| " + " | ".join(_escape_markdown(value) for value in row) + " |")
    lines.append("")
    lines.extend(f"{note}  " for note in table.notes)
    return "\n".join(lines).rstrip() + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"$\sim$",
    "^": r"\^{}",
    "±": r"$\pm$",
}


def _escape_latex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(character, character) for character in str(text))


def to_latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); title and notes as comments."""
    columns = list(table.display.columns)
    label_count = sum(1 for column in columns if column in ("Model", "Method", "Shots", "Dataset", "Source", "Prompts"))
    alignment = "l" * max(label_count, 1) + "r" * (len(columns) - max(label_count, 1))
    lines = [f"% {table.title}", *(f"% {note}" for note in table.notes)]
    lines += [rf"\begin{{tabular}}{{{alignment}}}", r"\toprule"]
    lines.append(" & ".join(_escape_latex(column) for column in columns) + r" \\")
    lines.append(r"\midrule")
    for row in table.display.itertuples(index=False):
        lines.append(" & ".join(_escape_latex(value) for value in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def table_paths(table: Table, out_dir: str | os.PathLike) -> list[Path]:
    return [Path(out_dir) / f"{table.name}{suffix}" for suffix in TABLE_SUFFIXES]


def write_table(table: Table, out_dir: str | os.PathLike) -> list[Path]:
    """Write TABLE.md, TABLE.csv and TABLE.tex into `out_dir`, each atomically."""
    markdown, csv, latex = table_paths(table, out_dir)
    write_text_atomic(markdown, to_markdown(table))
    write_text_atomic(csv, rounded(table.data).to_csv(index=False))
    write_text_atomic(latex, to_latex(table))
    return [markdown, csv, latex]
