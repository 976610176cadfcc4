"""The penalty axis: what training adds to a prompt method's loss, by name.

A run's `penalty` is "none" or registered names joined by "+", so regularisers combine
("kgcoop+nemesis" is KgCoOp's distance term and Nemesis's norms together). Each name is a
`PenaltySpec`, registered by one line; its `term` builds the run's `PenaltyTerm`
(`nemesis.penalties.base`: a part of each step's loss, and optionally an edit of the gradients, as
ProGrad's projection is). Nemesis's own settings are `NemesisConfig` (options of their own on the
command line); other penalties declare an options dataclass (`--penalty-option NAME=VALUE`, names
distinct across penalties). Light to import: no torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..choices import Norm, Schedule
from ..data.templates import KGCOOP_TEMPLATES, PROGRAD_TEMPLATES, init_phrase, template_for
from ..errors import NemesisError, choice, typed_option

NO_PENALTY = "none"
NEMESIS = "nemesis"
KGCOOP = "kgcoop"
PROGRAD = "prograd"
UNKNOWN_PENALTY = "unknown"  # records of Dassl files whose path does not say how they were trained


@dataclass(frozen=True)
class DasslTrainer:
    """A Dassl trainer whose runs are a registered method with this penalty (KgCoOp: CoOp + kgcoop)."""

    folder: str  # its trainer folder in output trees ("KgCoOp")
    method: str = "coop"
    # state-dict keys its files carry that nothing reads, some named like another method's tensors
    unused_keys: tuple[str, ...] = ()
    marker: str | None = None  # a key only its files hold: tells them apart outside an output tree
    # (dataset or None) -> the prompt options its files imply (ProGrad: its template's words, padded)
    prompt_options: Callable[[str | None], dict] | None = None


@dataclass(frozen=True)
class PenaltySpec:
    """One penalty: its name (in `--method coop+<name>`, files and tables), label, and term."""

    name: str
    label: str  # how labels name it after the method's: "CoOp+Nemesis"
    term: str | Callable[[Any, Any], Any]  # (train config, learner) -> PenaltyTerm, or "module:function"
    # (train config, n_ctx or None) -> None: refuse options before a model is built (NemesisError)
    check: Callable[[Any, int | None], None] | None = None
    # (train config) -> its settings, recorded in prompt files' `penalty_config` (keys distinct per penalty)
    settings: Callable[[Any], dict] | None = None
    options: type | None = None  # its options dataclass (`--penalty-option`), field names distinct per penalty
    methods: tuple[str, ...] | None = None  # the prompt methods it runs on (None: any)
    batch_size: int | None = None  # training defaults replacing the method's (None: the method's)
    epochs: int | None = None
    dassl: DasslTrainer | None = None  # the official trainer that trains it, whose files the toolkit reads

    def build(self, config: Any, learner: Any) -> Any:
        """The run's `PenaltyTerm`, built once before the first step."""
        maker = self.term
        if isinstance(maker, str):
            module, _, name = maker.partition(":")
            maker = getattr(importlib.import_module(module), name)
        return maker(config, learner)


PENALTIES: dict[str, PenaltySpec] = {}


def register_penalty(spec: PenaltySpec) -> None:
    """Make a penalty available by name; registering is one line."""
    PENALTIES[spec.name] = spec


def penalty_names(penalty: str) -> tuple[str, ...]:
    """The registered penalties of a `penalty` value, in order ("none": none)."""
    if penalty in (None, "", NO_PENALTY):
        return ()
    return tuple(str(penalty).split("+"))


def checked_penalty(penalty: str | None) -> str:
    """A valid `penalty` value: "none" or known names joined by "+", each once."""
    names = penalty_names(str(penalty or NO_PENALTY).strip().lower())
    unknown = [name for name in names if name not in PENALTIES]
    if unknown or len(set(names)) != len(names):
        known = ", ".join([NO_PENALTY, *PENALTIES])
        raise NemesisError(f"unknown penalty '{penalty}'; choose {known}, or several joined by '+'")
    return "+".join(names) or NO_PENALTY


def check_penalty_method(penalty: str, method: str) -> None:
    """Refuse a penalty on a prompt method it cannot run on, naming the ones it can."""
    for name in penalty_names(penalty):
        methods = PENALTIES[name].methods
        if methods is not None and method not in methods:
            raise NemesisError(
                f"penalty {name} runs on {', '.join(methods)} only, not on {method}; use --method coop+{name}"
            )


