"""The figures as matplotlib objects: series per dataset / run, axis labels, both axes, files written."""

from __future__ import annotations

import pytest

from analysis import (
    load_runs,
    plot_few_shot_curve,
    plot_frequency,
    plot_norms,
    save_figure,
)
from analysis.plots import axes_width_share, figure_paths
from analysis.trajectories import run_labels
from nemesis.errors import NemesisError

from .analysis_helpers import checkpoint_rows, increasing, reducing, sweep_frame, write_run

DATASETS = ("oxford_pets", "food101", "dtd")


def _cells():
    parts = []
    for dataset in DATASETS:
        for shots in (1, 2, 4, 8, 16):
            cells = [reducing(gained=shots % 3, position=0), increasing(lost=1, position=1)]
            cells.append(reducing(lost=1, position=1, op="replace", factor=0.0))
            parts.append(checkpoint_rows(f"{dataset}-{shots}", cells, dataset=dataset, shots=shots))
    return sweep_frame([row for rows, _ in parts for row in rows])


def _renderer(figure):
    figure.canvas.draw()
    return figure.canvas.get_renderer()


def _legend(figure) -> list[str]:
    return [text.get_text() for text in figure.legends[0].get_texts()]


def test_frequency_figure_has_one_series_per_dataset():
    figure = plot_frequency(_cells())
    (axes,) = figure.axes
    assert len(axes.get_lines()) == len(DATASETS)
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["1", "2", "4", "8", "16"]
    assert axes.get_xlabel() == "shots per class"
    assert "frequency" in axes.get_ylabel()
    (legend,) = figure.legends
    assert sorted(text.get_text() for text in legend.get_texts()) == ["DTD", "Food101", "OxfordPets"]
    markers = {line.get_marker() for line in axes.get_lines()}
    colours = {line.get_color() for line in axes.get_lines()}
    assert len(markers) == len(colours) == len(DATASETS)
    renderer = _renderer(figure)
    # Legend below the axes (and their tick labels), not beside them.
    assert legend.get_window_extent(renderer).y1 <= axes.get_tightbbox(renderer).y0
    # Heights: each checkpoint gains shots % 3 (1 or 2) samples in one reducing cell: one occurrence.
    pets = next(line for line in axes.get_lines() if line.get_label() == "OxfordPets")
    assert list(pets.get_ydata()) == [1, 1, 1, 1, 1]


def test_rate_figure_plots_rates():
    figure = plot_frequency(_cells(), rate=True)
    (axes,) = figure.axes
    assert "rate" in axes.get_ylabel()
    for line in axes.get_lines():
        assert all(0 <= value <= 100 for value in line.get_ydata())  # percent, as the tables
        assert list(line.get_ydata()) == [50.0] * 5  # one occurrence of two reducing cells


def test_position_heatmap_has_one_panel_per_op():
    figure = plot_frequency(_cells(), by="position")
    panels = [axes for axes in figure.axes if axes.get_title() in ("rescale", "replace")]
    assert len(panels) == 2
    for axes in panels:
        assert axes.get_ylabel() == "position"
        assert axes.get_xlabel().startswith("factor")


def test_degradation_figure_plots_the_share_of_increasing_cells_that_lose_accuracy():
    figure = plot_frequency(_cells(), degradation=True)
    (axes,) = figure.axes
    assert axes.get_ylabel() == "norm-increasing cells that lower accuracy (%)"
    assert axes.get_xlabel() == "shots per class"
    assert len(axes.get_lines()) == len(DATASETS)
    assert sorted(_legend(figure)) == ["DTD", "Food101", "OxfordPets"]
    for line in axes.get_lines():
        assert list(line.get_ydata()) == [100.0] * 5  # each checkpoint's one increasing cell loses a sample


