"""Sweeps on CoCoOp checkpoints: I4, corruption of the learned ctx before the meta-net's shift, `method` cocoop."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from corrupt.engine import evaluate_cells
from corrupt.grid import Cell, parse_grid
from corrupt.operators import corrupted_variants
from corrupt.results import correctness_path
from nemesis.evaluation.evaluate import prepare_evaluation, resolve_target
from nemesis.files.checkpoint import PromptMetadata, load_checkpoint, save_prompt
from nemesis.methods.cocoop.learner import CoCoOp
from nemesis.methods.coop.learner import PromptLearner

from .conftest import cached_backbone
from .test_sweep import CLASSES, N_CTX, _backbones, _ctx, _sweep, data_root  # noqa: F401 (fixture)

GRID = parse_grid(rescale="0.001,3", replace="0,1", noise_seeds="0")


def _cocoop_prompt(folder, seed: int = 3):
    learner = CoCoOp(cached_backbone("tiny"), CLASSES, ctx=_ctx(seed), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in learner.meta_net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)  # a shift that matters
    metadata = PromptMetadata(model="tiny", dataset="oxford_pets", shots=4, seed=seed, prompt_method="cocoop")
    return save_prompt(folder / "cocoop.safetensors", learner.ctx, metadata, learner.extra_parameters())


def test_cocoop_cells_in_a_batch_equal_cells_alone_i4(tmp_path, data_root):  # noqa: F811
    path = _cocoop_prompt(tmp_path)
    summary = _sweep([path], tmp_path / "r.parquet", GRID, data_root)
    assert set(summary.cells["method"]) == {"cocoop"}
    assert len(summary.cells) == len(GRID.cells(N_CTX))
    correctness = pd.read_parquet(correctness_path(tmp_path / "r.parquet"))

    checkpoint = load_checkpoint(path)
    target = resolve_target(checkpoint, pretrained="none")
    setup = prepare_evaluation(target, root=data_root, device="cpu", backbones=_backbones(), progress=False)
    assert isinstance(setup.learner, CoCoOp)
    cells = GRID.cells(N_CTX)
    batched = evaluate_cells(setup, checkpoint.ctx, cells, variants_per_pass=3)
    for index, cell in enumerate(cells):
        alone = evaluate_cells(setup, checkpoint.ctx, [cell]).correct[0]
        assert torch.equal(batched.correct[index], alone), cell
        row = summary.cells.iloc[index]
        assert row.correct == int(alone.sum())
        stored = correctness.loc[correctness.cell_id == row.cell_id, "correct"].iloc[0]
        assert list(stored) == alone.tolist()
    assert summary.cells["accuracy"].nunique() > 1  # the corruptions change predictions


@pytest.mark.parametrize("cell", [Cell("replace", 1, 0.0, 0), Cell("rescale", 2, 3.0)])
def test_corruption_acts_on_ctx_before_the_shift(tmp_path, data_root, cell):  # noqa: F811
    checkpoint = load_checkpoint(_cocoop_prompt(tmp_path))
    target = resolve_target(checkpoint, pretrained="none")
    setup = prepare_evaluation(target, root=data_root, device="cpu", backbones=_backbones(), progress=False)
    predicted = evaluate_cells(setup, checkpoint.ctx, [cell]).correct[0]
    corrupted = corrupted_variants(checkpoint.ctx, [cell])[0]  # [M, W]
    extra = checkpoint.extra
    expected = []
    with torch.no_grad():
        for image in setup.features[:6]:
            unit = F.normalize(image, dim=-1)
            hidden = F.relu(unit @ extra["meta_net.linear1.weight"].T + extra["meta_net.linear1.bias"])
            shift = hidden @ extra["meta_net.linear2.weight"].T + extra["meta_net.linear2.bias"]  # [W]
            text = PromptLearner(setup.backbone, setup.dataset.classnames, ctx=corrupted + shift).text_features()
            expected.append(int((F.normalize(text, dim=-1) @ unit).argmax()))
    labels = setup.labels[:6]
    assert predicted[:6].tolist() == (torch.tensor(expected) == labels).tolist()


def test_a_meta_net_for_another_model_is_refused_before_the_sweep(tmp_path, data_root):  # noqa: F811
    from corrupt.inputs import resolve_inputs
    from nemesis.errors import NemesisError

    path = _cocoop_prompt(tmp_path)
    checkpoint = load_checkpoint(path)
    extra = dict(
        checkpoint.extra, **{"meta_net.linear1.weight": torch.zeros(32, 512), "meta_net.linear1.bias": torch.zeros(32)}
    )
    wide = save_prompt(tmp_path / "wide.safetensors", checkpoint.ctx, checkpoint.metadata, extra)
    with pytest.raises(NemesisError, match="image width 64"):
        resolve_inputs([wide], pretrained="none")
