"""Defaults of the analysis options, light to import so the CLI can declare them without pandas."""

from __future__ import annotations

DEFAULT_BY = ("dataset", "shots")  # LNE frequency groups, as the paper's figure
DEFAULT_ALPHA = 0.05  # significance level of the McNemar mode
