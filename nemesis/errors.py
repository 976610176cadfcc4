"""The one exception type users see: its message is a single line saying what is wrong and how to fix it;
`choice` reads an option value into its enum or raises one that names the allowed values."""

from __future__ import annotations

import typing
from enum import Enum
from typing import Any, TypeVar


class NemesisError(ValueError):
    """Bad input from the user (a file, a flag, a data folder). The CLI prints it and exits with code 2."""


class NemesisNote(UserWarning):
    """Something the user should know but that is not an error (e.g. a guessed activation); the CLI prints
    it as one `note:` line on stderr."""


Choice = TypeVar("Choice", bound=Enum)


def choice(enum: type[Choice], value: object, what: str) -> Choice:
    """`value` as a member of `enum`; an unknown value names the allowed ones."""
    try:
        return enum(str(value.value if isinstance(value, Enum) else value))
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise NemesisError(f"unknown {what} '{value}'; choose one of {choices}") from None


def typed_option(what: str, value: Any, hint: Any) -> Any:
    """An option's `value` as type `hint` (int, float, bool, str, or one of them or None): text from the
    command line is converted; `what` names it in the error ("method option n_prompts")."""
    kinds = [kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None)]
    kind = kinds[0] if kinds else str
    if not isinstance(value, str) or kind is str:
        return value
    try:
        if kind is bool:
            return {"true": True, "false": False}[value.lower()]
        return kind(value)
    except (KeyError, ValueError):
        raise NemesisError(f"{what} must be {kind.__name__}, got '{value}'") from None
