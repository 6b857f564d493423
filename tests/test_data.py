"""Splits, the bundled dataset and the in-memory batch loader."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder

import data_setup
from core import errors
from data import decoding


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


def test_decode_image_matches_training_decode(tiny_data):
    splits = data_setup.load_splits(data_setup.DataDescription(data_dir=str(tiny_data), image_size=16,
                                                               val_fraction=0.25, seed=0))
    path = splits.test.paths[4]
    assert torch.equal(decoding.decode_image(path, 16), splits.test.images[4])
    assert Path(path).parent.name == splits.class_names[int(splits.test.labels[4])]


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


def test_decode_cache_is_reused_and_invalidated_by_changes(tiny_data, tmp_path, monkeypatch):
    paths = sorted(str(p) for p in (tiny_data / "train").rglob("*.png"))[:6]
    fresh = decoding.decode_cached(paths, 16, 0, tmp_path)
    assert len(list((tmp_path / "decoded").glob("*.pt"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again although the cache file is valid")

    monkeypatch.setattr(decoding, "_decode_all", no_decoding)
    assert torch.equal(decoding.decode_cached(paths, 16, 0, tmp_path), fresh)
    monkeypatch.undo()
    stat = Path(paths[0]).stat()
    import os

    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed file: a new key
    assert torch.equal(decoding.decode_cached(paths, 16, 0, tmp_path), fresh)
    assert len(list((tmp_path / "decoded").glob("*.pt"))) == 2


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
