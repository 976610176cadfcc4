"""Training CoOp, CoCoOp and their Nemesis variants on few-shot data: `train(config, out_dir)` writes a run folder.

The CLIP model is frozen; only the learner's parameters (ctx, and CoCoOp's meta-net) get gradients
(I5). Every random choice (data order, which cached view or live augmentation an image gets, PAN's
positions) is drawn from a generator seeded by (seed, epoch or step), so a run is a function of its
config and an interrupted run resumes exactly: the state saved after each epoch holds the learner's
tensors, SGD's momentum buffers and the counters (safetensors + JSON, no pickles), and the lr
schedule is a function of the epoch.

Run folder (DESIGN section 6): config.json, metrics.jsonl, log.txt, prompt.safetensors,
checkpoints/epoch-XXXX.safetensors and the resume state state.safetensors; with `report_to`, the live
logs of `reporting` (tensorboard/, wandb/), fed the rows as metrics.jsonl is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from ..atomic import write_text_atomic
from ..choices import Precision
from ..constants import CTX_TENSOR, POOLED_FEATURES, RUN_CHECKPOINTS, RUN_CONFIG, RUN_LOG, RUN_METRICS, RUN_PROMPT
from ..data.augmentation import augment
from ..data.datasets import Dataset, load_dataset
from ..data.feature_cache import Features, encode_split, encode_train_views, image_encoder
from ..distributed import SINGLE_PROCESS, Ranks, rank_device
from ..errors import NemesisError
from ..evaluation.metrics import coop_result_block, macro_f1, predictions
from ..files.checkpoint import PromptMetadata, save_prompt
from ..files.run_state import (
    DASSL_CLOSING,
    RUN_STATE,
    Journal,
    RunState,
    load_state,
    read_finished_log,
    read_finished_metrics,
    remove_orphans,
    save_state,
)
from ..methods import legacy_name
from ..methods.protocol import PromptMethod, build_learner
from ..model.backbone import Backbone, load_clip, model_config, resolve_device
from ..penalties import PENALTIES, check_penalties, penalty_names, penalty_settings
from ..penalties.base import PenaltyPart, PenaltyTerm, TrainingStep
from ..precision import autocast_policy, half_text_side
from ..progress import progress_bar
from ..tensors import position_norms
from ..wording import plural
from .configs import TrainConfig, read_run_config
from .reporting import Reporter, check_reporters, open_reporter

# Keys of config.json that may change when a run is resumed: they do not change what was learned so
# far (more epochs continue it; `nemesis train --resume` checks the options a user passes).
RESUMABLE_CHANGES = (
    "device", "cache_dir", "toolkit_version", "eval_every", "save_every", "epochs", "report_to",
)  # fmt: skip
# Options added after runs were saved: at their default, those runs still resume.
LATER_OPTIONS = {"crop_scale": 0.08, "method_options": {}, "penalty_options": {}}


# ---------------------------------------------------------------------------------------------
# Schedules and seeded randomness


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=epochs), at 0-based `epoch`."""
    if epoch < config.warmup_epochs:
        return config.warmup_lr
    return 0.5 * config.lr * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / config.epochs))


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one use (e.g. "order", epoch 3) of the run's seed, independent of the others."""
    digest = hashlib.sha256(":".join(str(part) for part in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, *parts))


