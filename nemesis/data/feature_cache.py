"""The image-feature cache: each split is encoded by the frozen image tower once, then read from disk.

A cache entry is one safetensors file holding `features` (float32, not normalised) and `labels` [N]
(int64), written a batch at a time as the images are encoded (`feature_store`). An entry larger than
`RESIDENT_LIMIT_BYTES` (ImageNet's test split as local features) is not read whole: it comes back as
`StoredFeatures`, which evaluation walks a block of images at a time. The features are of one kind
(`inputs`): pooled [N, D], or local [N, T, D], one per image token (`nemesis.model.local_features`).
Local features stay float32 too: stored as float16 they move logits at logit scale 100 by more than
PLOT's 1e-3 tolerance. An entry's key is the sha256 of
everything that decides the numbers: model name, weights identity, preprocessing, precision, dataset,
split, the exact sample list, the kind when it is not pooled, and for augmented training views the
view index and seed. Any change gives a new key, never a stale hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError
from safetensors.torch import safe_open

from ..atomic import file_lock
from ..checksum import tensors_sha256
from ..constants import LOCAL_FEATURES, PATCH_TOKENS, POOLED_FEATURES, cache_root
from ..errors import NemesisError
from ..model.local_features import check_local_features, local_image_features
from ..model.vision_prompts import check_vision_prompts, patch_embeddings
from ..precision import autocast_policy
from ..progress import progress_bar
from ..wording import plural
from .augmentation import CROP_SCALE, augment, train_augmentation_description, view_rng
from .datasets import Dataset, Sample, missing_files
from .feature_store import (
    CHECKSUM_KEY,
    FEATURES,
    LABELS,
    EntryWriter,
    StoredFeatures,
    entry_layout,
    file_checksum,
    read_labels,
    stored_features,
    write_entry,
)

CACHE_FORMAT_VERSION = 1
# Entries whose features take more bytes are streamed from disk instead of read whole (a test split of
# about 10,000 images as RN50 local features; ImageNet's 50,000 are 10 GB).
RESIDENT_LIMIT_BYTES = 2 * 2**30
LOCKS_FOLDER = ".locks"  # beside the entries: one lock file per entry, so one process encodes it
# Images pushed through the image encoder by this process; tests assert a cache hit encodes none.
encoded_images = 0

# Turns an image and its position in the sample list into tensors [V, 3, H, W], one per view.
ImageTransform = Callable[[Image.Image, int], torch.Tensor]
# Features [B, ...] of a batch of preprocessed images [B, 3, H, W], from a backbone.
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]


def image_encoder(backbone, inputs: str = POOLED_FEATURES) -> ImageEncoder:
    """The backbone's encoder of one kind of image input: pooled [B, D] or local [B, T, D] features.

    An image tower without local features is refused here, before any image is encoded."""
    model = backbone.model
    if inputs == POOLED_FEATURES:
        return model.encode_image
    if inputs == LOCAL_FEATURES:
        check_local_features(model, backbone.name)
        return lambda images: local_image_features(model, images, backbone.name)
    if inputs == PATCH_TOKENS:
        check_vision_prompts(model.visual, backbone.name)
        return lambda images: patch_embeddings(model.visual, images)
    known = ", ".join((POOLED_FEATURES, LOCAL_FEATURES, PATCH_TOKENS))
    raise NemesisError(f"unknown image input '{inputs}' (known: {known})")


def default_cache_dir() -> Path:
    """$NEMESIS_CACHE/features, else ~/.cache/nemesis/features."""
    return cache_root() / "features"


def _precision(device: torch.device) -> str:
    return "amp-fp16" if device.type == "cuda" else "fp32"


def feature_key(
    backbone,
    dataset_name: str,
    split: str,
    samples: list[Sample],
    preprocessing: str,
    precision: str,
    view: int | None = None,
    seed: int | None = None,
    inputs: str = POOLED_FEATURES,
) -> str:
    """sha256 over everything that decides the cached numbers."""
    material = {
        "version": CACHE_FORMAT_VERSION,
        "model": backbone.name,
        "weights": backbone.weights_id,
        "preprocessing": preprocessing,
        "precision": precision,
        "dataset": dataset_name,
        "split": split,
        "view": view,
        "seed": seed,
        "samples": [[sample.path, sample.label] for sample in samples],
    }
    if inputs != POOLED_FEATURES:  # pooled keys stay as they were before local features, so old entries still hit
        material["inputs"] = inputs
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()


def cache_file(cache_dir: Path, dataset_name: str, split: str, key: str, view: int | None = None) -> Path:
    view_part = "" if view is None else f"-view{view}"
    return cache_dir / f"{dataset_name}-{split}{view_part}-{key}.safetensors"


def _lock_file(entry: Path) -> Path:
    """The lock of one cache entry, in the cache's `.locks/` (a lock file stays: removing it would split the lock)."""
    folder = entry.parent / LOCKS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{entry.name}.lock"


Features = torch.Tensor | StoredFeatures  # what a cache read gives: the tensor, or the entry to stream


