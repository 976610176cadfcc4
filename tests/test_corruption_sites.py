"""Corruption sites: a method declares where corruption acts; sweeps enumerate cells over its sites,
the table says which site each cell corrupted, and the LNE analysis keeps sites apart.

The site method here is `coop-mean2` of the conformance suite (two prompts [2, M, W] per class):
sites "prompt 0", "prompt 1" and "every prompt". Its sweeps run on a learner built in memory
(`corrupt.engine.sweep_learner`) and, through `nemesis corrupt`, on its prompt file.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from analysis import frequency_table_and_figure, lne_frequency, lne_frequency_table, load_sweeps
from analysis.plots import plot_position_heatmap
from corrupt.engine import evaluate_cells, sweep_learner
from corrupt.grid import ORIGINAL_CELL, Cell, check_sites, parse_grid
from corrupt.operators import corrupt_ctx, position_norm, replacement_noise
from corrupt.results import ResultsFile, cell_id, checkpoint_key
from nemesis.errors import NemesisError
from nemesis.evaluation.evaluate import prepare_evaluation, resolve_target
from nemesis.files.checkpoint import PromptMetadata, load_checkpoint, save_prompt
from nemesis.files.sweep_format import read_sweep_table
from nemesis.methods import METHODS
from nemesis.methods.protocol import WHOLE_CTX, CorruptionSite
from nemesis_cli.main import app

from .test_method_conformance import MEAN2, SPECS, AveragedCoOp
from .test_sweep import CLASSES, N_CTX, _backbones, _prompt, _sweep, data_root  # noqa: F401 (fixture)

WIDTH = 64  # tiny's text width
SITES = AveragedCoOp.corruption_sites_for((2, N_CTX, WIDTH))
PROMPTS_OF = {"prompt 0": [0], "prompt 1": [1], "every prompt": [0, 1]}  # the prompts each site corrupts
GRID = parse_grid(rescale="0.5", replace="0.1", positions="1")  # two cells per site
IDENTITY = {"checkpoint": "memory:coop-mean2", "model": "tiny", "pretrained": None, "dataset": "oxford_pets",
            "subsample": "all", "train_dataset": "oxford_pets", "shots": 4, "seed": 3}  # fmt: skip


def _mean2_ctx(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, N_CTX, WIDTH, generator=torch.Generator().manual_seed(seed)) * 0.5  # [2, M, W]


@pytest.fixture(scope="module")
def mean2_setup(data_root, tmp_path_factory):  # noqa: F811
    """An evaluation of oxford_pets whose learner is a coop-mean2 prompt built in memory."""
    path = _prompt(tmp_path_factory.mktemp("coop"), "coop", 3)  # only for the backbone, data and features
    target = resolve_target(load_checkpoint(path), pretrained="none")
    setup = prepare_evaluation(target, root=data_root, device="cpu", backbones=_backbones(), progress=False)
    learner = AveragedCoOp(setup.backbone, setup.dataset.classnames, ctx=_mean2_ctx())
    return dataclasses.replace(setup, learner=learner)


@pytest.fixture(scope="module")
def mean2_table(mean2_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "mean2.parquet"
    sweep_learner(mean2_setup, IDENTITY, GRID, ResultsFile(out))
    return out


# --- the grid ------------------------------------------------------------------------------------


def test_cells_run_over_every_site_with_one_original():
    cells = GRID.cells(N_CTX, SITES)
    assert cells[0] == ORIGINAL_CELL and [cell.op for cell in cells].count("original") == 1
    assert [cell.site.name for cell in cells[1:]] == [name for name in ("prompt 0", "prompt 1", "every prompt")
                                                      for _ in range(2)]  # fmt: skip
    ids = [cell_id(IDENTITY, cell) for cell in cells]
    key = checkpoint_key(IDENTITY)
    assert len(set(ids)) == len(ids) and ids[1] == f"{key}:rescale:1:0.5:-:prompt 0"
    # A method's whole-ctx site (CoOp's) gives the cells and ids of before: no site in them.
    whole = GRID.cells(N_CTX)
    assert [cell.site for cell in whole] == [WHOLE_CTX] * len(whole) and whole[1] == Cell("rescale", 1, 0.5)
    assert [cell_id(IDENTITY, cell) for cell in whole] == [
        f"{key}:original:-:-:-", f"{key}:rescale:1:0.5:-", f"{key}:replace:1:0.1:0"]  # fmt: skip


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        ([], "declares no corruption site"),
        ([CorruptionSite("a"), CorruptionSite("a", index=(1,))], "'a' repeat"),
    ],
)
def test_sites_a_sweep_cannot_tell_apart_or_apply_are_refused(sites, message):
    with pytest.raises(NemesisError, match=message):
        check_sites(sites)


def test_a_site_on_a_tensor_the_prompt_lacks_is_refused(mean2_setup):
    """Sites may name any learned tensor (IVLP's vision prompts); one the prompt does not have is refused."""
    cell = GRID.cells(N_CTX, [CorruptionSite("deep", tensor="vision_ctx")])[1]
    with pytest.raises(NemesisError, match="acts on 'vision_ctx', which this prompt does not learn"):
        evaluate_cells(mean2_setup, mean2_setup.learner.ctx.detach(), [cell])


def test_a_site_index_must_select_a_part_of_ctx():
    with pytest.raises(ValueError, match="whole numbers"):
        CorruptionSite("bad", index=(-1,))
    with pytest.raises(ValueError, match="does not fit"):
        CorruptionSite("deep", index=(0, 1)).part(_mean2_ctx())


def test_an_operator_at_a_site_changes_that_part_of_ctx_only():
    ctx = _mean2_ctx()
    first, second, every = SITES
    rescaled = corrupt_ctx(ctx, Cell("rescale", 2, 0.5, None, first))
    assert torch.equal(rescaled[0, 2], ctx[0, 2] * 0.5) and torch.equal(rescaled[1], ctx[1])
    assert torch.equal(rescaled[0, [0, 1, 3]], ctx[0, [0, 1, 3]])
    replaced = corrupt_ctx(ctx, Cell("replace", 1, 0.1, 0, every))
    noise = replacement_noise(WIDTH, 0.1, 0, 1)
    assert torch.equal(replaced[0, 1], noise) and torch.equal(replaced[1, 1], noise)  # the same eps in each prompt
    assert position_norm(ctx, 2, second) == pytest.approx(ctx[1, 2].norm().item(), rel=1e-6)
    assert position_norm(ctx, 2, every) == pytest.approx(ctx[:, 2].norm(dim=-1).mean().item(), rel=1e-6)
    assert torch.equal(ctx, _mean2_ctx())  # the input is not changed


# --- the sweep -----------------------------------------------------------------------------------


def _by_hand(ctx: torch.Tensor, row) -> torch.Tensor:
    """The cell's ctx written out: each of the site's prompts changed at the position, nothing else."""
    variant = ctx.clone()
    for prompt in PROMPTS_OF[row.site]:
        if row.op == "rescale":
            variant[prompt, row.position] = ctx[prompt, row.position] * row.factor
        else:
            variant[prompt, row.position] = replacement_noise(WIDTH, row.factor, int(row.noise_seed), int(row.position))
    return variant


def test_a_sweep_runs_two_cells_at_each_site_of_a_learner_in_memory(mean2_table):
    table = read_sweep_table(mean2_table).table
    assert len(table) == 1 + 2 * len(SITES) and table["cell_id"].is_unique
    assert table["site"].value_counts().to_dict() == {"": 1, "prompt 0": 2, "prompt 1": 2, "every prompt": 2}
    assert table.loc[table["site"] == "", "op"].tolist() == ["original"]  # once per prompt, not per site
    assert set(table["method"]) == {MEAN2}
    for site in ("prompt 0", "prompt 1", "every prompt"):
        assert sorted(table.loc[table["site"] == site, "op"]) == ["replace", "rescale"]


def test_a_cell_at_a_site_equals_the_operator_applied_by_hand(mean2_setup, mean2_table):
    contents = read_sweep_table(mean2_table, correctness=True)
    stored = dict(zip(contents.correctness["cell_id"].to_pylist(), contents.correctness["correct"].to_pylist(),
                      strict=True))  # fmt: skip
    table = contents.table
    ctx = _mean2_ctx()
    learner, labels = mean2_setup.learner, mean2_setup.labels
    with torch.inference_mode():
        original = learner.similarities(mean2_setup.features, ctx[None])[0].argmax(-1) == labels
    accuracy = 100 * original.float().mean().item()
    assert table.loc[table["op"] == "original", "accuracy"].item() == pytest.approx(accuracy)
    for row in table[table["op"] != "original"].itertuples():
        variant = _by_hand(ctx, row)
        with torch.inference_mode():
            correct = learner.similarities(mean2_setup.features, variant[None])[0].argmax(-1) == labels
        assert stored[row.cell_id] == correct.tolist(), row.cell_id
        assert row.correct == int(correct.sum())
        assert row.delta_acc == pytest.approx(100 * correct.float().mean().item() - accuracy, abs=1e-6)
        prompts = PROMPTS_OF[row.site]
        before = torch.stack([ctx[prompt, row.position].norm() for prompt in prompts]).mean().item()
        after = torch.stack([variant[prompt, row.position].norm() for prompt in prompts]).mean().item()
        assert (row.norm_before, row.norm_after) == (pytest.approx(before, rel=1e-6), pytest.approx(after, rel=1e-6))
    norms = table.set_index("site")["norm_before"]
    assert norms["prompt 0"].iloc[0] != norms["prompt 1"].iloc[0]  # the sites corrupt different vectors


def test_site_cells_in_a_batch_equal_cells_alone_i4(mean2_setup):
    cells = GRID.cells(N_CTX, mean2_setup.learner.corruption_sites())
    ctx = mean2_setup.learner.ctx.detach()
    batched = evaluate_cells(mean2_setup, ctx, cells, variants_per_pass=4)  # chunks cut across sites
    for index, cell in enumerate(cells):
        alone = evaluate_cells(mean2_setup, ctx, [cell])
        assert torch.equal(batched.correct[index], alone.correct[0]), cell
        assert batched.norms_after[index] == alone.norms_after[0] or cell.op == "original"


def test_a_sweep_at_sites_resumes_computing_only_missing_cells(mean2_setup, mean2_table, tmp_path):
    out = tmp_path / "resumed.parquet"
    first = sweep_learner(mean2_setup, IDENTITY, parse_grid(rescale="0.5", positions="1"), ResultsFile(out))
    assert len(first) == 1 + len(SITES)
    results = ResultsFile(out)
    calls = []
    rows = sweep_learner(mean2_setup, IDENTITY, GRID, _Counting(results, calls))
    assert calls == [len(SITES)]  # only the replace cell of each site
    expected = read_sweep_table(mean2_table).table.set_index("cell_id")
    resumed = ResultsFile(out).table.set_index("cell_id")
    assert sorted(resumed.index) == sorted(expected.index) and len(rows) == len(expected)
    pd.testing.assert_frame_equal(resumed.loc[expected.index], expected)


class _Counting:
    """A ResultsFile that records how many rows each append brings."""

    def __init__(self, results: ResultsFile, calls: list) -> None:
        self.results, self.calls = results, calls

    def __getattr__(self, name):
        return getattr(self.results, name)

    def append(self, rows, correct) -> None:
        self.calls.append(len(rows))
        self.results.append(rows, correct)


def test_nemesis_corrupt_sweeps_every_site_of_a_saved_prompt(tmp_path, data_root, monkeypatch):  # noqa: F811
    """The file-based path: `nemesis corrupt` of a coop-mean2 prompt file."""
    monkeypatch.setitem(METHODS, MEAN2, SPECS[MEAN2])
    metadata = PromptMetadata(model="tiny", dataset="oxford_pets", shots=4, seed=3, prompt_method=MEAN2)
    path = save_prompt(tmp_path / "prompt.safetensors", _mean2_ctx(), metadata)
    out = tmp_path / "sweep.parquet"
    args = ["corrupt", str(path), "--out", str(out), "--root", str(data_root), "--pretrained", "none"]
    result = CliRunner().invoke(
        app, [*args, "--device", "cpu", "--rescale", "0.5", "--replace", "0.1", "--positions", "1"]
    )
    assert result.exit_code == 0, result.output
    table = read_sweep_table(out).table
    assert table["site"].value_counts().to_dict() == {"": 1, "prompt 0": 2, "prompt 1": 2, "every prompt": 2}


# --- the LNE analysis ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coop_table(data_root, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("coop-sweep")
    _sweep([_prompt(folder, "p", 3)], folder / "coop.parquet", GRID, data_root)
    return folder / "coop.parquet"


def test_lne_frequency_keeps_sites_apart_even_when_pooled(mean2_table):
    cells = load_sweeps([mean2_table])
    for pool in (False, True):
        table = lne_frequency(cells, pool=pool)
        assert sorted(table["site"]) == ["every prompt", "prompt 0", "prompt 1"] and set(table["cells"]) == {2}
    by_site = lne_frequency(cells, by="site")
    assert by_site.columns[0] == "site" and by_site.set_index("site")["cells"].to_dict() == {
        "every prompt": 2, "prompt 0": 2, "prompt 1": 2}  # fmt: skip
    figure = plot_position_heatmap(cells)
    assert len(figure.axes) == 2 * len(SITES) + 1  # a panel per op and site, and the colour bar


def test_a_coop_table_gives_the_output_of_before(coop_table):
    """CoOp's cells have one site: no site column in the frequency, the same table as without the column."""
    cells = load_sweeps([coop_table])
    assert set(cells["site"]) == {""}
    without = cells.drop(columns=["site"])
    assert "site" not in lne_frequency(cells).columns
    pd.testing.assert_frame_equal(lne_frequency(cells), lne_frequency(without))
    for by in ("dataset,shots", "position"):
        new, old = lne_frequency_table(cells, by=by), lne_frequency_table(without, by=by)
        pd.testing.assert_frame_equal(new.display, old.display)
        assert new.notes == old.notes
    # Asked for, the one site is a group of its own.
    assert lne_frequency(cells, by="site")["site"].tolist() == [""]


def test_tables_and_figures_of_a_mixed_sweep_show_each_site(coop_table, mean2_table):
    cells = load_sweeps([coop_table, mean2_table])
    table = lne_frequency(cells)
    assert table.set_index(["method", "site"])["cells"].to_dict() == {
        ("coop", ""): 2, (MEAN2, "every prompt"): 2, (MEAN2, "prompt 0"): 2, (MEAN2, "prompt 1"): 2}  # fmt: skip
    display = lne_frequency_table(cells, paper=False).display
    assert list(display["Prompts"]) == [
        "CoOp (random weights), whole ctx", *(f"{MEAN2} (random weights), {site}"
                                              for site in ("every prompt", "prompt 0", "prompt 1"))]  # fmt: skip
    by_position = lne_frequency_table(cells, by="position", paper=False).display
    assert sorted(by_position["site"]) == ["every prompt", "prompt 0", "prompt 1", "whole ctx"]
    _, figure = frequency_table_and_figure(cells)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]  # the legend below the axes
    assert len(labels) == 4 and any("prompt 0" in label for label in labels)


def test_plot_frequency_groups_by_site_when_asked(mean2_table, tmp_path):
    args = ["plot-frequency", str(mean2_table), "--out", str(tmp_path / "fig"), "--by", "site"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert all(site in result.output for site in ("every prompt", "prompt 0", "prompt 1"))


def test_the_corrupt_summary_counts_each_site_apart(mean2_table):
    from rich.console import Console

    from corrupt.engine import SweepSummary
    from nemesis_cli.corrupt import print_summary

    results = ResultsFile(mean2_table)
    console = Console(record=True, width=200)
    print_summary(SweepSummary(1, len(results.table), 0, 1.0, results.table), results, console)
    text = console.export_text()
    counts = [line.split(":")[0] for line in text.splitlines() if line.startswith("norm-reducing")]
    assert [line.rsplit(", ", 1)[1] for line in counts] == ["every prompt", "prompt 0", "prompt 1"]
    assert "rescale 0.5 @1, prompt 0" in text  # each cell names its site
