"""Prompt methods, registered by name: one module per method (its options and spec), one line here.

A method's module holds its options dataclass and its `MethodSpec` (label, learner class, Dassl
layout); `nemesis.methods.protocol` builds learners from the registry. Everything outside this
package asks the registry instead of naming a method. Light to import: no torch.

The names `nemesis train --method` takes are presets: a prompt method and a penalty (`PRESETS`).
Tables and files written before the two were separate name the pair by one word (`LEGACY_NAMES`).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

from ..data.templates import TEMPLATE_INIT
from ..errors import NemesisError, typed_option
from ..penalties import NEMESIS, NO_PENALTY, PENALTIES, UNKNOWN_PENALTY
from . import cocoop, coop, ivlp, maple, plot, prefix, promptsrc, vpt
from .base import MethodSpec, TrainingDefaults

METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    """Make `spec` a method every command can train, evaluate, corrupt and report."""
    METHODS[spec.name] = spec


register_method(coop.SPEC)
register_method(cocoop.SPEC)
register_method(plot.SPEC)
register_method(vpt.SPEC)
register_method(ivlp.SPEC)
register_method(maple.SPEC)
register_method(promptsrc.SPEC)
register_method(prefix.SPEC)

DEFAULT_METHOD = coop.SPEC.name  # what `nemesis train` trains when no method is named


def method_spec(name: str) -> MethodSpec:
    """The spec registered as `name`; an unknown name fails naming the known ones."""
    if name not in METHODS:
        raise NemesisError(f"unknown prompt method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def _trainer_key(name: str) -> str:
    """A trainer folder's name in any case, without separators or the official release's Nemesis mark."""
    return name.lower().replace("_", "").replace("-", "").replace(PENALTY_IN_TRAINER_NAMES, "")


def method_from_dassl_trainer(folder: str) -> str | None:
    """The method whose Dassl trainer folder is `folder`, in any case, with or without the official
    release's Nemesis mark ("CoOp", "coop", "CoOp_Nemesis", "NemesisCoOp", "PLOTNemesis")."""
    for spec in METHODS.values():
        if _trainer_key(folder) in (_trainer_key(name) for name in spec.dassl_trainers):
            return spec.name
    return None


def penalty_from_dassl_trainer(folder: str) -> tuple[str, str] | None:
    """(method, penalty) of a penalty's official trainer folder ("KgCoOp": coop, kgcoop), else None."""
    for spec in PENALTIES.values():
        if spec.dassl is not None and _trainer_key(folder) == _trainer_key(spec.dassl.folder):
            return spec.dassl.method, spec.name
    return None


PENALTY_IN_TRAINER_NAMES = "nemesis"  # the official release's trainers: NemesisCoOp, PLOTNemesis


def method_of_dassl_path(trainer: str | None, names_nemesis: bool) -> tuple[str | None, str | None]:
    """(method, penalty) a Dassl output path says: the method of its trainer folder (a penalty's trainer,
    KgCoOp or ProGrad: its method and that penalty), and Nemesis when a folder names it, no penalty under
    a known trainer, else not known (None)."""
    trained = penalty_from_dassl_trainer(trainer or "")
    if trained is not None:
        method, penalty = trained
        return method, f"{penalty}+{NEMESIS}" if names_nemesis else penalty
    method = method_from_dassl_trainer(trainer or "")
    if names_nemesis:
        return method, NEMESIS
    return method, NO_PENALTY if method is not None else None  # the official release names its trainers <Method>Nemesis


# `nemesis train --method` names: what each sets. A method's name alone trains it without a penalty.
PRESETS: dict[str, dict[str, Any]] = {
    "nemesis": {"prompt_method": "coop", "penalty": "nemesis"},  # Nemesis as the other options say (PUN)
    "pen": {"prompt_method": "coop", "penalty": "nemesis", "beta": 1.0},  # PUN only: the paper's PEN
    "pan": {"prompt_method": "coop", "penalty": "nemesis", "beta": 0.0},  # PAN only
    "cocoop-nemesis": {"prompt_method": "cocoop", "penalty": "nemesis"},
    "plot-nemesis": {"prompt_method": "plot", "penalty": "nemesis"},
    "vpt-nemesis": {"prompt_method": "vpt", "penalty": "nemesis"},
    "ivlp-nemesis": {"prompt_method": "ivlp", "penalty": "nemesis"},
    "maple-nemesis": {"prompt_method": "maple", "penalty": "nemesis"},
    "prefix-nemesis": {"prompt_method": "prefix", "penalty": "nemesis"},
    # KgCoOp's ctx is always "a photo of a" (its configs' CTX_INIT; batch 128, 100 epochs: the penalty's defaults)
    "kgcoop": {"prompt_method": "coop", "penalty": "kgcoop", "ctx_init": "a photo of a"},
    "kgcoop-nemesis": {"prompt_method": "coop", "penalty": "kgcoop+nemesis", "ctx_init": "a photo of a"},
    # ProGrad's init: the dataset's template words in the last of the 16 vectors, zeros before them
    "prograd": {
        "prompt_method": "coop",
        "penalty": "prograd",
        "ctx_init": TEMPLATE_INIT,
        "method_options": {"pad_init": True},
    },
    "prograd-nemesis": {
        "prompt_method": "coop",
        "penalty": "prograd+nemesis",
        "ctx_init": TEMPLATE_INIT,
        "method_options": {"pad_init": True},
    },
}

