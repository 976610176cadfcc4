"""Fashion-MNIST from Debian's dataset-fashion-mnist package: splits, class names, images, errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from nemesis.data import fashion_mnist
from nemesis.data.datasets import load_dataset
from nemesis.errors import NemesisError


def test_splits_classnames_and_images():
    dataset = load_dataset("fashion_mnist")
    assert dataset.classnames[0] == "t-shirt" and dataset.classnames[9] == "ankle boot"
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (54_000, 6_000, 10_000)
    train_paths = {sample.path for sample in dataset.train}
    assert not train_paths & {sample.path for sample in dataset.val}
    assert dataset.val[0].path == "fashion_mnist/train/00009"  # every 10th training image
    assert dataset.test[42].path == "fashion_mnist/test/00042"
    assert {sample.label for sample in dataset.test} == set(range(10))
    image = dataset.open_image(dataset.test[0])
    assert image.mode == "RGB" and image.size == (28, 28)
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and pixels.max() > 0


def test_loader_is_deterministic_and_few_shot_is_seeded():
    first = load_dataset("fashion_mnist", shots=2, seed=1)
    again = load_dataset("fashion_mnist", shots=2, seed=1)
    other = load_dataset("fashion_mnist", shots=2, seed=2)
    assert first.train == again.train and first.train != other.train
    assert len(first.train) == 20 and len(first.val) == 20
    base = load_dataset("fashion_mnist", subsample="base")
    assert base.classnames == ["t-shirt", "trouser", "pullover", "dress", "coat"]


def test_bad_pseudo_path_is_a_user_error():
    dataset = load_dataset("fashion_mnist")
    with pytest.raises(NemesisError, match="names no Fashion-MNIST image"):
        dataset.image_loader("fashion_mnist/val/1")


def test_read_idx_plain_and_gzipped(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in images.shape)
    (tmp_path / "raw-ubyte").write_bytes(header + images.tobytes())
    with gzip.open(tmp_path / "raw-ubyte.gz", "wb") as file:
        file.write(header + images.tobytes())
    assert (fashion_mnist.read_idx(tmp_path / "raw-ubyte") == images).all()
    assert (fashion_mnist.read_idx(tmp_path / "raw-ubyte.gz") == images).all()
    (tmp_path / "bad-ubyte").write_bytes(b"\0\0\0\0")
    with pytest.raises(NemesisError, match="not an IDX file"):
        fashion_mnist.read_idx(tmp_path / "bad-ubyte")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "_debian_folders", lambda: [tmp_path / "none"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fashion_mnist._arrays.cache_clear()
    try:
        with pytest.raises(NemesisError, match="apt-get install dataset-fashion-mnist"):
            load_dataset("fashion_mnist")
    finally:
        fashion_mnist._arrays.cache_clear()
