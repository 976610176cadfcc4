"""Training configs as dataclasses: `TrainConfig`, a run's config.json (the penalty's own: `nemesis.penalties`).

Light to import (no torch), so the CLI declares its options and defaults from them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .. import __version__
from ..choices import Activation, ClassPosition, Norm, Precision, Schedule
from ..constants import RUN_CONFIG
from ..data.dataset_records import Subsample, resolve_name
from ..data.templates import TEMPLATE_INIT, init_phrase
from ..errors import NemesisError, choice
from ..methods import DEFAULT_METHOD, checked_method_options, method_spec, setting_name, split_method
from ..penalties import (
    NO_PENALTY,
    PENALTIES,
    NemesisConfig,
    check_penalty_method,
    checked_penalty,
    checked_penalty_options,
    penalty_defaults,
    penalty_names,
    penalty_options,
    uses_nemesis,
)
from ..wording import plural
from .reporting import NO_REPORTING, reporter_names

# The TrainConfig fields that only Nemesis methods use (config.json keeps them under "nemesis").
NEMESIS_OPTIONS = (
    "beta",
    "weight",
    "norm",
    "schedule",
    "positions",
    "corrupt_weight",
    "pan_weight",
    "official_override",
)


FP16_MAX = 65504.0  # the largest finite float16


# TrainConfig's fields that are prompt-method options: a method takes those its config declares.
PROMPT_OPTIONS = ("n_ctx", "ctx_init", "class_specific", "class_position")


def default_epochs(dataset: str, shots: int) -> int:
    """CoOp's epochs: 50 for 1 shot, 100 for 2 and 4, 200 for 8 and 16; ImageNet always 50."""
    if dataset == "imagenet" or shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


