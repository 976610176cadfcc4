"""CoOp's training augmentation: a random resized crop and a horizontal flip, drawn from a seeded
`random.Random`, so a view is fixed by (seed, view, image) and not by batching.

Training applies it live each epoch, or the feature cache stores K augmented views once
(`nemesis.data.feature_cache.encode_train_views`).
"""

from __future__ import annotations

import math
import random

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

# CoOp's train augmentation: RandomResizedCrop(scale 0.08-1, bicubic) + horizontal flip. The smallest
# crop area is Dassl's INPUT.RRCROP_SCALE[0], an option of training (`crop_scale`).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_PROBABILITY = 0.5


def _crop_box(
    width: int, height: int, rng: random.Random, crop_scale: float = CROP_SCALE[0]
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering `crop_scale`-100% of the area, aspect 3/4-4/3."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(crop_scale, CROP_SCALE[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width), crop_height, crop_width
    # No fitting box drawn: the largest central crop with an allowed aspect.
    aspect = min(max(width / height, CROP_RATIO[0]), CROP_RATIO[1])
    crop_width = min(width, round(height * aspect))
    crop_height = min(height, round(crop_width / aspect))
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def train_augmentation_description(backbone, crop_scale: float = CROP_SCALE[0]) -> str:
    """The augmentation as written into cache keys (unchanged for CoOp's crop, so old entries stay valid)."""
    scale = (crop_scale, CROP_SCALE[1])
    return (
        f"coop-train(RandomResizedCrop({backbone.image_size}, scale={scale}, ratio=(3/4, 4/3), bicubic), "
        f"HorizontalFlip({FLIP_PROBABILITY}), Normalize(mean={tuple(backbone.image_mean)}, "
        f"std={tuple(backbone.image_std)}))"
    )


def augment(
    image: Image.Image,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    rng: random.Random,
    crop_scale: float = CROP_SCALE[0],
) -> torch.Tensor:
    """CoOp's train augmentation of one image with the random numbers of `rng`: tensor [3, size, size]."""
    top, left, height, width = _crop_box(image.width, image.height, rng, crop_scale)
    image = TF.resized_crop(image, top, left, height, width, [size, size], InterpolationMode.BICUBIC, antialias=True)
    if rng.random() < FLIP_PROBABILITY:
        image = TF.hflip(image)
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


def view_rng(seed: int, view: int, index: int) -> random.Random:
    """The random numbers of one image in one view: fixed by (seed, view, position), not by batching."""
    return random.Random(f"{seed}:{view}:{index}")
