"""Figures sized for a paper: `--width` / `--column`, fonts of at least 7 pt where printed, legends inside.

The acceptance check reads each figure's own fonts and size: every Text artist (tick labels,
legend entries, titles, cell numbers included) at its font size times printed width / figure
width, and every legend's window extent against the figure's box after drawing.
"""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from analysis import load_runs, plot_few_shot_curve, save_figure
from analysis.layout import COLUMN_WIDTHS, DEFAULT_LAYOUT, SMALLEST_FONT, PaperLayout
from corrupt.grid import DEFAULT_FACTORS
from figures.demo_pipeline import demo_figures
from nemesis.errors import NemesisError

from .analysis_helpers import checkpoint_rows, increasing, reducing, sweep_frame, write_run
from .conftest import fails_with_one_line

SINGLE = PaperLayout.column("single")


def _demo_cells() -> pd.DataFrame:
    """A small sweep shaped like the demo's: one dataset, shots 1-16, CoOp prompts of three seeds and
    PLOT prompts of the first, the default grid (both ops, all their factors) over 16 positions."""
    rows = []
    for method, seeds in (("coop", (1, 2, 3)), ("plot", (1,))):
        rows += _demo_method_rows(method, seeds)
    return sweep_frame(rows)


def _demo_method_rows(method: str, seeds: tuple[int, ...]) -> list[dict]:
    rows = []
    for shots in (1, 2, 4, 8, 16):
        for seed in seeds:
            cells = [
                reducing(gained=seed, position=position, factor=factor, op=op)
                if factor < 1
                else increasing(lost=position % 3, position=position, factor=factor, op=op)
                for op, factors in DEFAULT_FACTORS.items()
                for factor in factors
                for position in range(16)
            ]
            key = f"fmnist-{method}-{shots}-{seed}"
            rows += checkpoint_rows(key, cells, dataset="fashion_mnist", shots=shots, seed=seed, method=method)[0]
    return rows


def _demo_runs(folder):
    """The demo's norm trajectory: CoOp and Nemesis, 16 shots, seed 1, 40 epochs."""
    for method in ("coop", "nemesis"):
        accuracies = [60.0 + epoch * 0.5 for epoch in range(40)]
        norms = [0.8 + epoch * (0.02 if method == "coop" else 0.005) for epoch in range(40)]
        write_run(folder / method, accuracies, mean_norms=norms, method=method, shots=16, dataset="fashion_mnist")
    return load_runs([folder])


def _few_shot_averages() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "method": ["CoOp"] * 5
            + ["CoOp+Nemesis (PUN, weight 1)"] * 5
            + ["PLOT"] * 5
            + ["PLOT+Nemesis (PUN, weight 1)"] * 5,
            "shots": [1, 2, 4, 8, 16] * 4,
            "mean": [60.0, 62.0, 66.0, 70.0, 72.0, 61.0, 63.0, 67.0, 70.5, 73.0] + [24.0, 32.0, 33.0, 37.0, 43.0] * 2,
            "std": [1.0, 0.5, 0.8, 0.3, 0.2] * 2 + [0.0] * 10,
            "seeds": [3] * 10 + [1] * 10,
        }
    )


def _every_demo_figure(tmp_path, layout: PaperLayout) -> dict[str, Figure]:
    """What `nemesis demo` draws, on small inputs: its four figures and the report's few-shot curve."""
    drawn = demo_figures(_demo_cells(), _demo_runs(tmp_path / "runs"), layout)
    drawn["few_shot_curve"] = plot_few_shot_curve(_few_shot_averages(), layout)
    return drawn


def smallest_printed_font(figure: Figure, printed_width_pt: float) -> tuple[float, str]:
    """The smallest font of any visible text in `figure` once it is printed `printed_width_pt` wide, and that text."""
    figure.canvas.draw()  # tick labels and wrapped lines exist only after drawing
    scale = printed_width_pt / (figure.get_figwidth() * 72.0)
    texts = [text for text in figure.findobj(Text) if text.get_visible() and text.get_text().strip()]
    smallest = min(texts, key=lambda text: text.get_fontsize())
    return smallest.get_fontsize() * scale, smallest.get_text()


