"""Evaluating prompt checkpoints from cached test features: accuracy, macro-F1, CoOp's result block.

`resolve_target` resolves and checks once what a checkpoint is and what it is evaluated on (model,
weights, dataset, classes; user-given values override the file's metadata); `prepare_evaluation`
loads the backbone once per (model, weights) and reads the test features from the feature cache.
`predictions` classifies those features with any batch of ctx variants in chunked text passes;
evaluation and the corruption sweep both go through it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, write_text_atomic
from ..constants import NO_WEIGHTS, RANDOM_WEIGHTS
from ..data.datasets import Dataset, load_dataset
from ..data.feature_cache import encode_split
from ..errors import NemesisError, NemesisNote
from ..files.checkpoint import PromptCheckpoint
from ..files.whole_model import check_frozen_weights
from ..methods import checked_method_options
from ..methods.protocol import PromptMethod, build_learner
from ..model.backbone import (
    QUICKGELU_SUFFIX,
    Activation,
    Backbone,
    embed_dim,
    example_tag,
    known_tags,
    load_clip,
    model_config,
    named_weights,
    resolve_device,
    text_width,
)
from ..penalties import UNKNOWN_PENALTY
from ..wording import plural

# Scoring lives in `metrics` (the trainer and zero-shot use it without loading checkpoints); re-exported here.
from .metrics import (  # noqa: F401
    BASE_TO_NEW,
    EvaluationResult,
    class_logits,
    coop_result_block,
    macro_f1,
    predictions,
)


@dataclass
class EvaluationSetup:
    backbone: Backbone
    dataset: Dataset
    learner: PromptMethod  # the checkpoint's learner (ctx, meta-net...) with the evaluated dataset's class names
    features: torch.Tensor  # cached test image features [N, D]
    labels: torch.Tensor  # [N]
    source: dict[str, Any]  # checkpoint, model, pretrained, dataset, train_dataset, shots, seed, subsample, method...


@dataclass(frozen=True)
class EvaluationTarget:
    """One prompt and what it is evaluated on, resolved and checked once (`resolve_target`): the
    commands hand it on instead of reading or checking the checkpoint again."""

    checkpoint: PromptCheckpoint
    model: str
    pretrained: str | None  # a tag or weights file; None: random weights
    activation: str | None  # None: the weights' own
    dataset: str  # the test data
    subsample: str  # all, base or new
    shots: int | None
    seed: int | None
    ctx_init: str | None = None  # an init phrase named for a file that does not record its own
    # The method's options to evaluate with instead of the recorded ones (`--method-option stopping=converged`)
    method_options: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> dict[str, Any]:
        """What a result records of its prompt and data (eval records, sweep identities)."""
        metadata = self.checkpoint.metadata
        return {
            "checkpoint": str(Path(self.checkpoint.path).resolve()) if self.checkpoint.path else None,
            "model": self.model,
            "pretrained": self.pretrained,
            "activation": self.activation,
            "ctx_init": self.ctx_init or metadata.prompt_config.get("ctx_init"),
            "dataset": self.dataset,
            "train_dataset": metadata.dataset or self.dataset,
            "shots": self.shots,
            "seed": self.seed,
            "subsample": self.subsample,
            "method": self.checkpoint.prompt_method,
            "penalty": metadata.penalty or UNKNOWN_PENALTY,
            "penalty_config": metadata.penalty_config,
            "epoch": metadata.epoch,
        }

    def on(self, subsample: str) -> EvaluationTarget:
        """The same prompt on another class subset (base-to-new evaluates both)."""
        return dataclasses.replace(self, subsample=subsample)


def resolve_target(
    checkpoint: PromptCheckpoint,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    dataset: str | None = None,
    shots: int | None = None,
    seed: int | None = None,
    subsample: str | None = None,
    activation: Activation | str | None = None,
    ctx_init: str | None = None,
    method_options: dict[str, Any] | None = None,
) -> EvaluationTarget:
    """What the checkpoint is and what it is evaluated on, checked against the model: named values win
    over the file's metadata. Every check that needs no data runs here, before any model is built.

    `ctx_init` names the init phrase of a prompt that does not record it (CoOp's files): as in CoOp,
    its tokens beyond the checkpoint's n_ctx stay in the prompt.

    The prompt's own weights (model and pretrained from its metadata) come with the activation it
    was trained under; other weights get the activation of their provenance unless one is named.
    `pretrained` None means not named (see `choose_weights`); `none` names random weights, which the
    target holds as pretrained None.
    """
    metadata = checkpoint.metadata
    model = model or metadata.model
    if model is None:
        raise NemesisError(f"{checkpoint.path}: the checkpoint does not name its model; pass --model (e.g. RN50)")
    dataset = dataset or metadata.dataset
    if dataset is None:
        raise NemesisError(f"{checkpoint.path}: the checkpoint does not name its dataset; pass --dataset")
    pretrained = choose_weights(checkpoint, model, pretrained)
    if activation is None and model == metadata.model and pretrained == metadata.pretrained:
        activation = metadata.activation
    if ctx_init is not None:
        _check_init_phrase(checkpoint, ctx_init)
    checkpoint.check_model(model, embed_dim(model), text_width(model))  # every tensor against the model
    return EvaluationTarget(
        checkpoint,
        model=model,
        pretrained=pretrained,
        activation=getattr(activation, "value", activation),
        dataset=dataset,
        subsample=subsample or metadata.subsample or "all",
        shots=shots if shots is not None else metadata.shots,
        seed=seed if seed is not None else metadata.seed,
        ctx_init=ctx_init,
        method_options=_evaluation_options(checkpoint, method_options or {}),
    )


def _evaluation_options(checkpoint: PromptCheckpoint, options: dict[str, Any]) -> dict[str, Any]:
    """Options named for evaluation, checked against the method's config as the learner is built with."""
    options = checked_method_options(checkpoint.spec, options)
    try:
        checkpoint.spec.config(**(dataclasses.asdict(checkpoint.config) | options))
    except TypeError as error:
        raise NemesisError(f"{checkpoint.path}: {error}") from None
    return options


def _check_init_phrase(checkpoint: PromptCheckpoint, ctx_init: str) -> None:
    """A named init phrase (for a file that does not record its own) is an option of the prompt's
    method, and has one word per context vector, as the method builds it."""
    spec = checkpoint.spec
    if "ctx_init" not in spec.option_names():
        raise NemesisError(f"--ctx-init is not an option of {spec.name} ({spec.label})")
    words = spec.options(**(checkpoint.metadata.prompt_config | {"ctx_init": ctx_init})).n_ctx
    n_ctx = checkpoint.ctx.shape[-2]
    if words != n_ctx:
        raise NemesisError(
            f"--ctx-init '{ctx_init}' has {plural(words, 'word')} but {checkpoint.path} holds "
            f"{plural(n_ctx, 'context vector')}; CoOp learns one vector per word of the init phrase"
        )


def _name_the_weights(model: str) -> str:
    return f"pass --pretrained {example_tag(model)} (a pretrained tag), a weights file, or none for random weights"


def choose_weights(checkpoint: PromptCheckpoint, model: str, pretrained: str | None) -> str | None:
    """The weights `checkpoint` runs with on `model`: a tag or file, or None for random weights.

    Named weights win (`none`: random). Otherwise the prompt's own record, when it is for `model`:
    a known tag of the model, or random weights. A prompt file never chooses which local file is
    read, so a recorded path (or anything else) must be named by the user; missing weights are
    never quietly replaced by random ones.
    """
    model_config(model)  # an unknown model fails naming the known ones, before any word on weights
    if pretrained is not None:
        return named_weights(pretrained)
    metadata = checkpoint.metadata
    recorded = metadata.pretrained
    if metadata.model != model:
        trained = f"was trained on {metadata.model}" if metadata.model else "does not record its model or weights"
        raise NemesisError(f"{checkpoint.path} {trained}; name the weights of {model}: {_name_the_weights(model)}")
    random = recorded == NO_WEIGHTS or (metadata.weights_id or "").removesuffix(QUICKGELU_SUFFIX) == RANDOM_WEIGHTS
    if recorded in (None, NO_WEIGHTS) and random:
        return None  # trained on random weights, and it says so
    if recorded is None:
        raise NemesisError(f"{checkpoint.path} does not record its weights; {_name_the_weights(model)}")
    if recorded in known_tags(model):
        return recorded
    shown = recorded if len(recorded) <= 80 else recorded[:77] + "..."
    raise NemesisError(
        f"{checkpoint.path} records weights '{shown}', which is not a pretrained tag of {model}; a prompt file "
        f"does not choose which file is read: pass --pretrained with the weights it was trained on (a file is "
        f"checked against its record), or --pretrained {example_tag(model)} or none"
    )


def prepare_evaluation(
    target: EvaluationTarget,
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    backbones: dict[tuple[str, str | None, str | None], Backbone] | None = None,
    progress: bool = True,
) -> EvaluationSetup:
    """Everything needed to classify the test split with the target's prompt: its data, backbone
    (loaded once per model, weights and activation in `backbones`), learner and cached test features.

    The class count is checked before the backbone is built or any image is encoded, so bad input
    writes nothing to the cache.
    """
    checkpoint, source = target.checkpoint, target.source
    data = load_dataset(target.dataset, root, subsample=target.subsample)
    checkpoint.check_model(target.model, embed_dim(target.model), text_width(target.model), len(data.classnames))
    device = resolve_device(device)
    backbones = {} if backbones is None else backbones
    key = (target.model, target.pretrained, target.activation)
    if key not in backbones:
        backbones[key] = load_clip(target.model, target.pretrained, device=device, activation=target.activation)
    backbone = backbones[key]
    check_frozen_weights(checkpoint, backbone, target.pretrained)  # a whole-model file carries its towers
    source["weights_id"] = backbone.weights_id
    source["activation"] = backbone.activation.value
    if (note := activation_mismatch(checkpoint, backbone.activation)) is not None:
        warnings.warn(note, NemesisNote, stacklevel=2)
    learner = build_learner(
        checkpoint.prompt_method,
        backbone,
        data.classnames,
        extra=checkpoint.extra,
        ctx=checkpoint.ctx,
        **(prompt_options(checkpoint, source) | target.method_options),
    )
    # The learner's first image input decides which kind the cache gives (pooled [N, D], local [N, T, D]).
    inputs = learner.image_inputs[0]
    features, labels = encode_split(
        backbone, data, "test", cache_dir=cache_dir, device=device, progress=progress, inputs=inputs
    )
    return EvaluationSetup(backbone, data, learner, features.to(device), labels.to(device), source)


def export_backbone(checkpoint: PromptCheckpoint, model: str | None, pretrained: str | None) -> Backbone | None:
    """The backbone whose frozen towers a whole-model Dassl export writes (the prompt's own model and
    weights unless named), checked against the towers the prompt's file carries; None: not needed."""
    if checkpoint.spec.dassl_layout is None:
        return None
    model = model or checkpoint.metadata.model
    if model is None:
        raise NemesisError(f"{checkpoint.path}: the checkpoint does not name its model; pass --model (e.g. ViT-B-16)")
    weights = choose_weights(checkpoint, model, pretrained)
    checkpoint.check_model(model, embed_dim(model), text_width(model))
    backbone = load_clip(model, weights, activation=checkpoint.metadata.activation)
    check_frozen_weights(checkpoint, backbone, weights)
    return backbone


def prompt_options(checkpoint: PromptCheckpoint, source: dict[str, Any]) -> dict[str, Any]:
    """The learner options a checkpoint is rebuilt with: its method's config as recorded, with a named
    init phrase (its tokens beyond ctx stay in the prompt, as CoOp builds it)."""
    options = dataclasses.asdict(checkpoint.config)
    if source.get("ctx_init") is not None and "ctx_init" in options:
        options["ctx_init"] = source["ctx_init"]
    return options


def weights_mismatch(checkpoint: PromptCheckpoint, source: dict[str, Any]) -> str | None:
    """A note when the prompt was trained on other weights than it is evaluated with (else None).

    The activation part of the identity has its own note (`activation_mismatch`).
    """
    trained = checkpoint.metadata.weights_id
    used = source.get("weights_id")
    if trained is None or used is None or trained.removesuffix(QUICKGELU_SUFFIX) == used.removesuffix(QUICKGELU_SUFFIX):
        return None
    return f"the prompt was trained with weights {trained} but runs with {used}"


def activation_mismatch(checkpoint: PromptCheckpoint, activation: Activation) -> str | None:
    """A note when the prompt was trained under another activation than the one it runs under, or when
    a CoOp / Dassl file, which does not record it, runs under GELU (else None)."""
    trained = checkpoint.metadata.activation
    names = {"quickgelu": "QuickGELU", "gelu": "GELU"}
    if trained is None and checkpoint.metadata.source_format == "dassl" and activation is Activation.gelu:
        return (
            f"{checkpoint.path} does not record the activation it was trained under; it runs under GELU, the "
            "weights' own (CoOp and the official Nemesis code train under QuickGELU: pass --activation quickgelu "
            "for their checkpoints)"
        )
    if trained is None or trained == activation.value:
        return None
    return (
        f"{checkpoint.path}: the prompt was trained under {names.get(trained, trained)} but runs under "
        f"{names[activation.value]}; pass --activation {trained} to evaluate it as trained"
    )


def evaluate(
    target: EvaluationTarget, save_logits: str | os.PathLike | None = None, **options: Any
) -> EvaluationResult:
    """Test accuracy and macro-F1 of a target's prompt; `options` are those of `prepare_evaluation`.

    `save_logits`: also write the logits [N_images, n_cls] (logit scale x similarities, in the test
    split's order) and `labels` [N_images] to that safetensors file, for analyses of one's own."""
    setup = prepare_evaluation(target, **options)
    if save_logits is None:
        predicted = predictions(setup.learner, setup.features, setup.learner.ctx.detach().unsqueeze(0))[0]
    else:
        logits = class_logits(setup.learner, setup.features, setup.backbone.model.logit_scale)
        predicted = logits.argmax(dim=-1)
        write_logits(save_logits, logits, setup.labels)
    correct = int((predicted == setup.labels).sum())
    n = int(setup.labels.numel())
    return EvaluationResult(n, correct, 100.0 * correct / n, macro_f1(predicted, setup.labels), setup.source)


def write_logits(path: str | os.PathLike, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """`logits` [N, n_cls] (float32) and `labels` [N] (int64) as a safetensors file, written atomically."""
    from safetensors.torch import save_file

    tensors = {"logits": logits.float().cpu().contiguous(), "labels": labels.long().cpu().contiguous()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary))


def evaluate_base_to_new(target: EvaluationTarget, **options: Any) -> list[EvaluationResult]:
    """The base-to-new protocol on one prompt: test accuracy on the dataset's base classes, then on its new
    classes (`options` as `prepare_evaluation`'s; pass `backbones` to share models)."""
    base = evaluate(target.on(BASE_TO_NEW[0]), **options)
    with warnings.catch_warnings():  # notes on the prompt and its weights were said for the base classes
        warnings.simplefilter("ignore", NemesisNote)
        new = evaluate(target.on(BASE_TO_NEW[1]), **options)
    return [base, new]


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Add one row to a JSON Lines file: the whole file is rewritten atomically with the new line."""
    path = Path(path)
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    write_text_atomic(path, existing + json.dumps(record) + "\n")