def epoch_batches(n_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Indices of each step of an epoch; as in Dassl, a last partial batch is dropped when n >= batch."""
    order = torch.randperm(n_samples, generator=generator(seed, "order", epoch))
    batches = list(order.split(batch_size))
    if n_samples >= batch_size and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


# ---------------------------------------------------------------------------------------------
# Image features of the training images


class _AugmentedImages(torch.utils.data.Dataset):
    """CoOp's train augmentation of each image, its random numbers fixed by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, backbone: Backbone, seed: int, epoch: int, crop_scale: float) -> None:
        self.dataset, self.seed, self.epoch, self.crop_scale = dataset, seed, epoch, crop_scale
        self.size, self.mean, self.std = backbone.image_size, backbone.image_mean, backbone.image_std

    def __len__(self) -> int:
        return len(self.dataset.train)

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = random.Random(derived_seed(self.seed, "augment", self.epoch, index))
        image = self.dataset.open_image(self.dataset.train[index])
        return augment(image, self.size, self.mean, self.std, rng, self.crop_scale)


class TrainFeatures:
    """Image features and labels [B] of each step: cached augmented views, or live augmentation; the
    features are of the learner's kind `inputs` (pooled [B, D], local [B, T, D])."""

    def __init__(
        self,
        config: TrainConfig,
        backbone: Backbone,
        dataset: Dataset,
        device: torch.device,
        inputs: str = POOLED_FEATURES,
    ) -> None:
        self.config, self.backbone, self.dataset, self.device = config, backbone, dataset, device
        self.encode = image_encoder(backbone, inputs)
        self.labels = torch.tensor([sample.label for sample in dataset.train], device=device)
        self.views = None
        if config.train_views > 0:
            views, _ = encode_train_views(
                backbone,
                dataset,
                config.train_views,
                seed=config.seed,
                cache_dir=config.cache_dir,
                device=device,
                progress=False,
                crop_scale=config.crop_scale,
                inputs=inputs,
            )
            self.views = views.to(device)  # [V, N, ...]

    def __len__(self) -> int:
        return len(self.dataset.train)

    def batches(self, epoch: int, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.views is not None:
            # Each image gets one of its cached views per epoch, drawn from (seed, epoch).
            view_of = torch.randint(len(self.views), (len(self),), generator=generator(self.config.seed, "view", epoch))
            for indices in batches:
                yield self.views[view_of[indices], indices], self.labels[indices.to(self.device)]
            return
        images = _AugmentedImages(self.dataset, self.backbone, self.config.seed, epoch, self.config.crop_scale)
        workers = 0 if self.device.type == "cpu" else min(8, os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(
            images,
            batch_sampler=[indices.tolist() for indices in batches],
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )
        for indices, pixels in zip(batches, loader, strict=True):
            with torch.no_grad(), autocast_policy(self.device, training=self.config.precision).context():
                features = self.encode(pixels.to(self.device, non_blocking=True))
            yield features.float(), self.labels[indices.to(self.device)]


# ---------------------------------------------------------------------------------------------
# Precision, checks and run-folder state


def _text_backbone(config: TrainConfig, backbone: Backbone, backbones: dict) -> Backbone:
    """The backbone the learner's text passes run on: under fp16 one whose text side is a half copy (CoOp's
    PREC fp16 keeps CLIP in fp16), shared by the runs of a grid; its image tower is the fp32 model's own,
    neither copied nor converted, as image features come from the fp32 model's cache."""
    if config.precision is not Precision.fp16:
        return backbone
    key = (config.model, config.pretrained, config.activation, Precision.fp16.value)
    if key not in backbones:
        backbones[key] = dataclasses.replace(backbone, model=half_text_side(backbone.model))
    return backbones[key]


def _hold_in_precision(config: TrainConfig, parameters: dict[str, torch.nn.Parameter]) -> None:
    """Under fp16 the learned tensors are fp16 parameters, as CoOp's ctx (and CoCoOp's meta-net) are: SGD
    then keeps its momentum and applies each step in fp16."""
    if config.precision is Precision.fp16:
        for parameter in parameters.values():
            parameter.data = parameter.data.half()


def resolved_n_ctx(config: TrainConfig) -> int | None:
    """Context positions as the learner will build them (an init phrase: its word count); None for a
    method whose options do not count them (its learner's `n_ctx` then says)."""
    return getattr(config.prompt_config(), "n_ctx", None)


def load_training_data(config: TrainConfig) -> Dataset:
    """The few-shot dataset, after checking the shots fit in the smallest class of the full training split."""
    full = load_dataset(config.dataset, config.root, subsample=config.subsample)
    if not full.train:
        raise NemesisError(f"dataset '{config.dataset}' has no training split; train on another dataset")
    sizes = {}
    for sample in full.train:
        sizes[sample.label] = sizes.get(sample.label, 0) + 1
    smallest = min(sizes, key=lambda label: sizes[label])
    if config.shots > sizes[smallest]:
        raise NemesisError(
            f"--shots {config.shots} is more than the {sizes[smallest]} training images of class "
            f"'{full.classnames[smallest]}' in {config.dataset}; use at most {plural(sizes[smallest], 'shot')}"
        )
    return load_dataset(config.dataset, config.root, shots=config.shots, seed=config.seed, subsample=config.subsample)


def check_config(config: TrainConfig) -> Dataset:
    """Every check that can refuse a run, before a model is built or a file written; returns the data."""
    model_config(config.model)
    check_penalties(config, resolved_n_ctx(config))
    check_reporters(config.reporters)  # a missing optional package refuses the run, not its first epoch
    return load_training_data(config)


def _comparable(values: dict) -> dict:
    values = {key: value for key, value in values.items() if key not in RESUMABLE_CHANGES}
    # States saved before method and penalty were two options digested them as one word: still do.
    values["method"] = legacy_name(values.pop("prompt_method"), values.pop("penalty"))
    for key, default in LATER_OPTIONS.items():  # absent from states saved before the option existed
        if values.get(key) == default:
            del values[key]
    return values


def _config_digest(config: TrainConfig) -> str:
    """What the saved state was computed under: the options a resume may not change."""
    return hashlib.sha256(json.dumps(_comparable(config.to_json()), sort_keys=True).encode()).hexdigest()


def check_run_folder(out_dir: Path, config: TrainConfig, resume: bool) -> None:
    """Refuse an --out that is a file, or holds a run (unless resuming) or a run with other options."""
    config_path = out_dir / RUN_CONFIG
    if not config_path.is_file():
        if out_dir.exists() and not out_dir.is_dir():
            raise NemesisError(f"--out {out_dir} is a file; name a folder")
        return
    if not resume:
        raise NemesisError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    saved = _comparable(read_run_config(out_dir).to_json())
    wanted = _comparable(config.to_json())
    differing = sorted(key for key in set(saved) | set(wanted) if saved.get(key) != wanted.get(key))
    if differing:
        shown = ", ".join(f"{key}: {saved.get(key)!r} -> {wanted.get(key)!r}" for key in differing)
        raise NemesisError(f"cannot resume {out_dir} with other options ({shown}); use the run's own options")


# ---------------------------------------------------------------------------------------------
# Training


_NormSummary = tuple[list[float], float, float]  # ctx's norm per position, their mean, its Frobenius norm


def _norm_summary(ctx: torch.Tensor) -> _NormSummary:
    """L2 norms per position [M] (class mean for class-specific ctx), their mean, and ctx's Frobenius norm."""
    with torch.no_grad():
        norms = position_norms(ctx.float())
        return norms.tolist(), float(norms.mean()), float(torch.linalg.vector_norm(ctx.float()))


def _test_accuracy(learner: PromptMethod, features: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = predictions(learner, features, learner.ctx.detach().unsqueeze(0))[0]
    return 100.0 * float((predicted == labels).float().mean())


def _correct_counter(learner: PromptMethod, images: torch.Tensor, labels: torch.Tensor, ranks: Ranks = SINGLE_PROCESS):
    """PAN's pre-inference: batch samples each ctx variant classifies right [K], in batched text passes
    (CoCoOp: each image's prompts with the meta-net's shift applied to the variant).

    A batch sharded across ranks is counted whole: each rank's counts are summed over the ranks."""

    def count_correct(variants: torch.Tensor) -> torch.Tensor:
        scores = learner.similarities(images, variants)  # [K, B, n_cls]
        return ranks.all_reduce_sum((scores.argmax(dim=-1) == labels).sum(dim=-1))  # [K]

    return count_correct


class _Diverged(Exception):
    """Training produced a non-finite value; the message names what ("loss is"), the trainer makes it one line."""


def _check_finite(checks: dict[str, bool]) -> None:
    """Raise _Diverged naming the first of `checks` (what -> is finite) that failed."""
    for what, finite in checks.items():
        if not finite:
            raise _Diverged(what)


def _check_prompt(ctx: torch.Tensor, norms: list[float]) -> None:
    """A prompt can stay finite while its norms overflow fp32 (entries beyond ~1e19): that run diverged too.

    Every entry of ctx enters one norm, so finite norms mean a finite prompt: only a failure looks at ctx."""
    if not all(map(math.isfinite, norms)):
        raise _Diverged("prompt is" if not bool(torch.isfinite(ctx).all()) else "prompt's norms are")


@dataclasses.dataclass
class _Stepper:
    """One optimisation step on a batch of image features; returns the step's metrics row.

    Under torchrun with one run (batch sharding) each rank holds a shard of the global batch of
    `batch_size` images: its loss is its share of the global mean, ctx's gradient is summed over
    the ranks, so every rank takes the step one process would take on the whole batch. The run's
    penalties (`config.penalty`) add their parts to the loss and may then edit the gradients.
    """

    config: TrainConfig
    learner: PromptMethod
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    ranks: Ranks = SINGLE_PROCESS
    penalties: list[PenaltyTerm] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        names = penalty_names(self.config.penalty)
        self.penalties = [PENALTIES[name].build(self.config, self.learner) for name in names]

    @contextlib.contextmanager
    def _batch_shared(self) -> Iterator[None]:
        """During a step of a sharded batch, a learner that takes a `batch_sum` (PLOT's Sinkhorn, whose
        stopping rule averages over the batch) sums over the ranks, so it decides as on the whole batch."""
        shares = self.ranks.distributed and hasattr(self.learner, "batch_sum")
        if shares:
            self.learner.batch_sum = self.ranks.all_reduce_sum
        try:
            yield
        finally:
            if shares:
                self.learner.batch_sum = None

    def _sum_gradients(self) -> None:
        """Sharded batch: every trained tensor's gradient summed over the ranks (no-op in one process)."""
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    self.ranks.all_reduce_sum(parameter.grad)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's logits [B, n_cls], and the prompt's text features [n_cls, D] when a penalty reads them
        (from the same text pass)."""
        if any(term.reads_text_features for term in self.penalties):
            return self.learner.logits_and_text_features(images)
        return self.learner.logits(images), None

    def _penalty_parts(self, batch: TrainingStep) -> list[PenaltyPart]:
        return [part for term in self.penalties if (part := term.loss(batch)) is not None]

    def _training_step(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor,
        text_features: torch.Tensor | None,
        epoch: int,
        step: int,
        batch_size: int,
    ) -> TrainingStep:
        """What the penalties read of this step; `batch_size` is the whole batch's, over all ranks."""
        return TrainingStep(
            learner=self.learner,
            images=images,
            labels=labels,
            epoch=epoch,
            epochs=self.config.epochs,
            count_correct=_correct_counter(self.learner, images, labels, self.ranks),
            random=lambda purpose: generator(self.config.seed, purpose, step),
            logits=logits,
            text_features=text_features,
            batch_size=batch_size,
            sum_over_ranks=self.ranks.all_reduce_sum,
        )

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        editors = [term for term in self.penalties if term.edits_gradients]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self._sum_gradients()
            if editors:
                self.scaler.unscale_(self.optimizer)  # edits see true gradients; step then skips unscaling
            for term in editors:
                term.after_backward(self.learner)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._sum_gradients()
            for term in editors:
                term.after_backward(self.learner)
            self.optimizer.step()

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int, lr: float, batch_size: int
    ) -> dict:
        learner, ranks = self.learner, self.ranks
        logs = {"norm_loss": 0.0, "alpha": [0.0] * learner.n_ctx}  # a penalty's logs replace these
        with self._batch_shared(), autocast_policy(self.device, training=self.config.precision).context():
            logits, text_features = self._forward(images)  # [B, n_cls], [n_cls, D] or None
            if ranks.distributed:
                cross_entropy = F.cross_entropy(logits, labels, reduction="sum") / batch_size  # this shard's part
            else:
                cross_entropy = F.cross_entropy(logits, labels)
            loss, penalty_value = cross_entropy, 0.0
            batch = self._training_step(images, labels, logits, text_features, epoch, step, batch_size)
            parts = self._penalty_parts(batch)
            if parts:
                penalty = sum(part.value for part in parts)  # 0 + x is x: one penalty adds exactly as before
                # Every rank holds the same penalty: its gradient once in the sum over ranks.
                loss = cross_entropy + (penalty / ranks.world_size if ranks.distributed else penalty)
                penalty_value = float(penalty.detach())
                for part in parts:
                    logs.update(part.logs)
        self._backward_and_step(loss)
        norms, _, _ = _norm_summary(learner.ctx)
        correct = (logits.argmax(dim=-1) == labels).sum().float()
        non_finite_logits = (~torch.isfinite(logits.detach())).sum().float()
        # Summed over the ranks, so every rank of a sharded batch sees the same values and stops together.
        summed = ranks.all_reduce_sum(torch.stack([cross_entropy.detach().float(), correct, non_finite_logits]))
        _check_finite(
            {
                "logits are": float(summed[2]) == 0,
                "loss is": math.isfinite(float(summed[0])) and math.isfinite(penalty_value),
            }
        )
        _check_prompt(learner.ctx, norms)
        return {
            "kind": "step",
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "ce_loss": float(summed[0]),
            "norm_loss": logs["norm_loss"],
            "train_acc": 100.0 * float(summed[1]) / batch_size,
            "norms": norms,
            "alpha": logs["alpha"],
            **{key: value for key, value in logs.items() if key not in ("norm_loss", "alpha")},  # other penalties'
        }


def _metadata(config: TrainConfig, backbone: Backbone, data: Dataset, epoch: int) -> PromptMetadata:
    return PromptMetadata(
        model=config.model,
        pretrained=config.pretrained,
        weights_id=backbone.weights_id,
        activation=backbone.activation.value,
        classnames=list(data.classnames),
        dataset=config.dataset,
        shots=config.shots,
        seed=config.seed,
        subsample=config.subsample,
        prompt_method=config.prompt_method,
        prompt_config=dataclasses.asdict(config.prompt_config()),
        penalty=config.penalty,
        penalty_config=penalty_settings(config),
        epoch=epoch,
    )


def trained_parameters(learner: PromptMethod) -> dict[str, torch.nn.Parameter]:
    """What training updates, by name: ctx and the learner's other tensors, or what the learner's optional
    `trained_parameters()` says (prefix tuning's reparameterisation: an embedding and an MLP that give ctx)."""
    if hasattr(learner, "trained_parameters"):
        return learner.trained_parameters()
    return {CTX_TENSOR: learner.ctx, **learner.extra_parameters()}


def _extra_state(parameters: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """The learner's parameters besides ctx and their SGD momenta, for the resume state."""
    tensors = {}
    for name, parameter in parameters.items():
        if name == "ctx":
            continue  # saved as the state's own ctx and momentum
        tensors[f"param:{name}"] = parameter.detach()
        momentum = optimizer.state.get(parameter, {}).get("momentum_buffer")
        if momentum is not None:
            tensors[f"momentum:{name}"] = momentum
    return tensors


def _restore_extra(parameters: dict, optimizer: torch.optim.Optimizer, tensors: dict, device: torch.device) -> None:
    for name, parameter in parameters.items():
        if f"param:{name}" in tensors:
            with torch.no_grad():
                parameter.copy_(tensors[f"param:{name}"].to(device))
        if f"momentum:{name}" in tensors:
            optimizer.state[parameter]["momentum_buffer"] = tensors[f"momentum:{name}"].to(device, parameter.dtype)


# ---------------------------------------------------------------------------------------------
# The phases of a run, in the order `train` takes them


def _check_and_resolve(
    config: TrainConfig, out_dir: Path, resume: bool, ranks: Ranks, checked: bool = False
) -> tuple[Dataset, torch.device]:
    """Every check that can refuse the run before anything is built or written (the folder, the config and
    data, the ranks sharing a batch); returns the training data and this process's device. A run a grid
    planned (`checked`) had its folder checked then; its data is loaded here, as training needs it."""
    if not checked:
        check_run_folder(out_dir, config, resume)
    data = check_config(config)
    if ranks.distributed and min(config.batch_size, len(data.train)) < ranks.world_size:
        raise NemesisError(
            f"{ranks.world_size} ranks share each batch of {plural(min(config.batch_size, len(data.train)), 'image')}; "
            "use fewer ranks or a larger --batch-size"
        )
    ranks.barrier()  # every rank has checked the folder before rank 0 writes into it
    device = torch.device(resolve_device(rank_device(ranks, config.device)))
    return data, device


def _restore_or_seed(config: TrainConfig, out_dir: Path, resume: bool) -> RunState | None:
    """Seed the global generators from the run's seed; return the state a resume continues from (None: a
    fresh run), whose loading restores the generators as they were saved. Refused when config.json was
    edited after the state was saved."""
    # Only for code outside this module that draws from the global generators; a resumed run restores them.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    state_path = out_dir / RUN_STATE
    state = load_state(state_path) if resume and state_path.is_file() else None
    config_digest = _config_digest(config)
    if state is not None and state.extra.get("config", config_digest) != config_digest:
        raise NemesisError(
            f"{out_dir / RUN_CONFIG} was changed after the run saved its state; restore it, or delete {out_dir} "
            "and rerun"
        )
    return state


def _load_models(
    config: TrainConfig, data: Dataset, device: torch.device, backbones: dict
) -> tuple[Backbone, PromptMethod]:
    """The fp32 backbone (loaded once per model in `backbones`) and the learner, whose text passes run on
    the backbone of the run's precision."""
    key = (config.model, config.pretrained, config.activation)
    if key not in backbones:
        backbones[key] = load_clip(config.model, config.pretrained, device=device, activation=config.activation)
    backbone = backbones[key]
    learner = build_learner(
        config.prompt_method,
        _text_backbone(config, backbone, backbones),
        data.classnames,
        **dataclasses.asdict(config.prompt_config()),
        seed=config.seed,
    )
    return backbone, learner


@dataclasses.dataclass
class _RunFolder:
    """The run folder as this process sees it: whether it writes there, and what a diverged run undoes."""

    path: Path
    writes: bool  # under torchrun, rank 0 alone writes the run folder
    created: bool  # a run that fails before its first epoch leaves no folder it created
    # An empty folder given for a fresh run holds only what this run writes: a diverged run empties it again.
    emptied: bool

    @classmethod
    def prepare(
        cls, out_dir: Path, config: TrainConfig, state: RunState | None, resume: bool, writes: bool
    ) -> _RunFolder:
        """Make the folder ready: temporary files of killed writes removed, config.json written, metrics.jsonl
        and (on resume) log.txt cut back to the finished epochs."""
        created = not out_dir.exists()
        emptied = not created and state is None and not any(out_dir.iterdir())
        finished_metrics = read_finished_metrics(out_dir / RUN_METRICS, state.epoch if state else 0)
        if writes:
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_orphans(out_dir)  # temporary files of writes a kill interrupted
            if (out_dir / RUN_CHECKPOINTS).is_dir():
                remove_orphans(out_dir / RUN_CHECKPOINTS)
            if resume or not (out_dir / RUN_CONFIG).is_file():  # a resumed run records what it continues with
                write_text_atomic(out_dir / RUN_CONFIG, json.dumps(config.to_json(), indent=2) + "\n")
            write_text_atomic(out_dir / RUN_METRICS, finished_metrics)
            if state is not None:  # drop the log lines of an epoch or result block a kill cut short
                write_text_atomic(out_dir / RUN_LOG, read_finished_log(out_dir / RUN_LOG, state.epoch))
        return cls(out_dir, writes, created, emptied)

    def clear_diverged(self) -> None:
        """A diverged run leaves no folder it created, and an empty folder given for it empty again."""
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.emptied and self.writes:
            for entry in self.path.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _open_reporter(config: TrainConfig, folder: _RunFolder, state: RunState | None) -> Reporter:
    """The live logs (`config.report_to`) of the run, written where the folder is (rank 0 alone); a
    resumed run's logs continue after its saved step."""
    names = config.reporters if folder.writes else ()
    return open_reporter(names, folder.path, state.step if state is not None else 0, config.to_json())


@dataclasses.dataclass
class _Optimiser:
    """What training updates, by checkpoint name (ctx and the learner's other tensors), SGD over it, and the
    loss scaler of fp16 autocast; saved in and restored from the resume state."""

    learner: PromptMethod
    parameters: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None

    @classmethod
    def create(cls, config: TrainConfig, learner: PromptMethod, device: torch.device) -> _Optimiser:
        parameters = trained_parameters(learner)
        _hold_in_precision(config, parameters)
        optimizer = torch.optim.SGD(
            list(parameters.values()), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        scaler = None
        if autocast_policy(device, training=config.precision).scales_loss:
            scaler = torch.amp.GradScaler("cuda")
        return cls(learner, parameters, optimizer, scaler)

    def restore(self, state: RunState, device: torch.device) -> None:
        """The learned tensors, their SGD momenta and the loss scale as `state` saved them."""
        learner, optimizer = self.learner, self.optimizer
        if CTX_TENSOR in self.parameters:  # else ctx is computed from what is restored below (reparameterised)
            with torch.no_grad():
                learner.ctx.copy_(state.ctx.to(device))
            if state.momentum is not None:  # saved as fp32: back in the parameter's precision
                optimizer.state[learner.ctx]["momentum_buffer"] = state.momentum.to(device, learner.ctx.dtype)
        _restore_extra(self.parameters, optimizer, state.tensors, device)
        if self.scaler is not None and state.extra.get("scaler"):
            self.scaler.load_state_dict(state.extra["scaler"])

    def state(self, epoch: int, step: int, config_digest: str) -> RunState:
        """The resume state after `epoch` finished epochs and `step` steps."""
        ctx = self.parameters.get(CTX_TENSOR)
        momentum = None if ctx is None else self.optimizer.state.get(ctx, {}).get("momentum_buffer")
        extra = {"scaler": self.scaler.state_dict() if self.scaler is not None else None, "config": config_digest}
        tensors = _extra_state(self.parameters, self.optimizer)
        return RunState(epoch, step, self.learner.ctx.detach(), momentum, extra, tensors)


@dataclasses.dataclass
class _Run:
    """A run being trained, handed from phase to phase: its data and models, folder, journal and step count."""

    config: TrainConfig
    data: Dataset
    backbone: Backbone  # the fp32 model: image features and the prompt's metadata
    device: torch.device
    ranks: Ranks
    folder: _RunFolder
    journal: Journal
    optimiser: _Optimiser
    step: int = 0  # steps taken, over all epochs

    def __post_init__(self) -> None:
        optimiser = self.optimiser
        self.stepper = _Stepper(
            self.config, optimiser.learner, optimiser.optimizer, optimiser.scaler, self.device, self.ranks
        )

    @property
    def learner(self) -> PromptMethod:
        return self.optimiser.learner

    def resume(self, state: RunState) -> int:
        """Continue after the state's epoch: tensors, momenta and step restored; returns the epoch to start at."""
        self.optimiser.restore(state, self.device)
        start_epoch, self.step = state.epoch, state.step
        self.journal.say(f"resumed after epoch {start_epoch} (step {self.step})", show=True)
        return start_epoch

    def announce(self) -> int:
        """Start a fresh run's log: what is trained on what, and the config; returns the epoch to start at, 0."""
        config, data, backbone = self.config, self.data, self.backbone
        device, ranks, journal = self.device, self.ranks, self.journal
        if self.folder.writes:
            (self.folder.path / RUN_LOG).write_text("", encoding="utf-8")
        journal.say(
            f"nemesis train: {config.method_name} on {config.dataset} "
            f"({plural(len(data.classnames), 'class', 'classes')}, "
            f"{plural(len(data.train), 'training image')}), {plural(config.shots, 'shot')}, "
            f"seed {config.seed}, {config.model} ({config.pretrained or 'random weights'}, "
            f"{backbone.activation.value}), {plural(config.epochs, 'epoch')}, device {device}"
            + (f", each batch sharded over {ranks.world_size} ranks" if ranks.distributed else ""),
            show=True,
        )
        journal.say(f"config: {json.dumps(config.to_json())}")
        return 0


@dataclasses.dataclass
class _Features:
    """The image features a run reads: each step's training batch, and the test split's."""

    train: TrainFeatures
    test: Features  # [N, D], or [N, T, D] for a learner of local features (streamed from disk when large)
    test_labels: torch.Tensor  # [N]

    @classmethod
    def encode(cls, run: _Run, progress: bool) -> _Features:
        config, backbone, data, device = run.config, run.backbone, run.data, run.device
        inputs = run.learner.image_inputs[0]  # which kind of image features the learner takes
        features = TrainFeatures(config, backbone, data, device, inputs)
        test_features, test_labels = encode_split(
            backbone, data, "test", cache_dir=config.cache_dir, device=device, progress=progress, inputs=inputs
        )
        return cls(features, test_features.to(device), test_labels.to(device))


def _train_epoch(run: _Run, features: TrainFeatures, epoch: int) -> tuple[float, _NormSummary]:
    """The steps of 0-based `epoch` at its learning rate, a metrics row each; returns the lr and ctx's norm
    summary. A diverged run undoes its folder and stops with one line."""
    config, learner, ranks, journal = run.config, run.learner, run.ranks, run.journal
    lr = learning_rate(config, epoch)
    for group in run.optimiser.optimizer.param_groups:
        group["lr"] = lr
    batches = epoch_batches(len(features), config.batch_size, config.seed, epoch)
    sizes = [len(indices) for indices in batches]
    shards = [indices[ranks.rank :: ranks.world_size] for indices in batches]  # whole batches in one process
    try:
        for (images, labels), size in zip(features.batches(epoch, shards), sizes, strict=True):
            run.step += 1
            journal.rows.append(run.stepper(images, labels, epoch, run.step, lr, size))
        norms, mean_norm, fro_norm = _norm_summary(learner.ctx)
        _check_prompt(learner.ctx, [*norms, mean_norm, fro_norm])
    except _Diverged as diverged:
        folder = run.folder
        folder.clear_diverged()
        raise NemesisError(
            f"training diverged in epoch {epoch + 1}: the {diverged} no longer finite (lr {config.lr:g}); "
            "lower --lr"
            + ("" if folder.created or folder.emptied else f" (the run in {folder.path} stays at its last saved epoch)")
        ) from None
    return lr, (norms, mean_norm, fro_norm)


def _log_epoch(run: _Run, features: _Features, done: int, lr: float, summary: _NormSummary) -> str:
    """After epoch `done`: the test accuracy when due (every eval_every epochs and after the last), the
    epoch's metrics row and log line, written with the epoch's step rows. Returns the accuracy as shown."""
    config, journal = run.config, run.journal
    norms, mean_norm, fro_norm = summary
    test_accuracy = None
    if done == config.epochs or (config.eval_every and done % config.eval_every == 0):
        test_accuracy = _test_accuracy(run.learner, features.test, features.test_labels)
    journal.rows.append(
        {
            "kind": "epoch",
            "epoch": done,
            "test_acc": test_accuracy,
            "norms": norms,
            "mean_norm": mean_norm,
            "fro_norm": fro_norm,
        }
    )
    steps = [row for row in journal.rows if row["kind"] == "step"]
    loss = sum(row["ce_loss"] + row["norm_loss"] for row in steps) / max(1, len(steps))
    shown = "" if test_accuracy is None else f" test_acc {test_accuracy:.2f}"
    journal.say(f"epoch [{done}/{config.epochs}] lr {lr:.4e} loss {loss:.4f}{shown} mean_norm {mean_norm:.4f}")
    journal.flush_rows()
    return shown


def _save_epoch(run: _Run, done: int) -> None:
    """After epoch `done`: a checkpoint every save_every epochs, and the resume state (rank 0 alone writes)."""
    if not run.folder.writes:
        return
    config, backbone, data, learner, out_dir = run.config, run.backbone, run.data, run.learner, run.folder.path
    if config.save_every and done % config.save_every == 0:
        (out_dir / RUN_CHECKPOINTS).mkdir(exist_ok=True)
        checkpoint = out_dir / RUN_CHECKPOINTS / f"epoch-{done:04d}.safetensors"
        save_prompt(
            checkpoint,
            learner.ctx.detach(),
            _metadata(config, backbone, data, done),
            learner.extra_parameters(),
        )
    save_state(out_dir / RUN_STATE, run.optimiser.state(done, run.step, _config_digest(config)))


def _train_epochs(
    run: _Run, features: _Features, start_epoch: int, progress: bool, on_epoch_end: Callable[[int], None] | None
) -> None:
    """The epoch loop from `start_epoch`: train, log and save each epoch, under a progress bar."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with progress_bar(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("training", total=run.config.epochs, completed=start_epoch)
        for epoch in range(start_epoch, run.config.epochs):
            lr, summary = _train_epoch(run, features.train, epoch)
            done = epoch + 1
            shown = _log_epoch(run, features, done, lr, summary)
            _save_epoch(run, done)
            bar.update(task, completed=done, description=f"epoch {done}{shown}")
            if on_epoch_end is not None:
                on_epoch_end(done)


def _finish(run: _Run, features: _Features, started: float) -> None:
    """After the last epoch: the final prompt, Dassl's closing lines, CoOp's result block on the test split
    and the time the run took."""
    config, backbone, data, learner, journal = run.config, run.backbone, run.data, run.learner, run.journal
    test_features, test_labels, out_dir = features.test, features.test_labels, run.folder.path
    predicted = predictions(learner, test_features, learner.ctx.detach().unsqueeze(0))[0]
    total, correct = len(test_labels), int((predicted == test_labels).sum())
    if run.folder.writes:
        metadata = _metadata(config, backbone, data, config.epochs)
        save_prompt(out_dir / RUN_PROMPT, learner.ctx.detach(), metadata, learner.extra_parameters())
    # Dassl's closing lines, word for word: CoOp's parse_test_res.py reads accuracy after "Finish training".
    for line in DASSL_CLOSING:
        journal.say(line)
    for line in coop_result_block(total, correct, macro_f1(predicted, test_labels)).splitlines():
        journal.say(line, show=True)
    journal.say(f"Elapsed: {datetime.timedelta(seconds=round(time.perf_counter() - started))}")


def train(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    backbones: dict[tuple[str, str | None], Backbone] | None = None,
    ranks: Ranks = SINGLE_PROCESS,
    checked: bool = False,
) -> Path:
    """Train a prompt and write the run folder `out_dir`; return it.

    `resume=True` continues the run saved in `out_dir` (same options) after its last finished epoch.
    `on_epoch_end(epoch)` is called after each epoch's state is saved (tests interrupt runs with it).
    `backbones` ((model, weights) -> Backbone) is reused and filled, so a grid loads each model once.
    With `ranks` of a torchrun job, every rank trains the same run on its shard of each batch and
    rank 0 alone writes the folder. `checked`: the run folder was checked when a grid was planned.
    """
    started = time.perf_counter()
    config = config.resolved()
    out_dir = Path(out_dir)
    data, device = _check_and_resolve(config, out_dir, resume, ranks, checked)
    echo = echo if ranks.is_main else None
    state = _restore_or_seed(config, out_dir, resume)
    if state is not None and state.epoch >= config.epochs and (out_dir / RUN_PROMPT).is_file():
        if echo is not None:
            echo(f"{out_dir} finished its {plural(config.epochs, 'epoch')} before; nothing left to do")
        return out_dir
    backbone, learner = _load_models(config, data, device, {} if backbones is None else backbones)
    folder = _RunFolder.prepare(out_dir, config, state, resume, writes=ranks.is_main)
    journal = Journal(out_dir, echo, write=folder.writes, reporter=_open_reporter(config, folder, state))
    try:
        optimiser = _Optimiser.create(config, learner, device)
        run = _Run(config, data, backbone, device, ranks, folder, journal, optimiser)
        start_epoch = run.resume(state) if state is not None else run.announce()
        features = _Features.encode(run, progress)
        _train_epochs(run, features, start_epoch, progress, on_epoch_end)
        _finish(run, features, started)
    finally:
        journal.close()  # the live logs' files are complete, even when a run stops early
    return out_dir
