"""No silent pooling: LNE tables and figures keep methods and kinds of prompt apart unless asked."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from analysis import frequency_table_and_figure, lne_frequency, lne_frequency_table, load_sweeps
from nemesis.files.sweep_format import SWEEP_COLUMNS, typed_sweep_frame
from nemesis_cli.main import app
from tests.analysis_helpers import checkpoint_rows, increasing, reducing, sweep_frame, write_sweep

DTD_COOP, DTD_NEMESIS, DTD_BASE = "DTD / CoOp", "DTD / CoOp+Nemesis", "DTD / CoOp, base classes"


def _parts():
    """DTD at 1 and 2 shots: CoOp all-class prompts, Nemesis prompts, and CoOp base-class prompts."""
    return [
        checkpoint_rows("coop1", [reducing(gained=1), reducing(lost=1), increasing(lost=1)], dataset="dtd"),
        checkpoint_rows("coop2", [reducing(gained=1), reducing(gained=2)], dataset="dtd", shots=2),
        checkpoint_rows("nem1", [reducing(gained=1), reducing(gained=1), reducing()], dataset="dtd", method="nemesis"),
        checkpoint_rows("nem2", [reducing(gained=1)], dataset="dtd", shots=2, method="nemesis"),
        checkpoint_rows("base1", [reducing(gained=3)], dataset="dtd", subsample="base", n_classes=24),
    ]


@pytest.fixture
def cells():
    return sweep_frame([row for rows, _ in _parts() for row in rows])


def test_frequency_groups_by_method_and_kind_by_default(cells):
    table = lne_frequency(cells).set_index(["method", "subsample", "shots"])["frequency"]
    assert table.to_dict() == {
        ("coop", "all", 1): 1,
        ("coop", "all", 2): 2,
        ("coop", "base", 1): 1,
        ("nemesis", "all", 1): 2,
        ("nemesis", "all", 2): 1,
    }
    pooled = lne_frequency(cells, pool=True)
    assert list(pooled.columns[:2]) == ["dataset", "shots"]
    assert pooled.set_index("shots")["frequency"].to_dict() == {1: 4, 2: 3}


def test_table_shows_separate_groups_and_paper_numbers_only_beside_coop_all_classes(cells):
    table = lne_frequency_table(cells)
    rows = list(zip(table.display["Dataset"], table.display["Prompts"], strict=True))
    assert rows == [
        ("DTD", "CoOp"),
        ("DTD [paper]", "CoOp"),  # right beside the group of the same kind
        ("DTD", "CoOp, base classes"),
        ("DTD", "CoOp+Nemesis"),
    ]
    display = table.display.set_index(["Dataset", "Prompts"])
    assert display.loc[("DTD", "CoOp"), "1 shot"].startswith("1 (")
    assert display.loc[("DTD", "CoOp+Nemesis"), "1 shot"].startswith("2 (")
    assert display.loc[("DTD", "CoOp, base classes"), "1 shot"].startswith("1 (")
    assert "pooled" not in table.title

    pooled = lne_frequency_table(cells, pool=True)
    assert "pooled over methods and prompt kinds" in pooled.title
    assert list(pooled.display["Dataset"]) == ["DTD"]  # no paper row beside a pooled count
    assert pooled.display.set_index("Dataset").loc["DTD", "1 shot"].startswith("4 (")


def test_figure_has_one_line_per_kind_and_the_pooled_title_says_so(cells):
    _, figure = frequency_table_and_figure(cells)
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == [DTD_COOP, DTD_BASE, "DTD / CoOp+Nemesis"]
    assert "pooled" not in figure.axes[0].get_title(loc="left")
    _, figure = frequency_table_and_figure(cells, pool=True)
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["DTD"]
    assert "pooled over methods and prompt kinds (--pool)" in figure.axes[0].get_title(loc="left")


def test_heat_map_draws_one_panel_per_kind(cells):
    _, figure = frequency_table_and_figure(cells, by="position")
    titles = [axes.get_title() for axes in figure.axes if axes.get_label() != "<colorbar>"]
    assert len(titles) == 3 and any("base classes" in title for title in titles)
    _, pooled = frequency_table_and_figure(cells, by="position", pool=True)
    assert "pooled" in pooled.get_suptitle()


def test_cli_pool_flag_and_default_grouping(tmp_path):
    table = write_sweep(tmp_path / "dtd.parquet", _parts())
    result = CliRunner().invoke(app, ["report", str(table), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "report" / "lne_frequency.md").read_text()
    assert "CoOp+Nemesis" in written and "base classes" in written and "[paper]" in written
    result = CliRunner().invoke(app, ["report", str(table), "--out", str(tmp_path / "pooled"), "--pool"])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "pooled" / "lne_frequency.md").read_text()
    assert "pooled over methods and prompt kinds" in written and "[paper]" not in written
    result = CliRunner().invoke(app, ["plot-frequency", str(table), "--out", str(tmp_path / "fig"), "--pool"])
    assert result.exit_code == 0, result.output


def test_pun_and_pan_prompts_are_kinds_of_their_own(tmp_path):
    parts = [
        checkpoint_rows("pun", [reducing(gained=1), reducing()], method="nemesis", method_variant="PUN, weight 1"),
        checkpoint_rows(
            "pan", [reducing(gained=1), reducing(gained=1)], method="nemesis", method_variant="PAN, weight 20"
        ),
    ]
    cells = sweep_frame([row for rows, _ in parts for row in rows])
    assert lne_frequency(cells).set_index("method_variant")["frequency"].to_dict() == {
        "PAN, weight 20": 2,
        "PUN, weight 1": 1,
    }
    prompts = list(lne_frequency_table(cells).display["Prompts"])
    assert prompts == ["CoOp+Nemesis (PAN, weight 20)", "CoOp+Nemesis (PUN, weight 1)"]
    _, figure = frequency_table_and_figure(cells)
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["OxfordPets / CoOp+Nemesis (PAN, weight 20)", "OxfordPets / CoOp+Nemesis (PUN, weight 1)"]


def test_a_sweep_records_which_nemesis_a_prompt_was_trained_with(tmp_path):
    import torch

    from corrupt.inputs import resolve_inputs
    from nemesis.files.checkpoint import PromptMetadata, save_prompt

    ctx = torch.zeros(4, 64)
    files = {}
    for name, penalty, settings in [
        ("pan", "nemesis", {"beta": 0.0, "weight": 20.0}),
        ("both", "nemesis", {"beta": 0.5, "weight": 1}),
        ("coop", "none", {}),
    ]:
        metadata = PromptMetadata(
            model="tiny", dataset="dtd", shots=1, seed=1, prompt_method="coop", penalty=penalty, penalty_config=settings
        )
        files[name] = save_prompt(tmp_path / f"{name}.safetensors", ctx, metadata)
    variants = {
        Path(item.identity["checkpoint"]).stem: (item.identity["penalty"], item.identity["method_variant"])
        for item in resolve_inputs(list(files.values()), pretrained="none")
    }
    assert variants == {
        "pan": ("nemesis", "PAN, weight 20"),
        "both": ("nemesis", "PUN+PAN, beta 0.5, weight 1"),
        "coop": ("none", None),
    }


def test_old_tables_without_kind_columns_read_as_unknown_kind(tmp_path):
    frame = sweep_frame([row for rows, _ in _parts()[:2] for row in rows])
    old = frame.drop(columns=["weights", "subsample", "train_dataset", "n_classes"])
    typed = typed_sweep_frame(old, "old table")
    assert list(typed.columns) == list(SWEEP_COLUMNS)
    assert typed["subsample"].isna().all() and typed["n_classes"].isna().all() and typed["weights"].isna().all()
    path = tmp_path / "old.parquet"
    old.to_parquet(path, index=False)
    pd.DataFrame({"cell_id": [], "correct": []}).to_parquet(tmp_path / "old.correct.parquet")
    table = lne_frequency_table(load_sweeps([path]))
    assert list(table.display["Prompts"]) == ["CoOp, classes not recorded"]  # and no [paper] row beside it
    # A table of the last format before `weights`: unknown weights are no mark, and the paper stays beside it.
    path = tmp_path / "before_weights.parquet"
    frame.drop(columns=["weights"]).to_parquet(path, index=False)
    pd.DataFrame({"cell_id": [], "correct": []}).to_parquet(tmp_path / "before_weights.correct.parquet")
    table = lne_frequency_table(load_sweeps([path]))
    assert list(zip(table.display["Dataset"], table.display["Prompts"], strict=True)) == [
        ("DTD", "CoOp"),
        ("DTD [paper]", "CoOp"),
    ]


RANDOM, FILE_A, FILE_B = "random-seed0", "sha256:" + "a" * 64, "tag:openai+quickgelu"


def _on_weights(*weights_ids: str) -> pd.DataFrame:
    """The same CoOp prompt of DTD swept on each of `weights_ids` (another checkpoint key each, as in a sweep)."""
    parts = [
        checkpoint_rows("coop1", [reducing(gained=1), reducing(lost=1)], dataset="dtd", key=f"k{number}", weights=ids)
        for number, ids in enumerate(weights_ids)
    ]
    return sweep_frame([row for rows, _ in parts for row in rows])


def test_prompts_on_random_weights_are_a_group_of_their_own_and_marked():
    cells = _on_weights(RANDOM, FILE_A)
    assert lne_frequency(cells).set_index("weights")["cells"].to_dict() == {RANDOM: 2, FILE_A: 2}
    table = lne_frequency_table(cells)
    assert list(zip(table.display["Dataset"], table.display["Prompts"], strict=True)) == [
        ("DTD", "CoOp (random weights)"),  # the paper's numbers never beside it
        ("DTD", "CoOp"),  # one real weights id: nothing added
        ("DTD [paper]", "CoOp"),
    ]
    by_position = lne_frequency_table(cells, by="position").display
    assert list(by_position["prompts"]) == ["CoOp (random weights)", "CoOp"]
    _, figure = frequency_table_and_figure(cells)
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["DTD / CoOp (random weights)", "DTD / CoOp"]
    _, figure = frequency_table_and_figure(cells, by="position")
    titles = [axes.get_title() for axes in figure.axes if axes.get_label() != "<colorbar>"]
    assert titles == ["rescale, CoOp (random weights)", "rescale, CoOp"]
    pooled = lne_frequency_table(cells, pool=True)
    assert list(pooled.display["Dataset"]) == ["DTD"] and pooled.display["1 shot"].item().startswith("2 (")

    alone = _on_weights(RANDOM)
    assert list(lne_frequency_table(alone).display["Prompts"]) == ["CoOp (random weights)"]
    _, figure = frequency_table_and_figure(alone)
    assert "prompts: CoOp (random weights)" in figure.axes[0].get_title(loc="left")


def test_several_real_weights_are_named_in_labels():
    cells = _on_weights(FILE_A, FILE_B, RANDOM)
    prompts = list(lne_frequency_table(cells).display["Prompts"])
    assert prompts == [
        "CoOp (random weights)",
        "CoOp (weights sha256:aaaaaaaaaaaa)",
        "CoOp",  # the paper row beside the real weights
        "CoOp (weights openai+quickgelu)",
        "CoOp",
    ]


def test_a_resumed_older_table_keeps_one_group_per_prompt():
    """Rows written before `weights` existed take the weights of their checkpoint's newer rows."""
    cells = _on_weights(FILE_A)
    cells.loc[cells.index[:2], "weights"] = pd.NA  # the original row and the first cell: the older table's
    assert lne_frequency(cells)["weights"].tolist() == [FILE_A]