def _read_entry(path: Path, samples: list[Sample], stream: bool = True) -> Features | None:
    """Cached features of `path`, or None when absent or unreadable (then they are encoded again).
    With `stream`, an entry above `RESIDENT_LIMIT_BYTES` comes back as `StoredFeatures`."""
    if not path.is_file():
        return None
    stored = stored_features(path)
    if stream and stored is not None and len(stored) * stored.row_bytes > RESIDENT_LIMIT_BYTES:
        return stored if _stored_entry_is_sound(path, samples) else None
    try:
        with safe_open(str(path), framework="pt") as file:
            checksum = (file.metadata() or {}).get(CHECKSUM_KEY)
            # Copied out of the file's memory map: a later change to the file must not change them.
            tensors = {key: file.get_tensor(key).clone() for key in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError):
        return None
    if checksum != tensors_sha256(tensors):
        return None  # damaged (a flipped bit, a zeroed block) or written without a checksum: encoded again
    features, labels = tensors.get(FEATURES), tensors.get(LABELS)
    if features is None or labels is None or len(features) != len(samples) or not torch.equal(labels, _labels(samples)):
        return None
    return features


# Streamed entries whose checksum this process has checked: (path, size, modification time). A sweep
# evaluates many prompts on one test split; its gigabytes are read through once, not once a prompt.
_checked_entries: set[tuple[str, int, int]] = set()


def _file_identity(path: Path) -> tuple[str, int, int]:
    status = path.stat()
    return str(path.resolve()), status.st_size, status.st_mtime_ns


def _stored_entry_is_sound(path: Path, samples: list[Sample]) -> bool:
    """A streamed entry's checksum (read through a block at a time) and labels, as `_read_entry` checks them."""
    identity = _file_identity(path)
    if identity not in _checked_entries:
        layout = entry_layout(path)
        recorded = (layout[0].get("__metadata__") or {}).get(CHECKSUM_KEY) if layout else None
        if recorded is None or recorded != file_checksum(path):
            return False
        _checked_entries.add(identity)
    labels = read_labels(path)
    return labels is not None and len(labels) == len(samples) and torch.equal(labels, _labels(samples))


# ---------------------------------------------------------------------------------------------
# Encoding


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, dataset: Dataset, samples: list[Sample], transform: ImageTransform) -> None:
        self.dataset = dataset
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.dataset.open_image(self.samples[index]), index)


def _check_images(dataset: Dataset, samples: list[Sample]) -> None:
    if dataset.image_loader is not None:
        return
    missing = missing_files(samples)
    if missing:
        shown = ", ".join(missing[:3])
        raise NemesisError(
            f"{len(missing)} image files of '{dataset.name}' are missing ({shown}, ...); "
            f"`nemesis data check --dataset {dataset.name}` lists them"
        )


def _model_device(backbone) -> torch.device:
    return next(backbone.model.parameters()).device


