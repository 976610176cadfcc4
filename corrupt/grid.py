"""Sweep grids as data: which operators with which factors, at which positions, with which noise seeds.

A `Grid` expands into `Cell`s for a checkpoint with n_ctx positions and the corruption sites its
method declares (`PromptMethod.corruption_sites`; CoOp's one site is all of ctx): the original
cell first, once per checkpoint, then at every site every (operator, factor, position[, noise
seed]). Grids come from the `nemesis corrupt` flags, the default grid of DESIGN section 5, or the
paper preset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from nemesis.errors import NemesisError
from nemesis.tensors import WHOLE_CTX, CorruptionSite

from .operators import OPERATORS, ORIGINAL

ALL_POSITIONS = "all"
# DESIGN section 5.
DEFAULT_FACTORS: dict[str, tuple[float, ...]] = {
    "rescale": (0.001, 0.01, 0.1, 0.5, 2.0, 5.0, 10.0),
    "replace": (0.0, 0.001, 0.01, 0.1, 1.0),
}
# The examples of the released scripts: REPLACE sigma = 0 and RESCALE tau = 0.001 at every position.
PAPER_PRESET_FACTORS: dict[str, tuple[float, ...]] = {"replace": (0.0,), "rescale": (0.001,)}
DEFAULT_NOISE_SEEDS: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Cell:
    """One evaluation of a checkpoint: the original prompt, or one operator at one position of one site."""

    op: str
    position: int | None = None  # None for the original cell
    factor: float | None = None  # None for the original cell
    noise_seed: int | None = None  # only for seeded operators (replace)
    site: CorruptionSite = WHOLE_CTX  # where the operator acts (the original cell: the whole ctx, uncorrupted)


ORIGINAL_CELL = Cell(ORIGINAL)


def _unique(values: Sequence) -> tuple:
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class Grid:
    """Operators with their factors, positions (None: all of each checkpoint) and noise seeds."""

    factors: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_FACTORS))
    positions: tuple[int, ...] | None = None
    noise_seeds: tuple[int, ...] = DEFAULT_NOISE_SEEDS

    def __post_init__(self) -> None:
        for op, factors in self.factors.items():
            if op not in OPERATORS:
                raise NemesisError(f"unknown operator '{op}'; available: {', '.join(OPERATORS)}")
            name = OPERATORS[op].factor_name
            for factor in factors:
                if not math.isfinite(factor) or factor < 0:
                    raise NemesisError(f"{op} {name} must be a finite number >= 0, got {factor}")
        for position in self.positions or ():
            if position < 0:
                raise NemesisError(f"position {position} is negative; positions run from 0 to n_ctx - 1")
        for seed in self.noise_seeds:
            if not 0 <= seed < 2**63:
                raise NemesisError(f"noise seed {seed} is outside 0..2^63-1; use seeds such as 0,1,2")
        if not self.noise_seeds:
            raise NemesisError("no noise seeds given; pass --noise-seeds 0 or more seeds")

    def check_positions(self, n_ctx: int, origin: str) -> None:
        """Refuse positions a checkpoint with n_ctx context vectors does not have."""
        for position in self.positions or ():
            if position >= n_ctx:
                raise NemesisError(
                    f"position {position} is outside 0..{n_ctx - 1} for {origin} (n_ctx {n_ctx}); "
                    f"use --positions all or values in 0..{n_ctx - 1}"
                )

    def cells(self, n_ctx: int, sites: Sequence[CorruptionSite] = (WHOLE_CTX,)) -> list[Cell]:
        """The original cell, then every corrupted cell at each of `sites` (in their order) for a
        checkpoint with n_ctx positions."""
        check_sites(sites)
        positions = range(n_ctx) if self.positions is None else self.positions
        cells = [ORIGINAL_CELL]
        for site in sites:
            for op, factors in self.factors.items():
                for factor in factors:
                    # REPLACE with sigma 0 is the zero vector whatever the seed: one cell, not one per seed
                    seeds = self.noise_seeds[:1] if factor == 0 else self.noise_seeds
                    seeds = seeds if OPERATORS[op].seeded else (None,)
                    cells += [Cell(op, position, float(factor), seed, site) for position in positions for seed in seeds]
        return cells


def check_sites(sites: Sequence[CorruptionSite]) -> None:
    """Refuse sites a sweep cannot tell apart: none, or a repeated name."""
    if not sites:
        raise NemesisError("the prompt method declares no corruption site; a sweep needs at least one")
    names = [site.name for site in sites]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise NemesisError(f"corruption site names must differ, but {', '.join(map(repr, repeated))} repeat")


# --- parsing the command-line flags -------------------------------------------------------------


def _numbers(flag: str, text: str, kind: type) -> tuple:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            values.append(kind(item))
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise NemesisError(f"{flag}: '{item}' is not {noun}; give a comma-separated list like 0,3,7") from None
    if not values:
        raise NemesisError(f"{flag} is empty; give a comma-separated list of values")
    return _unique(values)


def parse_positions(text: str | None) -> tuple[int, ...] | None:
    """`all` (or nothing) -> None; `0,3,7` -> (0, 3, 7)."""
    if text is None or text.strip().lower() == ALL_POSITIONS:
        return None
    return _numbers("--positions", text, int)


def parse_operator_spec(spec: str) -> tuple[str, tuple[float, ...]]:
    """`NAME=F1,F2` (the generic `--op` flag) -> (name, factors)."""
    name, separator, factors = spec.partition("=")
    name = name.strip().lower()
    if not separator:
        raise NemesisError(f"--op '{spec}' must look like NAME=F1,F2 (e.g. rescale=0.5,2)")
    if name not in OPERATORS:
        raise NemesisError(f"unknown operator '{name}'; available: {', '.join(OPERATORS)}")
    return name, _numbers(f"--op {name}", factors, float)


def parse_grid(
    rescale: str | None = None,
    replace: str | None = None,
    positions: str | None = None,
    noise_seeds: str | None = None,
    paper_preset: bool = False,
    ops: Sequence[str] = (),
) -> Grid:
    """The grid the flags describe; without operator flags the default grid (or the paper preset)."""
    named: dict[str, tuple[float, ...]] = {}
    if rescale is not None:
        named["rescale"] = _numbers("--rescale", rescale, float)
    if replace is not None:
        named["replace"] = _numbers("--replace", replace, float)
    for spec in ops:
        name, factors = parse_operator_spec(spec)
        named[name] = _unique(named.get(name, ()) + factors)
    if paper_preset and named:
        raise NemesisError("--paper-preset fixes the operators; leave out --rescale, --replace and --op with it")
    factors = dict(PAPER_PRESET_FACTORS) if paper_preset else (named or dict(DEFAULT_FACTORS))
    seeds = DEFAULT_NOISE_SEEDS if noise_seeds is None else _numbers("--noise-seeds", noise_seeds, int)
    return Grid(factors=factors, positions=parse_positions(positions), noise_seeds=seeds)
