"""CoOp dataset readers on generated folders: every key, the layout quirks, base-to-new, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nemesis.data.datasets import (
    DATASET_NAMES,
    LAYOUTS,
    Dataset,
    Sample,
    check_dataset,
    load_dataset,
    subsample_classes,
)
from nemesis.data.testing import make_coop_folder, wnid
from nemesis.errors import NemesisError

CLASSNAMES = ["red apple", "green leaf", "blue sky"]


def test_every_coop_key_and_fashion_mnist_are_registered():
    assert len(LAYOUTS) == 15
    assert (*LAYOUTS, "fashion_mnist") == DATASET_NAMES


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reader_returns_the_generated_samples(tmp_path, name):
    folder = make_coop_folder(tmp_path, name, CLASSNAMES, per_class=(2, 1, 2), image_size=8)
    assert folder == tmp_path / LAYOUTS[name].folder
    dataset = load_dataset(name, tmp_path)
    assert dataset.name == name
    assert dataset.classnames == CLASSNAMES
    expected_train = 0 if LAYOUTS[name].test_only else 2 * len(CLASSNAMES)
    assert len(dataset.train) == expected_train
    assert len(dataset.test) == 2 * len(CLASSNAMES)
    for sample in [*dataset.train, *dataset.val, *dataset.test]:
        assert Path(sample.path).is_file() and Path(sample.path).is_absolute()
        assert str(folder) in sample.path
        assert dataset.classnames[sample.label] == sample.classname
    image = dataset.open_image(dataset.test[0])
    assert image.mode == "RGB" and image.size == (8, 8)


def test_dassl_class_names_are_accepted(tmp_path):
    make_coop_folder(tmp_path, "oxford_pets", CLASSNAMES, per_class=(1, 1, 1), image_size=8)
    assert load_dataset("OxfordPets", tmp_path).name == "oxford_pets"


def test_stanford_cars_paths_are_relative_to_the_dataset_folder(tmp_path):
    folder = make_coop_folder(tmp_path, "stanford_cars", CLASSNAMES, per_class=(1, 1, 1), image_size=8)
    split = json.loads((folder / "split_zhou_StanfordCars.json").read_text())
    relative = split["test"][0][0]
    assert relative.startswith("cars_test/")
    dataset = load_dataset("stanford_cars", tmp_path)
    assert dataset.test[0].path == str(folder / relative)


def test_split_json_paths_are_relative_to_the_image_folder(tmp_path):
    folder = make_coop_folder(tmp_path, "eurosat", CLASSNAMES, per_class=(1, 1, 1), image_size=8)
    relative = json.loads((folder / "split_zhou_EuroSAT.json").read_text())["train"][0][0]
    assert load_dataset("eurosat", tmp_path).train[0].path == str(folder / "2750" / relative)


def test_fgvc_lists_give_classes_in_variants_order(tmp_path):
    variants = ["DC-10", "Boeing 737-300", "A300B4"]  # not alphabetical; names with spaces
    folder = make_coop_folder(tmp_path, "fgvc_aircraft", variants, per_class=(2, 1, 1), image_size=8)
    lines = (folder / "images_variant_train.txt").read_text().splitlines()
    image_id, variant = lines[2].split(" ", 1)
    assert variant == "Boeing 737-300"
    dataset = load_dataset("fgvc_aircraft", tmp_path)
    assert dataset.classnames == variants
    assert dataset.train[2] == Sample(str(folder / "images" / f"{image_id}.jpg"), 1, "Boeing 737-300")


def test_imagenet_folders_labels_follow_sorted_wnids_and_val_is_test(tmp_path):
    folder = make_coop_folder(tmp_path, "imagenet", CLASSNAMES, per_class=(3, 0, 2), image_size=8)
    dataset = load_dataset("imagenet", tmp_path)
    assert dataset.classnames == CLASSNAMES
    assert dataset.val == dataset.test
    assert [s.label for s in dataset.train] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert dataset.train[3].path.startswith(str(folder / "images" / "train" / wnid(1)))
    assert dataset.test[0].path.startswith(str(folder / "images" / "val" / wnid(0)))


def test_imagenet_preprocessed_pickle_gives_coops_samples_in_coops_order(tmp_path):
    """CoOp caches its ImageNet listing (file-system order) in imagenet/preprocessed.pkl; reading it gives
    the same samples, in that order, re-rooted from another machine, so few-shot draws equal CoOp's."""
    from nemesis.data.fewshot import sample_fewshot_splits
    from nemesis.data.testing import FOREIGN_ROOT, write_imagenet_preprocessed

    folder = make_coop_folder(tmp_path, "imagenet", CLASSNAMES, per_class=(4, 0, 2), image_size=8)
    listed = load_dataset("imagenet", tmp_path)  # sorted file names

    def coop_order(samples):  # another file-system order: each class folder listed backwards
        return [sample for label in range(3) for sample in reversed([s for s in samples if s.label == label])]

    train, test = coop_order(listed.train), coop_order(listed.test)
    pickle_file = write_imagenet_preprocessed(folder, train, test)
    assert FOREIGN_ROOT.encode() in pickle_file.read_bytes()  # paths of the machine that wrote it
    dataset = load_dataset("imagenet", tmp_path)
    assert dataset.train == train and dataset.test == test and dataset.val == test
    assert dataset.classnames == CLASSNAMES and dataset.train != listed.train
    few = load_dataset("imagenet", tmp_path, shots=2, seed=1)
    assert few.train == sample_fewshot_splits(train, None, 2, 1)[0]
    assert few.train != sample_fewshot_splits(listed.train, None, 2, 1)[0]


