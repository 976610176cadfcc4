"""Counts in messages: "1 epoch", "2 epochs", never "1 epochs"."""

from __future__ import annotations


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """ "1 epoch", "3 epochs", "1,200 cells"; `plural_form` for nouns that do not just take an "s"."""
    word = noun if count == 1 else (plural_form or noun + "s")
    return f"{count:,} {word}"