@dataclass
class TrainConfig:
    """Everything a run depends on; `config.json` of the run folder is `resolved().to_json()`."""

    dataset: str  # dataset key (e.g. oxford_pets, imagenet) or fashion_mnist, which needs no root
    root: str | None = None  # folder holding the CoOp-format datasets
    shots: int = 16  # training images per class, drawn CoOp's way (or read from CoOp's split_fewshot)
    seed: int = 1  # seeds the few-shot draw, ctx initialisation, data order, views and PAN's draws
    prompt_method: str = DEFAULT_METHOD  # the learner, a name registered in nemesis.methods
    # none, or penalties joined by "+": nemesis (PUN and PAN, settings below), kgcoop, prograd
    penalty: str = NO_PENALTY
    subsample: str = "all"  # classes to train on: all, base or new (base-to-new)
    model: str = "RN50"  # open_clip model name
    pretrained: str | None = "openai"  # open_clip tag or weights file; None for seeded random weights
    activation: str | None = None  # quickgelu or gelu; None: the weights' own (QuickGELU for OpenAI's)
    n_ctx: int | None = None  # context vectors M (ignored when ctx_init is given); None: 16 (CoCoOp: "a photo of a")
    # words to initialise ctx from, e.g. "a photo of a", or "template": the dataset's hand-crafted words
    # (ProGrad's); None: N(0, 0.02^2)
    ctx_init: str | None = None
    class_specific: bool = False  # one ctx per class (CoOp's CSC)
    class_position: str = "end"  # where the class name goes: end, middle or front
    # The method's other options by name (`--method-option n_prompts=8`; PLOT: n_prompts, image_tokens...)
    method_options: dict[str, Any] = field(default_factory=dict)
    # The penalties' options other than Nemesis's (`--penalty-option kgcoop_weight=8`; prograd_lambda...)
    penalty_options: dict[str, Any] = field(default_factory=dict)
    # None: CoOp's count for the shots (1: 50, 2/4: 100, 8/16: 200, ImageNet 50); CoCoOp 10; KgCoOp 100
    epochs: int | None = None
    batch_size: int | None = None  # images per step; None: 32 (CoCoOp: 1; KgCoOp: 128)
    lr: float = 0.002  # SGD learning rate after warm-up, cosine-annealed over the epochs
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay on ctx
    warmup_epochs: int = 1  # epochs at the constant warm-up learning rate
    warmup_lr: float = 1e-5  # the warm-up learning rate
    beta: float = 1.0  # Nemesis: PUN's share, 1 = PUN only, 0 = PAN only
    weight: float = 1.0  # Nemesis: A, the penalty's weight
    norm: Norm = Norm.l2  # Nemesis: p of ||ctx_j||_p: 1, 2 or inf
    schedule: Schedule = Schedule.logistic  # Nemesis: s(e), logistic or constant
    positions: int = 1  # Nemesis: NP, positions PAN tries per step (1..n_ctx)
    corrupt_weight: float = 0.5  # Nemesis: CW, PAN's rescaling factor
    pan_weight: float | None = None  # Nemesis: PAN's weight instead of A (None: A)
    official_override: bool = False  # Nemesis on food101/oxford_pets: PAN weight 50, constant schedule
    train_views: int = 0  # 0: live CoOp augmentation each epoch; K: K cached augmented views per image
    crop_scale: float = 0.08  # smallest area of the random resized crop (Dassl's INPUT.RRCROP_SCALE[0]); 1: flips only
    precision: Precision = Precision.fp32  # fp32, amp (autocast on CUDA), or fp16 (the official code's)
    device: str | None = None  # cpu, cuda, cuda:1...; None: cuda when available
    eval_every: int = 1  # test accuracy every this many epochs (and after the last); 0: last only
    save_every: int = 0  # a checkpoint in checkpoints/ every this many epochs; 0: none
    cache_dir: str | None = None  # image-feature cache (default: the user cache)
    # Live logs besides metrics.jsonl: tensorboard, wandb (offline), tensorboard,wandb or none, written as on
    # the command line; a runtime option that changes nothing a run learns, so a resume may change it.
    report_to: str = NO_REPORTING

    def __post_init__(self) -> None:
        self.dataset = resolve_name(self.dataset)
        spec = method_spec(self.prompt_method)
        if not spec.trains:
            raise NemesisError(
                f"training {spec.label} is not offered: its users' prompts are read, evaluated and swept; "
                "train the same prompts with --method ivlp"
            )
        self.penalty = checked_penalty(self.penalty)
        check_penalty_method(self.penalty, self.prompt_method)
        self.penalty_options = checked_penalty_options(self.penalty, dict(self.penalty_options or {}))
        for name in penalty_names(self.penalty):  # each penalty's own checks of its options
            if PENALTIES[name].options is not None:
                penalty_options(name, self.penalty_options)
        if self.ctx_init is not None and self.ctx_init.strip().lower() == TEMPLATE_INIT:
            self.ctx_init = init_phrase(self.dataset)  # the dataset's hand-crafted words, as ProGrad starts from
        self._check_prompt_options(spec)
        self.method_options = checked_method_options(spec, dict(self.method_options or {}))
        if shared := sorted(set(self.method_options) & set(PROMPT_OPTIONS)):
            raise NemesisError(f"{', '.join(map(_flag, shared))} has its own option; drop it from --method-option")
        defaults = spec.config()
        if self.n_ctx is None and "n_ctx" in spec.option_names():  # the method's own count and init phrase
            self.ctx_init = getattr(defaults, "ctx_init", None) if self.ctx_init is None else self.ctx_init
            self.n_ctx = defaults.n_ctx
        if self.batch_size is None:
            self.batch_size = penalty_defaults(self.penalty).get("batch_size", spec.training.batch_size)
        self.precision = choice(Precision, self.precision, "precision")
        self.subsample = choice(Subsample, self.subsample, "subsample").value
        self.class_position = choice(ClassPosition, self.class_position, "class position").value
        self.root = None if self.root is None else str(self.root)
        self.cache_dir = None if self.cache_dir is None else str(self.cache_dir)
        self.report_to = ",".join(reporter_names(self.report_to)) or NO_REPORTING  # one spelling per choice
        self.pretrained = None if self.pretrained in (None, "", "none") else str(self.pretrained)
        if self.activation is not None:
            self.activation = choice(Activation, self.activation, "activation").value
        counts = {
            "shots": (self.shots, 1),
            "batch_size": (self.batch_size, 1),
            "warmup_epochs": (self.warmup_epochs, 0),
            "train_views": (self.train_views, 0),
            "eval_every": (self.eval_every, 0),
            "save_every": (self.save_every, 0),
            "seed": (self.seed, 0),
        }
        if self.epochs is not None:
            counts["epochs"] = (self.epochs, 1)
        if self.n_ctx is not None:
            counts["n_ctx"] = (self.n_ctx, 1)
        for name, (value, least) in counts.items():
            if value < least:
                raise NemesisError(f"{name} must be at least {least}, got {value}")
        if self.seed >= 2**32:  # numpy's global generator takes 32-bit seeds
            raise NemesisError(f"seed must be below 2**32, got {self.seed}")
        for name, value in (
            ("lr", self.lr),
            ("warmup_lr", self.warmup_lr),
            ("weight_decay", self.weight_decay),
        ):
            if not (value >= 0 and math.isfinite(value)):
                raise NemesisError(f"{name} must be a finite number, 0 or more, got {value}")
            if self.precision is Precision.fp16 and value > FP16_MAX:  # SGD applies it as an fp16 factor
                raise NemesisError(
                    f"--precision fp16 applies {name} in fp16, whose largest value is {FP16_MAX:g}; got {value:g}"
                )
        if not 0 < self.crop_scale <= 1:
            raise NemesisError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if not 0 <= self.momentum < 1:
            raise NemesisError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.ctx_init is not None and not self.ctx_init.strip():
            self.ctx_init = None
        nemesis = self.nemesis_config()  # checks beta, weight, norm, schedule, positions, corrupt_weight
        self.norm, self.schedule = nemesis.norm, nemesis.schedule
        if self.uses_nemesis and self.ctx_init is None and self.n_ctx is not None and self.positions > self.n_ctx:
            raise NemesisError(f"positions (NP) must be between 1 and n_ctx = {self.n_ctx}, got {self.positions}")
        self.prompt_config()  # the method's own checks of its options

    def _check_prompt_options(self, spec) -> None:
        """Refuse a prompt option the method does not take (given: not None, not its default)."""
        defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
        for name in PROMPT_OPTIONS:
            if name not in spec.option_names() and getattr(self, name) not in (None, defaults[name]):
                raise NemesisError(f"{_flag(name)} is not an option of {spec.name} ({spec.label})")

    @property
    def uses_nemesis(self) -> bool:
        return uses_nemesis(self.penalty)

    @property
    def reporters(self) -> tuple[str, ...]:
        """The backends `report_to` names (none: empty)."""
        return reporter_names(self.report_to)

    @property
    def method_name(self) -> str:
        """The run's method and penalty as one name: <method>, or <method>+<penalty>."""
        return setting_name(self.prompt_method, self.penalty)

    def prompt_config(self):
        """The prompt method's own config, from the prompt options it takes."""
        spec = method_spec(self.prompt_method)
        given = {name: getattr(self, name) for name in spec.option_names() if name in PROMPT_OPTIONS}
        return spec.options(**given, **self.method_options)

    def nemesis_config(self) -> NemesisConfig:
        return NemesisConfig(
            beta=self.beta,
            weight=self.weight,
            norm=self.norm,
            schedule=self.schedule,
            positions=self.positions,
            corrupt_weight=self.corrupt_weight,
            pan_weight=self.pan_weight,
            official_override=self.official_override,
        )

    def resolved(self) -> TrainConfig:
        """The config as it runs: epochs and device filled in, the official override applied."""
        from ..model.clip_models import resolve_device  # torch, only when a run starts

        values = dataclasses.asdict(self)
        method_epochs = penalty_defaults(self.penalty).get("epochs", method_spec(self.prompt_method).training.epochs)
        values["epochs"] = self.epochs or method_epochs or default_epochs(self.dataset, self.shots)
        values["device"] = resolve_device(self.device)
        if self.uses_nemesis:
            nemesis = self.nemesis_config().for_dataset(self.dataset)
            values["pan_weight"], values["schedule"] = nemesis.pan_weight, nemesis.schedule
        return TrainConfig(**values)

    def to_json(self) -> dict:
        values = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            values[spec.name] = value.value if isinstance(value, Enum) else value
        for name in NEMESIS_OPTIONS:  # written once, under "nemesis"
            del values[name]
        values["nemesis"] = self.nemesis_config().to_json() if self.uses_nemesis else None
        values["toolkit_version"] = __version__
        return values

    @classmethod
    def from_json(cls, values: dict) -> TrainConfig:
        """A config from `to_json()`'s dict (config.json); unknown keys are refused."""
        values = dict(values)
        values.pop("toolkit_version", None)
        if "method" in values:  # written before method and penalty were two options
            values["prompt_method"], values["penalty"] = split_method(values.pop("method"))
        nemesis = values.pop("nemesis", None) or {}
        known = {spec.name for spec in dataclasses.fields(cls)}
        unknown = sorted((set(values) | set(nemesis)) - known)
        if unknown:
            raise NemesisError(f"unknown training options {unknown}; known: {', '.join(sorted(known))}")
        return cls(**values, **nemesis)


