"""Turning the paths given to `nemesis corrupt` into checkpoints with a resolved identity.

Accepted: our `.safetensors` prompts and run folders (identity from their metadata), Dassl files,
`prompt_learner/` folders and run folders, and whole CoOp output trees such as
`output/<dataset>/<Trainer>/<cfg>_<K>shots/nctx16_cscFalse_ctpend/seed<S>/prompt_learner/...` or
`output/base2new/train_base/<dataset>/shots_<K>/<Trainer>/<cfg>/seed<S>`, whose dataset, shots,
seed and method are read from the path. Named flags (--model, --dataset, ...) win over both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemesis.choices import nemesis_variant
from nemesis.constants import (
    DASSL_BEST_FILE,
    DASSL_FILE_PREFIX,
    DASSL_PROMPT_FOLDER,
    RUN_CHECKPOINTS,
    RUN_PROMPT,
)
from nemesis.data.datasets import Subsample, load_dataset, resolve_name
from nemesis.errors import NemesisError
from nemesis.evaluation.evaluate import EvaluationTarget, resolve_target
from nemesis.files.checkpoint import PromptCheckpoint, dassl_folders, load_checkpoint
from nemesis.files.coop_paths import identity_from_path
from nemesis.methods.protocol import WHOLE_CTX, CorruptionSite, planned_sites
from nemesis.model.backbone import check_pretrained, model_config
from nemesis.penalties import uses_nemesis

# --- finding checkpoints ------------------------------------------------------------------------


def _has_dassl_files(folder: Path) -> bool:
    return folder.is_dir() and any(
        child.name.startswith(DASSL_FILE_PREFIX) or child.name == DASSL_BEST_FILE for child in folder.iterdir()
    )


def _is_checkpoint_folder(folder: Path) -> bool:
    """Our run folder, a Dassl run folder or a Dassl model folder (`prompt_learner/`, `VLPromptLearner/`...)."""
    return (
        (folder / RUN_PROMPT).is_file()
        or (folder / RUN_CHECKPOINTS).is_dir()
        or any(_has_dassl_files(folder / name) for name in dassl_folders())
        or (folder.name in dassl_folders() and _has_dassl_files(folder))
    )


def _checkpoint_folders_under(tree: Path) -> list[Path]:
    found = []
    for root, folders, _ in os.walk(tree):
        folder = Path(root)
        if _is_checkpoint_folder(folder):
            found.append(folder)
            folders[:] = []  # a run folder's own subfolders hold no further runs
            continue
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        # os.walk does not enter links (no loops); a linked run folder, e.g. a seed folder pointing to
        # where the run is stored, still counts as the run its place in the tree names.
        linked = [folder / name for name in folders if (folder / name).is_symlink()]
        found += [child for child in linked if _is_checkpoint_folder(child)]
    return sorted(found)  # the walk's order: by path, folder by folder


def find_checkpoints(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Checkpoint files and run folders among `paths`; other folders are searched as output trees."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise NemesisError(f"checkpoint not found: {path}")
        if path.is_file() or _is_checkpoint_folder(path):
            found.append(path)
            continue
        under = _checkpoint_folders_under(path)
        if not under:
            raise NemesisError(
                f"no prompt checkpoints under {path} (looked for {DASSL_PROMPT_FOLDER}/{DASSL_FILE_PREFIX}<E> "
                f"and {RUN_PROMPT}); pass checkpoint files or run folders"
            )
        found.extend(under)
    return found


# --- resolving what each checkpoint is ----------------------------------------------------------


@dataclass(frozen=True)
class SweepInput:
    """One checkpoint of a sweep: its file and what it is evaluated as."""

    file: Path  # the checkpoint file itself (absolute)
    identity: dict[str, Any]  # checkpoint, model, pretrained, activation, ctx_init, dataset, train_dataset, ...
    n_ctx: int
    class_specific: bool
    n_classes: int | None = None  # classes of a class-specific ctx
    # [M, W]: the largest |ctx| over classes (every leading axis), so factors are checked before any work
    magnitude: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # Where its method corrupts a ctx of its shape (`PromptMethod.corruption_sites_for`), so cells are
    # planned before any learner is built
    sites: tuple[CorruptionSite, ...] = (WHOLE_CTX,)
    # The checkpoint as read and checked once, and what it is evaluated on: the sweep uses it as it is.
    target: EvaluationTarget | None = field(default=None, compare=False, repr=False)


def _resolve_one(
    checkpoint: PromptCheckpoint,
    model: str | None,
    pretrained: str | None,
    dataset: str | None,
    activation: str | None,
    ctx_init: str | None,
    method_options: dict[str, Any] | None = None,
) -> tuple[EvaluationTarget, dict[str, Any]]:
    """The checkpoint's evaluation target and the identity its table rows record."""
    metadata = checkpoint.metadata
    from_path = identity_from_path(checkpoint.path)
    # Named flags first, then the file's metadata, then the path (Dassl files have no metadata).
    target = resolve_target(
        checkpoint,
        model=model,
        pretrained=pretrained,
        activation=activation,
        ctx_init=ctx_init,
        method_options=method_options,
        dataset=dataset or (None if metadata.dataset else from_path.dataset),
        shots=None if metadata.shots is not None else from_path.shots,
        seed=None if metadata.seed is not None else from_path.seed,
        subsample=None if metadata.source_format != "dassl" else from_path.subsample,
    )
    target = dataclasses.replace(target, dataset=resolve_name(target.dataset))
    identity = target.source
    # Dassl files do not name their training dataset: their path does (the --dataset flag names the test data).
    trained_on = metadata.dataset or from_path.dataset
    identity["train_dataset"] = resolve_name(trained_on) if trained_on else identity["dataset"]
    identity["method_variant"] = _nemesis_variant(identity["penalty"], metadata.penalty_config)
    identity["checkpoint"] = str(checkpoint.path)
    identity["ctx_init"] = ctx_init  # only a named init: the file's own is part of the file
    try:
        check_pretrained(identity["model"], identity["pretrained"])
    except NemesisError as error:
        raise NemesisError(f"{checkpoint.path}: {error}") from None
    _check_choice(Subsample, identity["subsample"], "subsample", checkpoint.path)
    for key in ("shots", "seed"):
        value = identity[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise NemesisError(f"{checkpoint.path}: {key} {value!r} is not a non-negative whole number")
    keys = (
        "checkpoint",
        "model",
        "pretrained",
        "activation",
        "ctx_init",
        "dataset",
        "train_dataset",
        "shots",
        "seed",
        "subsample",
        "method",
        "penalty",
        "method_variant",
    )
    return target, {key: identity[key] for key in keys}


def _nemesis_variant(penalty: Any, settings: dict[str, Any]) -> str | None:
    """PUN or PAN and the weight of a Nemesis prompt, from its file's settings; None for other
    methods and for files that do not say (Dassl's)."""
    beta, weight = settings.get("beta"), settings.get("weight")
    numbers = all(isinstance(value, int | float) and not isinstance(value, bool) for value in (beta, weight))
    if not numbers or not uses_nemesis(penalty):
        return None
    return nemesis_variant(beta, weight)


def _check_choice(choices: type, value: Any, what: str, origin: Any) -> None:
    allowed = [choice.value for choice in choices]
    if value not in allowed:
        raise NemesisError(f"{origin}: unknown {what} {value!r}; available: {', '.join(allowed)}")


def check_against_data(inputs: Sequence[SweepInput], root: str | os.PathLike | None) -> None:
    """Refuse before any work a checkpoint that cannot run on its data: class count, prompt length."""
    import open_clip

    classnames: dict[tuple[str, str], list[str]] = {}
    for item in inputs:
        key = (item.identity["dataset"], item.identity["subsample"])
        if key not in classnames:
            classnames[key] = load_dataset(key[0], root, subsample=key[1]).classnames
        names = classnames[key]
        if item.class_specific and item.n_classes != len(names):
            raise NemesisError(
                f"{item.file}: class-specific ctx has {item.n_classes} classes but {key[0]} has {len(names)}"
            )
        model = item.identity["model"]
        context_length = int(model_config(model)["text_cfg"].get("context_length", 77))
        token_count = functools.partial(_token_count, open_clip.get_tokenizer(model))
        checkpoint = item.target.checkpoint
        try:
            checkpoint.spec.check_classnames(checkpoint.config, names, token_count, context_length)
        except NemesisError as error:
            raise NemesisError(f"{item.file}: {error} of {model}") from None


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text))