UNKNOWN_METHOD = "unknown"  # records of a prompt whose method is not known

# One-word names of (method, penalty) in files written before the axes were separate.
LEGACY_NAMES: dict[str, tuple[str, str]] = {
    "nemesis": ("coop", "nemesis"),
    "cocoop-nemesis": ("cocoop", "nemesis"),
}


def preset(name: str) -> dict[str, Any]:
    """The options a `--method` name sets: a preset, `<method>`, or `<method>+<penalty>`."""
    key = name.strip().lower()
    if key in PRESETS:
        return dict(PRESETS[key])
    method, _, penalty = key.partition("+")
    if method in METHODS:
        return {"prompt_method": method, "penalty": penalty or NO_PENALTY}
    raise NemesisError(f"unknown method '{name}'; choose one of {', '.join(preset_names())}")


def preset_names() -> list[str]:
    """Every name `--method` takes, methods first."""
    return [*METHODS, *PRESETS]


def split_method(name: Any, penalty: Any = None) -> tuple[Any, str]:
    """(method, penalty) of a record: its own penalty when it has one, else what a one-word name says."""
    if isinstance(penalty, str) and penalty:
        return name, penalty
    if name == UNKNOWN_METHOD:  # a Dassl file whose path named no trainer: nothing is known of its training
        return name, UNKNOWN_PENALTY
    if isinstance(name, str) and name in LEGACY_NAMES:
        return LEGACY_NAMES[name]
    if isinstance(name, str) and "+" in name:
        method, _, penalty = name.partition("+")
        return method, penalty
    return name, NO_PENALTY


def legacy_name(method: str, penalty: str) -> str:
    """The one-word name files written before the axes were separate give (method, penalty)."""
    for name, pair in LEGACY_NAMES.items():
        if pair == (method, penalty):
            return name
    return setting_name(method, penalty)


def setting_name(method: str, penalty: str | None) -> str:
    """A method and its penalty as one name, as `--method` takes it: <method>, or <method>+<penalty>."""
    return method if penalty in (None, NO_PENALTY) else f"{method}+{penalty}"


__all__ = [
    "DEFAULT_METHOD",
    "LEGACY_NAMES",
    "METHODS",
    "NO_PENALTY",
    "PRESETS",
    "MethodSpec",
    "TrainingDefaults",
    "legacy_name",
    "method_from_dassl_trainer",
    "method_of_dassl_path",
    "method_spec",
    "penalty_from_dassl_trainer",
    "preset",
    "preset_names",
    "register_method",
    "setting_name",
    "split_method",
]


def checked_method_options(spec: MethodSpec, values: dict[str, Any]) -> dict[str, Any]:
    """Options of `spec`'s config by field name (`--method-option n_prompts=8`), each as its field's
    type (text from the command line is converted); a name the method does not take is refused."""
    hints = typing.get_type_hints(spec.config)
    checked = {}
    for name, value in values.items():
        if name not in hints:
            raise NemesisError(f"{spec.name} has no option '{name}'; its options: {', '.join(spec.option_names())}")
        checked[name] = typed_option(f"method option {name}", value, hints[name])
    return checked


def option_pairs(pairs: Sequence[str], flag: str = "--method-option", example: str = "n_prompts=8") -> dict[str, str]:
    """`["n_prompts=8", "stopping=converged"]` as {name: text}; a pair without "=" is refused."""
    options = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name.strip():
            raise NemesisError(f"{flag} '{pair}' is not NAME=VALUE (e.g. {flag} {example})")
        options[name.strip()] = value.strip()
    return options