def checked_penalty_options(penalty: str, values: dict[str, Any]) -> dict[str, Any]:
    """`--penalty-option` values by name, each as its field's type (text is converted); an option that
    none of the run's penalties takes is refused, naming theirs."""
    hints = {
        name: kind
        for spec in map(PENALTIES.__getitem__, penalty_names(penalty))
        if spec.options is not None
        for name, kind in typing.get_type_hints(spec.options).items()
    }
    checked = {}
    for name, value in values.items():
        if name not in hints:
            known = ", ".join(hints) or "none"
            raise NemesisError(f"penalty {penalty} has no option '{name}'; its options: {known}")
        checked[name] = typed_option(f"penalty option {name}", value, hints[name])
    return checked


def penalty_options(name: str, values: dict[str, Any]) -> Any:
    """Penalty `name`'s options dataclass from the run's `--penalty-option` values (the rest default)."""
    options = PENALTIES[name].options
    fields = {spec.name for spec in dataclasses.fields(options)}
    return options(**{key: value for key, value in values.items() if key in fields})


def penalty_defaults(penalty: str) -> dict[str, int]:
    """The training defaults the run's penalties set (batch_size, epochs), the first penalty's first."""
    defaults: dict[str, int] = {}
    for name in reversed(penalty_names(penalty)):
        spec = PENALTIES[name]
        defaults |= {key: value for key in ("batch_size", "epochs") if (value := getattr(spec, key)) is not None}
    return defaults


def uses_nemesis(penalty: str | None) -> bool:
    return NEMESIS in penalty_names(penalty or NO_PENALTY)


def penalty_label(penalty: str | None) -> str:
    """ "+Nemesis" (each penalty's label after a "+"), or "" without a penalty."""
    names = penalty_names(penalty or NO_PENALTY)
    return "".join(f"+{PENALTIES[name].label if name in PENALTIES else name}" for name in names)


LOGISTIC_RATE = 0.2  # k of the logistic schedule, the official code's value
OFFICIAL_OVERRIDE_DATASETS = ("food101", "oxford_pets")
OFFICIAL_OVERRIDE_WEIGHT = 50.0


@dataclass
class NemesisConfig:
    """Nemesis's hyper-parameters; the defaults are the paper's."""

    beta: float = 1.0  # PUN's share: 1 = PUN only (the paper's PEN), 0 = PAN only
    weight: float = 1.0  # A, the penalty's overall weight
    norm: Norm = Norm.l2  # p of ||ctx_j||_p
    schedule: Schedule = Schedule.logistic  # s(e)
    positions: int = 1  # NP, positions PAN tries per step
    corrupt_weight: float = 0.5  # CW, PAN's rescaling factor
    pan_weight: float | None = None  # PAN's weight inside the bracket instead of A (None: A, as DESIGN's formula)
    official_override: bool = False  # Food101 / OxfordPets: PAN weight 50, constant schedule, as the official code
    rate: float = field(default=LOGISTIC_RATE, repr=False)  # k of the logistic schedule

    def __post_init__(self) -> None:
        self.norm = choice(Norm, self.norm, "norm")
        self.schedule = choice(Schedule, self.schedule, "schedule")
        if not 0.0 <= self.beta <= 1.0:
            raise NemesisError(f"beta must be between 0 and 1 (1 = PUN only, 0 = PAN only), got {self.beta}")
        if not self.weight >= 0.0:
            raise NemesisError(f"the Nemesis weight must be 0 or more, got {self.weight}")
        if self.positions < 1:
            raise NemesisError(f"positions (NP) must be at least 1, got {self.positions}")
        if self.pan_weight is not None and not self.pan_weight >= 0.0:
            raise NemesisError(f"the PAN weight must be 0 or more, got {self.pan_weight}")
        if not self.corrupt_weight >= 0.0:
            raise NemesisError(f"corrupt_weight (CW) must be 0 or more, got {self.corrupt_weight}")

    def shares(self) -> dict[str, float]:
        """Weight of each registered penalty, A included; zero shares are not computed."""
        pan_weight = self.weight if self.pan_weight is None else self.pan_weight
        return {"pun": self.beta * self.weight, "pan": (1.0 - self.beta) * pan_weight}

    def for_dataset(self, dataset: str) -> NemesisConfig:
        """The official code's Food101/OxfordPets setting when asked for: PAN weighted 50 (PUN keeps A),
        constant schedule."""
        if not self.official_override or dataset not in OFFICIAL_OVERRIDE_DATASETS:
            return self
        values = asdict(self) | {"pan_weight": OFFICIAL_OVERRIDE_WEIGHT, "schedule": Schedule.constant}
        return NemesisConfig(**values)

    def to_json(self) -> dict:
        return {
            "beta": self.beta,
            "weight": self.weight,
            "norm": self.norm.value,
            "schedule": self.schedule.value,
            "positions": self.positions,
            "corrupt_weight": self.corrupt_weight,
            "pan_weight": self.pan_weight,
            "official_override": self.official_override,
        }


