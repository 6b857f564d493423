"""Data setup (data_setup): stratified splits and carving, the bundled digits, batch loaders, augmentation and
samplers."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, class_folders_only, make_image_folder

import data_setup
from core import errors


def test_stratified_split_is_disjoint_and_keeps_class_shares():
    labels = np.repeat([0, 1, 2], [40, 20, 10])
    train_idx, val_idx = data_setup.stratified_split(labels, 0.2, seed=3)
    assert set(train_idx).isdisjoint(val_idx)
    assert len(train_idx) + len(val_idx) == len(labels)
    assert np.bincount(labels[val_idx]).tolist() == [8, 4, 2]
    again = data_setup.stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(again[1], val_idx)


def test_too_few_images_to_carve_validation():
    with pytest.raises(errors.DataError, match="Too few training images"):
        data_setup.stratified_split([0, 1, 1, 1], 0.25, seed=0)


def test_bundled_digits_tree():
    root = data_setup.bundled_digits_dir()
    counts = {split: len(list((root / split).rglob("*.png"))) for split in ("train", "val", "test")}
    assert sum(counts.values()) == 1797
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    names = {split: {p.name for p in (root / split).rglob("*.png")} for split in counts}
    assert names["train"].isdisjoint(names["val"]) and names["train"].isdisjoint(names["test"])
    assert names["val"].isdisjoint(names["test"])
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    # stratified: every class has a share of the test split close to its share overall
    per_class = [len(list((root / "test" / str(d)).iterdir())) for d in range(10)]
    assert max(per_class) - min(per_class) <= 2
    assert data_setup.bundled_digits_dir() == root  # written once, then reused


def test_load_splits_carves_disjoint_validation(tiny_data):
    splits = data_setup.load_splits(data_setup.DataDescription(data_dir=str(tiny_data), image_size=16,
                                                               val_fraction=0.25, seed=0))
    assert splits.class_names == ["circle", "cross", "stripes"]
    assert len(splits.train) == 27 and len(splits.val) == 9 and len(splits.test) == 15
    assert set(splits.train.paths).isdisjoint(splits.val.paths)
    assert splits.val.labels.bincount().tolist() == [3, 3, 3]
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (3, 16, 16)
    assert all(0 < s for s in splits.std) and all(0 < m < 1 for m in splits.mean)


def test_class_mismatch_names_the_classes(tmp_path):
    root = make_image_folder(tmp_path, {"train": 3, "test": 2})
    (root / "test" / "cross").rename(root / "test" / "plus")
    with pytest.raises(errors.DataError,
                       match=r"'cross' is in train but missing from test; 'plus' is in test but missing from train"):
        data_setup.load_splits(data_setup.DataDescription(data_dir=str(root), image_size=16, val_fraction=0.3, seed=0))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(errors.DataError, match="does not exist"):
        data_setup.load_splits(data_setup.DataDescription(data_dir=str(tmp_path / "nowhere"), image_size=16,
                                                          val_fraction=0.2, seed=0))
    make_image_folder(tmp_path, {"train": 3})
    with pytest.raises(errors.DataError, match="has train/ but no test/"):
        data_setup.load_splits(data_setup.DataDescription(data_dir=str(tmp_path), image_size=16, val_fraction=0.2,
                                                          seed=0))


def _tensors(n=10, size=8, labels=None):
    images = torch.arange(n * 3 * size * size, dtype=torch.int64).remainder(251).to(torch.uint8)
    labels = torch.arange(n) % 3 if labels is None else labels
    return data_setup.ImageTensors(images.view(n, 3, size, size), labels, [str(i) for i in range(n)], size)


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_same_seed_same_batches_and_augmentation_changes_epochs():
    data = _tensors()
    make = lambda seed: data_setup.BatchLoader(  # noqa: E731
        data, 4, [0.5] * 3, [0.25] * 3, torch.device("cpu"), data_setup.Augmentation(2, True), seed=seed)
    first, second = make(7), make(7)
    for (xa, ya), (xb, yb) in zip(_batches(first), _batches(second), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epoch_one, epoch_two = _batches(first), _batches(first)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch_one, epoch_two, strict=True))
    assert len(first) == 3 and sum(len(y) for _, y in epoch_one) == 10


def test_evaluation_loader_is_deterministic_and_normalized():
    data = _tensors()
    loader = data_setup.BatchLoader(data, 4, [0.5] * 3, [0.25] * 3, torch.device("cpu"))
    batches = _batches(loader)
    assert torch.equal(torch.cat([y for _, y in batches]), data.labels)
    expected = (data.images.float() / 255 - 0.5) / 0.25
    assert torch.allclose(torch.cat([x for x, _ in batches]), expected, atol=1e-5)


@pytest.mark.parametrize("hflip", [False, True])
def test_crop_and_flip_shift_content_with_zero_fill_in_one_gather(hflip):
    image = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    data = data_setup.ImageTensors(image.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long),
                                   [str(i) for i in range(64)], 4)
    # mean 0 and std 1/255: the normalized batch holds the pixel values themselves
    loader = data_setup.BatchLoader(data, 16, [0.0] * 3, [1 / 255] * 3, torch.device("cpu"),
                                    data_setup.Augmentation(1, hflip), seed=0)
    padded = torch.nn.functional.pad(image[0, 0], (1, 1, 1, 1))
    windows = {tuple(padded[r : r + 4, c : c + 4].flatten().tolist()) for r in range(3) for c in range(3)}
    mirrored = {tuple(torch.tensor(w).view(4, 4).flip(1).flatten().tolist()) for w in windows}
    seen = set()
    for images, _ in loader:
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images[:, 0], images[:, 2])  # every channel cropped and flipped alike
        seen |= {tuple(img[0].flatten().int().tolist()) for img in images}
    assert seen <= windows | mirrored and len(seen) > 3
    assert bool(seen & (mirrored - windows)) == hflip  # flipped windows appear only with hflip
    unshifted = data_setup.BatchLoader(data, 16, [0.0] * 3, [1 / 255] * 3, torch.device("cpu"),
                                       data_setup.Augmentation(0, False), seed=0)
    assert all(torch.equal(images, image.float().expand_as(images)) for images, _ in unshifted)


def test_streamed_cached_and_in_memory_batches_are_identical(tiny_data, tmp_path):
    """Over the memory budget the split is streamed by worker processes; from a decode cache file
    it is read back without decoding. Neither may change a single batch, with any augmentation
    (TrivialAugmentWide included) or sampler."""
    common = data_setup.DataDescription(data_dir=str(tiny_data), image_size=16, val_fraction=0.25, seed=0)
    in_memory = data_setup.load_splits(replace(common, memory_budget_mb=float("inf")))
    streamed = data_setup.load_splits(replace(common, memory_budget_mb=0, workers=2))
    data_setup.load_splits(replace(common, cache_dir=tmp_path))  # writes the cache files
    cached = data_setup.load_splits(replace(common, cache_dir=tmp_path))  # reads them
    assert len(list((tmp_path / "decoded").glob("*.pt"))) == 3
    assert not in_memory.streamed and streamed.streamed and streamed.train.images is None
    assert in_memory.mean == pytest.approx(streamed.mean) and in_memory.std == pytest.approx(streamed.std)
    trivialaugment = data_setup.Augmentation(2, True, trivialaugment=True)
    for split in ("train", "val", "test"):
        for augmentation, balanced in ((data_setup.Augmentation(2, True), False), (trivialaugment, False),
                                       (trivialaugment, True), (None, False)):
            loaders = [
                data_setup.BatchLoader(getattr(s, split), 5, s.mean, s.std, torch.device("cpu"), augmentation, seed=4,
                                       workers=2, balanced=balanced)
                for s in (in_memory, streamed, cached)
            ]
            for _ in range(2):  # two epochs: the generators must stay in step
                rng_state = torch.get_rng_state()
                reference, *others = [_batches(loader) for loader in loaders]
                # The global RNG drives dropout: loading must not move it, streamed or not.
                assert torch.equal(torch.get_rng_state(), rng_state)
                assert len(reference) == len(loaders[0])
                for batches in others:
                    assert len(batches) == len(reference)
                    for (xa, ya), (xb, yb) in zip(reference, batches, strict=True):
                        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_carries_cached_teacher_logits_per_sample():
    data = _tensors(labels=torch.arange(10))  # a label of its own for every sample: each pairing is checked
    loader = data_setup.BatchLoader(data, 4, [0.5] * 3, [0.25] * 3, torch.device("cpu"),
                                    data_setup.Augmentation(0, False), seed=1)
    loader.teacher_logits = torch.arange(10.0)[:, None].repeat(1, 3)  # row i holds i
    seen = []
    for _, labels, logits in loader:
        index = logits[:, 0].long()
        assert torch.equal(labels, data.labels[index])
        seen += index.tolist()
    assert sorted(seen) == list(range(10)), "every sample once, with its own logits"
    assert seen != sorted(seen), "shuffled, so the pairing follows the shuffle"


def test_sample_indices_name_each_batch_image_and_change_no_batch_nor_draw():
    data = _tensors(labels=torch.arange(10))
    make = lambda augmentation: data_setup.BatchLoader(  # noqa: E731
        data, 4, [0.5] * 3, [0.25] * 3, torch.device("cpu"), augmentation, seed=1)
    plain, indexed = make(data_setup.Augmentation(2, True)), make(data_setup.Augmentation(2, True))
    indexed.sample_indices = True
    indexed.teacher_logits = torch.arange(10.0)[:, None]
    for _ in range(2):  # a second epoch: the indices drew nothing from the loader's generator
        for (images, labels), (same_images, same_labels, logits, indices) in zip(plain, indexed, strict=True):
            assert torch.equal(images, same_images) and torch.equal(labels, same_labels)
            assert torch.equal(labels, indices) and torch.equal(logits[:, 0].long(), indices)
    unaugmented = make(data_setup.Augmentation(0, False))
    unaugmented.sample_indices = True
    for images, _, indices in unaugmented:
        assert torch.equal(images, unaugmented._normalize(data.images[indices]))
    evaluation = make(None)
    evaluation.sample_indices = True
    assert torch.cat([indices for *_, indices in evaluation]).tolist() == list(range(10))


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


def _labelled_tensors(labels: list[int], size: int = 6) -> data_setup.ImageTensors:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(labels), 3, size, size), dtype=torch.uint8, generator=generator)
    return data_setup.ImageTensors(images, torch.tensor(labels), [str(i) for i in range(len(labels))], size)


def _loader(data, augmentation, seed=3, **options) -> data_setup.BatchLoader:
    return data_setup.BatchLoader(data, 8, [0.5] * 3, [0.25] * 3, torch.device("cpu"), augmentation, seed=seed,
                                  **options)


def test_trivialaugment_changes_images_is_seeded_and_leaves_the_global_rng_alone():
    data = _labelled_tensors([0, 1, 2] * 8)
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
    data = _labelled_tensors(labels, size=2)
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
