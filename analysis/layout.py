"""How big a figure is drawn: its printed width in points, its fonts, where its legend goes.

A figure is drawn at the size it is printed (`\\includegraphics` at its natural size, or scaled to
`\\columnwidth`, which is the same), so a font of 7 pt in the figure is 7 pt on paper. Every figure
of `analysis.plots` takes a `PaperLayout`; the CLI builds one from `--width` or `--column`.

Imports nothing heavy: the CLI checks these options before pandas or matplotlib are loaded.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

from nemesis.errors import NemesisError

POINTS_PER_INCH = 72.0
# Text widths of the ICLR and NeurIPS style files: one column of a two-column page / the full page.
COLUMN_WIDTHS = {"single": 397.0, "double": 826.0}
DEFAULT_COLUMN = "double"  # with neither --width nor --column: the full text width
SMALLEST_FONT = 7.0  # the smallest text conferences accept after placement
# Wider is no longer a figure for a page; narrower leaves no room for an axis and its labels.
WIDTH_RANGE = (144.0, 1440.0)
# An average character of DejaVu Sans is about 0.55 em wide; 0.6 keeps wrapped lines inside their box.
CHARACTER_WIDTH_EM = 0.6


@dataclass(frozen=True)
class PaperLayout:
    """A figure's printed width (points) and the font sizes of its text, none below 7 pt."""

    width_pt: float = COLUMN_WIDTHS[DEFAULT_COLUMN]
    text_size: float = 8.0  # axis labels, titles of panels
    title_size: float = 9.0  # the figure's title
    small_size: float = SMALLEST_FONT  # tick labels, legends, numbers in cells

    @classmethod
    def column(cls, name: str) -> PaperLayout:
        """`single` (397 pt) or `double` (826 pt): the ICLR / NeurIPS text widths."""
        if name not in COLUMN_WIDTHS:
            known = " or ".join(COLUMN_WIDTHS)
            raise NemesisError(f"--column {name!r} is not a column; pass {known}, or --width in points")
        return cls(width_pt=COLUMN_WIDTHS[name])

    @classmethod
    def from_options(cls, width: float | None = None, column: str | None = None) -> PaperLayout:
        """The layout of `--width POINTS` or `--column NAME` (one of them; neither: the default column)."""
        if width is not None and column is not None:
            raise NemesisError("--width and --column both set the figure's width; pass one of them")
        if width is None:
            return cls.column(column or DEFAULT_COLUMN)
        low, high = WIDTH_RANGE
        if not low <= width <= high:  # also refuses nan
            raise NemesisError(f"--width {width:g} is not a figure width; pass points between {low:g} and {high:g}")
        return cls(width_pt=float(width))

    @property
    def width_in(self) -> float:
        return self.width_pt / POINTS_PER_INCH

    def height_in(self, aspect: float, most: float | None = None) -> float:
        """Height for `aspect` (height / width), at most `most` inches: a full-page figure stays flat."""
        height = self.width_in * aspect
        return min(height, most) if most is not None else height

    def characters(self, width_pt: float, size: float | None = None) -> int:
        """About how many characters of `size` fit in `width_pt`: where to wrap a title or a label."""
        return int(width_pt / ((size or self.text_size) * CHARACTER_WIDTH_EM))

    def wrap(self, text: str, share: float = 1.0, size: float | None = None) -> str:
        """`text` broken at spaces so each line fits `share` of the figure's width; lines it has stay."""
        width = max(12, self.characters(self.width_pt * share, size))  # a word a line is no wrapping
        return "\n".join(textwrap.fill(line, width, break_on_hyphens=False) for line in text.split("\n"))

    def rc(self) -> dict[str, float]:
        """matplotlib settings that give every text artist created under them its size."""
        return {
            "font.size": self.text_size,
            "axes.titlesize": self.text_size,
            "axes.labelsize": self.text_size,
            "figure.titlesize": self.title_size,
            "xtick.labelsize": self.small_size,
            "ytick.labelsize": self.small_size,
            "legend.fontsize": self.small_size,
            "legend.title_fontsize": self.small_size,
            "lines.markersize": 4.0,
            "lines.linewidth": 1.2,
        }

    @contextlib.contextmanager
    def fonts(self) -> Iterator[None]:
        """Build a figure under these font sizes (matplotlib reads them when an artist is created)."""
        import matplotlib

        with matplotlib.rc_context(self.rc()):
            yield


DEFAULT_LAYOUT = PaperLayout()
