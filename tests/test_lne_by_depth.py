"""The Low-Norm Effect by tower, layer and position: table, figure, report and command on synthetic sweeps."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

import analysis
from analysis.low_norm_effect import has_depth_sites, lne_by_depth, lne_by_layer
from analysis.plots import depth_table_and_figure
from analysis.report import build_report, make_report
from analysis.results import load_inputs
from nemesis.errors import NemesisError
from nemesis_cli.main import app

from .analysis_helpers import checkpoint_rows, increasing, reducing, write_sweep

runner = CliRunner()


def _at(rows: list[dict], sites: list[tuple[str, int] | None]) -> list[dict]:
    """The rows with the sweep's site, tower and layer columns: the original row none, the corrupted rows
    `sites` in order (None: a CoOp-like method's whole ctx)."""
    placed = []
    for row, site in zip(rows, [None, *sites], strict=True):
        tower, layer = site if site is not None else ("", None)
        name = f"{tower} layer {layer}" if site is not None else ""
        placed.append({**row, "site": name, "tower": tower, "layer": layer})
    return placed


def _ivlp_and_coop(seed: int = 1) -> list[tuple[list[dict], dict]]:
    """An IVLP prompt (n = 100 samples, so a gained sample is +1 pp) and a CoOp prompt with an occurrence that
    the depth table must leave out."""
    ivlp_cells = [
        reducing(gained=3, position=0),  # text layer 0, position 0: +3, an occurrence
        reducing(lost=2, position=1),  # text layer 0, position 1: -2
        reducing(gained=1, position=0),  # vision layer 1, position 0: +1, an occurrence
        increasing(lost=4, position=0),  # vision layer 1, position 0: -4, norm up
        reducing(gained=2, lost=2, position=1),  # vision layer 1, position 1: 0, no occurrence
    ]
    rows, correctness = checkpoint_rows(f"ivlp-{seed}", ivlp_cells, method="ivlp", seed=seed)
    sites = [("text", 0), ("text", 0), ("vision", 1), ("vision", 1), ("vision", 1)]
    coop_rows, coop_correctness = checkpoint_rows(f"coop-{seed}", [reducing(gained=5)], seed=seed)
    return [(_at(rows, sites), correctness), (_at(coop_rows, [None]), coop_correctness)]


def _sweep(tmp_path, parts) -> pd.DataFrame:
    return analysis.load_sweeps([write_sweep(tmp_path / "sweep.parquet", parts)])


def test_frequency_and_mean_change_by_tower_layer_and_position(tmp_path):
    table = lne_by_depth(_sweep(tmp_path, _ivlp_and_coop()))
    assert set(table["method"]) == {"ivlp"}  # the CoOp cell (tower "") is not in the depth table
    keyed = table.set_index(["tower", "layer", "position"])
    assert list(keyed.index) == [("text", 0, 0), ("text", 0, 1), ("vision", 1, 0), ("vision", 1, 1)]
    assert keyed["cells"].tolist() == [1, 1, 2, 1]
    assert keyed["reducing"].tolist() == [1, 1, 1, 1]
    assert keyed["frequency"].tolist() == [1, 0, 1, 0]
    assert keyed["rate_percent"].tolist() == [100.0, 0.0, 100.0, 0.0]
    assert keyed["mean_delta_acc"].tolist() == pytest.approx([3.0, -2.0, -1.5, 0.0])
    assert keyed["mean_delta_acc_reducing"].tolist() == pytest.approx([3.0, -2.0, 1.0, 0.0])


def test_summed_over_positions_by_layer(tmp_path):
    layers = lne_by_layer(lne_by_depth(_sweep(tmp_path, _ivlp_and_coop())))
    keyed = layers.set_index(["tower", "layer"])
    assert keyed["cells"].tolist() == [2, 3]
    assert keyed["frequency"].tolist() == [1, 1]
    assert keyed["rate_percent"].tolist() == [50.0, 50.0]
    assert keyed["mean_delta_acc"].tolist() == pytest.approx([0.5, -1.0])
    assert keyed["mean_delta_acc_reducing"].tolist() == pytest.approx([0.5, 0.5])


def test_seeds_are_summed_and_the_margin_and_significance_apply(tmp_path):
    parts = _ivlp_and_coop(seed=1) + _ivlp_and_coop(seed=2)
    cells = _sweep(tmp_path, parts)
    keyed = lne_by_depth(cells).set_index(["tower", "layer", "position"])
    assert keyed.loc[("text", 0, 0), ["seeds", "cells", "frequency"]].tolist() == [2, 2, 2]
    assert lne_by_depth(cells, margin=2.0)["frequency"].sum() == 2  # only the +3 cells
    significant = lne_by_depth(cells, significant=True)  # 3 and 1 gained samples, none lost: p = 0.25 and 1
    assert significant["frequency"].sum() == 0


def test_tables_without_tower_sites_have_no_depth_table(tmp_path):
    rows, correctness = checkpoint_rows("coop", [reducing(gained=5)])
    old = pd.DataFrame(rows)  # a table from before the tower and layer columns
    assert not has_depth_sites(old)
    cells = _sweep(tmp_path, [(rows, correctness)])
    assert not has_depth_sites(cells)
    with pytest.raises(NemesisError, match="no cells at \\(tower, layer\\) sites"):
        lne_by_depth(cells)
    report = build_report(load_inputs([tmp_path / "sweep.parquet"]))
    assert [table.name for table in report.tables] == ["lne_frequency"]
    assert "lne_by_depth" not in report.figures


def test_report_writes_the_depth_table_and_figure(tmp_path):
    path = write_sweep(tmp_path / "sweep.parquet", _ivlp_and_coop())
    written = make_report([path], tmp_path / "report")
    names = {item.name for item in written}
    assert {"lne_by_depth.csv", "lne_by_depth.md", "lne_by_depth.png", "lne_by_depth.pdf"} <= names
    assert "lne_frequency.csv" in names
    csv = pd.read_csv(tmp_path / "report" / "lne_by_depth.csv")
    assert csv[["tower", "layer", "position", "frequency"]].values.tolist() == [
        ["text", 0, 0, 1],
        ["text", 0, 1, 0],
        ["vision", 1, 0, 1],
        ["vision", 1, 1, 0],
    ]
    markdown = (tmp_path / "report" / "lne_by_depth.md").read_text()
    assert "IVLP" in markdown and "CoOp" not in markdown.split("\n\n")[1]


def test_the_figure_has_a_panel_per_tower_and_quantity(tmp_path):
    _, figure = depth_table_and_figure(_sweep(tmp_path, _ivlp_and_coop()))
    titles = [axes.get_title() for axes in figure.axes]
    assert titles == ["text tower", "vision tower", "", ""]  # frequency above, mean change below
    heights = [patch.get_height() for patch in figure.axes[0].patches]  # text tower frequency
    assert heights == [1.0]


def test_plot_depth_command(tmp_path):
    path = write_sweep(tmp_path / "sweep.parquet", _ivlp_and_coop())
    result = runner.invoke(app, ["plot-depth", str(path), "--out", str(tmp_path / "depth")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "depth.png").exists() and (tmp_path / "depth.pdf").exists()
    assert "vision" in result.output and "mean_delta_acc" in result.output


def test_plot_depth_command_without_tower_sites_fails_in_one_line(tmp_path):
    rows, correctness = checkpoint_rows("coop", [reducing(gained=5)])
    path = write_sweep(tmp_path / "sweep.parquet", [(rows, correctness)])
    result = runner.invoke(app, ["plot-depth", str(path), "--out", str(tmp_path / "depth")])
    assert result.exit_code == 2
    assert "no cells at (tower, layer) sites" in result.output
    assert not (tmp_path / "depth.png").exists()


def test_kinds_of_prompt_stay_apart_unless_pooled_and_methods_always(tmp_path):
    cells = [reducing(gained=1, position=0)]
    parts = []
    for checkpoint, method, variant in (("a", "ivlp", None), ("b", "ivlp", "other"), ("c", "maple", None)):
        rows, correctness = checkpoint_rows(checkpoint, cells, method=method, method_variant=variant)
        parts.append((_at(rows, [("vision", 2)]), correctness))
    sweep = _sweep(tmp_path, parts)
    apart = lne_by_depth(sweep)
    variants = apart["method_variant"].astype("string").fillna("-")
    assert list(zip(apart["method"], variants, apart["frequency"], strict=True)) == [
        ("ivlp", "-", 1),
        ("ivlp", "other", 1),
        ("maple", "-", 1),
    ]
    pooled = lne_by_depth(sweep, pool=True)
    assert list(pooled.columns[:4]) == ["method", "tower", "layer", "position"]
    assert pooled[["method", "cells", "frequency"]].values.tolist() == [["ivlp", 2, 2], ["maple", 1, 1]]


def test_kinds_of_prompt_in_different_towers_draw(tmp_path):
    """A kind with no row in a tower (VPT has no text panel, prefix tuning only keys and values): its series
    is left out of that panel (an empty selection once broke the filtering of the next kind column)."""
    vpt, vpt_correctness = checkpoint_rows("vpt-1", [reducing(gained=1, position=0)], method="vpt", seed=1)
    prefix, prefix_correctness = checkpoint_rows("prefix-1", [reducing(lost=1, position=0)], method="prefix", seed=1)
    parts = [(_at(vpt, [("vision", 0)]), vpt_correctness), (_at(prefix, [("text keys", 1)]), prefix_correctness)]
    table, figure = depth_table_and_figure(_sweep(tmp_path, parts))
    assert set(zip(table["method"], table["tower"], strict=True)) == {("vpt", "vision"), ("prefix", "text keys")}
    bars = [len(axes.patches) for axes in figure.axes[:4]]
    assert sum(bars) == 4  # one bar per kind in its own tower's two panels
