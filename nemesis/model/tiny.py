"""The embedded default model: the `tiny` open_clip config pretrained by the toolkit on Fashion-MNIST.

`pretrain_tiny` trains the whole tiny CLIP contrastively on Fashion-MNIST's training images paired
with templated captions of their class names ("a photo of a {name}.", ...), from a fixed seed on
one CPU thread, and writes the weights as one safetensors file that open_clip loads with
`create_model_and_transforms("tiny", pretrained=<file>)`. `load_clip("tiny", "fmnist")` asks
`pretrained_tiny_weights()`, which trains once and then reuses the cached file.

Why the pretraining images are shifted: pretrained on the very images and names it is later tested
on, the model's zero-shot classifier is already as good as 16 shots can make it, and prompt tuning
would have nothing to show. Real CLIP is pretrained on web photos that differ from each benchmark;
here the pretraining images are over-exposed (pixel ** gamma), randomly cropped and flipped, so
the un-shifted Fashion-MNIST images are a neighbouring domain: zero-shot accuracy lands near 55-60%
and few-shot CoOp has room to improve on it, as it does on real benchmarks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..choices import Activation
from ..constants import cache_root
from ..data.fashion_mnist import CLASSNAMES, VAL_EVERY, find_fashion_mnist_files, read_idx
from ..errors import NemesisError
from ..progress import progress_bar
from .clip_build import build_backbone
from .clip_models import Backbone
from .text_encoder import TextEncoder

MODEL = "tiny"
TAG = "fmnist"
RECIPE_VERSION = 1
METADATA_KEY = "nemesis_tiny"
ZERO_SHOT_TEMPLATE = "a photo of a {}."
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a photo of the {}.",
    "a low resolution photo of a {}.",
    "a black and white photo of a {}.",
    "a cropped photo of the {}.",
    "an image of a {}.",
    "a product photo of a {}.",
)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_BATCH = 1000


@dataclass(frozen=True)
class TinyRecipe:
    """How the tiny model is pretrained. The defaults give the cached `fmnist` weights."""

    steps: int = 400  # optimisation steps
    batch_size: int = 256  # images (and captions) per step
    lr: float = 2e-3  # AdamW peak learning rate, cosine-annealed after a linear warm-up
    warmup_steps: int = 40  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW weight decay on weight matrices (not embeddings, norms, biases)
    exposure_gamma: float = 0.3  # pretraining images are shown as pixel ** gamma: the domain gap
    crop_scale: float = 0.08  # smallest area of the random resized crop (CLIP-style augmentation)
    flip: float = 0.5  # horizontal-flip probability
    seed: int = 0  # seeds the batches, templates and augmentation (initial weights: load_clip's fixed seed)
    threads: int = 1  # CPU threads: tiny ops gain little from more, and one keeps results bit-identical


@dataclass
class TinyResult:
    path: Path
    zero_shot_accuracy: float  # percent, Fashion-MNIST test split, prompt ZERO_SHOT_TEMPLATE
    seconds: float  # time spent pretraining and evaluating
    recipe: TinyRecipe


def weights_path(recipe: TinyRecipe = TinyRecipe()) -> Path:
    """The cache file of `recipe`: <cache>/models/tiny-fmnist-v1[-<recipe hash>].safetensors."""
    name = f"{MODEL}-{TAG}-v{RECIPE_VERSION}"
    if recipe != TinyRecipe():
        name += "-" + hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / "models" / f"{name}.safetensors"


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _images() -> dict[str, torch.Tensor]:
    """Fashion-MNIST as uint8 tensors: train images/labels (the `train` split, val carved out) and test."""
    arrays = {key: read_idx(path) for key, path in find_fashion_mnist_files().items()}
    in_train = np.arange(len(arrays["train-labels"])) % VAL_EVERY != VAL_EVERY - 1
    return {
        "train": torch.from_numpy(arrays["train-images"][in_train].copy()),  # [N, 28, 28]
        "train_labels": torch.from_numpy(arrays["train-labels"][in_train].astype(np.int64)),
        "test": torch.from_numpy(arrays["test-images"].copy()),
        "test_labels": torch.from_numpy(arrays["test-labels"].astype(np.int64)),
    }


def _normalize(pixels: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    """Grey pixels in [0, 1] [B, 28, 28] -> model input [B, 3, 28, 28], as the model's preprocessing does."""
    mean = torch.tensor(backbone.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.image_std).view(1, 3, 1, 1)
    return (pixels.unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std


def _pretraining_view(pixels: torch.Tensor, recipe: TinyRecipe, rng: torch.Generator) -> torch.Tensor:
    """The shifted domain: over-exposed, randomly resized-cropped and flipped copies of `pixels` [B, H, W]."""
    batch = len(pixels)
    pixels = pixels.float().div(255).pow(recipe.exposure_gamma)
    area = recipe.crop_scale + (1 - recipe.crop_scale) * torch.rand(batch, generator=rng)
    log_ratio = (torch.rand(batch, generator=rng) * 2 - 1) * math.log(CROP_RATIO[1])
    width = (area * log_ratio.exp()).sqrt().clamp(max=1)  # of the crop, as a share of the image
    height = (area / log_ratio.exp()).sqrt().clamp(max=1)
    flip = torch.where(torch.rand(batch, generator=rng) < recipe.flip, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)  # affine map output -> input grid, in [-1, 1] coordinates
    theta[:, 0, 0] = width * flip
    theta[:, 1, 1] = height
    theta[:, 0, 2] = (torch.rand(batch, generator=rng) * 2 - 1) * (1 - width)
    theta[:, 1, 2] = (torch.rand(batch, generator=rng) * 2 - 1) * (1 - height)
    grid = F.affine_grid(theta, [batch, 1, *pixels.shape[1:]], align_corners=False)
    return F.grid_sample(pixels.unsqueeze(1), grid, mode="bilinear", align_corners=False)[:, 0]


def _contrastive_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor):
    """CLIP's symmetric loss where every pair with the same class counts as a positive (captions repeat)."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T  # [B, B]
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
    per_image = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    per_text = -(targets * logits.log_softmax(dim=0)).sum(dim=0).mean()
    return (per_image + per_text) / 2


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decayed, kept = [], []
    for name, parameter in model.named_parameters():
        (decayed if parameter.dim() >= 2 and "embedding" not in name else kept).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]


def zero_shot_accuracy(backbone: Backbone, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of `images` (uint8 [N, 28, 28]) classified right with the prompt ZERO_SHOT_TEMPLATE."""
    model = backbone.model
    with torch.no_grad():
        text = model.encode_text(backbone.tokenizer([ZERO_SHOT_TEMPLATE.format(name) for name in CLASSNAMES]))
        text = F.normalize(text, dim=-1)  # [n_cls, D]
        correct = 0
        for start in range(0, len(images), EVAL_BATCH):
            pixels = _normalize(images[start : start + EVAL_BATCH].float() / 255, backbone)
            predicted = (F.normalize(model.encode_image(pixels), dim=-1) @ text.T).argmax(dim=-1)
            correct += int((predicted == labels[start : start + EVAL_BATCH]).sum())
    return 100.0 * correct / len(images)