def check_factors(inputs: Sequence[SweepInput], grid: Any) -> None:
    """Refuse before any work a factor whose corrupted prompt or norm overflows fp32 (e.g. --rescale 1e39)."""
    from .operators import ORIGINAL, corrupt_ctx, position_norm

    for item in inputs:
        if item.magnitude is None:
            continue
        for cell in grid.cells(item.n_ctx):
            if cell.op == ORIGINAL:
                continue
            variant = corrupt_ctx(item.magnitude, cell)
            if not (torch.isfinite(variant).all() and math.isfinite(position_norm(variant, cell.position))):
                raise NemesisError(
                    f"{item.file}: {cell.op} {cell.factor:g} at position {cell.position} overflows the prompt's "
                    "float32 values; choose a smaller factor"
                )


def corruption_sites(checkpoint: PromptCheckpoint, all_sites: bool = False) -> tuple[CorruptionSite, ...]:
    """Where a sweep corrupts the checkpoint's ctx: the sites its method declares, and with `all_sites`
    the optional ones too (`optional_corruption_sites_for`; PLOT: each prompt alone)."""
    learner_class, shape = checkpoint.spec.learner_class(), tuple(checkpoint.ctx.shape)
    sites = planned_sites(learner_class, {name: tuple(tensor.shape) for name, tensor in checkpoint.tensors.items()})
    if all_sites and hasattr(learner_class, "optional_corruption_sites_for"):
        sites += learner_class.optional_corruption_sites_for(shape)
    return tuple(sites)