def legends_outside_the_figure(figure: Figure) -> list[str]:
    """The legends (of the figure or of an axes) whose drawn extent leaves the figure's box."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legends = list(figure.legends) + [axes.get_legend() for axes in figure.axes if axes.get_legend()]
    box = figure.bbox
    outside = []
    for legend in legends:
        extent = legend.get_window_extent(renderer)
        if extent.x0 < box.x0 - 0.5 or extent.x1 > box.x1 + 0.5 or extent.y0 < box.y0 - 0.5:
            outside.append(", ".join(text.get_text() for text in legend.get_texts()))
    return outside


def test_every_demo_figure_at_one_column_has_7pt_text_and_its_legend_inside(tmp_path):
    drawn = _every_demo_figure(tmp_path, SINGLE)
    assert set(drawn) == {"lne_frequency", "lne_by_method", "lne_degradation", "lne_by_position", "norm_trajectory",
                          "few_shot_curve"}  # fmt: skip
    for name, figure in drawn.items():
        assert figure.get_figwidth() * 72.0 == pytest.approx(COLUMN_WIDTHS["single"]), name
        size, text = smallest_printed_font(figure, COLUMN_WIDTHS["single"])
        assert size >= SMALLEST_FONT, f"{name}: {text!r} prints at {size:.1f} pt"
        assert figure.legends or name == "lne_by_position", name  # the heat map's key is its colour bar
        assert not legends_outside_the_figure(figure), name
        # Nothing else sticks out either: the file keeps the width the fonts were sized for.
        drawn_box = figure.get_tightbbox(figure.canvas.get_renderer())  # inches
        assert drawn_box.x0 >= -0.01 and drawn_box.x1 <= figure.get_figwidth() + 0.01, name


def test_the_check_fails_a_figure_drawn_for_the_page_and_printed_in_a_column(tmp_path):
    """Drawn 826 pt wide and shrunk into 397 pt, 7 pt tick labels print at 3.4 pt: the check above notices."""
    figure = demo_figures(_demo_cells(), _demo_runs(tmp_path / "runs"), DEFAULT_LAYOUT)["lne_frequency"]
    size, _ = smallest_printed_font(figure, COLUMN_WIDTHS["single"])
    assert size < SMALLEST_FONT
    assert size == pytest.approx(SMALLEST_FONT * 397 / 826)


def test_a_legend_beside_the_axes_is_caught():
    """The figures' old legend place, right of the axes, ends outside a figure that no layout widens."""
    figure = Figure(figsize=(4, 3))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.plot([0, 1], label="a line with a long legend entry")
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    assert legends_outside_the_figure(figure) == ["a line with a long legend entry"]


def test_saved_files_keep_the_asked_width(tmp_path):
    from PIL import Image

    figure = plot_few_shot_curve(_few_shot_averages(), PaperLayout.from_options(width=300))
    png, _pdf = save_figure(figure, tmp_path / "curve")
    with Image.open(png) as image:
        assert image.width == round(300 / 72 * 150)  # points -> inches -> pixels at the saving DPI


def test_layout_options():
    assert PaperLayout.from_options() == DEFAULT_LAYOUT == PaperLayout.column("double")
    assert PaperLayout.from_options(column="single").width_pt == 397.0
    assert PaperLayout.from_options(width=505).width_in == pytest.approx(505 / 72)
    with pytest.raises(NemesisError, match="--width and --column both"):
        PaperLayout.from_options(width=397, column="single")
    with pytest.raises(NemesisError, match="--width -5 is not a figure width"):
        PaperLayout.from_options(width=-5)
    with pytest.raises(NemesisError, match="--column 'triple' is not a column; pass single or double"):
        PaperLayout.from_options(column="triple")
    assert PaperLayout.column("single").wrap("a " * 200).count("\n") >= 2  # long titles break into lines


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--width", "397", "--column", "single"], "error: --width and --column both"),
        (["--width", "-1"], "error: --width -1 is not a figure width"),
        (["--width", "nan"], "is not a figure width"),
        (["--column", "wide"], "error: --column 'wide' is not a column"),
    ],
)
@pytest.mark.parametrize("command", ["plot-frequency", "plot-depth", "plot-norms", "plot-transport", "report", "demo"])
def test_bad_sizes_are_one_error_line_before_anything_is_written(tmp_path, command, options, expected):
    out = tmp_path / "out"
    inputs = {"demo": [], "plot-transport": [str(tmp_path), "--image", "0"]}.get(command, [str(tmp_path)])
    fails_with_one_line([command, *inputs, "--out", str(out), *options], expected)
    assert not out.exists()
