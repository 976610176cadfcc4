"""Dataset records and names: `Sample`, `Dataset`, the dataset keys and CoOp's folder layouts.

The bottom of the data modules: `datasets` (reading CoOp's folders), `fewshot` (CoOp's K-shot
subsets) and `fashion_mnist` (the embedded default) all build on these records, and none of them
is needed to name a dataset or to describe where its files live.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import NemesisError

SPLITS = ("train", "val", "test")
FASHION_MNIST = "fashion_mnist"


class LayoutKind(str, Enum):
    SPLIT_JSON = "split_json"  # split_zhou_*.json: {"train": [[path, label, classname], ...], ...}
    FGVC = "fgvc"  # images_variant_{train,val,test}.txt and variants.txt
    IMAGENET = "imagenet"  # images/{train,val}/<wnid>/ and classnames.txt
    IMAGENET_V2 = "imagenet_v2"  # <label int>/ folders, classes in classnames.txt order
    IMAGENET_VARIANT = "imagenet_variant"  # <wnid>/ folders, test split only


class Subsample(str, Enum):
    ALL = "all"
    BASE = "base"
    NEW = "new"


@dataclass(frozen=True)
class Layout:
    """Where one CoOp dataset keeps its files, relative to the root."""

    name: str  # CoOp's dataset key
    folder: str  # the dataset's folder under the root
    kind: LayoutKind
    image_dir: str  # relative to `folder`; "" when split paths are relative to the folder itself
    split_file: str = ""  # for SPLIT_JSON
    dassl_name: str = ""  # the Dassl class name (cfg.DATASET.NAME in CoOp's configs)

    @property
    def test_only(self) -> bool:
        return self.kind in (LayoutKind.IMAGENET_V2, LayoutKind.IMAGENET_VARIANT)


_SPLIT_JSON = LayoutKind.SPLIT_JSON
_VARIANT = LayoutKind.IMAGENET_VARIANT

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("imagenet", "imagenet", LayoutKind.IMAGENET, "images", dassl_name="ImageNet"),
        Layout("caltech101", "caltech-101", _SPLIT_JSON, "101_ObjectCategories", "split_zhou_Caltech101.json",
               "Caltech101"),
        Layout("oxford_pets", "oxford_pets", _SPLIT_JSON, "images", "split_zhou_OxfordPets.json", "OxfordPets"),
        # StanfordCars' split paths ("cars_train/00001.jpg") are relative to the dataset folder.
        Layout("stanford_cars", "stanford_cars", _SPLIT_JSON, "", "split_zhou_StanfordCars.json", "StanfordCars"),
        Layout("oxford_flowers", "oxford_flowers", _SPLIT_JSON, "jpg", "split_zhou_OxfordFlowers.json",
               "OxfordFlowers"),
        Layout("food101", "food-101", _SPLIT_JSON, "images", "split_zhou_Food101.json", "Food101"),
        Layout("fgvc_aircraft", "fgvc_aircraft", LayoutKind.FGVC, "images", dassl_name="FGVCAircraft"),
        Layout("sun397", "sun397", _SPLIT_JSON, "SUN397", "split_zhou_SUN397.json", "SUN397"),
        Layout("dtd", "dtd", _SPLIT_JSON, "images", "split_zhou_DescribableTextures.json", "DescribableTextures"),
        Layout("eurosat", "eurosat", _SPLIT_JSON, "2750", "split_zhou_EuroSAT.json", "EuroSAT"),
        Layout("ucf101", "ucf101", _SPLIT_JSON, "UCF-101-midframes", "split_zhou_UCF101.json", "UCF101"),
        Layout("imagenetv2", "imagenetv2", LayoutKind.IMAGENET_V2, "imagenetv2-matched-frequency-format-val",
               dassl_name="ImageNetV2"),
        Layout("imagenet_sketch", "imagenet-sketch", _VARIANT, "images", dassl_name="ImageNetSketch"),
        Layout("imagenet_a", "imagenet-adversarial", _VARIANT, "imagenet-a", dassl_name="ImageNetA"),
        Layout("imagenet_r", "imagenet-rendition", _VARIANT, "imagenet-r", dassl_name="ImageNetR"),
    )
}  # fmt: skip

DATASET_NAMES: tuple[str, ...] = (*LAYOUTS, FASHION_MNIST)
IMAGENET_CLASSNAMES_FILE = "classnames.txt"
# CoOp's cached ImageNet listing: a pickle of {"train": [Datum], "test": [Datum]} in its listing order.
IMAGENET_PREPROCESSED_FILE = "preprocessed.pkl"
FGVC_CLASSES_FILE = "variants.txt"
FEWSHOT_DIR = "split_fewshot"


@dataclass(frozen=True)
class Sample:
    path: str  # absolute image path; for in-memory datasets a stable pseudo path
    label: int
    classname: str


@dataclass
class Dataset:
    name: str  # CoOp key, e.g. "oxford_pets"
    classnames: list[str]  # index = label
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    # Opens in-memory images (Fashion-MNIST) from their pseudo path; None: files on disk.
    image_loader: Callable[[str], Image.Image] | None = field(default=None, repr=False, compare=False)

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise NemesisError(f"unknown split '{name}'; available: {', '.join(SPLITS)}")
        return getattr(self, name)

    def open_image(self, sample: Sample) -> Image.Image:
        """The sample's image as RGB."""
        if self.image_loader is not None:
            return self.image_loader(sample.path)
        try:
            with warnings.catch_warnings():
                # PIL only warns between MAX_IMAGE_PIXELS and twice that; both are refused before decoding
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(sample.path) as image:
                    return image.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise NemesisError(
                f"image {sample.path} is too large to decode safely ({error}); replace it with a smaller image"
            ) from None
        except FileNotFoundError as error:
            raise NemesisError(f"image file missing: {sample.path}; check the data folder") from error
        except (OSError, UnidentifiedImageError) as error:
            raise NemesisError(
                f"cannot read image {sample.path} ({type(error).__name__}); replace the file or check it with "
                "`nemesis data check`"
            ) from error


def resolve_name(name: str) -> str:
    """The CoOp key for `name`; Dassl class names ("OxfordPets") are accepted too."""
    if name in DATASET_NAMES:
        return name
    by_dassl_name = {layout.dassl_name.lower(): key for key, layout in LAYOUTS.items()}
    key = by_dassl_name.get(name.lower()) or name.lower().replace("-", "_")
    if key in DATASET_NAMES:
        return key
    raise NemesisError(f"unknown dataset '{name}'; available: {', '.join(DATASET_NAMES)}")


def dataset_dir(name: str, root: str | os.PathLike) -> Path:
    """The folder of dataset `name` under `root` (absolute, user folder expanded)."""
    return Path(root).expanduser().absolute() / LAYOUTS[resolve_name(name)].folder