def resolve_inputs(
    paths: Sequence[str | os.PathLike],
    *,
    epoch: int | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    dataset: str | None = None,
    activation: str | None = None,
    ctx_init: str | None = None,
    prompt_method: str | None = None,
    method_options: dict[str, Any] | None = None,
    all_sites: bool = False,
) -> list[SweepInput]:
    """Every checkpoint among `paths`, loaded once to check it and resolve its identity (no model is built).
    `prompt_method` names the method of Dassl files and refuses our files of another (as `nemesis eval`);
    `all_sites` adds the optional corruption sites methods declare.

    Bad input (a missing file, an unknown model or dataset, a width that does not fit the model)
    raises a NemesisError here, before any sweep work starts. The same file named twice counts once.
    """
    inputs: dict[Path, SweepInput] = {}
    for location in find_checkpoints(paths):
        checkpoint = load_checkpoint(location, epoch, prompt_method)
        file = Path(checkpoint.path).resolve()  # one name per file, so reruns find its cells
        if file in inputs:
            continue
        # The identity comes from the path as given: a linked run folder keeps what its tree names.
        target, identity = _resolve_one(checkpoint, model, pretrained, dataset, activation, ctx_init, method_options)
        identity["checkpoint"] = str(file)
        inputs[file] = SweepInput(
            file=file,
            identity=identity,
            n_ctx=checkpoint.ctx.shape[-2],
            class_specific=checkpoint.class_specific,
            n_classes=checkpoint.ctx.shape[0] if checkpoint.class_specific else None,
            magnitude=checkpoint.ctx.abs().reshape(-1, *checkpoint.ctx.shape[-2:]).amax(0),  # [M, W]
            sites=corruption_sites(checkpoint, all_sites),
            target=target,
        )
    return list(inputs.values())