def test_a_preprocessed_pickle_naming_code_is_refused(tmp_path):
    import pickle

    folder = make_coop_folder(tmp_path, "imagenet", CLASSNAMES, per_class=(1, 0, 1), image_size=8)
    (folder / "preprocessed.pkl").write_bytes(pickle.dumps({"train": [os.system], "test": []}))
    with pytest.raises(NemesisError, match=r"refusing to load .*preprocessed\.pkl"):
        load_dataset("imagenet", tmp_path)


def test_imagenet_r_has_200_classes_in_its_own_order(tmp_path):
    classnames = [f"class {index}" for index in range(200)]
    folder = make_coop_folder(tmp_path, "imagenet_r", classnames, per_class=(0, 0, 1), image_size=4)
    # classnames.txt lists more classes than the variant holds, as ImageNet's 1000 do for -R's 200.
    assert len((folder / "classnames.txt").read_text().splitlines()) > 200
    dataset = load_dataset("imagenet_r", tmp_path)
    assert len(dataset.classnames) == 200 and dataset.classnames == classnames
    assert [s.label for s in dataset.test] == list(range(200))
    assert dataset.train == [] and dataset.val == []


def test_imagenet_variant_reads_classnames_from_the_imagenet_folder(tmp_path):
    make_coop_folder(
        tmp_path, "imagenet_sketch", CLASSNAMES, per_class=(0, 0, 1), image_size=8, classnames_in_variant_folder=False
    )
    assert not (tmp_path / "imagenet-sketch" / "classnames.txt").exists()
    assert load_dataset("imagenet_sketch", tmp_path).classnames == CLASSNAMES


def test_imagenetv2_folders_are_labels_in_classnames_order(tmp_path):
    folder = make_coop_folder(tmp_path, "imagenetv2", CLASSNAMES, per_class=(0, 0, 2), image_size=8)
    dataset = load_dataset("imagenetv2", tmp_path)
    assert dataset.test[4].path.startswith(str(folder / "imagenetv2-matched-frequency-format-val" / "2"))
    assert dataset.test[4].classname == "blue sky"


