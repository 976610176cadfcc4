"""The sweep engine: I4 (batched cells equal cells alone), resuming, CoOp output trees as input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import corrupt.engine as engine
from corrupt.engine import evaluate_cells, run_sweep
from corrupt.grid import ORIGINAL_CELL, Cell, parse_grid
from corrupt.inputs import identity_from_path, resolve_inputs
from corrupt.results import COLUMNS, ResultsFile, correctness_path
from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError
from nemesis.evaluation.evaluate import prepare_evaluation, resolve_target
from nemesis.files.checkpoint import PromptCheckpoint, PromptMetadata, export_dassl, load_checkpoint, save_prompt
from nemesis.methods import legacy_name, method_of_dassl_path
from nemesis.methods.coop.learner import PromptLearner
from nemesis.model.text_encoder import TextEncoder

from .conftest import cached_backbone

CLASSES = ["red square", "green circle", "blue star", "yellow moon"]
N_CTX = 4


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for dataset in ("oxford_pets", "dtd"):
        make_coop_folder(root, dataset, classnames=CLASSES, per_class=(1, 1, 8))
    return root


def _backbones() -> dict:
    return {("tiny", None, None): cached_backbone("tiny")}


def _ctx(seed: int, class_specific: bool = False) -> torch.Tensor:
    shape = (len(CLASSES), N_CTX, 64) if class_specific else (N_CTX, 64)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def _prompt(folder, name: str, seed: int, class_specific: bool = False):
    metadata = PromptMetadata(model="tiny", dataset="oxford_pets", shots=4, seed=seed, prompt_method="coop")
    return save_prompt(folder / f"{name}.safetensors", _ctx(seed, class_specific), metadata)


def _sweep(paths, out, grid, root, **options):
    inputs = resolve_inputs(paths, **({"pretrained": "none"} | options))
    return run_sweep(inputs, grid, ResultsFile(out), root=root, device="cpu", backbones=_backbones(), progress=False)


GRID = parse_grid(rescale="0.001,0.5,3", replace="0,0.1,1", noise_seeds="0,1")


@pytest.mark.parametrize("class_specific", [False, True], ids=["unified", "class-specific"])
def test_batched_cells_equal_cells_alone(tmp_path, data_root, class_specific):
    """I4 for both operators: every row and correctness list of a sweep equals that cell evaluated alone."""
    path = _prompt(tmp_path, "p", 3, class_specific)
    summary = _sweep([path], tmp_path / "r.parquet", GRID, data_root)
    correctness = pd.read_parquet(correctness_path(tmp_path / "r.parquet"))
    # REPLACE sigma 0 is one cell per position (the seed cannot change a zero vector), the others one per seed
    assert len(summary.cells) == len(GRID.cells(N_CTX)) == 1 + 3 * N_CTX + (1 + 2 * 2) * N_CTX

    checkpoint = load_checkpoint(path)
    target = resolve_target(checkpoint, pretrained="none")
    setup = prepare_evaluation(target, root=data_root, device="cpu", backbones=_backbones(), progress=False)
    cells = GRID.cells(N_CTX)
    batched = evaluate_cells(setup, checkpoint.ctx, cells, variants_per_pass=5)  # chunks cut across operators
    accuracies = set()
    for index, cell in enumerate(cells):
        alone = evaluate_cells(setup, checkpoint.ctx, [cell]).correct[0]
        assert torch.equal(batched.correct[index], alone), cell
        row = summary.cells.iloc[index]
        assert (row.op, row.factor if cell.factor is not None else None) == (cell.op, cell.factor)
        assert row.correct == int(alone.sum()) and row.accuracy == pytest.approx(100 * alone.float().mean().item())
        stored = correctness.loc[correctness.cell_id == row.cell_id, "correct"].iloc[0]
        assert np.array_equal(np.asarray(stored, dtype=bool), alone.numpy())
        accuracies.add(row.accuracy)
    assert len(accuracies) > 1  # the corruptions do change predictions: the comparison has teeth


def test_rows_follow_the_table_schema(tmp_path, data_root):
    path = _prompt(tmp_path, "p", 1)
    table = _sweep([path], tmp_path / "r.parquet", GRID, data_root).cells
    assert tuple(table.columns) == COLUMNS
    original = table[table.op == "original"].iloc[0]
    assert pd.isna(original.position) and np.isnan(original.factor) and pd.isna(original.noise_seed)
    assert original.delta_acc == 0 and np.isnan(original.norm_before) and np.isnan(original.norm_after)
    corrupted = table[table.op != "original"]
    assert np.allclose(corrupted.delta_acc, corrupted.accuracy - original.accuracy)
    assert corrupted[corrupted.op == "rescale"].noise_seed.isna().all()
    assert set(corrupted[corrupted.op == "replace"].noise_seed) == {0, 1}
    assert (table.n == 4 * 8).all() and table.cell_id.is_unique
    assert str(table.shots.dtype) == "Int64" and table.shots.iloc[0] == 4
    assert (table.dataset == "oxford_pets").all() and (table.method == "coop").all()
    assert (table.weights == "random-seed0").all()  # the backbone's weights id (--pretrained none)


def test_interrupted_sweep_resumes_to_the_uninterrupted_table(tmp_path, data_root, monkeypatch):
    paths = [_prompt(tmp_path, f"p{seed}", seed) for seed in (1, 2, 3)]
    grid = parse_grid(rescale="0.01,2", replace="0", positions="0,2")
    reference = _sweep(paths, tmp_path / "full.parquet", grid, data_root)

    calls = []

    def killed_after_first_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the sweep is killed while the second checkpoint runs
        return prepare_evaluation(*args, **kwargs)

    monkeypatch.setattr(engine, "prepare_evaluation", killed_after_first_checkpoint)
    out = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        _sweep(paths, out, grid, data_root)
    cells_per_checkpoint = len(grid.cells(N_CTX))
    assert len(pd.read_parquet(out)) == cells_per_checkpoint  # the first checkpoint's rows survived
    monkeypatch.undo()

    resumed = _sweep(paths, out, grid, data_root)
    assert resumed.computed == 2 * cells_per_checkpoint and resumed.skipped == cells_per_checkpoint
    table, expected = pd.read_parquet(out), pd.read_parquet(tmp_path / "full.parquet")
    pd.testing.assert_frame_equal(table, expected)
    assert table.cell_id.is_unique and len(table) == 3 * cells_per_checkpoint == len(reference.cells)
    correct = pd.read_parquet(correctness_path(out)).set_index("cell_id").sort_index()
    expected_correct = pd.read_parquet(correctness_path(tmp_path / "full.parquet")).set_index("cell_id").sort_index()
    assert correct.index.equals(expected_correct.index)
    assert all(np.array_equal(a, b) for a, b in zip(correct.correct, expected_correct.correct, strict=True))

    again = _sweep(paths, out, grid, data_root)  # nothing left to do
    assert again.computed == 0 and len(again.cells) == len(table)
    pd.testing.assert_frame_equal(pd.read_parquet(out), expected)


def test_larger_grid_computes_only_new_cells(tmp_path, data_root):
    path = _prompt(tmp_path, "p", 4)
    out = tmp_path / "r.parquet"
    _sweep([path], out, parse_grid(rescale="0.5"), data_root)
    summary = _sweep([path], out, parse_grid(rescale="0.5,3"), data_root)
    assert summary.computed == N_CTX and summary.skipped == 1 + N_CTX
    fresh = _sweep([path], tmp_path / "fresh.parquet", parse_grid(rescale="0.5,3"), data_root)
    pd.testing.assert_frame_equal(pd.read_parquet(out), fresh.cells)  # delta_acc against the stored original


def _coop_run(folder, ctx, epoch=5):
    folder.mkdir(parents=True)
    export_dassl(PromptCheckpoint(ctx, PromptMetadata()), folder, epoch=epoch)


def test_sweep_over_a_coop_output_tree_reads_identity_from_paths(tmp_path, data_root):
    output = tmp_path / "output"
    expected = {}
    for dataset, shots, seed in [("oxford_pets", 1, 1), ("oxford_pets", 16, 2), ("dtd", 4, 1), ("dtd", 4, 3)]:
        run = output / dataset / "CoOp" / f"vit_b16_ep50_{shots}shots" / "nctx4_cscFalse_ctpend" / f"seed{seed}"
        _coop_run(run, _ctx(seed + shots))
        expected[(dataset, shots, seed)] = ("coop", 4 * 8)
    base = output / "base2new" / "train_base" / "dtd" / "shots_16" / "CoOp_Nemesis" / "vit_b16_c4" / "seed2"
    _coop_run(base, _ctx(9))
    expected[("dtd", 16, 2)] = ("nemesis", 2 * 8)  # base classes only: 2 of 4
    # An earlier epoch beside the latest: the latest is swept.
    export_dassl(PromptCheckpoint(_ctx(0), PromptMetadata()), base, epoch=1)

    grid = parse_grid(paper_preset=True, positions="0,3")
    table = _sweep([output], tmp_path / "r.parquet", grid, data_root, model="tiny").cells
    assert len(table) == 5 * len(grid.cells(N_CTX))
    found = {
        (row.dataset, row.shots, row.seed): (legacy_name(row.method, row.penalty), row.n)
        for row in table.drop_duplicates("checkpoint").itertuples()
    }
    assert found == expected
    assert all(path.endswith("model.pth.tar-5") for path in table.checkpoint)
    kinds = {
        (row.dataset, row.shots, row.seed): (row.subsample, row.train_dataset, row.n_classes)
        for row in table.drop_duplicates("checkpoint").itertuples()
    }
    assert kinds[("dtd", 16, 2)] == ("base", "dtd", 2)  # a base-class prompt is recorded as one
    assert kinds[("oxford_pets", 1, 1)] == ("all", "oxford_pets", 4)


def test_sweep_of_a_linked_run_folder_reads_identity_from_the_link(tmp_path):
    """A tree whose seed folder links to a run stored elsewhere: its identity comes from the path as
    given, while the table names the file once, by its real path, so reruns find its cells."""
    stored = tmp_path / "store" / "run-a"
    _coop_run(stored, _ctx(1))
    seed = tmp_path / "output" / "base2new" / "train_base" / "dtd" / "shots_16" / "CoOp" / "vit_b16_c4" / "seed2"
    seed.parent.mkdir(parents=True)
    seed.symlink_to(stored, target_is_directory=True)
    (item,) = resolve_inputs([seed, stored], model="tiny", pretrained="none")
    identity = item.identity
    assert (identity["dataset"], identity["shots"], identity["seed"]) == ("dtd", 16, 2)
    assert (identity["subsample"], identity["method"]) == ("base", "coop")
    assert item.file == stored.resolve() / "prompt_learner" / "model.pth.tar-5"
    assert identity["checkpoint"] == str(item.file)


def test_rows_record_the_kind_of_prompt_under_domain_shift(tmp_path, data_root):
    path = _prompt(tmp_path, "p", 1)  # trained on oxford_pets
    grid = parse_grid(paper_preset=True, positions="0")
    shifted = _sweep([path], tmp_path / "shift.parquet", grid, data_root, dataset="dtd").cells
    assert set(shifted.dataset) == {"dtd"} and set(shifted.train_dataset) == {"oxford_pets"}
    assert set(shifted.subsample) == {"all"} and set(shifted.n_classes) == {4}


@pytest.mark.parametrize(
    ("path", "dataset", "shots", "seed", "method", "subsample"),
    [
        ("output/oxford_pets/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1/prompt_learner/model.pth.tar-200",
         "oxford_pets", 16, 1, "coop", None),
        ("runs/output/food101/NemesisCoOp/vit_b16_ep50_2shots/nctx16_cscTrue_ctpend/seed3",
         "food101", 2, 3, "nemesis", None),
        ("output/base2new/train_base/stanford_cars/shots_16/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1/seed1",
         "stanford_cars", 16, 1, "cocoop", "base"),
        ("somewhere/else/model.pth.tar-5", None, None, None, "unknown", None),
    ],
)  # fmt: skip
def test_identity_from_coop_paths(path, dataset, shots, seed, method, subsample):
    identity = identity_from_path(path)
    assert (identity.dataset, identity.shots, identity.seed) == (dataset, shots, seed)
    trained, penalty = method_of_dassl_path(identity.trainer, identity.nemesis)
    assert (legacy_name(trained, penalty) if trained else "unknown", identity.subsample) == (method, subsample)


def test_original_cell_comes_first_and_ids_are_deterministic(tmp_path, data_root):
    path = _prompt(tmp_path, "p", 1)
    first = _sweep([path], tmp_path / "a.parquet", parse_grid(replace="0.1"), data_root).cells
    second = _sweep([path], tmp_path / "b.parquet", parse_grid(replace="0.1"), data_root).cells
    assert first.cell_id.tolist() == second.cell_id.tolist()
    assert first.op.iloc[0] == "original"
    assert Cell("replace", 0, 0.1, 0) != ORIGINAL_CELL


def test_a_table_without_its_correctness_is_refused_not_truncated(tmp_path, data_root):
    path = _prompt(tmp_path, "p", 1)
    out = tmp_path / "r.parquet"
    _sweep([path], out, GRID, data_root)
    rows = len(pd.read_parquet(out))
    correctness_path(out).unlink()
    with pytest.raises(NemesisError, match="lacks the per-sample correctness"):
        ResultsFile(out)
    assert len(pd.read_parquet(out)) == rows


def test_the_same_file_under_other_names_is_one_checkpoint(tmp_path, data_root, monkeypatch):
    path = _prompt(tmp_path, "p", 1)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    out = tmp_path / "r.parquet"
    first = _sweep([path], out, GRID, data_root)
    again = _sweep(["../p.safetensors", "../sub/../p.safetensors"], out, GRID, data_root)
    assert again.computed == 0 and len(pd.read_parquet(out)) == len(first.cells)


@pytest.mark.parametrize("class_position", ["end", "middle"])
def test_tables_are_identical_with_and_without_prefix_reuse(tmp_path, data_root, monkeypatch, class_position):
    """The shared-prefix text pass changes no accuracy and no per-sample correctness of a sweep."""
    metadata = PromptMetadata(
        model="tiny", dataset="oxford_pets", shots=4, seed=3, prompt_config={"class_position": class_position}
    )
    path = save_prompt(tmp_path / "p.safetensors", _ctx(3), metadata)
    prefix_passes = []
    original_pass = TextEncoder.prefix_keys_values
    monkeypatch.setattr(TextEncoder, "prefix_keys_values", lambda *a: prefix_passes.append(1) or original_pass(*a))
    shared = _sweep([path], tmp_path / "shared.parquet", GRID, data_root).cells
    assert prefix_passes  # the prefixes were shared
    monkeypatch.setattr(PromptLearner, "share_prefix", False)
    prefix_passes.clear()
    whole = _sweep([path], tmp_path / "whole.parquet", GRID, data_root).cells
    assert not prefix_passes
    pd.testing.assert_frame_equal(shared, whole)
    correctness = [pd.read_parquet(correctness_path(tmp_path / name)) for name in ("shared.parquet", "whole.parquet")]
    pd.testing.assert_frame_equal(*correctness)
    assert shared.accuracy.nunique() > 1
