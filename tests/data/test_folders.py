"""Image folders with hostile content (data.folders): every good image loaded, every bad file listed with its
reason, and folder layouts that cannot work refused in one sentence."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from hostile_images import BIG, CLASSES, _noise, _png_bytes, _write_good
from PIL import Image

import data_setup
from core import errors
from data import decoding


def test_every_class_difference_between_splits_in_one_message(tmp_path):
    root = make_image_folder(tmp_path, {"train": 3, "val": 2, "test": 2})
    make_image_folder(tmp_path / "extra", {"val": 1})
    (tmp_path / "extra" / "val" / "circle").rename(root / "val" / "hexagon")
    shutil.rmtree(root / "test" / "cross")
    for path in (root / "val" / "stripes").iterdir():
        path.unlink()
    with pytest.raises(errors.DataError) as error:
        data_setup.load_splits(data_setup.DataDescription(data_dir=str(root), image_size=16, val_fraction=0.3, seed=0))
    message = str(error.value)
    assert "'cross' is in train and val but missing from test" in message
    assert "'hexagon' is in val but missing from train and test" in message
    assert "'stripes' in the val folder" in message and "the folder is empty" in message


SIZE = 8  # decoded image size: small, the content checks use uniform images


def _load(root: Path, **options) -> data_setup.DatasetSplits:
    return data_setup.load_splits(data_setup.DataDescription(data_dir=str(root), image_size=SIZE, val_fraction=0.25,
                                                             seed=0, **options))


def _check_splits(splits: data_setup.DatasetSplits, good: dict, bad: dict) -> None:
    assert splits.class_names == sorted(CLASSES)
    used = splits.train.paths + splits.val.paths + splits.test.paths
    assert len(used) == len(set(used)) and set(used) == set(good)
    assert not any("/." in path for path in used)
    for part in (splits.train, splits.val, splits.test):
        names = [splits.class_names[label] for label in part.labels.tolist()]
        assert names == [Path(p).parent.name for p in part.paths]
    # every bad file, and nothing else, is listed with a one-line reason, sorted by path
    assert [item["path"] for item in splits.skipped_files] == sorted(bad)
    for item in splits.skipped_files:
        assert item["reason"] and "\n" not in item["reason"]
        assert bad[item["path"]].lower() in item["reason"].lower(), item


def _check_content(part: data_setup.ImageTensors, good: dict) -> None:
    assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, SIZE, SIZE)
    for path, image in zip(part.paths, part.images, strict=True):
        rgb, tolerance = good[path]
        mean = image.float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(rgb, dtype=torch.float), atol=tolerance + 0.5), (path, mean, rgb)


def test_hostile_folder_loads_every_good_image_and_lists_every_bad_file(hostile):
    root, good, bad = hostile
    splits = _load(root)
    _check_splits(splits, good, bad)
    for part in (splits.train, splits.val, splits.test):
        _check_content(part, good)
    sixteen = [i for i, p in enumerate(splits.train.paths + splits.val.paths) if "sixteen bit" in p]
    assert sixteen and all(
        torch.cat([splits.train.images, splits.val.images])[i].float().mean().round() == 128 for i in sixteen)


def test_streamed_and_cached_loads_give_the_same_images_and_skips(hostile, tmp_path, monkeypatch):
    root, good, bad = hostile
    in_memory = _load(root)
    streamed = _load(root, memory_budget_mb=0)
    assert streamed.streamed and streamed.train.images is None
    _check_splits(streamed, good, bad)
    assert streamed.skipped_files == in_memory.skipped_files
    assert streamed.mean == pytest.approx(in_memory.mean) and streamed.std == pytest.approx(in_memory.std)
    for name in ("train", "val", "test"):  # a streamed epoch meets no bad file and matches memory
        loaders = [data_setup.BatchLoader(getattr(s, name), 7, s.mean, s.std, torch.device("cpu"))
                   for s in (in_memory, streamed)]
        for (xa, ya), (xb, yb) in zip(*loaders, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)

    first = _load(root, cache_dir=tmp_path)
    first_streamed = _load(root, cache_dir=tmp_path, memory_budget_mb=0)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds the result")

    monkeypatch.setattr(decoding, "_decode_checked", no_decoding)
    monkeypatch.setattr(decoding, "_decode_all", no_decoding)
    again = _load(root, cache_dir=tmp_path)
    again_streamed = _load(root, cache_dir=tmp_path, memory_budget_mb=0)
    for splits in (first, first_streamed, again, again_streamed):
        _check_splits(splits, good, bad)
        assert splits.skipped_files == in_memory.skipped_files
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(again, name).images, getattr(in_memory, name).images)
        assert torch.equal(getattr(first, name).images, getattr(in_memory, name).images)


def test_large_png_is_used_and_the_bomb_limit_skips_with_a_reason(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("L", BIG, 77).save(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's decompression-bomb warning must not escape either
        assert decoding.decode_image(str(big), SIZE).float().mean().round() == 77

    root = tmp_path / "data"
    for split, count in (("train", 4), ("test", 2)):
        for name in ("a", "b"):
            _write_good(root / split / name, 0, count, 0, {})
    large = root / "train" / "a" / "large.png"
    Image.new("RGB", (300, 300), (9, 99, 199)).save(large)  # 90,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # above the warning limit, below the hard one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = _load(root)
    assert str(large) in splits.train.paths + splits.val.paths and splits.skipped_files == []
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # 90,000 > 2 x 40,000: refused
    splits = _load(root)
    assert str(large) not in splits.train.paths + splits.val.paths
    assert [item["path"] for item in splits.skipped_files] == [str(large)]
    assert "too large" in splits.skipped_files[0]["reason"]
    with pytest.raises(decoding.UnreadableImage, match="too large"):
        decoding.decode_image(str(large), SIZE)


def _small_tree(root: Path, per_class: dict[str, int], classes=("a", "b")) -> Path:
    for split, count in per_class.items():
        for name in classes:
            _write_good(root / split / name, 0, count, 0, {})
    return root


def test_missing_split_folder(tmp_path):
    _small_tree(tmp_path, {"train": 4})
    with pytest.raises(errors.DataError, match=r"^Data folder '.*' has train/ but no test/: .*\.$"):
        _load(tmp_path)
    with pytest.raises(errors.DataError, match=r"^The test folder '.*nowhere' does not exist\.$"):
        data_setup.load_splits(data_setup.DataDescription(train_dir=str(tmp_path / "train"),
                                                          test_dir=str(tmp_path / "nowhere"), image_size=SIZE,
                                                          val_fraction=0.25, seed=0))


def test_split_folder_without_class_folders(tmp_path):
    _small_tree(tmp_path, {"train": 4})
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "loose.png").write_bytes(_png_bytes(_noise((4, 4))))
    with pytest.raises(errors.DataError, match=r"The test folder .* has no class folders"):
        _load(tmp_path)


def test_class_with_only_bad_files_names_class_and_split(tmp_path):
    _small_tree(tmp_path, {"train": 4, "test": 2})
    for path in (tmp_path / "test" / "b").iterdir():
        path.write_bytes(b"")  # every test image of class b is now empty
    with pytest.raises(errors.DataError,
                       match=r"^The class 'b' in the test folder .* has no usable images: 2 files were skipped, "
                             r"e\.g\. .*empty file"):
        _load(tmp_path)


def test_class_folder_without_image_files(tmp_path):
    _small_tree(tmp_path, {"train": 4, "test": 2})
    for path in (tmp_path / "train" / "a").iterdir():
        path.unlink()
    (tmp_path / "train" / "a" / "notes.txt").write_text("nothing here yet")
    with pytest.raises(errors.DataError, match=r"The class 'a' in the train folder .* has no usable images"):
        _load(tmp_path)


def test_too_few_images_to_carve_validation_names_the_class_and_fraction(tmp_path):
    _small_tree(tmp_path, {"train": 6, "test": 2}, classes=("common", "rare"))
    for path in sorted((tmp_path / "train" / "rare").iterdir())[1:]:
        path.write_bytes(b"not an image")  # one usable image left in 'rare'
    with pytest.raises(errors.DataError,
                       match=r"Too few training images to carve a stratified 25% validation split: "
                             r"class 'rare' has only 1 usable image"):
        _load(tmp_path)
    enough = _small_tree(tmp_path / "enough", {"train": 4, "test": 2})
    with pytest.raises(errors.DataError, match=r"5% of 8 images is 1, fewer than the 2 classes"):
        data_setup.load_splits(data_setup.DataDescription(data_dir=str(enough), image_size=SIZE, val_fraction=0.05,
                                                          seed=0))