def _check_nemesis(config: Any, n_ctx: int | None) -> None:
    if n_ctx is not None and not 1 <= config.positions <= n_ctx:
        raise NemesisError(f"positions (NP) must be between 1 and n_ctx = {n_ctx}, got {config.positions}")


def _nemesis_settings(config: Any) -> dict:
    return config.nemesis_config().to_json()


register_penalty(
    PenaltySpec(NEMESIS, "Nemesis", "nemesis.penalties.losses:nemesis_term", _check_nemesis, _nemesis_settings)
)


@dataclass
class KgCoOpOptions:
    """KgCoOp's option; the default is its scripts' (TRAINER.COOP.W 8.0; its train.py says 1.0)."""

    kgcoop_weight: float = 8.0  # w in CE + w * (1 - mean_c cos(t_c, t_c^hand))

    def __post_init__(self) -> None:
        if not 0.0 <= self.kgcoop_weight < float("inf"):
            raise NemesisError(f"kgcoop_weight must be a finite number, 0 or more, got {self.kgcoop_weight}")


@dataclass
class ProGradOptions:
    """ProGrad's options; the defaults are its configs' and scripts' (LOSS.LAMBDA 1.0, LOSS.T 1.0)."""

    # share of the cross-entropy gradient's conflicting component removed (its paper: 0.8 for 8 and 16
    # shots on Flowers102, DTD and EuroSAT)
    prograd_lambda: float = 1.0
    prograd_temperature: float = 1.0  # T of the distillation term between zero-shot CLIP and the prompt

    def __post_init__(self) -> None:
        if not 0.0 <= self.prograd_lambda < float("inf"):
            raise NemesisError(f"prograd_lambda must be a finite number, 0 or more, got {self.prograd_lambda}")
        if not 0.0 < self.prograd_temperature < float("inf"):
            raise NemesisError(f"prograd_temperature must be a finite number above 0, got {self.prograd_temperature}")


def _kgcoop_settings(config: Any) -> dict:
    options = penalty_options(KGCOOP, config.penalty_options)
    return asdict(options) | {"kgcoop_template": template_for(config.dataset, KGCOOP_TEMPLATES)}


def _prograd_settings(config: Any) -> dict:
    options = penalty_options(PROGRAD, config.penalty_options)
    return asdict(options) | {"prograd_template": template_for(config.dataset, PROGRAD_TEMPLATES)}


def _prograd_prompt(dataset: str | None) -> dict:
    """What a ProGrad Dassl file's prompt was built from: its dataset's template words in the last vectors
    (the words' tokens beyond their count stay in the prompt, after ctx); nothing known without a dataset."""
    return {"ctx_init": init_phrase(dataset), "pad_init": True} if dataset else {}


# KgCoOp (Yao et al., CVPR 2023; htyao89/KgCoOp): batch 128, 100 epochs in both of its configs.
register_penalty(
    PenaltySpec(
        KGCOOP, "KgCoOp", "nemesis.penalties.kgcoop:kgcoop_term", settings=_kgcoop_settings,
        options=KgCoOpOptions, methods=("coop",), batch_size=128, epochs=100,
        dassl=DasslTrainer(
            "KgCoOp",
            # its PromptLearner's unused `bias_vectors` [1, 512] and `meta_net` Linear(512, 512), never trained;
            # its loader also drops a `token_midfix` buffer
            unused_keys=("bias_vectors", "meta_net.linear1.weight", "meta_net.linear1.bias", "token_midfix"),
            marker="bias_vectors",
        ),
    )
)  # fmt: skip
# ProGrad (Zhu et al., ICCV 2023; BeierZhu/Prompt-align): CoOp's batch and epochs.
register_penalty(
    PenaltySpec(
        PROGRAD, "ProGrad", "nemesis.penalties.prograd:prograd_term", settings=_prograd_settings,
        options=ProGradOptions, methods=("coop",), dassl=DasslTrainer("ProGrad", prompt_options=_prograd_prompt),
    )
)  # fmt: skip


def check_penalties(config: Any, n_ctx: int | None) -> None:
    """Each of the run's penalties checks the training options it reads."""
    for name in penalty_names(config.penalty):
        if PENALTIES[name].check is not None:
            PENALTIES[name].check(config, n_ctx)


def penalty_settings(config: Any) -> dict:
    """The run's penalties' settings, one dict, as prompt files record them ({} without a penalty)."""
    settings = {}
    for name in penalty_names(config.penalty):
        if PENALTIES[name].settings is not None:
            settings |= PENALTIES[name].settings(config)
    return settings
