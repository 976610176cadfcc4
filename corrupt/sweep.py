"""One call from checkpoints to a sweep table: what `nemesis corrupt` does, for Python users."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nemesis.atomic import prepare_output
from nemesis.errors import NemesisError
from nemesis.training.configs import run_root

from .engine import SweepSummary, run_sweep_job
from .grid import Grid, parse_grid
from .inputs import SweepInput, resolve_inputs
from .results import ResultsFile


def runs_root(inputs: Sequence[SweepInput]) -> str | None:
    """The data folder named by the config.json of the inputs' run folders, as `nemesis eval` reads it."""
    roots = {root for item in inputs if (root := run_root(item.file)) is not None}
    if len(roots) > 1:
        raise NemesisError(f"the runs were trained on data in {' and '.join(sorted(roots))}; pass --root DATA")
    return next(iter(roots), None)


def sweep(
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike | ResultsFile,
    *,
    grid: Grid | None = None,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    epoch: int | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    dataset: str | None = None,
    activation: str | None = None,
    ctx_init: str | None = None,
    prompt_method: str | None = None,
    method_options: dict[str, Any] | None = None,
    all_sites: bool = False,
    **options: Any,
) -> SweepSummary:
    """Corrupt each checkpoint (prompt files, run folders, CoOp output trees) over `grid` (default: the
    default grid, `parse_grid()`) and re-evaluate it on the test split; rows go to the table `out`
    (a path, or a `ResultsFile`), and a rerun computes only the cells it misses.

    Everything that can be checked is checked before any work, so bad input writes nothing.
    `options` go to `run_sweep` (`progress`, `console`, `variants_per_pass`).
    """
    grid = parse_grid() if grid is None else grid
    if not isinstance(out, ResultsFile):
        prepare_output(Path(out))
        out = ResultsFile(out)
    inputs = resolve_inputs(
        checkpoints,
        epoch=epoch,
        model=model,
        pretrained=pretrained,
        dataset=dataset,
        activation=activation,
        ctx_init=ctx_init,
        prompt_method=prompt_method,
        method_options=method_options,
        all_sites=all_sites,
    )
    root = root if root is not None else runs_root(inputs)  # run folders know where their data was
    return run_sweep_job(inputs, grid, out, root=root, cache_dir=cache_dir, device=device, **options)