def read_run_config(out_dir: str | Path) -> TrainConfig:
    """The config of the run in `out_dir` (its config.json)."""
    path = Path(out_dir) / RUN_CONFIG
    if not path.is_file():
        raise NemesisError(f"{path} not found: {out_dir} is not a run folder of `nemesis train`")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise NemesisError(f"{path} is not valid JSON ({error}); restore it, or delete {out_dir} and rerun") from None
    if not isinstance(values, dict) or not isinstance(values.get("nemesis") or {}, dict):
        raise NemesisError(f"{path} is not a run config (a JSON object); restore it, or delete {out_dir} and rerun")
    try:
        return TrainConfig.from_json(values)
    except NemesisError as error:
        raise NemesisError(f"{path}: {error}; restore it, or delete {out_dir} and rerun") from None
    except (TypeError, ValueError, AttributeError) as error:  # a value of the wrong type
        raise NemesisError(
            f"{path} holds a value of the wrong type ({error}); restore it, or delete {out_dir}"
        ) from None


# Options a resumed run can take from the command line: they change where or how often it reports,
# or (epochs) how long it goes on; every other option would make it another run.
RESUMABLE_OPTIONS = ("device", "cache_dir", "eval_every", "save_every", "epochs", "report_to")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_config(saved: TrainConfig, passed: dict, out_dir: str | Path) -> tuple[TrainConfig, list[str]]:
    """The config a `--resume` continues with: the run's own, plus the `passed` options it can honour.

    Only options the user passed are compared. Device, cache, reporting and more epochs are applied
    (more epochs come back as a warning line: the cosine schedule then spans the new count); any
    other option that differs is refused, naming each with the run's value.
    """
    candidate = dataclasses.replace(saved, **passed)
    changed = [name for name in passed if getattr(candidate, name) != getattr(saved, name)]
    refused = [name for name in changed if name not in RESUMABLE_OPTIONS]
    if "epochs" in changed and candidate.epochs < saved.epochs:
        refused.append("epochs")
    if refused:

        def shown(value: object) -> object:
            return value.value if isinstance(value, Enum) else value

        described = ", ".join(
            f"{_flag(name)} {shown(getattr(candidate, name))} (the run has {shown(getattr(saved, name))})"
            for name in refused
        )
        raise NemesisError(
            f"cannot resume {out_dir} with {described}: resume continues the same run; drop "
            f"{'it' if len(refused) == 1 else 'them'}, or train a new run with another --out"
        )
    warnings = []
    if "epochs" in changed:
        warnings.append(
            f"--resume continues {out_dir} to {plural(candidate.epochs, 'epoch')} (was {saved.epochs}); the cosine "
            f"learning-rate schedule now spans {plural(candidate.epochs, 'epoch')}"
        )
    return candidate, warnings


def ignored_nemesis_options(config: TrainConfig, passed: dict) -> list[str]:
    """The Nemesis-only options among `passed` when the method is not Nemesis (they change nothing)."""
    if config.uses_nemesis:
        return []
    return [_flag(name) for name in NEMESIS_OPTIONS if name in passed]


def run_root(path: str | os.PathLike) -> str | None:
    """The data folder (`root`) of the run holding `path` (its folder, prompt or checkpoint), if any."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            try:
                return json.loads((folder / RUN_CONFIG).read_text(encoding="utf-8")).get("root")
            except (OSError, json.JSONDecodeError):
                return None
    return None