def _encode(
    encoder: ImageEncoder,
    dataset: Dataset,
    samples: list[Sample],
    transform: ImageTransform,
    writers: list[EntryWriter],
    description: str,
    batch_size: int,
    device: torch.device,
    num_workers: int | None,
    progress: bool,
) -> None:
    """Encode `samples`, each image transformed into one tensor per writer (view), and append each
    view's features to its writer batch by batch, so no split is ever held whole."""
    global encoded_images
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    loader = torch.utils.data.DataLoader(
        _ImageList(dataset, samples, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with progress_bar(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=len(samples))
        # Evaluation only: no autograd, and half precision on the GPU.
        with torch.inference_mode(), autocast_policy(device).context():
            for images in loader:  # [B, V, 3, H, W]
                batch, n_views = images.shape[:2]
                flat = images.flatten(0, 1).to(device, non_blocking=True)  # [B * V, 3, H, W]
                features = encoder(flat).float().cpu()  # [B * V, ...]
                features = features.view(batch, n_views, *features.shape[1:])  # [B, V, ...]
                for view, writer in enumerate(writers):
                    writer.append(features[:, view])
                encoded_images += batch * n_views
                bar.advance(task, batch)


def _inputs_summary(inputs: str) -> dict[str, str]:
    """An entry's readable summary names the features' kind when they are not pooled (as its key does)."""
    return {} if inputs == POOLED_FEATURES else {"inputs": inputs}


def _labels(samples: list[Sample]) -> torch.Tensor:
    return torch.tensor([sample.label for sample in samples], dtype=torch.int64)


def encode_split(
    backbone,
    dataset: Dataset,
    split: str,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    inputs: str = POOLED_FEATURES,
    stream: bool = True,
) -> tuple[Features, torch.Tensor]:
    """Features (float32, unnormalised) and labels [N] of a split, encoded once then cached: pooled
    features [N, D], or with `inputs="local"` local features [N, T, D].

    The images go through the backbone's own test preprocessing. Missing image files raise a
    NemesisError before anything is encoded or written. An entry above `RESIDENT_LIMIT_BYTES` comes
    back as `StoredFeatures`, read a block at a time (`evaluation.metrics.predictions` takes either),
    unless `stream` is False.
    """
    encoder = image_encoder(backbone, inputs)
    samples = dataset.split(split)
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise NemesisError(f"--cache-dir {cache_dir} is a file; name a folder for the feature cache")
    device = torch.device(device) if device is not None else _model_device(backbone)
    preprocessing = repr(backbone.preprocess)
    key = feature_key(backbone, dataset.name, split, samples, preprocessing, _precision(device), inputs=inputs)
    path = cache_file(Path(cache_dir) if cache_dir else default_cache_dir(), dataset.name, split, key)
    cached = _read_entry(path, samples, stream)
    if cached is not None:
        return cached, _labels(samples)
    _check_images(dataset, samples)
    # One process encodes an entry; others asking for it meanwhile (torchrun ranks) wait, then read it.
    with file_lock(_lock_file(path)):
        cached = _read_entry(path, samples, stream)
        if cached is not None:
            return cached, _labels(samples)
        transform = _TestTransform(backbone.preprocess)
        description = f"encoding {dataset.name} {split}"
        summary = {"model": backbone.name, "weights": backbone.weights_id, "dataset": dataset.name, "split": split}
        summary.update(_inputs_summary(inputs))
        with write_entry(path, _labels(samples), summary) as writer:
            _encode(
                encoder, dataset, samples, transform, [writer], description, batch_size, device, num_workers, progress
            )
        _checked_entries.add(_file_identity(path))  # its checksum was computed over the bytes as they were written
        written = _read_entry(path, samples, stream)
    if written is None:
        raise NemesisError(f"the feature cache entry {path} could not be read back after it was written")
    return written, _labels(samples)


# ---------------------------------------------------------------------------------------------
# Augmented training views (nemesis.data.augmentation), encoded and cached


# Transforms are small classes, not closures, so DataLoader workers can receive them.
class _TestTransform:
    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Image.Image, index: int) -> torch.Tensor:
        return self.preprocess(image).unsqueeze(0)  # [1, 3, H, W]


class _ViewTransform:
    def __init__(self, size: int, mean: tuple, std: tuple, views: list[int], seed: int, crop_scale: float) -> None:
        self.size, self.mean, self.std, self.views, self.seed = size, mean, std, views, seed
        self.crop_scale = crop_scale

    def __call__(self, image: Image.Image, index: int) -> torch.Tensor:
        return torch.stack(  # [V, 3, size, size]
            [
                augment(image, self.size, self.mean, self.std, view_rng(self.seed, view, index), self.crop_scale)
                for view in self.views
            ]
        )


def encode_train_views(
    backbone,
    dataset: Dataset,
    views: int,
    seed: int = 0,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    crop_scale: float = CROP_SCALE[0],
    inputs: str = POOLED_FEATURES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [views, N, D] (with `inputs="local"`: [views, N, T, D]) of `views` augmented copies of
    each image, and labels [N].

    Each view is cached on its own (its key holds the view index and seed), so asking for more
    views later encodes only the new ones. Images are opened once for all missing views.
    """
    if views < 1:
        raise NemesisError(f"views must be at least 1 (got {views})")
    encoder = image_encoder(backbone, inputs)
    samples = dataset.split(split)
    device = torch.device(device) if device is not None else _model_device(backbone)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    preprocessing = train_augmentation_description(backbone, crop_scale)
    precision = _precision(device)
    paths = [
        cache_file(
            folder,
            dataset.name,
            split,
            feature_key(backbone, dataset.name, split, samples, preprocessing, precision, view, seed, inputs),
            view,
        )
        for view in range(views)
    ]
    found = {view: _read_entry(path, samples, stream=False) for view, path in enumerate(paths)}  # training holds them

    def summary(view: int) -> dict:
        return {"model": backbone.name, "weights": backbone.weights_id, "dataset": dataset.name, "split": split,
                "view": view, "seed": seed, **_inputs_summary(inputs)}  # fmt: skip

    if any(features is None for features in found.values()):
        _check_images(dataset, samples)
        with file_lock(_lock_file(paths[0])):  # as in encode_split: one process encodes, the others wait, then read
            found = {
                view: _read_entry(path, samples, stream=False) if found[view] is None else found[view]
                for view, path in enumerate(paths)
            }
            todo = [view for view, features in found.items() if features is None]
            if todo:
                transform = _ViewTransform(
                    backbone.image_size, backbone.image_mean, backbone.image_std, todo, seed, crop_scale
                )
                description = f"encoding {dataset.name} {split} x{plural(len(todo), 'view')}"
                with contextlib.ExitStack() as entries:  # every view's entry appears, or none
                    writers = [
                        entries.enter_context(write_entry(paths[view], _labels(samples), summary(view)))
                        for view in todo
                    ]
                    _encode(encoder, dataset, samples, transform, writers, description, batch_size, device,
                            num_workers, progress)  # fmt: skip
                for view in todo:
                    found[view] = _read_entry(paths[view], samples, stream=False)
    return torch.stack([found[view] for view in range(views)]), _labels(samples)  # [V, N, ...]