def test_degradation_of_a_group_without_increasing_cells_fails():
    cells = sweep_frame(checkpoint_rows("c", [reducing(gained=1)])[0])
    with pytest.raises(NemesisError, match="no norm-increasing cells, so its degradation rate is undefined"):
        plot_frequency(cells, degradation=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate": True, "degradation": True}, "--rate and --degradation"),
        ({"by": "position", "rate": True}, "--by position .* does not use --rate"),
        ({"by": "position", "margin": 1.0}, "does not use --margin"),
        ({"by": "position", "significant": True, "degradation": True}, "does not use --degradation, --significant"),
        ({"degradation": True, "margin": 1.0}, "only apply to LNE occurrences"),
    ],
)
def test_options_a_figure_would_ignore_are_refused(options, message):
    with pytest.raises(NemesisError, match=message):
        plot_frequency(_cells(), **options)


def _runs(tmp_path):
    write_run(tmp_path / "coop", [50.0, 55.0, 54.0], mean_norms=[0.8, 1.0, 1.05])
    write_run(tmp_path / "nemesis", [50.0, 55.5, 56.0], mean_norms=[0.8, 0.95, 0.9], method="nemesis", weight=10.0)
    write_run(tmp_path / "pan", [None, 52.0, None], method="nemesis", beta=0.0)
    return load_runs([tmp_path])


def test_norm_figure_stacks_accuracy_over_norm_with_one_series_per_run(tmp_path):
    runs = _runs(tmp_path)
    figure = plot_norms(runs)
    accuracy_axes, norm_axes = figure.axes  # two panels, no twin axes
    renderer = _renderer(figure)
    assert accuracy_axes.get_window_extent(renderer).y0 > norm_axes.get_window_extent(renderer).y1  # stacked
    assert accuracy_axes.get_shared_x_axes().joined(accuracy_axes, norm_axes)  # one epoch axis
    assert norm_axes.get_xlabel() == "epoch" and not any(label.get_visible() and label.get_text()
                                                         for label in accuracy_axes.get_xticklabels())  # fmt: skip
    assert len(accuracy_axes.get_lines()) == len(norm_axes.get_lines()) == len(runs)
    assert "accuracy" in accuracy_axes.get_ylabel()
    assert "norm" in norm_axes.get_ylabel()
    labels = _legend(figure)
    assert {"CoOp", "CoOp+Nemesis (PUN, weight 10)", "CoOp+Nemesis (PAN, weight 1)"} <= set(labels)
    # The PAN run evaluated once: its accuracy line has one point, its norm line three.
    colours = [line.get_color() for line in norm_axes.get_lines()]
    styles = [line.get_linestyle() for line in norm_axes.get_lines()]
    assert len(set(colours)) == len(set(styles)) == len(runs)  # apart by colour and by line style
    assert [line.get_color() for line in accuracy_axes.get_lines()] == colours  # the same key in both panels
    assert sorted(len(line.get_xdata()) for line in accuracy_axes.get_lines()) == [1, 3, 3]


def test_runs_sharing_a_label_get_one_series_each(tmp_path):
    # Two copies of the same CoOp setting in different experiment folders, and two seeds.
    write_run(tmp_path / "exp1" / "coop", [50.0, 55.0, 54.0], mean_norms=[0.8, 1.0, 1.05])
    write_run(tmp_path / "exp2" / "coop", [40.0, 45.0, 47.0], mean_norms=[0.7, 0.9, 1.2])
    write_run(tmp_path / "seeds" / "a", [30.0, 35.0], seed=1, dataset="dtd")
    write_run(tmp_path / "seeds" / "b", [31.0, 36.0], seed=2, dataset="dtd")
    figure = plot_norms(load_runs([tmp_path]))
    axes = [panel for panel in figure.axes if panel.get_visible()]
    assert len(axes) == 4  # two panels (DTD, OxfordPets), each with its accuracy and norm axes
    lines = [line for panel in axes for line in panel.get_lines()]
    assert len(lines) == 2 * 3  # DTD: one mean over its two seeds; OxfordPets: one series per experiment
    for line in lines:
        epochs = list(line.get_xdata())
        assert epochs == sorted(set(epochs))  # one run (or one mean) per line: no zig-zag back to epoch 1
    assert {"CoOp (OxfordPets, seed 1) [exp1/coop]", "CoOp (OxfordPets, seed 1) [exp2/coop]", "CoOp"} <= set(
        _legend(figure)
    )
    dtd = next(panel for panel in axes if panel.get_title().startswith("DTD"))
    assert list(dtd.get_lines()[0].get_ydata()) == [30.5, 35.5]  # the mean over seeds 1 and 2


