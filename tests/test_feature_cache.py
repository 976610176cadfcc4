"""The image-feature cache: equal to live encoding (I3), no second encoding, keys, views, errors."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from nemesis.data import augmentation, feature_cache
from nemesis.data.datasets import load_dataset
from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError

CLASSNAMES = ["red apple", "green leaf", "blue sky"]


@pytest.fixture
def pets(tmp_path):
    make_coop_folder(tmp_path / "data", "oxford_pets", CLASSNAMES, per_class=(3, 1, 4), image_size=32)
    return load_dataset("oxford_pets", tmp_path / "data")


def _live(backbone, dataset, split):
    images = torch.stack([backbone.preprocess(dataset.open_image(s)) for s in dataset.split(split)])
    with torch.no_grad():
        return backbone.model.encode_image(images)  # [N, D]


def _accuracy(features, labels, prototypes):
    logits = torch.nn.functional.normalize(features, dim=-1) @ torch.nn.functional.normalize(prototypes, dim=-1).T
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def test_cached_features_equal_live_encoding_and_a_second_call_encodes_nothing(tiny, pets, tmp_path):
    cache = tmp_path / "cache"
    before = feature_cache.encoded_images
    features, labels = feature_cache.encode_split(tiny, pets, "test", cache_dir=cache, batch_size=5, progress=False)
    assert feature_cache.encoded_images - before == len(pets.test)
    assert features.shape == (12, 64) and features.dtype == torch.float32
    assert labels.tolist() == [s.label for s in pets.test]
    live = _live(tiny, pets, "test")
    assert torch.allclose(features, live, atol=1e-5)
    prototypes = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    assert _accuracy(features, labels, prototypes) == _accuracy(live, labels, prototypes)

    encoded = feature_cache.encoded_images
    again, _ = feature_cache.encode_split(tiny, pets, "test", cache_dir=cache, progress=False)
    assert feature_cache.encoded_images == encoded
    assert torch.equal(again, features)
    files = [name for name in os.listdir(cache) if name != feature_cache.LOCKS_FOLDER]
    assert len(files) == 1 and files[0].endswith(".safetensors") and not files[0].startswith(".")


def test_any_change_gives_a_new_key(tiny, pets, tmp_path):
    cache = tmp_path / "cache"
    feature_cache.encode_split(tiny, pets, "test", cache_dir=cache, progress=False)
    other_weights = dataclasses.replace(tiny, weights_id="sha256:another-weights-file")
    feature_cache.encode_split(other_weights, pets, "test", cache_dir=cache, progress=False)
    other_model = dataclasses.replace(tiny, name="tiny-copy")
    feature_cache.encode_split(other_model, pets, "test", cache_dir=cache, progress=False)
    feature_cache.encode_split(tiny, pets, "val", cache_dir=cache, progress=False)
    fewer = dataclasses.replace(pets, test=pets.test[:-1])
    feature_cache.encode_split(tiny, fewer, "test", cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.safetensors"))) == 5
    keys = {
        feature_cache.feature_key(tiny, "oxford_pets", "test", pets.test, "p", "fp32", view, seed)
        for view, seed in [(None, None), (0, 0), (1, 0), (0, 1)]
    }
    assert len(keys) == 4
    assert feature_cache.feature_key(tiny, "oxford_pets", "test", pets.test, "p", "fp32") != feature_cache.feature_key(
        tiny, "oxford_pets", "test", pets.test, "q", "fp32"
    )


def test_missing_image_fails_before_anything_is_written(tiny, pets, tmp_path):
    os.remove(pets.test[2].path)
    before = feature_cache.encoded_images
    with pytest.raises(NemesisError, match=os.path.basename(pets.test[2].path)):
        feature_cache.encode_split(tiny, pets, "test", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()
    assert feature_cache.encoded_images == before


def test_unreadable_cache_file_is_encoded_again(tiny, pets, tmp_path):
    cache = tmp_path / "cache"
    features, _ = feature_cache.encode_split(tiny, pets, "test", cache_dir=cache, progress=False)
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(b"truncated")
    before = feature_cache.encoded_images
    again, _ = feature_cache.encode_split(tiny, pets, "test", cache_dir=cache, progress=False)
    assert feature_cache.encoded_images - before == len(pets.test)
    assert torch.allclose(again, features)


def test_default_cache_dir_follows_nemesis_cache(tiny, pets, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMESIS_CACHE", str(tmp_path / "user-cache"))
    assert feature_cache.default_cache_dir() == tmp_path / "user-cache" / "features"
    feature_cache.encode_split(tiny, pets, "val", progress=True)
    assert len(list((tmp_path / "user-cache" / "features").glob("*.safetensors"))) == 1


def test_train_views_are_seeded_cached_per_view_and_extendable(tiny, pets, tmp_path):
    cache = tmp_path / "cache"
    n = len(pets.train)
    before = feature_cache.encoded_images
    views, labels = feature_cache.encode_train_views(tiny, pets, 2, seed=7, cache_dir=cache, progress=False)
    assert views.shape == (2, n, 64) and labels.tolist() == [s.label for s in pets.train]
    assert feature_cache.encoded_images - before == 2 * n
    assert not torch.allclose(views[0], views[1])  # two different augmentations

    more, _ = feature_cache.encode_train_views(tiny, pets, 3, seed=7, cache_dir=cache, progress=False)
    assert feature_cache.encoded_images - before == 3 * n  # only the new view was encoded
    assert torch.equal(more[:2], views)

    # Same seed in a fresh cache gives the same numbers, batched differently; another seed does not.
    fresh, _ = feature_cache.encode_train_views(
        tiny, pets, 2, seed=7, cache_dir=tmp_path / "fresh", batch_size=1, progress=False
    )
    assert torch.allclose(fresh, views, atol=1e-5)
    other, _ = feature_cache.encode_train_views(tiny, pets, 1, seed=8, cache_dir=cache, progress=False)
    assert not torch.allclose(other[0], views[0])
    with pytest.raises(NemesisError, match="views"):
        feature_cache.encode_train_views(tiny, pets, 0, cache_dir=cache)


def test_augmentation_crops_inside_the_image_and_normalises(tiny):
    rng = random.Random(0)
    for _ in range(200):
        width, height = rng.randint(1, 60), rng.randint(1, 60)
        top, left, crop_height, crop_width = augmentation._crop_box(width, height, rng)
        assert top >= 0 and left >= 0 and top + crop_height <= height and left + crop_width <= width
        assert crop_height > 0 and crop_width > 0
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    tensor = augmentation.augment(image, tiny.image_size, tiny.image_mean, tiny.image_std, random.Random(1))
    assert tensor.shape == (3, 28, 28)
    expected_red = (1.0 - tiny.image_mean[0]) / tiny.image_std[0]
    assert torch.allclose(tensor[0], torch.full((28, 28), expected_red), atol=1e-4)


def test_crop_scale_one_keeps_the_whole_image_and_gets_its_own_cache_entries(tiny, pets, tmp_path):
    # CoOp's crop keeps the description the cache keys were made with, so existing entries stay valid.
    assert "scale=(0.08, 1.0)" in augmentation.train_augmentation_description(tiny)
    assert "scale=(1.0, 1.0)" in augmentation.train_augmentation_description(tiny, 1.0)
    pixels = torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray((pixels.permute(1, 2, 0) * 255).round().byte().numpy())
    mean, std = torch.tensor(tiny.image_mean).view(3, 1, 1), torch.tensor(tiny.image_std).view(3, 1, 1)
    whole = (TF.to_tensor(image) - mean) / std
    flips = 0
    for seed in range(20):  # every view is the whole image, flipped or not
        view = augmentation.augment(image, 28, tiny.image_mean, tiny.image_std, random.Random(seed), crop_scale=1.0)
        flipped = torch.allclose(view, whole.flip(-1), atol=1e-5)
        assert flipped or torch.allclose(view, whole, atol=1e-5)
        flips += flipped
    assert 0 < flips < 20
    cache = tmp_path / "cache"
    coop, _ = feature_cache.encode_train_views(tiny, pets, 1, seed=3, cache_dir=cache, progress=False)
    whole_views, _ = feature_cache.encode_train_views(
        tiny, pets, 1, seed=3, cache_dir=cache, progress=False, crop_scale=1.0
    )
    assert len(list(cache.rglob("*.safetensors"))) == 2 and not torch.allclose(coop, whole_views)


def test_fashion_mnist_subset_encodes_from_memory(tiny, tmp_path):
    dataset = load_dataset("fashion_mnist", shots=1, seed=1)
    features, labels = feature_cache.encode_split(tiny, dataset, "train", cache_dir=tmp_path, progress=False)
    assert features.shape == (10, 64) and sorted(labels.tolist()) == list(range(10))
