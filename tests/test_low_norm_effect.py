"""LNE marking, occurrence (margin, significance), frequency / rate per group, degradation rate."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis import add_mcnemar, lne_frequency, load_sweeps, mark_cells, mark_occurrences, mcnemar_exact_p
from analysis.low_norm_effect import require_rates
from nemesis.errors import NemesisError

from .analysis_helpers import checkpoint_rows, increasing, reducing, sweep_frame, write_sweep


def _exact_p(gained: int, lost: int) -> float:
    trials = gained + lost
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, k) for k in range(min(gained, lost) + 1))
    return min(1.0, 2 * tail / 2**trials)


@pytest.mark.parametrize(
    ("gained", "lost"), [(0, 0), (0, 1), (1, 0), (5, 5), (3, 17), (17, 3), (40, 60), (480, 400), (2100, 2000)]
)
def test_mcnemar_matches_direct_binomial(gained, lost):
    assert mcnemar_exact_p(gained, lost) == pytest.approx(_exact_p(gained, lost), rel=1e-9, abs=1e-300)


def test_mcnemar_matches_scipy_binomtest():
    for gained, lost in [(1, 9), (12, 30), (250, 300)]:
        expected = scipy.stats.binomtest(min(gained, lost), gained + lost, 0.5).pvalue
        assert mcnemar_exact_p(gained, lost) == pytest.approx(expected, rel=1e-9)


def _grid() -> pd.DataFrame:
    """Two datasets x two shots; frequency, reducing and degrading counts known by construction."""
    parts = [
        # oxford_pets, 1 shot, seed 1: reducing +2 (yes), -1, 0; increasing -3 (degrades), +1.
        checkpoint_rows(
            "pets-1-s1",
            [reducing(gained=2), reducing(lost=1), reducing(), increasing(lost=3), increasing(gained=1)],
        ),
        # oxford_pets, 1 shot, seed 2: reducing +1 (yes); increasing -1 (degrades).
        checkpoint_rows("pets-1-s2", [reducing(gained=1), increasing(lost=1)], seed=2),
        # oxford_pets, 2 shots: reducing -2 only; no increasing cell.
        checkpoint_rows("pets-2-s1", [reducing(lost=2)], shots=2),
        # food101, 1 shot: two reducing +1, +3 (both yes).
        checkpoint_rows("food-1-s1", [reducing(gained=1), reducing(gained=3, position=1)], dataset="food101"),
    ]
    return sweep_frame([row for rows, _ in parts for row in rows])


def _group(table: pd.DataFrame, dataset: str, shots: int) -> pd.Series:
    rows = table[(table["dataset"] == dataset) & (table["shots"] == shots)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_mark_cells_by_norm_direction():
    marked = mark_cells(_grid())
    originals = marked[marked["op"] == "original"]
    assert not originals["reduces"].any() and not originals["increases"].any()
    assert marked["reduces"].sum() == 7 and marked["increases"].sum() == 3


def test_frequency_and_rate_per_group():
    table = lne_frequency(_grid())
    assert list(table.columns[:2]) == ["dataset", "shots"]
    pets_1 = _group(table, "oxford_pets", 1)
    assert (pets_1["cells"], pets_1["reducing"], pets_1["frequency"]) == (7, 4, 2)
    assert pets_1["rate_percent"] == pytest.approx(100 * 2 / 4)
    assert (pets_1["increasing"], pets_1["degrading"]) == (3, 2)
    assert pets_1["degradation_rate_percent"] == pytest.approx(100 * 2 / 3)
    pets_2 = _group(table, "oxford_pets", 2)
    assert (pets_2["frequency"], pets_2["rate_percent"]) == (0, 0.0)
    assert np.isnan(pets_2["degradation_rate_percent"])  # no increasing cell: undefined, not 0
    food = _group(table, "food101", 1)
    assert (food["frequency"], food["rate_percent"]) == (2, 100.0)


def test_group_by_any_columns():
    by_position = lne_frequency(_grid(), by="position")  # one kind of prompt: CoOp, all classes, own dataset
    assert list(by_position.columns[:5]) == ["position", "method", "method_variant", "subsample", "trained_on"]
    assert list(by_position["position"]) == [0, 1]
    assert list(by_position["frequency"]) == [3, 1]
    by_seed = lne_frequency(_grid(), by=["dataset", "seed"])
    assert by_seed.set_index(["dataset", "seed"])["frequency"].to_dict() == {
        ("food101", 1): 2,
        ("oxford_pets", 1): 1,
        ("oxford_pets", 2): 1,
    }


def test_margin_raises_the_bar():
    # n = 100: one sample is 1 pp; gains of 1, 2 and 3 samples.
    cells = _grid()
    assert lne_frequency(cells, by="dataset")["frequency"].sum() == 4
    above_one = lne_frequency(cells, by="dataset", margin=1.0)  # strictly more than 1 pp
    assert above_one.set_index("dataset")["frequency"].to_dict() == {"food101": 1, "oxford_pets": 1}
    assert lne_frequency(cells, by="dataset", margin=5.0)["frequency"].sum() == 0


def test_one_sample_on_a_large_test_set_is_not_significant(tmp_path):
    parts = [
        checkpoint_rows("big", [reducing(gained=1), reducing(gained=60, lost=10, position=1)], n=10000, correct=6000)
    ]
    path = write_sweep(tmp_path / "sweep.parquet", parts)
    cells = load_sweeps([path])
    plain = mark_occurrences(cells)
    assert plain["lne"].sum() == 2
    significant = mark_occurrences(cells, significant=True, alpha=0.05)
    corrupted = significant[significant["op"] != "original"].set_index("position")
    assert (corrupted.loc[0, "gained"], corrupted.loc[0, "lost"]) == (1, 0)
    assert corrupted.loc[0, "p_value"] == pytest.approx(1.0)
    assert not corrupted.loc[0, "lne"]
    assert corrupted.loc[1, "p_value"] == pytest.approx(_exact_p(60, 10), rel=1e-9)
    assert corrupted.loc[1, "lne"]
    assert lne_frequency(cells, significant=True)["frequency"].item() == 1


def test_alpha_decides_significance(tmp_path):
    path = write_sweep(tmp_path / "sweep.parquet", [checkpoint_rows("c", [reducing(gained=8, lost=1)])])
    cells = load_sweeps([path])
    p_value = _exact_p(8, 1)  # about 0.039
    assert p_value < 0.05
    assert lne_frequency(cells, significant=True, alpha=0.05)["frequency"].item() == 1
    assert lne_frequency(cells, significant=True, alpha=0.01)["frequency"].item() == 0


def test_csv_tables_and_their_correctness_file(tmp_path):
    path = write_sweep(tmp_path / "sweep.csv", [checkpoint_rows("c", [reducing(gained=30)], n=200)])
    table = lne_frequency(load_sweeps([path]), significant=True)
    assert table["frequency"].item() == 1


def test_several_tables_and_folders_load_together(tmp_path):
    write_sweep(tmp_path / "a.parquet", [checkpoint_rows("a", [reducing(gained=1)])])
    (tmp_path / "more").mkdir()
    write_sweep(tmp_path / "more" / "b.parquet", [checkpoint_rows("b", [reducing(lost=1)], dataset="dtd")])
    cells = load_sweeps([tmp_path, tmp_path / "a.parquet"])  # a.parquet named twice: loaded once
    assert len(cells) == 4
    frequency = lne_frequency(cells, by="dataset").set_index("dataset")["frequency"]
    assert frequency.to_dict() == {"dtd": 0, "oxford_pets": 1}


def test_bad_groups_and_inputs_fail_clearly(tmp_path):
    cells = _grid()
    with pytest.raises(NemesisError, match="'epoch' is not in the results"):
        lne_frequency(cells, by="epoch")
    no_seed = cells.assign(seed=pd.array([None] * len(cells), dtype="Int64"))
    with pytest.raises(NemesisError, match="'seed' has no values"):
        lne_frequency(no_seed, by="dataset,seed")
    with pytest.raises(NemesisError, match="no corrupted cells"):
        lne_frequency(cells[cells["op"] == "original"])
    only_increasing = lne_frequency(cells[~mark_cells(cells)["reduces"]])
    with pytest.raises(NemesisError, match="no norm-reducing cells"):
        require_rates(only_increasing, ["dataset", "shots"])
    with pytest.raises(NemesisError, match="no sweep result files"):
        load_sweeps([])
    (tmp_path / "other.csv").write_text("cell_id,accuracy\na,1.0\n")
    with pytest.raises(NemesisError, match=r"missing columns checkpoint, model, dataset"):
        load_sweeps([tmp_path / "other.csv"])


def test_significance_needs_the_correctness_file(tmp_path):
    path = write_sweep(tmp_path / "sweep.parquet", [checkpoint_rows("c", [reducing(gained=1)])])
    (tmp_path / "sweep.correct.parquet").unlink()
    with pytest.raises(NemesisError, match=r"sweep\.correct\.parquet not found"):
        lne_frequency(load_sweeps([path]), significant=True)


def test_a_cell_in_several_tables_counts_once(tmp_path):
    # A paper-preset table beside a default-grid table of the same checkpoint: their shared cells
    # (same cell_id) must not be counted twice.
    default = write_sweep(tmp_path / "default.parquet", [checkpoint_rows("c", [reducing(gained=2), reducing(lost=1)])])
    paper = write_sweep(tmp_path / "paper.parquet", [checkpoint_rows("c", [reducing(gained=2)])])
    alone = lne_frequency(load_sweeps([default]))
    both = lne_frequency(load_sweeps([default, paper]))
    assert (
        (both["cells"].item(), both["frequency"].item()) == (alone["cells"].item(), alone["frequency"].item()) == (2, 1)
    )


def test_mcnemar_pairs_a_cell_with_its_original_in_another_file(tmp_path):
    # default.parquet holds the original row and cell 0; extra.parquet holds cell 1 of the same
    # checkpoint, once beside a copy of the original row (dropped as a duplicate) and once alone.
    default = write_sweep(tmp_path / "default.parquet", [checkpoint_rows("c", [reducing(gained=1)])])
    for name, keep_original in (("extra.parquet", True), ("bare.parquet", False)):
        rows, correctness = checkpoint_rows("c", [reducing(gained=8, lost=1, position=1)], first_number=1)
        if not keep_original:
            del correctness[rows[0]["cell_id"]]
            rows = rows[1:]
        extra = write_sweep(tmp_path / name, [(rows, correctness)])
        cells = load_sweeps([default, extra])
        marked = mark_occurrences(cells, significant=True).set_index("position")
        assert marked.loc[1, "results_file"] == str(extra)  # its correctness is read from its own file
        assert (marked.loc[1, "gained"], marked.loc[1, "lost"]) == (8, 1)
        assert marked.loc[1, "p_value"] == pytest.approx(_exact_p(8, 1), rel=1e-9)
        assert (marked.loc[0, "gained"], marked.loc[0, "lost"]) == (1, 0)
    alone = tmp_path / "alone"
    alone.mkdir()
    (tmp_path / "bare.parquet").rename(alone / "bare.parquet")
    (tmp_path / "bare.correct.parquet").rename(alone / "bare.correct.parquet")
    with pytest.raises(NemesisError, match=r"cell c:rescale:1:0.001:1 has no original row of its checkpoint \(key c\)"):
        mark_occurrences(load_sweeps([alone]), significant=True)


def test_mcnemar_pairs_by_checkpoint_key_not_by_columns(tmp_path):
    # One checkpoint file swept on two weights: the table's columns (checkpoint, model, dataset)
    # are the same, only the cell ids' checkpoint key tells the two originals apart.
    parts = [
        checkpoint_rows("ckpt", [reducing(gained=8, lost=1)], key="weights-a", correct=50),
        checkpoint_rows("ckpt", [reducing(gained=2, lost=5)], key="weights-b", correct=70),
    ]
    cells = load_sweeps([write_sweep(tmp_path / "sweep.parquet", parts)])
    marked = add_mcnemar(cells)
    corrupted = marked[marked["op"] != "original"].set_index("cell_id")
    assert (
        corrupted.loc["weights-a:rescale:0:0.001:0", "gained"],
        corrupted.loc["weights-a:rescale:0:0.001:0", "lost"],
    ) == (8, 1)
    assert (
        corrupted.loc["weights-b:rescale:0:0.001:0", "gained"],
        corrupted.loc["weights-b:rescale:0:0.001:0", "lost"],
    ) == (2, 5)
