"""Data a practitioner brings: class-folder-only layouts, capped training splits, non-square
photos (center-crop), TrivialAugmentWide and the class-balanced sampler."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, make_image_folder
from PIL import Image

import data_setup
import experiment
import utils
from core import errors
from data import decoding
from training import checkpoints

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def class_folders_only(root: Path, per_class: int, seed: int = 0) -> Path:
    """root/<class>/<n>.png with no train/ or test/ folder (the split name "" puts classes at the root)."""
    return make_image_folder(root, {"": per_class}, seed=seed)


def split_paths(splits: data_setup.DatasetSplits) -> dict[str, set[str]]:
    return {name: set(getattr(splits, name).paths) for name in ("train", "val", "test")}


def test_class_folders_only_carve_a_stratified_test_split_then_validation(tmp_path):
    root = class_folders_only(tmp_path / "photos", 10)
    described = data_setup.DataDescription(data_dir=str(root), image_size=16, val_fraction=0.25, seed=0,
                                           test_fraction=0.2)
    splits = data_setup.load_splits(described)
    paths = split_paths(splits)
    assert splits.class_names == list(TINY_CLASSES)
    # 20% of 30 images (2 a class) for test, then 25% of the other 24 (2 a class) for validation
    assert [len(paths[name]) for name in ("train", "val", "test")] == [18, 6, 6]
    assert paths["train"].isdisjoint(paths["val"]) and paths["train"].isdisjoint(paths["test"])
    assert paths["val"].isdisjoint(paths["test"])
    assert set().union(*paths.values()) == {str(p) for p in root.rglob("*.png")}
    for name, per_class in (("train", 6), ("val", 2), ("test", 2)):
        assert getattr(splits, name).labels.bincount().tolist() == [per_class] * 3
        for path, label in zip(getattr(splits, name).paths, getattr(splits, name).labels, strict=True):
            assert Path(path).parent.name == splits.class_names[label]
    carving = splits.carving
    assert carving["layout"] == "class folders only"
    assert carving["test_fraction"] == 0.2 and carving["val_fraction"] == 0.25 and carving["seed"] == 0
    assert carving["class_counts"]["test"] == {name: 2 for name in TINY_CLASSES}
    assert "carved from all images (20%, stratified, seed 0)" == carving["test"]
    # The same files and settings give the same splits (a resumed run sees the same data); another seed others.
    assert split_paths(data_setup.load_splits(described)) == paths
    other = split_paths(data_setup.load_splits(replace(described, seed=1)))
    assert other["test"] != paths["test"]


def test_max_per_class_caps_only_the_training_split(tiny_data):
    whole = data_setup.load_splits(data_setup.DataDescription(data_dir=str(tiny_data), image_size=16, val_fraction=0.25,
                                                              seed=0))
    capped = data_setup.load_splits(data_setup.DataDescription(data_dir=str(tiny_data), image_size=16,
                                                               val_fraction=0.25, seed=0, max_per_class=4))
    assert capped.train.labels.bincount().tolist() == [4, 4, 4]
    assert set(capped.train.paths) < set(whole.train.paths)  # a subset of the same training split
    assert capped.val.paths == whole.val.paths and capped.test.paths == whole.test.paths
    # the images travel with their paths
    positions = [whole.train.paths.index(path) for path in capped.train.paths]
    assert torch.equal(capped.train.images, whole.train.images[positions])
    assert capped.carving["max_per_class"] == 4
    assert capped.carving["train_subset"] == "at most 4 images per class (stratified, seed 0): 12 of 27 training images"
    assert capped.carving["class_counts"]["train"] == {name: 4 for name in TINY_CLASSES}
    other_seed = data_setup.load_splits(data_setup.DataDescription(data_dir=str(tiny_data), image_size=16,
                                                                   val_fraction=0.25, seed=5, max_per_class=4))
    assert set(other_seed.train.paths) != set(capped.train.paths)
    assert data_setup.stratified_subset([0, 0, 1], 5, seed=0).tolist() == [0, 1, 2]  # fewer than the cap: all kept


@pytest.mark.parametrize("folders, message", [
    (("train",), "has train/ but no test/"),
    (("test", "val"), "has val/ and test/ but no train/"),
    ((), "holds neither train/ and test/ folders nor class folders"),
])
def test_ambiguous_layouts_are_refused_in_one_sentence(tmp_path, folders, message):
    for folder in folders:
        make_image_folder(tmp_path, {folder: 2})
    (tmp_path / "notes.txt").write_text("a file beside the folders")
    with pytest.raises(errors.DataError, match=message):
        data_setup.load_splits(data_setup.DataDescription(data_dir=str(tmp_path), image_size=16, val_fraction=0.25,
                                                          seed=0))


def test_too_few_images_to_carve_the_test_split(tmp_path):
    root = class_folders_only(tmp_path, 1)
    with pytest.raises(errors.DataError, match="Too few images to carve a stratified 20% test split"):
        data_setup.load_splits(data_setup.DataDescription(data_dir=str(root), image_size=16, val_fraction=0.25, seed=0))


def bands(path: Path, size: tuple[int, int], vertical: bool) -> Path:
    """A non-square image: red, green, blue bands of 1/4, 1/2, 1/4 along its longer side."""
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    length = width if vertical else height
    cuts = (length // 4, length - length // 4)
    for colour, (start, stop) in zip((RED, GREEN, BLUE), ((0, cuts[0]), cuts, (cuts[1], length)), strict=True):
        if vertical:
            pixels[:, start:stop] = colour
        else:
            pixels[start:stop, :] = colour
    Image.fromarray(pixels).save(path)
    return path


def colours(image: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(pixel) for pixel in image.reshape(3, -1).T.tolist()}


@pytest.mark.parametrize("size, vertical", [((40, 20), True), ((20, 40), False)])
def test_center_crop_keeps_the_central_square_and_squash_the_whole_image(tmp_path, size, vertical):
    path = bands(tmp_path / "photo.png", size, vertical)
    cropped = decoding.decode_image(str(path), 10, "center-crop")
    assert cropped.shape == (3, 10, 10) and colours(cropped) == {GREEN}  # the central 20x20 square only
    squashed = decoding.decode_image(str(path), 10, "squash")
    edges = (squashed[:, :, 0], squashed[:, :, -1]) if vertical else (squashed[:, 0, :], squashed[:, -1, :])
    assert colours(edges[0][:, :, None]) == {RED} and colours(edges[1][:, :, None]) == {BLUE}
    assert decoding.decode_image(str(path), 10).equal(squashed)  # squash stays the default


def test_resize_mode_is_part_of_the_decode_cache_key(tmp_path):
    paths = [str(bands(tmp_path / f"{i}.png", (40, 20), True)) for i in range(2)]
    cache = tmp_path / "cache"
    squashed = decoding.decode_cached(paths, 10, 0, cache, "squash")
    cropped = decoding.decode_cached(paths, 10, 0, cache, "center-crop")
    assert len(list((cache / "decoded").glob("*.pt"))) == 2
    assert not torch.equal(squashed, cropped) and colours(cropped[0]) == {GREEN}
    assert torch.equal(decoding.decode_cached(paths, 10, 0, cache, "center-crop"), cropped)


def test_load_splits_decodes_with_the_resize_mode(tmp_path):
    root = tmp_path / "data"
    for split, count in (("train", 4), ("test", 2)):
        for name in ("wide", "tall"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                bands(root / split / name / f"{i}.png", (40, 20) if name == "wide" else (20, 40), name == "wide")
    splits = data_setup.load_splits(data_setup.DataDescription(data_dir=str(root), image_size=8, val_fraction=0.5,
                                                               seed=0, resize="center-crop"))
    assert all(colours(image) == {GREEN} for image in splits.train.images)
    assert splits.train.resize == "center-crop"


def _tensors(labels: list[int], size: int = 6) -> data_setup.ImageTensors:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(labels), 3, size, size), dtype=torch.uint8, generator=generator)
    return data_setup.ImageTensors(images, torch.tensor(labels), [str(i) for i in range(len(labels))], size)


def _loader(data, augmentation, seed=3, **options) -> data_setup.BatchLoader:
    return data_setup.BatchLoader(data, 8, [0.5] * 3, [0.25] * 3, torch.device("cpu"), augmentation, seed=seed,
                                  **options)


def test_trivialaugment_changes_images_is_seeded_and_leaves_the_global_rng_alone():
    data = _tensors([0, 1, 2] * 8)
    basic = data_setup.Augmentation(1, True)
    trivial = data_setup.Augmentation(1, True, trivialaugment=True)
    rng_state = torch.get_rng_state()
    plain_batches = [x for x, _ in _loader(data, basic)]
    trivial_batches = [x for x, _ in _loader(data, trivial)]
    again = [x for x, _ in _loader(data, trivial)]
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(a, b) for a, b in zip(trivial_batches, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plain_batches, trivial_batches, strict=True))
    # --resume restores the loader's generator: the next epoch is the same as without the interruption
    loader = _loader(data, trivial)
    list(loader)
    state = loader.generator.get_state()
    second_epoch = [x for x, _ in loader]
    resumed = _loader(data, trivial, seed=99)
    resumed.generator.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(second_epoch, (x for x, _ in resumed), strict=True))


def test_balanced_sampler_draws_every_class_equally_often_and_deterministically():
    labels = [0] * 80 + [1] * 15 + [2] * 5
    data = _tensors(labels, size=2)
    augmentation = data_setup.Augmentation(0, False)
    loader = _loader(data, augmentation, balanced=True)
    drawn = Counter()
    for _ in range(30):
        epoch = torch.cat([y for _, y in loader])
        assert len(epoch) == len(labels)  # an epoch is as long as the training split
        drawn.update(epoch.tolist())
    shares = np.array([drawn[c] for c in range(3)]) / sum(drawn.values())
    assert np.allclose(shares, 1 / 3, atol=0.04), shares  # unbalanced, class 0 would take 80%
    assert drawn[2] > 5 * 30  # the rare class's images are drawn again and again, with replacement
    first, second = _loader(data, augmentation, balanced=True), _loader(data, augmentation, balanced=True)
    for _ in range(2):
        assert torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in second]))
    # torchrun: the ranks' shards of one epoch are that epoch's draws, split between them
    whole = torch.cat([y for _, y in _loader(data, augmentation, balanced=True)])
    shards = [torch.cat([y for _, y in _loader(data, augmentation, balanced=True, shard=(rank, 2))]) for rank in (0, 1)]
    assert torch.equal(torch.stack(shards, dim=1).flatten(), whole)


def test_class_folders_only_end_to_end_records_every_carving(tmp_path):
    root = class_folders_only(tmp_path / "photos", 10)
    run_dir = tmp_path / "run"
    code = experiment.main([
        "--data-dir", str(root), "--output-dir", str(run_dir), "--test-fraction", "0.2", "--val-fraction", "0.25",
        "--max-per-class", "4", "--resize", "center-crop", "--augment", "trivialaugment", "--balanced-sampler",
        "--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "8", "--image-size", "32",
        "--seed", "0", "--device", "cpu", "--no-decode-cache",
    ])
    assert code == 0
    config = utils.read_json(run_dir / "config.json")
    assert (config["test_fraction"], config["max_per_class"], config["resize"]) == (0.2, 4, "center-crop")
    assert config["augment"] == "trivialaugment" and config["balanced_sampler"] is True
    carving = config["dataset"]["carving"]
    assert config["dataset"]["sizes"] == {"train": 12, "val": 6, "test": 6}
    assert carving["layout"] == "class folders only" and carving["max_per_class"] == 4
    assert carving["class_counts"]["train"] == {name: 4 for name in TINY_CLASSES}
    checkpoint = checkpoints.load_checkpoint(run_dir / "student_kd" / "best_model.pth")
    assert checkpoint["resize"] == "center-crop"
    # the recorded settings rebuild the same splits
    splits = data_setup.load_splits(data_setup.DataDescription(data_dir=config["data_dir"], image_size=32,
                                                               val_fraction=config["val_fraction"], seed=config["seed"],
                                                               test_fraction=config["test_fraction"],
                                                               max_per_class=config["max_per_class"]))
    assert {name: len(getattr(splits, name)) for name in ("train", "val", "test")} == config["dataset"]["sizes"]
    assert splits.carving["class_counts"] == carving["class_counts"]
