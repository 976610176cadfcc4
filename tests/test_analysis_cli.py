"""`nemesis plot-frequency`, `plot-norms` and `report` through typer's runner on the whole app."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from nemesis_cli.main import app

from .analysis_helpers import (
    checkpoint_rows,
    eval_record,
    increasing,
    reducing,
    write_evals,
    write_run,
    write_sweep,
)
from .conftest import fails_with_one_line

runner = CliRunner()


def _sweeps(folder):
    folder.mkdir()
    parts = []
    for dataset in ("oxford_pets", "food101"):
        for shots in (1, 2):
            cells = [reducing(gained=2), reducing(lost=1, position=1), increasing(lost=1, position=2)]
            cells.append(reducing(gained=1, op="replace", factor=0.0, position=3))
            parts.append(checkpoint_rows(f"{dataset}-{shots}", cells, dataset=dataset, shots=shots))
    write_sweep(folder / "sweep.parquet", parts)
    return folder


def _runs(folder):
    for seed in (1, 2):
        write_run(folder / f"coop-{seed}", [50.0, 55.0 + seed], seed=seed)
        write_run(folder / f"nemesis-{seed}", [50.0, 56.0 + seed], seed=seed, method="nemesis", beta=0.0)
    return folder


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def _files(folder):
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("out", ["lne", "lne.png", "lne.pdf"])
def test_plot_frequency_writes_png_and_pdf_and_prints_the_table(tmp_path, out):
    sweeps = _sweeps(tmp_path / "sweeps")
    (tmp_path / "figures").mkdir()
    output = _ok(["plot-frequency", str(sweeps), "--out", str(tmp_path / "figures" / out)])
    assert _files(tmp_path / "figures") == ["lne.pdf", "lne.png"]
    assert "frequency" in output and "oxford_pets" in output and "food101" in output


@pytest.mark.parametrize(
    "options", [["--rate"], ["--significant", "--alpha", "0.01"], ["--margin", "1.5"], ["--by", "position"]]
)
def test_plot_frequency_modes(tmp_path, options):
    sweeps = _sweeps(tmp_path / "sweeps")
    output = _ok(["plot-frequency", str(sweeps / "sweep.parquet"), "--out", str(tmp_path / "fig"), *options])
    assert (tmp_path / "fig.png").is_file() and (tmp_path / "fig.pdf").is_file()
    assert "wrote" in output


def test_plot_norms(tmp_path):
    runs = _runs(tmp_path / "runs")
    output = _ok(["plot-norms", str(runs / "coop-1"), str(runs / "nemesis-1"), "--out", str(tmp_path / "norms")])
    assert "norms.png" in output and (tmp_path / "norms.pdf").is_file()


def test_report_writes_every_supported_table(tmp_path):
    runs = _runs(tmp_path / "runs")
    sweeps = _sweeps(tmp_path / "sweeps")
    records = [
        eval_record(checkpoint="b2n", subsample="base", accuracy=80.0),
        eval_record(checkpoint="b2n", subsample="new", accuracy=70.0),
        eval_record(checkpoint="dg", dataset="imagenet", train_dataset="imagenet", accuracy=62.0),
        eval_record(checkpoint="dg", dataset="imagenet_r", train_dataset="imagenet", accuracy=55.0),
    ]
    evals = write_evals(tmp_path / "evals.jsonl", records)
    output = _ok(["report", str(runs), str(sweeps), str(evals), "--out", str(tmp_path / "report")])
    expected = [
        f"{name}.{suffix}"
        for name in ("base_to_new", "domain_generalization", "few_shot", "lne_frequency")
        for suffix in ("csv", "md", "tex")
    ] + ["few_shot_curve.pdf", "few_shot_curve.png"]
    assert _files(tmp_path / "report") == sorted(expected)
    assert output.count("wrote") == len(expected)
    few_shot = (tmp_path / "report" / "few_shot.md").read_text()
    # The ImageNet source evaluation is a 16-shot result of its own; the 1-shot average covers OxfordPets.
    assert "| Method | Shots | Seeds | OxfordPets | ImageNet | Average |" in few_shot
    assert "| CoOp | 1 | 2 | 56.50 ± 0.71 |  | 56.50 ± 0.71 |" in few_shot
    assert "| CoOp | 16 | 1 |  | 62.00 | 62.00 |" in few_shot
    assert "CoOp+Nemesis (PAN, weight 1)" in few_shot


def test_report_writes_only_what_the_inputs_support(tmp_path):
    _ok(["report", str(_runs(tmp_path / "runs")), "--out", str(tmp_path / "report")])
    assert _files(tmp_path / "report") == [
        "few_shot.csv",
        "few_shot.md",
        "few_shot.tex",
        "few_shot_curve.pdf",
        "few_shot_curve.png",
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    fails_with_one_line(["plot-frequency", "--out", str(out / "fig")], "no sweep result files")
    fails_with_one_line(["plot-frequency", str(tmp_path / "missing.parquet"), "--out", str(out)], "no such file")
    (tmp_path / "other.csv").write_text("name,value\na,1\n")
    fails_with_one_line(["plot-frequency", str(tmp_path / "other.csv"), "--out", str(out)], "missing columns")
    fails_with_one_line(["report", str(tmp_path / "other.csv"), "--out", str(out)], "missing columns cell_id")
    fails_with_one_line(["report", "--out", str(out)], "no inputs given")
    (tmp_path / "empty").mkdir()
    fails_with_one_line(["report", str(tmp_path / "empty"), "--out", str(out)], "no result files found")
    fails_with_one_line(["plot-norms", str(tmp_path / "empty"), "--out", str(out)], "no run folders found")
    write_run(tmp_path / "unevaluated" / "run", [None, None])
    fails_with_one_line(["report", str(tmp_path / "unevaluated"), "--out", str(out)], "support no report table")
    assert not out.exists()


def test_empty_groups_exit_2_and_write_nothing(tmp_path):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    write_sweep(sweeps / "a.parquet", [checkpoint_rows("a", [increasing(lost=1)], seed=None)])
    fig = tmp_path / "fig"
    fails_with_one_line(["plot-frequency", str(sweeps), "--out", str(fig), "--rate"], "no norm-reducing cells")
    fails_with_one_line(["plot-frequency", str(sweeps), "--out", str(fig), "--by", "dataset,seed"], "no values")
    fails_with_one_line(["plot-frequency", str(sweeps), "--out", str(fig), "--by", "epoch"], "not in the results")
    write_sweep(sweeps / "a.parquet", [checkpoint_rows("a", [])])
    fails_with_one_line(["report", str(sweeps), "--out", str(tmp_path / "report")], "no corrupted cells")
    assert _files(tmp_path) == ["sweeps"]


def test_plot_frequency_degradation(tmp_path):
    sweeps = _sweeps(tmp_path / "sweeps")
    output = _ok(["plot-frequency", str(sweeps), "--out", str(tmp_path / "fig"), "--degradation"])
    assert _files(tmp_path) == ["fig.pdf", "fig.png", "sweeps"]
    assert "degradation_rate" in output and "note:" not in output  # no duplicates, no note


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--by", "position", "--rate"], "--by position draws the mean accuracy change"),
        (["--by", "position", "--margin", "1"], "does not use --margin"),
        (["--by", "position", "--significant"], "does not use --significant"),
        (["--by", "position", "--degradation"], "does not use --degradation"),
        (["--rate", "--degradation"], "--rate and --degradation"),
        (["--degradation", "--significant"], "only apply to LNE occurrences"),
    ],
)
def test_plot_frequency_refuses_options_the_figure_ignores(tmp_path, options, expected):
    sweeps = _sweeps(tmp_path / "sweeps")
    fails_with_one_line(["plot-frequency", str(sweeps), "--out", str(tmp_path / "fig"), *options], expected)
    assert _files(tmp_path) == ["sweeps"]


def test_degradation_of_a_group_without_increasing_cells_exits_2(tmp_path):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    write_sweep(sweeps / "a.parquet", [checkpoint_rows("a", [reducing(gained=1)])])
    fails_with_one_line(
        ["plot-frequency", str(sweeps), "--out", str(tmp_path / "fig"), "--degradation"], "no norm-increasing cells"
    )
    assert _files(tmp_path) == ["sweeps"]


def test_duplicate_cells_are_counted_once_and_reported(tmp_path):
    sweeps = _sweeps(tmp_path / "sweeps")
    (sweeps / "old").mkdir()
    for name in ("sweep.parquet", "sweep.correct.parquet"):
        (sweeps / "old" / name).write_bytes((sweeps / name).read_bytes())
    output = _ok(["plot-frequency", str(sweeps), "--out", str(tmp_path / "fig")])
    assert "note: 20 cells found in more than one results table were counted once" in output
    alone = _ok(["plot-frequency", str(sweeps / "sweep.parquet"), "--out", str(tmp_path / "fig")])
    assert output.split("\n", 1)[1] == alone  # the same table as from one copy
    output = _ok(["report", str(sweeps), "--out", str(tmp_path / "report"), "--significant"])
    assert "note: 20 cells" in output
    assert "20 cells found in more than one results table" in (tmp_path / "report" / "lne_frequency.md").read_text()


def test_report_groups_the_lne_table_by_any_columns(tmp_path):
    sweeps = _sweeps(tmp_path / "sweeps")
    _ok(["report", str(sweeps), "--out", str(tmp_path / "report"), "--by", "dataset,position", "--no-paper"])
    markdown = (tmp_path / "report" / "lne_frequency.md").read_text()
    assert "| dataset | position | prompts | seeds | cells | reducing | frequency | rate_percent |" in markdown
    assert "degradation_rate_percent" in markdown
    default = _ok(["report", str(sweeps), "--out", str(tmp_path / "default")])
    assert "wrote" in default
    markdown = (tmp_path / "default" / "lne_frequency.md").read_text()
    assert "| Dataset | Prompts | Seeds | 1 shot | 2 shots |" in markdown and "degr." in markdown
    fails_with_one_line(["report", str(sweeps), "--out", str(tmp_path / "bad"), "--by", "epoch"], "not in the results")
    assert not (tmp_path / "bad").exists()


def test_report_skips_unfinished_runs_and_says_so(tmp_path):
    runs = _runs(tmp_path / "runs")
    write_run(runs / "coop-3", [50.0, 99.0], seed=3, epochs=50)  # still training
    _ok(["report", str(runs), "--out", str(tmp_path / "report")])
    few_shot = (tmp_path / "report" / "few_shot.md").read_text()
    assert "| CoOp | 1 | 2 | 56.50 ± 0.71 |" in few_shot  # seeds 1 and 2 only
    assert "1 unfinished run skipped" in few_shot
    write_run(tmp_path / "stopped" / "run", [50.0], epochs=5)
    args = ["report", str(tmp_path / "stopped"), "--out", str(tmp_path / "out")]
    fails_with_one_line(args, "runs need to finish their epochs (1 unfinished skipped)")
    assert not (tmp_path / "out").exists()


def _outputs(folder):
    """Every file a command wrote, by name (PDFs left out: they carry their creation time)."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.suffix != ".pdf"}