def test_folder_listings_are_sorted(tmp_path):
    folder = make_coop_folder(tmp_path, "imagenet_a", CLASSNAMES, per_class=(0, 0, 4), image_size=8)
    # Files created out of order must still come back sorted.
    (folder / "imagenet-a" / wnid(0) / "000_first.png").write_bytes(
        (folder / "imagenet-a" / wnid(0) / f"{wnid(0)}_test_0000.png").read_bytes()
    )
    (folder / "imagenet-a" / "README.txt").write_text("not a class")
    paths = [sample.path for sample in load_dataset("imagenet_a", tmp_path).test]
    assert paths == sorted(paths)
    assert Path(paths[0]).name == "000_first.png"


def test_base_to_new_splits_sorted_labels_at_ceil_half(tmp_path):
    names = ["a", "b", "c", "d", "e"]
    make_coop_folder(tmp_path, "dtd", names, per_class=(2, 1, 1), image_size=8)
    base = load_dataset("dtd", tmp_path, subsample="base")
    new = load_dataset("dtd", tmp_path, subsample="new")
    assert base.classnames == ["a", "b", "c"] and new.classnames == ["d", "e"]
    for dataset in (base, new):
        for split in ("train", "val", "test"):
            samples = dataset.split(split)
            assert {s.label for s in samples} == set(range(len(dataset.classnames)))
            assert all(dataset.classnames[s.label] == s.classname for s in samples)
    assert len(base.test) + len(new.test) == len(load_dataset("dtd", tmp_path).test)


def test_subsample_relabels_from_zero():
    samples = [Sample(f"/x/{label}.png", label, f"c{label}") for label in (3, 1, 2, 0)]
    dataset = Dataset("toy", ["c0", "c1", "c2", "c3"], samples, [], samples)
    new = subsample_classes(dataset, "new")
    assert new.classnames == ["c2", "c3"]
    assert [(s.label, s.classname) for s in new.test] == [(1, "c3"), (0, "c2")]
    with pytest.raises(NemesisError, match="unknown subsample"):
        load_dataset("fashion_mnist", subsample="middle")


def test_missing_image_names_the_file(tmp_path):
    folder = make_coop_folder(tmp_path, "oxford_pets", CLASSNAMES, per_class=(1, 1, 1), image_size=8)
    victim = load_dataset("oxford_pets", tmp_path).test[1]
    os.remove(victim.path)
    with pytest.raises(NemesisError, match=Path(victim.path).name) as error:
        load_dataset("oxford_pets", tmp_path)
    assert "\n" not in str(error.value) and "nemesis data check" in str(error.value)
    report = check_dataset("oxford_pets", tmp_path)
    assert report.found and not report.complete
    assert report.missing == [os.path.relpath(victim.path, tmp_path)]
    assert report.counts == {"train": 3, "val": 3, "test": 3}
    assert folder.is_dir()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "not found"),
        (lambda root: (root / "oxford_pets").mkdir(), "split_zhou_OxfordPets.json"),
        (lambda root: (root / "imagenet-rendition" / "imagenet-r").mkdir(parents=True), "classnames.txt"),
    ],
)
def test_missing_dataset_parts_raise_one_line(tmp_path, setup, message):
    setup(tmp_path)
    name = "imagenet_r" if message == "classnames.txt" else "oxford_pets"
    with pytest.raises(NemesisError, match=message) as error:
        load_dataset(name, tmp_path)
    assert "\n" not in str(error.value)
    assert not check_dataset(name, tmp_path).found


def test_unknown_name_and_missing_root_are_user_errors(tmp_path):
    with pytest.raises(NemesisError, match=r"unknown dataset 'pets'.*oxford_pets"):
        load_dataset("pets", tmp_path)
    with pytest.raises(NemesisError, match="--root"):
        load_dataset("oxford_pets")
    with pytest.raises(NemesisError, match="unknown split"):
        Dataset("toy", [], [], [], []).split("holdout")


def test_unreadable_image_is_a_user_error(tmp_path):
    make_coop_folder(tmp_path, "oxford_pets", classnames=["a", "b"], per_class=(1, 1, 1))
    data = load_dataset("oxford_pets", tmp_path)
    Path(data.test[0].path).write_bytes(b"not an image")
    with pytest.raises(NemesisError, match="cannot read image"):
        data.open_image(data.test[0])
