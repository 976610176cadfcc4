"""Fashion-MNIST, the embedded default dataset: no `--root`, images held in memory.

Files come from Debian's `dataset-fashion-mnist` package when installed, else from torchvision's
downloader into the user's cache. Train and val are carved from the 60,000 training images by a
fixed rule (every 10th image is val); test is the 10,000 test images. Samples carry pseudo paths
`fashion_mnist/<train|test>/<index in that file>` so feature-cache keys stay stable.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from ..constants import cache_root
from ..errors import NemesisError
from .dataset_records import FASHION_MNIST, Dataset, Sample

# Prompt-friendly words for the ten classes, in label order.
CLASSNAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}
# Every 10th training image (index % 10 == 9) is a val image: a carve that no library version changes.
VAL_EVERY = 10
_IDX_MAGIC = {1: 2049, 3: 2051}  # IDX magic numbers of label (1-d) and image (3-d) files


def _files_in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in FILES.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _debian_folders() -> list[Path]:
    """Folders holding the package's files: the usual one, then whatever `dpkg -L` lists."""
    folders = [DEBIAN_DIR]
    if shutil.which("dpkg"):
        try:
            listing = subprocess.run(
                ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        folders += [Path(line).parent for line in listing.splitlines() if line.endswith("-ubyte.gz")]
    return list(dict.fromkeys(folders))


def download_dir() -> Path:
    return cache_root() / "fashion-mnist"


def find_fashion_mnist_files(download: bool = True) -> dict[str, Path]:
    """Paths of the four IDX files: Debian package, earlier download, or a torchvision download now."""
    for folder in [*_debian_folders(), download_dir() / "FashionMNIST" / "raw"]:
        found = _files_in(folder)
        if found:
            return found
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if download and not offline:
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(download_dir()), train=train, download=True)
            found = _files_in(download_dir() / "FashionMNIST" / "raw")
            if found:
                return found
        except Exception:  # any download failure ends in the one error below
            pass
    raise NemesisError(
        f"Fashion-MNIST not found; install it with `apt-get install {DEBIAN_PACKAGE}` "
        f"(or run once with internet access to download it into {download_dir()})"
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array: labels [N] or images [N, 28, 28]."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    magic = int.from_bytes(data[:4], "big")
    dims = magic & 0xFF
    if _IDX_MAGIC.get(dims) != magic:
        raise NemesisError(f"{path} is not an IDX file of Fashion-MNIST; reinstall {DEBIAN_PACKAGE}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@functools.lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    files = find_fashion_mnist_files()
    arrays = {key: read_idx(path) for key, path in files.items()}
    for part in ("train", "test"):
        if len(arrays[f"{part}-images"]) != len(arrays[f"{part}-labels"]):
            raise NemesisError(f"Fashion-MNIST {part} images and labels differ in count; reinstall {DEBIAN_PACKAGE}")
    return arrays


def open_fashion_mnist_image(pseudo_path: str) -> Image.Image:
    """The RGB image behind a pseudo path `fashion_mnist/<train|test>/<index>`."""
    try:
        dataset, part, index = pseudo_path.split("/")
        if dataset != FASHION_MNIST:
            raise ValueError(dataset)
        pixels = _arrays()[f"{part}-images"][int(index)]  # [28, 28] uint8
    except (ValueError, KeyError, IndexError) as error:
        raise NemesisError(f"'{pseudo_path}' names no Fashion-MNIST image") from error
    return Image.fromarray(pixels).convert("RGB")


def _samples(part: str, indices: np.ndarray, labels: np.ndarray) -> list[Sample]:
    return [
        Sample(f"{FASHION_MNIST}/{part}/{index:05d}", int(labels[index]), CLASSNAMES[labels[index]])
        for index in indices
    ]


@functools.lru_cache(maxsize=1)
def _splits() -> tuple[tuple[Sample, ...], tuple[Sample, ...], tuple[Sample, ...]]:
    """Train, val and test samples, built once per process (a grid loads the dataset for every run)."""
    arrays = _arrays()
    train_labels, test_labels = arrays["train-labels"], arrays["test-labels"]
    indices = np.arange(len(train_labels))
    is_val = indices % VAL_EVERY == VAL_EVERY - 1
    return (
        tuple(_samples("train", indices[~is_val], train_labels)),
        tuple(_samples("train", indices[is_val], train_labels)),
        tuple(_samples("test", np.arange(len(test_labels)), test_labels)),
    )


def load_fashion_mnist() -> Dataset:
    """Fashion-MNIST's train (54,000), val (6,000) and test (10,000) samples."""
    _arrays()  # the files are found (or how to get them is said) before the cached sample lists are used
    train, val, test = _splits()
    return Dataset(
        name=FASHION_MNIST,
        classnames=list(CLASSNAMES),
        train=list(train),
        val=list(val),
        test=list(test),
        image_loader=open_fashion_mnist_image,
    )
