"""Report tables against hand-computed means, sample standard deviations and harmonic means."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from analysis import (
    base_to_new_table,
    domain_generalization_table,
    few_shot_results,
    few_shot_table,
    harmonic_mean,
    lne_frequency_table,
    load_evals,
    load_runs,
    method_label,
    write_table,
)
from analysis.tables import to_latex, to_markdown, unfinished_runs
from nemesis.errors import NemesisError

from .analysis_helpers import checkpoint_rows, eval_record, increasing, reducing, sweep_frame, write_evals, write_run

# (dataset, shots) -> final test accuracy of seeds 1, 2, 3 (CoOp); Nemesis gets +1 everywhere.
ACCURACIES = {
    ("oxford_pets", 1): [60.0, 62.0, 67.0],
    ("food101", 1): [70.0, 71.0, 72.0],
    ("oxford_pets", 2): [65.0, 66.0, 70.0],
    ("food101", 2): [75.0, 75.0, 75.0],
}


def _runs(tmp_path):
    for (dataset, shots), values in ACCURACIES.items():
        for seed, accuracy in enumerate(values, start=1):
            # An evaluation-free middle epoch: the final accuracy is the last non-null one.
            identity = {"dataset": dataset, "shots": shots, "seed": seed}
            write_run(tmp_path / f"coop-{dataset}-{shots}-{seed}", [10.0, None, accuracy], **identity)
            write_run(
                tmp_path / f"nemesis-{dataset}-{shots}-{seed}",
                [10.0, accuracy + 1],
                **identity,
                method="nemesis",
                weight=10.0,
            )
    return load_runs([tmp_path])


def _cell(data: pd.DataFrame, method: str, shots: int, dataset: str) -> pd.Series:
    rows = data[(data["method"] == method) & (data["shots"] == shots) & (data["dataset"] == dataset)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_method_labels():
    assert method_label("coop") == "CoOp"
    assert method_label("nemesis", beta=1.0, weight=1.0) == "CoOp+Nemesis (PUN, weight 1)"
    assert method_label("nemesis", beta=0.0, weight=10.0) == "CoOp+Nemesis (PAN, weight 10)"
    assert method_label("nemesis", beta=0.5, weight=0.5) == "CoOp+Nemesis (PUN+PAN, beta 0.5, weight 0.5)"


def test_few_shot_means_and_sample_std(tmp_path):
    table = few_shot_table(few_shot_results(_runs(tmp_path)))
    data = table.data
    pets = _cell(data, "CoOp", 1, "oxford_pets")
    # 60, 62, 67: mean 63; sample variance (9 + 1 + 16) / 2 = 13.
    assert pets["mean"] == pytest.approx(63.0)
    assert pets["std"] == pytest.approx(math.sqrt(13.0))
    assert pets["seeds"] == 3
    food = _cell(data, "CoOp", 2, "food101")
    assert (food["mean"], food["std"]) == (75.0, 0.0)
    assert _cell(data, "CoOp+Nemesis (PUN, weight 10)", 1, "oxford_pets")["mean"] == pytest.approx(64.0)
    # Average over datasets, 1 shot: per-seed averages 65, 66.5, 69.5 -> mean 67, variance 5.25.
    average = _cell(data, "CoOp", 1, "Average")
    assert average["mean"] == pytest.approx(67.0)
    assert average["std"] == pytest.approx(math.sqrt(5.25))
    display = table.display.set_index(["Method", "Shots"])
    assert display.loc[("CoOp", "1"), "OxfordPets"] == f"63.00 ± {math.sqrt(13.0):.2f}"
    assert display.loc[("CoOp", "1"), "Average"] == "67.00 ± 2.29"
    assert list(table.display.columns) == ["Method", "Shots", "Seeds", "OxfordPets", "Food101", "Average"]
    assert set(table.display["Seeds"]) == {"3"}


def test_one_seed_has_a_blank_std(tmp_path):
    write_run(tmp_path / "a", [55.5], dataset="dtd", shots=4, seed=1)
    table = few_shot_table(few_shot_results(load_runs([tmp_path])))
    row = _cell(table.data, "CoOp", 4, "dtd")
    assert row["mean"] == 55.5 and pd.isna(row["std"])
    assert table.display.loc[0, "DTD"] == "55.50"


def test_few_shot_uses_own_dataset_evals_of_other_checkpoints(tmp_path):
    runs = [*_runs(tmp_path / "runs")]
    inside = str(runs[0].path / "prompt.safetensors")
    evals = load_evals(
        [
            write_evals(
                tmp_path / "e.jsonl",
                [
                    eval_record(checkpoint=inside, accuracy=1.0),  # already counted through its run
                    eval_record(checkpoint="official/seed1", dataset="dtd", train_dataset="dtd", accuracy=40.0),
                    eval_record(checkpoint="official/seed1", dataset="eurosat", train_dataset="dtd", accuracy=30.0),
                ],
            )
        ]
    )
    results = few_shot_results(runs, evals)
    assert len(results) == len(runs) + 1
    assert results[results["dataset"] == "dtd"]["accuracy"].tolist() == [40.0]


def test_harmonic_mean():
    assert harmonic_mean(80.0, 70.0) == pytest.approx(2 * 80 * 70 / 150)
    assert harmonic_mean(50.0, 50.0) == 50.0
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_base_to_new_table(tmp_path):
    records = []
    for dataset, seeds in {"oxford_pets": [(90, 60), (92, 62)], "dtd": [(70, 50), (72, 54)]}.items():
        for seed, (base, new) in enumerate(seeds, start=1):
            for subsample, accuracy in (("base", base), ("new", new)):
                records.append(
                    eval_record(
                        checkpoint=f"{dataset}/{seed}",
                        dataset=dataset,
                        train_dataset=dataset,
                        subsample=subsample,
                        seed=seed,
                        accuracy=accuracy,
                    )
                )
    records.append(eval_record(checkpoint="lonely", subsample="base", accuracy=99.0))  # no new: left out
    table = base_to_new_table(load_evals([write_evals(tmp_path / "b2n.jsonl", records)]))
    data = table.data.set_index("dataset")
    assert (data.loc["oxford_pets", "base"], data.loc["oxford_pets", "new"]) == (91.0, 61.0)
    assert data.loc["oxford_pets", "H"] == pytest.approx(harmonic_mean(91.0, 61.0))
    assert (data.loc["dtd", "base"], data.loc["dtd", "new"]) == (71.0, 52.0)
    assert (data.loc["Average", "base"], data.loc["Average", "new"]) == (81.0, 56.5)
    assert data.loc["Average", "H"] == pytest.approx(harmonic_mean(81.0, 56.5))
    assert set(table.display["Dataset"]) == {"OxfordPets", "DTD", "Average"}


def test_domain_generalization_table(tmp_path):
    records = []
    for seed, shift in ((1, 0.0), (2, 2.0)):
        for target, accuracy in (("imagenet", 62.0), ("imagenetv2", 55.0), ("imagenet_a", 22.0)):
            records.append(
                eval_record(
                    checkpoint=f"in/{seed}",
                    dataset=target,
                    train_dataset="imagenet",
                    seed=seed,
                    accuracy=accuracy + shift,
                    model="RN50",
                )
            )
    table = domain_generalization_table(load_evals([write_evals(tmp_path / "dg.jsonl", records)]), paper=False)
    data = table.data.set_index("target")
    assert data.loc["imagenetv2", "mean"] == 56.0
    assert data.loc["imagenetv2", "std"] == pytest.approx(math.sqrt(2.0))
    columns = ["Method", "Shots", "Source", "Seeds", "ImageNet", "ImageNet-V2", "ImageNet-A"]
    assert list(table.display.columns) == columns and table.display.loc[0, "Seeds"] == "2"
    assert table.display.loc[0, "ImageNet-V2"] == "56.00 ± 1.41"


def test_paper_rows_are_labelled(tmp_path):
    targets = ("imagenet", "imagenet_r")
    records = [eval_record(checkpoint="c", dataset=target, train_dataset="imagenet") for target in targets]
    table = domain_generalization_table(load_evals([write_evals(tmp_path / "dg.jsonl", records)]))
    paper_methods = table.display[table.display["Method"].str.endswith("[paper]")]
    assert len(paper_methods) > 0
    assert set(table.data["origin"]) == {"ours", "paper"}
    assert any("[paper]" in note for note in table.notes)


def _cells():
    parts = [
        checkpoint_rows("p1", [reducing(gained=1), reducing(lost=1), increasing(lost=1)], shots=1),
        checkpoint_rows("p2", [reducing(gained=1), reducing(gained=1)], shots=2),
        checkpoint_rows("f1", [reducing(), increasing(gained=1)], dataset="fashion_mnist", shots=1),
    ]
    return sweep_frame([row for rows, _ in parts for row in rows])


def test_lne_frequency_table():
    table = lne_frequency_table(_cells(), paper=False)
    assert list(table.display.columns) == ["Dataset", "Prompts", "Seeds", "1 shot", "2 shots"]
    assert set(table.display["Prompts"]) == {"CoOp"} and set(table.display["Seeds"]) == {"1"}
    display = table.display.set_index("Dataset")
    # frequency (rate); degr. = share of norm-increasing cells that lose accuracy.
    assert display.loc["OxfordPets", "1 shot"] == "1 (50.0%); degr. 100.0%"
    assert display.loc["OxfordPets", "2 shots"] == "2 (100.0%); degr. n/a"
    assert display.loc["Fashion-MNIST", "1 shot"] == "0 (0.0%); degr. 0.0%"
    assert display.loc["Fashion-MNIST", "2 shots"] == ""
    assert any("degr. = share of norm-increasing cells that lower accuracy" in note for note in table.notes)
    assert "1 (50.0%); degr. 100.0%" in to_markdown(table)
    frequency = table.data.set_index(["dataset", "shots"])["frequency"]
    assert frequency.to_dict() == {("fashion_mnist", 1): 0, ("oxford_pets", 1): 1, ("oxford_pets", 2): 2}


def test_lne_frequency_table_says_how_many_seeds_each_row_sums():
    parts = [
        checkpoint_rows("s1", [reducing(gained=1)], shots=1, seed=1),
        checkpoint_rows("s2", [reducing(lost=1)], shots=1, seed=2),
        checkpoint_rows("s3", [reducing(gained=1)], shots=2, seed=1),
    ]
    cells = sweep_frame([row for rows, _ in parts for row in rows])
    table = lne_frequency_table(cells, paper=False)
    assert table.display.set_index("Dataset").loc["OxfordPets", "Seeds"] == "1-2"  # 2 seeds at 1 shot, 1 at 2
    assert table.data.set_index("shots")["seeds"].to_dict() == {1: 2, 2: 1}
    by_seed = lne_frequency_table(cells, by="dataset,seed", paper=False).data
    assert set(by_seed["seeds"]) == {1}


def test_lne_frequency_table_by_other_columns_shows_the_degradation_rate():
    table = lne_frequency_table(_cells(), by="dataset", paper=False, duplicate_cells=3)
    display = table.display.set_index("dataset")
    assert display.loc["oxford_pets", "degradation_rate_percent"] == "100.0%"
    assert display.loc["fashion_mnist", "degradation_rate_percent"] == "0.0%"
    assert "degradation_rate_percent" in to_markdown(table)
    assert any("3 cells found in more than one results table were counted once" in note for note in table.notes)


def test_few_shot_table_counts_finished_runs_only(tmp_path):
    write_run(tmp_path / "done-1", [50.0, 60.0], seed=1)
    write_run(tmp_path / "done-2", [50.0, 62.0], seed=2)
    write_run(tmp_path / "stopped", [50.0, 90.0], seed=3, epochs=10)  # 2 of 10 epochs
    write_run(tmp_path / "no-prompt", [50.0, 95.0], seed=4, prompt=False)
    runs = load_runs([tmp_path])
    assert sorted(run.name for run in unfinished_runs(runs)) == ["no-prompt", "stopped"]
    table = few_shot_table(few_shot_results(runs), skipped_runs=len(unfinished_runs(runs)))
    pets = _cell(table.data, "CoOp", 1, "oxford_pets")
    assert (pets["mean"], pets["seeds"]) == (61.0, 2)
    assert any("2 unfinished runs skipped" in note for note in table.notes)
    assert "2 unfinished runs skipped" in to_markdown(table)
    with pytest.raises(NemesisError, match=r"no run finished its epochs .*\(2 unfinished runs skipped\)"):
        few_shot_table(few_shot_results([run for run in runs if not run.finished]), skipped_runs=2)


def test_writers_produce_markdown_csv_and_latex(tmp_path):
    table = lne_frequency_table(_cells())
    markdown = to_markdown(table)
    assert markdown.startswith("## Low-Norm Effect") and "| Dataset | Prompts | Seeds | 1 shot | 2 shots |" in markdown
    assert "OxfordPets [paper]" in markdown  # reference rows, clearly marked
    latex = to_latex(table)
    assert r"\begin{tabular}{llrrr}" in latex and r"50.0\%" in latex and r"\bottomrule" in latex
    paths = write_table(table, tmp_path)
    assert [path.name for path in paths] == ["lne_frequency.md", "lne_frequency.csv", "lne_frequency.tex"]
    csv = pd.read_csv(tmp_path / "lne_frequency.csv")
    assert {"origin", "dataset", "shots", "frequency", "rate_percent"} <= set(csv.columns)
    assert csv.set_index(["origin", "dataset", "shots"]).loc[("ours", "oxford_pets", 1), "rate_percent"] == 50.0


def test_empty_inputs_fail_clearly(tmp_path):
    with pytest.raises(NemesisError, match="no few-shot results"):
        few_shot_table(few_shot_results([]))
    records = [eval_record()]
    with pytest.raises(NemesisError, match="base and its new"):
        base_to_new_table(load_evals([write_evals(tmp_path / "e.jsonl", records)]))
    with pytest.raises(NemesisError, match="besides its own"):
        domain_generalization_table(load_evals([tmp_path / "e.jsonl"]))


def test_a_copied_run_folder_is_one_seed_and_a_note_names_the_copy(tmp_path):
    for seed, accuracy in ((1, 60.0), (2, 62.0)):
        write_run(tmp_path / "tree" / f"seed{seed}", [accuracy], seed=seed)
    shutil.copytree(tmp_path / "tree" / "seed1", tmp_path / "copy" / "seed1")
    table = few_shot_table(few_shot_results(load_runs([tmp_path / "tree", tmp_path / "copy" / "seed1"])))
    pets = _cell(table.data, "CoOp", 1, "oxford_pets")
    assert (pets["mean"], pets["seeds"]) == (61.0, 2)
    assert _cell(table.data, "CoOp", 1, "Average")["seeds"] == 2
    (note,) = table.findings
    assert "seed 1 was given 2 times" in note and str(tmp_path / "copy" / "seed1") in note
    assert note in table.notes


def test_two_presets_of_one_setting_are_one_seed_in_the_report(tmp_path):
    # `--method nemesis,pen` trained before the grid planned such presets once: the same run twice.
    write_run(tmp_path / "nemesis" / "seed1", [60.0], method="nemesis", beta=1.0)
    write_run(tmp_path / "pen" / "seed1", [60.0], method="nemesis", beta=1.0)
    table = few_shot_table(few_shot_results(load_runs([tmp_path])))
    row = _cell(table.data, "CoOp+Nemesis (PUN, weight 1)", 1, "oxford_pets")
    assert row["seeds"] == 1 and pd.isna(row["std"])
    assert len(table.findings) == 1


def test_a_copied_checkpoint_is_one_seed_in_the_base_to_new_table(tmp_path):
    records = [
        eval_record(checkpoint=checkpoint, subsample=subsample, accuracy=accuracy)
        for checkpoint in ("runs/seed1", "copy/seed1")
        for subsample, accuracy in (("base", 80.0), ("new", 60.0))
    ]
    table = base_to_new_table(load_evals([write_evals(tmp_path / "b2n.jsonl", records)]))
    assert table.data.set_index("dataset").loc["oxford_pets", "seeds"] == 1
    assert len(table.findings) == 1 and "copy/seed1" in table.findings[0]


def test_random_weight_records_never_replace_a_real_result(tmp_path):
    real = {"checkpoint": "official/seed1", "pretrained": "openai", "weights_id": "tag:openai+quickgelu"}
    random = {"checkpoint": "official/seed1", "pretrained": None, "weights_id": "random-seed0"}
    records = [eval_record(**real, accuracy=54.34), eval_record(**random, accuracy=10.02)]
    for subsample, accuracy in (("base", 80.0), ("new", 60.0)):
        records.append(eval_record(**real, subsample=subsample, accuracy=accuracy))
        records.append(eval_record(**random, subsample=subsample, accuracy=accuracy / 8))
    evals = load_evals([write_evals(tmp_path / "e.jsonl", records)])
    few_shot = few_shot_table(few_shot_results([], evals))
    assert _cell(few_shot.data, "CoOp", 16, "oxford_pets")["mean"] == 54.34
    assert _cell(few_shot.data, "CoOp (random weights)", 16, "oxford_pets")["mean"] == 10.02
    assert set(few_shot.display["Method"]) == {"CoOp", "CoOp (random weights)"}
    base_to_new = base_to_new_table(evals).data.set_index(["method", "dataset"])
    assert base_to_new.loc[("CoOp", "oxford_pets"), "base"] == 80.0
    assert base_to_new.loc[("CoOp (random weights)", "oxford_pets"), "base"] == 10.0


def test_runs_on_random_weights_are_labelled(tmp_path):
    write_run(tmp_path / "run", [55.0])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps(config | {"pretrained": None}))
    (run,) = load_runs([tmp_path])
    assert run.label == "CoOp (random weights)"
    assert few_shot_table(few_shot_results([run])).display.loc[0, "Method"] == "CoOp (random weights)"


def test_a_checkpoint_evaluated_under_two_real_weights_is_two_rows_and_stated(tmp_path):
    from analysis.tables import weights_conflicts

    records = [
        eval_record(checkpoint="c", pretrained="openai", activation="quickgelu", accuracy=54.0),
        eval_record(checkpoint="c", pretrained="openai", activation="gelu", accuracy=40.0),
        eval_record(checkpoint="c", pretrained="openai", activation="gelu", accuracy=41.0),  # evaluated again
    ]
    evals = load_evals([write_evals(tmp_path / "e.jsonl", records)])
    (note,) = weights_conflicts(evals)
    assert "openai, quickgelu; openai, gelu" in note and "each weights' result is a row of its own" in note
    assert few_shot_results([], evals)["accuracy"].tolist() == [54.0, 41.0]
    table = few_shot_table(few_shot_results([], evals))
    shown = table.display.set_index("Method")["OxfordPets"].to_dict()
    assert shown == {"CoOp (weights openai, quickgelu)": "54.00", "CoOp (weights openai, gelu)": "41.00"}
    assert not table.findings and any("each label names its weights" in line for line in table.notes)


def _zero_shot(subsample: str, accuracy: float) -> dict:
    return eval_record(
        checkpoint="zero-shot:tiny:fmnist", method="zero-shot", method_label="Zero-shot CLIP", shots=0, seed=None,
        pretrained="fmnist", subsample=subsample, accuracy=accuracy,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("subsamples", "expected"),
    [(("base", "new"), (72.0, 60.0, harmonic_mean(72.0, 60.0))), (("base",), (72.0, None, None))],
)
def test_the_zero_shot_row_shows_what_was_evaluated(tmp_path, subsamples, expected):
    records = [eval_record(checkpoint="p", subsample=s, accuracy=a) for s, a in (("base", 80.0), ("new", 50.0))]
    records += [_zero_shot(subsample, {"base": 72.0, "new": 60.0}[subsample]) for subsample in subsamples]
    table = base_to_new_table(load_evals([write_evals(tmp_path / "b2n.jsonl", records)]))
    row = table.data[(table.data["method"] == "Zero-shot CLIP") & (table.data["dataset"] == "oxford_pets")].iloc[0]
    values = tuple(None if pd.isna(value) else value for value in (row["base"], row["new"], row["H"]))
    assert values == pytest.approx(expected)
    shown = table.display[table.display["Method"] == "Zero-shot CLIP"].iloc[0]
    assert shown["Base"] == "72.00" and (shown["H"] == "") == (len(subsamples) == 1)


def test_a_lone_zero_shot_record_makes_a_base_to_new_table(tmp_path):
    evals = load_evals([write_evals(tmp_path / "b2n.jsonl", [_zero_shot("new", 60.0)])])
    assert base_to_new_table(evals).display.loc[0, "New"] == "60.00"


def test_markdown_tables_say_how_many_seeds(tmp_path):
    for seed in (1, 2, 3):
        write_run(tmp_path / "runs" / f"pets{seed}", [60.0 + seed], seed=seed)
    write_run(tmp_path / "runs" / "dtd1", [40.0], dataset="dtd", seed=1)
    markdown = to_markdown(few_shot_table(few_shot_results(load_runs([tmp_path / "runs"]))))
    assert "| Method | Shots | Seeds | OxfordPets | DTD | Average |" in markdown
    assert "| CoOp | 1 | 1-3 | 62.00 ± 1.00 | 40.00 | 51.00 |" in markdown
    records = [
        eval_record(checkpoint=f"c{seed}", seed=seed, subsample=part) for seed in (1, 2) for part in ("base", "new")
    ]
    base_to_new = to_markdown(base_to_new_table(load_evals([write_evals(tmp_path / "b2n.jsonl", records)])))
    assert "| Method | Shots | Dataset | Seeds | Base | New | H |" in base_to_new
    assert "| CoOp | 16 | OxfordPets | 2 | 50.00 | 50.00 | 50.00 |" in base_to_new


def test_the_own_dataset_cell_comes_from_the_run_folder_or_a_note_says_why_it_is_blank(tmp_path):
    run = write_run(tmp_path / "runs" / "seed1", [61.0])
    record = eval_record(checkpoint=str(run / "prompt.safetensors"), dataset="dtd", shots=1, accuracy=30.0)
    evals = load_evals([write_evals(tmp_path / "e.jsonl", [record])])
    table = domain_generalization_table(evals, paper=False, runs=load_runs([tmp_path / "runs"]))
    assert (table.display.loc[0, "OxfordPets"], table.display.loc[0, "DTD"]) == ("61.00", "30.00")
    alone = domain_generalization_table(evals, paper=False)
    assert alone.display.loc[0, "OxfordPets"] == ""
    assert any("1 checkpoint without a result on its own dataset" in note for note in alone.notes)


def _sha(letter: str) -> str:
    return "sha256:" + letter * 64


def test_results_on_different_real_weights_are_separate_rows_not_copies(tmp_path):
    """Two zero-shot records on two weights files, and prompts of one seed trained on two real weights:
    no copies, so every result is a row of its own, its label naming the weights."""
    records = []
    for letter, accuracy in (("a", 70.0), ("b", 50.0)):
        weights = {"pretrained": f"w{letter}.pt", "weights_id": _sha(letter)}
        for subsample, value in (("base", accuracy), ("new", accuracy - 10)):
            zero_shot = _zero_shot(subsample, value) | weights | {"checkpoint": f"zero-shot:tiny:w{letter}.pt"}
            records.append(zero_shot)
            records.append(eval_record(checkpoint=f"{letter}/seed1", subsample=subsample, accuracy=value, **weights))
    table = base_to_new_table(load_evals([write_evals(tmp_path / "b2n.jsonl", records)]))
    assert not table.findings  # nothing was counted as a copy
    rows = table.data[table.data["dataset"] == "oxford_pets"].set_index("method")
    assert rows["base"].to_dict() == {
        "CoOp (weights sha256:aaaaaaaaaaaa)": 70.0,
        "CoOp (weights sha256:bbbbbbbbbbbb)": 50.0,
        "Zero-shot CLIP (weights sha256:aaaaaaaaaaaa)": 70.0,
        "Zero-shot CLIP (weights sha256:bbbbbbbbbbbb)": 50.0,
    }
    assert set(rows["seeds"]) == {1}
    # The same prompt copied (same weights) is still one seed.
    copies = [record | {"checkpoint": "copy/seed1"} for record in records if record["checkpoint"] == "a/seed1"]
    table = base_to_new_table(load_evals([write_evals(tmp_path / "b2n.jsonl", records + copies)]))
    (note,) = table.findings
    assert "seed 1 was given 2 times (a/seed1, copy/seed1)" in note


def _run_on_weights(folder, accuracy: float, weights_id: str, seed: int = 1):
    """A finished run folder whose prompt records the weights it trained on."""
    import torch

    from nemesis.files.checkpoint import PromptMetadata, save_prompt

    write_run(folder, [accuracy], seed=seed)
    (folder / "prompt.safetensors").unlink()
    metadata = PromptMetadata(model="tiny", weights_id=weights_id, activation="gelu", seed=seed, prompt_method="coop")
    save_prompt(folder / "prompt.safetensors", torch.zeros(4, 64), metadata)
    return folder


def test_a_run_prompt_evaluated_on_other_weights_is_a_result_of_its_own(tmp_path):
    """`eval RUN/prompt.safetensors --pretrained w.pt` on other weights than the run trained on is a row
    of its own; a record on the run's own weights repeats the run's result and is not counted again."""
    from analysis.tables import weights_conflicts

    run = _run_on_weights(tmp_path / "run", 60.0, _sha("a"))
    inside = str(run / "prompt.safetensors")
    records = [
        eval_record(checkpoint=inside, shots=1, weights_id=_sha("a"), activation="gelu", accuracy=60.0),
        eval_record(checkpoint=inside, shots=1, weights_id=_sha("b"), activation="gelu", accuracy=20.0),
    ]
    evals = load_evals([write_evals(tmp_path / "e.jsonl", records)])
    runs = load_runs([run])
    results = few_shot_results(runs, evals)
    assert sorted(results["accuracy"]) == [20.0, 60.0]
    table = few_shot_table(results)
    shown = table.display.set_index("Method")["OxfordPets"].to_dict()
    assert shown == {"CoOp (weights sha256:aaaaaaaaaaaa)": "60.00", "CoOp (weights sha256:bbbbbbbbbbbb)": "20.00"}
    assert not table.findings
    (note,) = weights_conflicts(evals)  # what the note says is what the table does
    assert "each weights' result is a row of its own" in note
    # Under another activation, the same weights file is other weights too.
    other = eval_record(checkpoint=inside, shots=1, weights_id=_sha("a"), activation="quickgelu", accuracy=30.0)
    evals = load_evals([write_evals(tmp_path / "e.jsonl", [records[0], other])])
    assert sorted(few_shot_results(runs, evals)["accuracy"]) == [30.0, 60.0]
