"""`nemesis demo` end to end at a reduced size: every step runs and every output is written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from figures.demo_pipeline import DemoSettings, run_demo
from nemesis.training.train_grid import plan_grid
from nemesis_cli.main import app


@pytest.mark.slow
def test_reduced_demo_writes_every_output(tmp_path, pretrained_tiny):
    settings = DemoSettings(
        epochs=2, train_views=1, n_ctx=4, shots=(1, 2), seeds=(1, 2), base_to_new_shots=2, base_to_new_epochs=1,
        base_to_new_views=1, sweep_cocoop=False,  # CoCoOp's sweep (a text pass per image) has tests of its own
        deep_methods=("ivlp", "prefix"),  # IVLP's image cells re-encode the test images
    )  # fmt: skip
    options = {"model": "tiny", "n_ctx": settings.n_ctx}
    runs = tmp_path / "demo" / "runs"
    grid = plan_grid(runs, options, ["fashion_mnist"], ["coop", "nemesis"], [1, 2], [1, 2])  # every seed
    plot = plan_grid(runs, options, ["fashion_mnist"], ["plot", "plot-nemesis"], [1, 2], [1], tree=True)  # the first
    # KgCoOp's and ProGrad's init phrases set their prompts' lengths
    regularised = plan_grid(runs, {"model": "tiny"}, ["fashion_mnist"], ["kgcoop", "prograd"], [1, 2], [1], tree=True)
    towers = plan_grid(
        runs, {"model": "tiny", "n_ctx": 2, "batch_size": 32}, ["fashion_mnist"], ["ivlp"], [2], [1], tree=True
    )
    prefix = plan_grid(
        runs, {"model": "tiny", "n_ctx": 8, "batch_size": 32}, ["fashion_mnist"], ["prefix"], [2], [1], tree=True
    )
    outputs = run_demo(tmp_path / "demo", settings)
    assert len(outputs.runs) == 2 * 2 * 2 + 4 * 2 + 2
    assert all((run / "prompt.safetensors").is_file() for run in outputs.runs)
    # the demo's runs lie where `nemesis train --out DEMO/runs` with lists puts them
    planned = [*grid.runs, *plot.runs, *regularised.runs, *towers.runs, *prefix.runs]
    assert sorted(outputs.runs) == sorted(run.folder for run in planned)
    assert outputs.sweep.is_file() and outputs.sweep.with_name("lne.correct.parquet").is_file()
    import pandas as pd

    swept = pd.read_parquet(outputs.sweep)[["method", "penalty"]].drop_duplicates()
    assert set(swept.itertuples(index=False, name=None)) == {  # the LNE of every few-shot method
        ("coop", "none"),
        ("coop", "nemesis"),
        ("plot", "none"),
        ("plot", "nemesis"),
        ("coop", "kgcoop"),
        ("coop", "prograd"),
        ("ivlp", "none"),
        ("prefix", "none"),
    }
    names = {path.name for path in outputs.figures}
    figures = (
        "lne_frequency",
        "lne_by_method",
        "lne_degradation",
        "lne_by_position",
        "norm_trajectory",
        "lne_by_depth",
    )
    for figure in figures:
        assert {f"{figure}.png", f"{figure}.pdf"} <= names
    report = {path.name for path in outputs.report}
    assert {"few_shot.md", "few_shot.csv", "few_shot.tex", "lne_frequency.md", "few_shot_curve.png"} <= report
    assert "base_to_new.md" in report and len(outputs.base_to_new.read_text().splitlines()) == 3 * 2

    # a rerun resumes: nothing is trained or swept again, the outputs are the same
    again = run_demo(tmp_path / "demo", settings)
    assert again.sweep == outputs.sweep
    assert len(again.base_to_new.read_text().splitlines()) == 3 * 2  # not evaluated again


def test_demo_into_a_file_path_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, ["demo", "--out", str(blocker)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error:")