def pretrain_tiny(
    recipe: TinyRecipe = TinyRecipe(), out: str | Path | None = None, progress: bool = True
) -> TinyResult:
    """Pretrain the tiny CLIP on Fashion-MNIST; write its weights to `out` (default: the cache) atomically."""
    path = Path(out) if out is not None else weights_path(recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _threads(recipe.threads):
        data = _images()
        # random weights drawn from a fixed seed, as `load_clip(MODEL)` builds them (GELU: tiny.json's own)
        backbone = build_backbone(MODEL, None, Activation.gelu)
        model = backbone.model.train()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / 0.07))
        encoder = TextEncoder(model, MODEL, backbone.tokenizer)
        captions = backbone.tokenizer([template.format(name) for template in TEMPLATES for name in CLASSNAMES])
        pool_index = encoder.pool_index(captions)  # caption t * n_cls + c: template t, class c
        optimizer = torch.optim.AdamW(
            _parameter_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6
        )
        rng = torch.Generator().manual_seed(recipe.seed)
        n_classes = len(CLASSNAMES)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with progress_bar(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task("pretraining tiny on Fashion-MNIST", total=recipe.steps)
            for step in range(recipe.steps):
                warmup = min(1.0, (step + 1) / max(1, recipe.warmup_steps))
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr * warmup * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
                chosen = torch.randint(len(data["train"]), (recipe.batch_size,), generator=rng)
                labels = data["train_labels"][chosen]
                templates = torch.randint(len(TEMPLATES), (recipe.batch_size,), generator=rng)
                pixels = _normalize(_pretraining_view(data["train"][chosen], recipe, rng), backbone)
                # All captions in one cut text pass; each image takes its template's caption of its class.
                text = encoder(model.token_embedding(captions), pool_index)  # [T * n_cls, D]
                loss = _contrastive_loss(
                    model.encode_image(pixels),
                    text[templates * n_classes + labels],
                    labels,
                    model.logit_scale.exp(),
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                bar.advance(task)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        accuracy = zero_shot_accuracy(backbone, data["test"], data["test_labels"])
    seconds = time.perf_counter() - started
    info = {
        "model": MODEL,
        "tag": TAG,
        "recipe_version": RECIPE_VERSION,
        "recipe": asdict(recipe),
        "zero_shot_accuracy": accuracy,
        "zero_shot_template": ZERO_SHOT_TEMPLATE,
    }  # no timings: the file is a function of the recipe, so its hash (the weights identity) is too
    tensors = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(info)})
    return TinyResult(path, accuracy, seconds, recipe)


def read_tiny_info(path: str | Path) -> dict:
    """What a tiny weights file says about itself: its recipe and zero-shot accuracy."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return json.loads((file.metadata() or {})[METADATA_KEY])
    except Exception as error:
        raise NemesisError(f"{path} is not a tiny weights file written by `nemesis pretrain-tiny` ({error})") from error


def pretrained_tiny_weights(progress: bool = True) -> Path:
    """The cached `fmnist` weights of the tiny model, pretrained on the first call (about a minute)."""
    path = weights_path()
    if path.is_file():
        return path
    return pretrain_tiny(progress=progress).path
