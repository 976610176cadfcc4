"""Training options from a file: `nemesis train --config FILE` (YAML or JSON).

A file names options as `nemesis train` does (`n_ctx`, `method`, `shots`, ...), and the grid's axes
(dataset, method, shots, seed) take lists, as YAML lists or as the CLI's "1,2,4". A run's own
`config.json` is such a file as it is: its `prompt_method` and `penalty` read as `method`, its
`nemesis` block as the Nemesis options, and its version stamp is skipped. Options given on the
command line override the file's.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Collection
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import NemesisError
from ..methods import setting_name
from .configs import TrainConfig

LISTABLE = {"dataset": str, "method": str, "shots": int, "seed": int}  # the grid's axes


def _option_types() -> dict[str, tuple[type, ...]]:
    """Each TrainConfig option the CLI names, with the types a value may have (None excluded)."""
    hints = typing.get_type_hints(TrainConfig)
    types = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("prompt_method", "penalty"):
            continue
        if typing.get_origin(hints[field.name]) is dict:  # method_options: a mapping of its own
            types[field.name] = (dict,)
            continue
        kinds = tuple(
            kind for kind in typing.get_args(hints[field.name]) or (hints[field.name],) if kind is not type(None)
        )
        types[field.name] = tuple(str if isinstance(kind, type) and issubclass(kind, Enum) else kind for kind in kinds)
    return types | {"method": (str,)}


def _load(path: Path) -> dict[str, Any]:
    """The file's mapping: JSON for .json (YAML would read 1e-05 as text), YAML otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise NemesisError(f"cannot read --config {path}: {error.strerror or error}") from None
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as error:  # json's and yaml's own parse errors
        reason = " ".join(str(error).split())
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise NemesisError(f"--config {path} is not valid {kind}: {reason}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise NemesisError(f"--config {path} must hold a mapping of option names to values")
    return values


def _from_run_record(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """A run's config.json as options: method and penalty as `method`, the Nemesis block spread out."""
    values = dict(values)
    values.pop("toolkit_version", None)
    if "prompt_method" in values:
        values["method"] = setting_name(values.pop("prompt_method"), values.pop("penalty", None))
    nemesis = values.pop("nemesis", None)
    if nemesis is not None and not isinstance(nemesis, dict):
        raise NemesisError(f"{origin}: nemesis must be a mapping of Nemesis options, got {nemesis!r}")
    values = (nemesis or {}) | values
    if "pretrained" in values and values["pretrained"] is None:  # recorded random weights; not given is "openai"
        values["pretrained"] = "none"
    return values


def _checked(key: str, value: Any, kinds: tuple[type, ...], origin: str) -> Any:
    """The value as the option takes it; numbers may be written as text, as on the command line."""
    if value is None:
        return None
    for kind in kinds:
        if kind is dict and isinstance(value, dict):
            return value
        if kind is bool and isinstance(value, bool):
            return value
        if kind in (int, float) and not isinstance(value, bool):
            try:
                number = kind(value)
            except (TypeError, ValueError):
                continue
            if kind is int and isinstance(value, float) and number != value:
                continue
            return number
        if kind is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
    names = {bool: "true/false", int: "a whole number", float: "a number", str: "text", dict: "a mapping"}
    wanted = " or ".join(names[kind] for kind in kinds)
    raise NemesisError(f"{origin}: {key} must be {wanted}, got {value!r}")


def _listed(key: str, value: Any, origin: str) -> str:
    """An axis as the CLI writes it: "1,2,4" (a YAML list or one value)."""
    values = value if isinstance(value, list) else [value]
    return ",".join(str(_checked(key, item, (LISTABLE[key],), origin)) for item in values)


def read_train_options(path: str | Path, extra: Collection[str] = ()) -> dict[str, Any]:
    """The `nemesis train` options a file sets, as the CLI would pass them (axes as "a,b" text).

    `extra` names further options the command takes besides TrainConfig's (text values). Unknown
    keys are refused, naming the nearest known option.
    """
    path = Path(path)
    origin = f"--config {path}"
    values = _from_run_record(_load(path), origin)
    types = _option_types() | {name: (str,) for name in extra}
    options = {}
    for key, value in values.items():
        key = str(key)
        if key not in types:
            nearest = difflib.get_close_matches(key, list(types), n=1, cutoff=0.0)
            raise NemesisError(f"{origin}: unknown option '{key}'; did you mean '{nearest[0]}'?")
        if key in LISTABLE:
            options[key] = _listed(key, value, origin)
        elif isinstance(value, list):
            raise NemesisError(f"{origin}: {key} takes one value; only {', '.join(LISTABLE)} take lists")
        else:
            options[key] = _checked(key, value, types[key], origin)
    return {key: value for key, value in options.items() if value is not None}