def test_run_labels_fall_back_to_a_number(tmp_path):
    run = write_run(tmp_path / "coop", [50.0])
    (loaded,) = load_runs([run])
    assert run_labels([loaded, loaded]) == ["CoOp #1", "CoOp #2"]


def test_few_shot_curve_has_one_series_per_method():
    import pandas as pd

    averages = pd.DataFrame(
        {
            "method": ["CoOp"] * 3 + ["CoOp+Nemesis (PUN, weight 1)"] * 3,
            "shots": [1, 2, 4] * 2,
            "mean": [60.0, 62.0, 66.0, 61.0, 63.0, 67.0],
            "std": [1.0, 0.5, float("nan")] * 2,
        }
    )
    figure = plot_few_shot_curve(averages)
    (axes,) = figure.axes
    assert len(axes.get_lines()) == 2
    assert len({line.get_linestyle() for line in axes.get_lines()}) == 2  # apart inside their bands
    assert axes.get_xlabel() == "shots per class" and "accuracy" in axes.get_ylabel()


@pytest.mark.parametrize("name", ["fig", "fig.png", "fig.pdf"])
def test_save_writes_png_and_pdf(tmp_path, name):
    paths = save_figure(plot_frequency(_cells()), tmp_path / name)
    assert paths == [tmp_path / "fig.png", tmp_path / "fig.pdf"]
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "fig.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]  # no temporaries left


def test_figure_paths_keep_other_dots():
    assert [path.name for path in figure_paths("out/lne.v2")] == ["lne.v2.png", "lne.v2.pdf"]


def test_save_creates_a_missing_folder(tmp_path):
    save_figure(plot_frequency(_cells()), tmp_path / "missing" / "fig")
    assert sorted(path.name for path in (tmp_path / "missing").iterdir()) == ["fig.pdf", "fig.png"]


def test_svg_out_writes_one_svg(tmp_path):
    assert save_figure(plot_frequency(_cells()), tmp_path / "fig.svg") == [tmp_path / "fig.svg"]
    assert b"<svg" in (tmp_path / "fig.svg").read_bytes()[:500]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fig.svg"]


def _pdf_font_types(path) -> set[bytes]:
    """The /Subtype of every font dictionary in a PDF, read from its bytes."""
    import re

    data = path.read_bytes()
    return set(re.findall(rb"/Type\s*/Font\b.*?/Subtype\s*/(\w+)", data, flags=re.S)) | set(
        re.findall(rb"/Subtype\s*/(\w+)\s*/Type\s*/Font\b", data)
    )


def test_twelve_runs_paper_style_norm_figure(tmp_path):
    """3 seeds x 2 methods x 2 shot counts: one series per method and shots with a band, panels of
    one kind on one y range, the legend below without squeezing the axes, TrueType (Type 42) fonts in the PDF."""
    for method in ("coop", "nemesis"):
        for shots in (1, 16):
            for seed in (1, 2, 3):
                accuracies = [50.0 + seed, 55.0 + seed, 56.0 + seed + (method == "nemesis")]
                write_run(tmp_path / f"{method}-{shots}-{seed}", accuracies, method=method, shots=shots, seed=seed)
    runs = load_runs([tmp_path])
    assert len(runs) == 12
    figure = plot_norms(runs)
    accuracy_panels = [axes for axes in figure.axes if axes.get_title()]  # the upper panel of each pair
    norm_panels = [axes for axes in figure.axes if not axes.get_title()]
    assert [axes.get_ylabel() for axes in accuracy_panels] == ["test accuracy (%)", ""]  # said once a row
    for panels in (accuracy_panels, norm_panels):
        assert panels[0].get_ylim() == panels[1].get_ylim()  # comparable across panels
        assert panels[0].get_shared_y_axes().joined(*panels)
    assert [axes.get_title() for axes in accuracy_panels] == [
        "OxfordPets, 1 shot (3 seeds per line)",
        "OxfordPets, 16 shots (3 seeds per line)",
    ]
    for axes in accuracy_panels:
        assert len(axes.get_lines()) == 2  # CoOp and Nemesis: means over the three seeds
        assert len(axes.collections) == 2  # ... each with its band
        top = max(max(line.get_ydata()) for line in axes.get_lines())
        assert axes.get_ylim()[1] > top  # headroom: no line on the frame
    assert "band: ±1 std over seeds" in _legend(figure)
    assert {"CoOp", "CoOp+Nemesis (PUN, weight 1)"} <= set(_legend(figure))
    assert axes_width_share(figure) >= 0.6
    (_png, pdf) = save_figure(figure, tmp_path / "norms")
    assert _pdf_font_types(pdf) and _pdf_font_types(pdf) <= {b"TrueType", b"CIDFontType2", b"Type0"}


