"""Few-shot subsets: Dassl pickles from another machine, CoOp-style sampling, saved JSON subsets."""

from __future__ import annotations

import json
import pickle
import random
import sys
from pathlib import Path

import pytest

from nemesis.data import fewshot
from nemesis.data.datasets import Sample, load_dataset
from nemesis.data.testing import FOREIGN_ROOT, make_coop_folder, shuffled_subset, write_fewshot_pickle
from nemesis.errors import NemesisError

CLASSNAMES = ["red apple", "green leaf", "blue sky", "yellow sun"]


@pytest.fixture
def pets(tmp_path) -> Path:
    make_coop_folder(tmp_path, "oxford_pets", CLASSNAMES, per_class=(6, 5, 1), image_size=8)
    return tmp_path


def test_dassl_pickle_is_read_rerooted_and_yields_exactly_its_samples(pets):
    full = load_dataset("oxford_pets", pets)
    # A subset unlike a fresh CoOp draw, so the test can tell the pickle was used.
    train, val = shuffled_subset(full.train, 2, seed=5), shuffled_subset(full.val, 1, seed=6)
    path = write_fewshot_pickle(pets / "oxford_pets", 2, 1, train, val)
    raw = path.read_bytes()
    assert b"dassl.data.datasets.base_dataset" in raw and FOREIGN_ROOT.encode() in raw
    assert "dassl" not in sys.modules  # the fake module was only there while dumping
    few = load_dataset("oxford_pets", pets, shots=2, seed=1)
    assert few.train == train and few.val == val
    assert few.test == full.test
    assert path.read_bytes() == raw  # the user's pickle is never rewritten
    assert not (pets / "oxford_pets" / "split_fewshot" / "shot_2-seed_1.json").exists()


def test_generated_pickle_holds_datum_objects_with_foreign_paths(pets):
    make_coop_folder(pets, "caltech101", CLASSNAMES, per_class=(3, 2, 1), image_size=8, fewshot=[(1, 2)])
    content = fewshot.load_pickle(pets / "caltech-101" / "split_fewshot" / "shot_1-seed_2.pkl")
    datum = content["train"][0]
    assert datum.pickled_class == "dassl.data.datasets.base_dataset.Datum"
    assert set(datum.state) == {"_impath", "_label", "_domain", "_classname"}
    assert datum.state["_impath"].startswith(f"{FOREIGN_ROOT}/caltech-101/101_ObjectCategories/")
    few = load_dataset("caltech101", pets, shots=1, seed=2)
    assert len(few.train) == 4 and len(few.val) == 4
    assert all(Path(sample.path).is_file() for sample in few.train)


def _dassl_reference(train, val, shots, seed):
    """Dassl's generate_fewshot_dataset after CoOp's set_random_seed, on the global `random`."""
    state = random.getstate()
    random.seed(seed)
    try:
        output = []
        for source, k in ((train, shots), (val, min(shots, 4))):
            tracker: dict[int, list] = {}
            for item in source:
                tracker.setdefault(item.label, []).append(item)
            dataset = []
            for items in tracker.values():
                dataset.extend(random.sample(items, k) if len(items) >= k else items)
            output.append(dataset)
        return output
    finally:
        random.setstate(state)


def test_sampling_without_pickle_follows_coop_and_is_saved_with_relative_paths(pets):
    full = load_dataset("oxford_pets", pets)
    few = load_dataset("oxford_pets", pets, shots=5, seed=3)
    assert [few.train, few.val] == _dassl_reference(full.train, full.val, 5, 3)
    assert len(few.train) == 20 and len(few.val) == 16  # val: min(K, 4) per class
    saved = pets / "oxford_pets" / "split_fewshot" / "shot_5-seed_3.json"
    content = json.loads(saved.read_text())
    assert content["train"][0][0].startswith("images/") and not Path(content["train"][0][0]).is_absolute()
    assert not list(saved.parent.glob("*.pkl"))
    # Same seed: the same subset, read back from the file and drawn again without it.
    assert load_dataset("oxford_pets", pets, shots=5, seed=3).train == few.train
    saved.unlink()
    assert load_dataset("oxford_pets", pets, shots=5, seed=3).train == few.train
    other = load_dataset("oxford_pets", pets, shots=5, seed=4)
    assert other.train != few.train


def test_fewer_items_than_shots_keeps_them_all():
    samples = [Sample(f"/x/{index}.png", index % 2, "c") for index in range(5)]
    subset = fewshot.sample_fewshot(samples, 4, random.Random(0))
    assert len([s for s in subset if s.label == 1]) == 2 and len(subset) == 5


def test_imagenet_pickle_holds_train_only_and_val_stays_the_test_folder(tmp_path):
    make_coop_folder(tmp_path, "imagenet", CLASSNAMES[:2], per_class=(3, 0, 2), image_size=8, fewshot=[(2, 1)])
    few = load_dataset("imagenet", tmp_path, shots=2, seed=1)
    assert len(few.train) == 4 and few.val == few.test and len(few.test) == 4
    assert all("/images/train/" in sample.path for sample in few.train)


def test_read_only_dataset_folder_saves_the_subset_in_the_cache(pets, monkeypatch):
    monkeypatch.setattr(fewshot, "_writable", lambda folder: False)
    few = load_dataset("oxford_pets", pets, shots=1, seed=1)
    assert not (pets / "oxford_pets" / "split_fewshot").exists()
    cached = fewshot.cache_json_path("oxford_pets", pets / "oxford_pets", 1, 1)
    assert cached.is_file()
    assert load_dataset("oxford_pets", pets, shots=1, seed=1).train == few.train


@pytest.mark.parametrize(
    ("foreign", "expected"),
    [
        ("/home/a/data/oxford_pets/images/x.jpg", "images/x.jpg"),
        ("/oxford_pets/oxford_pets/images/x.jpg", "images/x.jpg"),
        ("C:\\data\\oxford_pets\\images\\x.jpg", "images/x.jpg"),
        ("/mnt/pets-renamed/images/x.jpg", "images/x.jpg"),
    ],
)
def test_reroot(tmp_path, foreign, expected):
    assert fewshot.reroot(foreign, "oxford_pets", tmp_path) == tmp_path / expected


def test_reroot_stanford_cars_and_unplaceable_paths(tmp_path):
    cars = fewshot.reroot("/d/stanford_cars/cars_train/00001.jpg", "stanford_cars", tmp_path)
    assert cars == tmp_path / "cars_train/00001.jpg"
    with pytest.raises(NemesisError, match="cannot place"):
        fewshot.reroot("/somewhere/else/x.jpg", "oxford_pets", tmp_path)


def test_pickle_pointing_at_missing_images_is_a_user_error(pets):
    ghost = Sample(str(pets / "oxford_pets" / "images" / "ghost.png"), 0, "red apple")
    write_fewshot_pickle(pets / "oxford_pets", 1, 1, [ghost], [ghost])
    with pytest.raises(NemesisError, match=r"ghost\.png"):
        load_dataset("oxford_pets", pets, shots=1, seed=1)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_foreign_code_is_refused(pets):
    path = pets / "oxford_pets" / "split_fewshot" / "shot_1-seed_1.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"train": [_Evil()], "val": []}))
    with pytest.raises(NemesisError, match="refusing"):
        load_dataset("oxford_pets", pets, shots=1, seed=1)
    path.write_bytes(pickle.dumps({"train": [{"impath": "x"}]}))
    with pytest.raises(NemesisError, match="Datum"):
        load_dataset("oxford_pets", pets, shots=1, seed=1)