def test_globs_that_include_correctness_sidecars_give_the_same_figure_and_tables(tmp_path):
    """`nemesis plot-frequency sweeps/*` and `nemesis report out/*`: X.correct.parquet is X's companion."""
    sweeps = _sweeps(tmp_path / "sweeps")
    write_sweep(sweeps / "more.parquet", [checkpoint_rows("more", [reducing(gained=3)], dataset="dtd", shots=4)])
    glob = sorted(str(path) for path in sweeps.iterdir())  # what the shell makes of sweeps/*
    tables = [path for path in glob if not path.endswith(".correct.parquet")]
    assert len(glob) == 4 and len(tables) == 2
    for options in ([], ["--significant"]):
        figures = {}
        for name, inputs in (("tables", tables), ("glob", glob)):
            (tmp_path / name).mkdir(exist_ok=True)
            output = _ok(["plot-frequency", *inputs, "--out", str(tmp_path / name / "fig"), *options])
            printed = [line for line in output.splitlines() if not line.startswith("wrote ")]
            figures[name] = (printed, _outputs(tmp_path / name))
        assert figures["glob"] == figures["tables"] and not any("note:" in line for line in figures["glob"][0])

    _runs(tmp_path / "runs")
    everything = [*glob, *(str(path) for path in sorted((tmp_path / "runs").iterdir()))]
    for name, inputs in (("report-tables", [*tables, str(tmp_path / "runs")]), ("report-glob", everything)):
        _ok(["report", *inputs, "--out", str(tmp_path / name), "--significant"])
    assert _outputs(tmp_path / "report-glob") == _outputs(tmp_path / "report-tables")
    assert "lne_frequency.md" in _outputs(tmp_path / "report-glob")