def _cells_by_seed():
    parts = []
    for dataset in DATASETS[:2]:
        for seed in (1, 2):
            for shots in (1, 16):
                cells = [reducing(gained=seed, position=0), increasing(lost=1, position=1)]
                key = f"{dataset}-{shots}-{seed}"
                parts.append(checkpoint_rows(key, cells, dataset=dataset, shots=shots, seed=seed))
    return sweep_frame([row for rows, _ in parts for row in rows])


def test_frequency_by_dataset_and_seed_puts_seeds_on_the_x_axis_and_sums_over_shots():
    figure = plot_frequency(_cells_by_seed(), "dataset,seed")
    (axes,) = figure.axes
    assert axes.get_xlabel() == "seed"
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["seed 1", "seed 2"]
    assert sorted(_legend(figure)) == ["Food101", "OxfordPets"]
    title = axes.get_title(loc="left")
    assert "summed over shots, positions and factors" in title and "seeds" not in title
    assert [list(line.get_ydata()) for line in axes.get_lines()] == [[2, 2], [2, 2]]  # one occurrence per shots


def test_frequency_by_seed_and_dataset_labels_the_seeds_in_the_legend():
    figure = plot_frequency(_cells_by_seed(), "seed,dataset")
    (axes,) = figure.axes
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["Food101", "OxfordPets"]
    assert sorted(_legend(figure)) == ["seed 1", "seed 2"]


def test_position_heatmap_never_shows_minus_zero():
    cells = _cells()
    cells.loc[cells["op"] != "original", "delta_acc"] = -0.04  # rounds to 0.0, not "-0.0"
    figure = plot_frequency(cells, by="position")
    texts = [text.get_text() for axes in figure.axes for text in axes.texts]
    assert texts and "-0.0" not in texts and "0.0" in texts


def test_by_method_puts_each_kind_of_prompt_on_the_axis_and_shots_in_the_legend():
    """`--by method,shots`: the cross-method figure, one category per method and penalty (CoOp+KgCoOp is
    not CoOp), in the methods' order, one series per shots, markers without lines between methods."""
    kinds = [("plot", None, 2), ("coop", "prograd", 1), ("coop", None, 0), ("coop", "kgcoop", 2)]
    rows = []
    for method, penalty, gained in kinds:
        for shots in (1, 4):
            cells = [reducing(gained=gained, position=0), reducing(lost=1, position=1)]
            part, _ = checkpoint_rows(f"{method}-{penalty}-{shots}", cells, method=method, shots=shots)
            rows += [row | {"penalty": penalty or "none"} for row in part]
    figure = plot_frequency(sweep_frame(rows), by="method,shots", rate=True)
    (axes,) = figure.axes
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["CoOp", "CoOp+KgCoOp", "CoOp+ProGrad", "PLOT"]
    assert axes.get_xlabel() == "prompts"
    assert _legend(figure) == ["1", "4"] and figure.legends[0].get_title().get_text() == "shots"
    one, four = axes.get_lines()
    assert list(one.get_xdata() + 0.12) == pytest.approx(list(four.get_xdata()))  # side by side in each slot
    for line in axes.get_lines():
        assert line.get_linestyle() == "None"
        assert list(line.get_ydata()) == [0.0, 50.0, 50.0, 50.0]  # CoOp gains nothing; one of two cells elsewhere
    (pooled,) = plot_frequency(sweep_frame(rows), by="method").axes[0].get_lines()
    assert list(pooled.get_ydata()) == [0, 2, 2, 2]  # occurrences over both shots
