"""Corruption operators and sweep grids: what each operator changes, noise seeds, norms, flag parsing."""

from __future__ import annotations

import pytest
import torch

from corrupt.engine import evaluate_cells
from corrupt.grid import DEFAULT_FACTORS, ORIGINAL_CELL, Cell, Grid, parse_grid
from corrupt.operators import (
    OPERATORS,
    corrupted_variants,
    position_norm,
    replace,
    replacement_noise,
    rescale,
)
from nemesis.errors import NemesisError
from nemesis.evaluation.evaluate import EvaluationSetup
from nemesis.methods.coop.learner import PromptLearner

from .conftest import cached_backbone

SHAPES = {"unified": (16, 64), "class-specific": (3, 16, 64)}


@pytest.fixture(params=list(SHAPES))
def ctx(request):
    return torch.randn(SHAPES[request.param], generator=torch.Generator().manual_seed(5))


def _others_unchanged(before: torch.Tensor, after: torch.Tensor, position: int) -> bool:
    keep = [j for j in range(before.shape[-2]) if j != position]
    return torch.equal(before[..., keep, :], after[..., keep, :])


@pytest.mark.parametrize("tau", [0.0, 0.001, 0.5, 2.0, 10.0])
def test_rescale_scales_exactly_that_position(ctx, tau):
    original = ctx.clone()
    corrupted = rescale(ctx, 5, tau, 0)
    assert torch.equal(corrupted[..., 5, :], original[..., 5, :] * tau)
    assert _others_unchanged(original, corrupted, 5)
    assert torch.equal(ctx, original)  # pure: the input is untouched


def test_replace_with_sigma_zero_is_the_zero_vector(ctx):
    corrupted = replace(ctx, 2, 0.0, 7)
    assert torch.equal(corrupted[..., 2, :], torch.zeros_like(corrupted[..., 2, :]))
    assert _others_unchanged(ctx, corrupted, 2)


def test_replace_noise_is_reproducible_per_seed_and_differs_between_seeds(ctx):
    first, again = replace(ctx, 3, 0.1, 0), replace(ctx, 3, 0.1, 0)
    assert torch.equal(first, again)
    assert not torch.equal(first[..., 3, :], replace(ctx, 3, 0.1, 1)[..., 3, :])
    assert _others_unchanged(ctx, first, 3)
    # Another position draws other noise; sigma scales the same draw.
    assert not torch.equal(replacement_noise(64, 0.1, 0, 3), replacement_noise(64, 0.1, 0, 4))
    assert torch.allclose(replacement_noise(64, 1.0, 0, 3) * 0.1, replacement_noise(64, 0.1, 0, 3))


def test_replace_noise_has_the_asked_spread_and_is_shared_by_classes():
    noise = replacement_noise(4096, 0.5, 0, 0)
    assert abs(noise.std().item() - 0.5) < 0.03 and abs(noise.mean().item()) < 0.03
    corrupted = replace(torch.randn(3, 4, 64), 1, 0.1, 0)
    assert torch.equal(corrupted[0, 1], corrupted[2, 1])  # the same eps for every class at position j


def test_norms_are_l2_norms_of_that_position(ctx):
    expected = torch.linalg.vector_norm(ctx[..., 4, :], dim=-1).mean().item()  # class mean if class-specific
    assert position_norm(ctx, 4) == pytest.approx(expected, rel=1e-6)
    assert position_norm(rescale(ctx, 4, 0.01, 0), 4) == pytest.approx(0.01 * expected, rel=1e-5)
    assert position_norm(replace(ctx, 4, 0.0, 0), 4) == 0.0