def test_a_sidecar_without_its_table_is_one_line(tmp_path):
    sweeps = _sweeps(tmp_path / "sweeps")
    fails_with_one_line(
        ["plot-frequency", str(sweeps / "sweep.correct.parquet"), "--out", str(tmp_path / "fig")],
        "is the per-sample correctness of",
    )


def test_report_counts_a_copied_run_once_and_names_the_copy(tmp_path):
    runs = _runs(tmp_path / "runs")
    shutil.copytree(runs / "coop-1", tmp_path / "copy")
    result = runner.invoke(app, ["report", str(runs), str(tmp_path / "copy"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "seed 1 was given 2 times" in notes[0] and str(tmp_path / "copy") in notes[0]
    assert "| CoOp | 1 | 2 | 56.50 ± 0.71 |" in (tmp_path / "report" / "few_shot.md").read_text()


def test_report_help_keeps_every_word():
    result = runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "published numbers as [paper] rows" in result.output


def test_rates_are_percent_in_stdout_and_csv_with_sensible_decimals(tmp_path):
    sweeps = _sweeps(tmp_path / "sweeps")
    output = _ok(["plot-frequency", str(sweeps), "--out", str(tmp_path / "fig"), "--rate"])
    header, first = output.splitlines()[:2]
    assert "rate_percent" in header and "degradation_rate_percent" in header
    assert " 66.67 " in first  # 2 of 3 reducing cells gain: 66.67 %, not 0.666667
    _ok(["report", str(sweeps), "--out", str(tmp_path / "report"), "--no-paper"])
    csv = (tmp_path / "report" / "lne_frequency.csv").read_text()
    assert ",66.6667," in csv and "0.666" not in csv


def test_report_csv_has_no_float32_noise(tmp_path):
    write_run(tmp_path / "runs" / "seed1", [49.06999965508779])  # a float32 accuracy read back as a double
    _ok(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    csv = (tmp_path / "report" / "few_shot.csv").read_text()
    assert ",49.07," in csv and "49.0699" not in csv


def test_report_keeps_a_run_prompt_evaluated_on_other_weights(tmp_path):
    """Train on one weights file, evaluate the prompt on it and on a second file, report the run with
    the records: the run's result once, the other weights' result as a row of its own, both named."""
    import pandas as pd
    import torch

    from nemesis.data.testing import make_coop_folder
    from nemesis.model.backbone import file_sha256

    from .conftest import cached_backbone

    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", ["red apple", "green leaf", "blue sky", "yellow sun"], per_class=(2, 1, 3))
    state = cached_backbone("tiny").model.state_dict()
    weights = []
    for number in (1, 2):
        weights.append(tmp_path / f"weights{number}.pt")
        torch.save(state | {"logit_scale": state["logit_scale"] + number}, weights[-1])
    run = tmp_path / "run"
    common = ["--root", str(root), "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    _ok(["train", "--dataset", "oxford_pets", "--model", "tiny", "--pretrained", str(weights[0]), "--shots", "1",
         "--n-ctx", "4", "--epochs", "1", *common, "--out", str(run)])  # fmt: skip
    records = tmp_path / "r.jsonl"
    for file in (weights[1], weights[0]):  # other weights, then the run's own (repeats its result)
        _ok(["eval", str(run / "prompt.safetensors"), "--pretrained", str(file), *common, "--out", str(records)])
    output = _ok(["report", str(run), str(records), "--out", str(tmp_path / "report")])
    (note,) = [line for line in output.splitlines() if line.startswith("note:")]  # no copy; what the table does
    assert "under different weights (weights2.pt, gelu; weights1.pt, gelu)" in note and "a row of its own" in note
    few_shot = pd.read_csv(tmp_path / "report" / "few_shot.csv")
    cells = few_shot[few_shot["dataset"] == "oxford_pets"]
    names = {f"CoOp (weights sha256:{file_sha256(file)[:12]})" for file in weights}
    assert set(cells["method"]) == names and set(cells["seeds"]) == {1}
