"""Corruption sweeps: operators, grids, checkpoint inputs, the sweep engine and its results table."""

from .engine import SweepSummary, check_sweep, evaluate_cells, run_sweep, sweep_learner
from .grid import DEFAULT_FACTORS, PAPER_PRESET_FACTORS, Cell, Grid, parse_grid
from .inputs import SweepInput, identity_from_path, resolve_inputs
from .operators import OPERATORS, ORIGINAL, corrupt_ctx, corrupted_variants, position_norm
from .results import COLUMNS, ResultsFile, cell_id, correctness_path, merge_parts
from .sweep import sweep

__all__ = [
    "COLUMNS",
    "DEFAULT_FACTORS",
    "OPERATORS",
    "ORIGINAL",
    "PAPER_PRESET_FACTORS",
    "Cell",
    "Grid",
    "ResultsFile",
    "SweepInput",
    "SweepSummary",
    "cell_id",
    "check_sweep",
    "correctness_path",
    "corrupt_ctx",
    "corrupted_variants",
    "evaluate_cells",
    "identity_from_path",
    "merge_parts",
    "parse_grid",
    "position_norm",
    "resolve_inputs",
    "run_sweep",
    "sweep",
    "sweep_learner",
]