def test_evaluated_cells_report_norms_before_and_after(ctx):
    """The engine's norm_before/norm_after are the L2 norms of the corrupted position."""
    backbone = cached_backbone("tiny")
    classnames = ["cat", "dog", "bird"]
    small = ctx[..., :4, :]  # [..., 4, 64]
    learner = PromptLearner(backbone, classnames, ctx=small, class_specific=small.dim() == 3)
    features = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    setup = EvaluationSetup(backbone, None, learner, features, torch.tensor([0, 1, 2, 0, 1, 2]), {})
    cells = [ORIGINAL_CELL, Cell("rescale", 1, 2.0), Cell("replace", 3, 0.1, 0)]
    outcome = evaluate_cells(setup, small, cells)
    assert outcome.correct.shape == (3, 6) and outcome.correct.dtype == torch.bool
    assert torch.isnan(torch.tensor(outcome.norms_before[0])) and torch.isnan(torch.tensor(outcome.norms_after[0]))
    for index, cell in enumerate(cells[1:], start=1):
        corrupted = corrupted_variants(small, [cell])[0]
        norm = torch.linalg.vector_norm
        assert outcome.norms_before[index] == pytest.approx(norm(small[..., cell.position, :], dim=-1).mean().item())
        assert outcome.norms_after[index] == pytest.approx(norm(corrupted[..., cell.position, :], dim=-1).mean().item())


def test_variants_batch_matches_single_corruptions(ctx):
    cells = [ORIGINAL_CELL, Cell("rescale", 0, 0.5), Cell("replace", 15, 1.0, 2)]
    variants = corrupted_variants(ctx, cells)
    assert variants.shape == (3, *ctx.shape)
    assert torch.equal(variants[0], ctx)
    assert torch.equal(variants[2], replace(ctx, 15, 1.0, 2))


# --- grids ----------------------------------------------------------------------------------------


def test_default_grid_and_paper_preset():
    cells = parse_grid().cells(16)
    n_settings = len(DEFAULT_FACTORS["rescale"]) + len(DEFAULT_FACTORS["replace"])
    assert cells[0] == ORIGINAL_CELL and len(cells) == 1 + 16 * n_settings
    assert {cell.noise_seed for cell in cells if cell.op == "replace"} == {0}
    assert {cell.noise_seed for cell in cells if cell.op == "rescale"} == {None}
    preset = parse_grid(paper_preset=True).cells(16)
    assert len(preset) == 1 + 32
    assert {(cell.op, cell.factor) for cell in preset[1:]} == {("replace", 0.0), ("rescale", 0.001)}


def test_flags_make_the_grid():
    grid = parse_grid(rescale="0.001,0.01,0.1", replace="0,0.01", positions="0,3,7", noise_seeds="0,1,2")
    assert grid.factors == {"rescale": (0.001, 0.01, 0.1), "replace": (0.0, 0.01)}
    assert grid.positions == (0, 3, 7) and grid.noise_seeds == (0, 1, 2)
    cells = grid.cells(8)
    assert len(cells) == 1 + 3 * 3 + (1 + 3) * 3  # sigma 0 once per position, sigma 0.01 per seed
    assert parse_grid(replace="0.1").factors == {"replace": (0.1,)}
    assert parse_grid(positions="all").positions is None
    assert parse_grid(ops=["rescale=0.5,2"]).factors == {"rescale": (0.5, 2.0)}
    assert set(OPERATORS) == {"rescale", "replace"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"ops": ["scale=0.5"]}, "unknown operator 'scale'; available: rescale, replace"),
        ({"replace": "0,-0.1"}, "replace sigma must be a finite number >= 0, got -0.1"),
        ({"rescale": "-2"}, "rescale tau must be a finite number >= 0, got -2.0"),
        ({"rescale": "nan"}, "rescale tau must be a finite number"),
        ({"positions": "0,x"}, "'x' is not an integer"),
        ({"positions": "-1"}, "position -1 is negative"),
        ({"noise_seeds": "-3"}, "noise seed -3 is outside 0..2"),
        ({"noise_seeds": str(2**64)}, "is outside 0..2"),
        ({"paper_preset": True, "rescale": "0.1"}, "--paper-preset fixes the operators"),
    ],
)
def test_bad_grids_are_refused(arguments, message):
    with pytest.raises(NemesisError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_grid(**arguments)


def test_positions_beyond_n_ctx_are_refused():
    grid = Grid(positions=(0, 16))
    grid.check_positions(17, "ckpt")
    with pytest.raises(NemesisError, match=r"position 16 is outside 0..15 for ckpt"):
        grid.check_positions(16, "ckpt")
