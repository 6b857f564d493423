"""Hostile image folders (damaged files, odd colour modes, junk, odd names) and bad prediction inputs."""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import tokenize
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_one_sentence_exit_2
from PIL import Image

import data_setup
import prediction_for_one
from core import errors
from data import decoding
from training import checkpoints

SIZE = 8  # decoded image size: small, the content checks use uniform images
CLASSES = ("red circle", "blå", "plain")  # a space and a non-ASCII letter
BIG = (6400, 6400)  # about 41 megapixels: a real photo's size, which must be used


def _noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _palette(colour, transparent: bool) -> Image.Image:
    image = Image.new("P", (10, 6), 1)
    image.putpalette([200, 0, 0, *colour])  # index 0: red, index 1: the colour
    if transparent:
        image = Image.new("P", (10, 6), 0)
        image.putpalette([200, 0, 0, *colour])
        image.info["transparency"] = 0  # every pixel is transparent red: composited onto white
    return image


def _sixteen_bit(value: int) -> Image.Image:
    return Image.fromarray(np.full((6, 9), value, dtype=np.uint16))  # mode I;16


# Good images: (file name, writer(colour) -> (PIL image, format), expected RGB after decoding, tolerance).
# `c` is a per-image RGB colour; every image is uniform so its decoded mean is known.
def _good_kinds(c: tuple[int, int, int]) -> list[tuple[str, Image.Image, str, tuple[int, int, int], float]]:
    grey = c[1]
    return [
        ("rgb.png", Image.new("RGB", (12, 9), c), "PNG", c, 0),
        ("photo ø.jpg", Image.new("RGB", (20, 16), c), "JPEG", c, 6),
        ("grey.png", Image.new("L", (7, 7), grey), "PNG", (grey,) * 3, 0),
        ("one bit.png", Image.new("1", (9, 9), 1), "PNG", (255, 255, 255), 0),
        ("palette.png", _palette(c, transparent=False), "PNG", c, 0),
        ("palette transparent.png", _palette(c, transparent=True), "PNG", (255, 255, 255), 0),
        ("rgba clear.png", Image.new("RGBA", (8, 8), (10, 20, 30, 0)), "PNG", (255, 255, 255), 0),
        ("rgba opaque.png", Image.new("RGBA", (8, 8), (*c, 255)), "PNG", c, 0),
        ("cmyk.tif", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF", (255, 0, 0), 0),
        ("cmyk.jpg", Image.new("CMYK", (16, 16), (255, 0, 255, 0)), "JPEG", (0, 255, 0), 8),
        ("sixteen bit.png", _sixteen_bit(32768), "PNG", (128, 128, 128), 1),  # mid-grey, not white
        ("grey alpha.png", Image.new("LA", (8, 8), (grey, 255)), "PNG", (grey,) * 3, 0),
        ("tiny 1x1.png", Image.new("RGB", (1, 1), c), "PNG", c, 0),
    ]


def _colour(label: int, i: int) -> tuple[int, int, int]:
    return (40 + 60 * label, 30 + 15 * i, 200 - 10 * i)


def _write_good(folder: Path, label: int, count: int, start: int, expected: dict[str, tuple]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        kinds = _good_kinds(_colour(label, i))
        name, image, fmt, rgb, tolerance = kinds[i % len(kinds)]
        path = folder / f"{i:02d} {name}"
        image.save(path, fmt)
        expected[str(path)] = (rgb, tolerance)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A train/ and test/ tree with good images in every colour mode plus every kind of bad file.

    Returns (root, {good path: (expected RGB, tolerance)}, {bad path: expected reason fragment}).
    """
    root = tmp_path_factory.mktemp("hostile ø")
    good: dict[str, tuple] = {}
    bad: dict[str, str] = {}
    for label, name in enumerate(sorted(CLASSES)):
        _write_good(root / "train" / name, label, 13, 0, good)  # every kind once
        _write_good(root / "test" / name, label, 4, 5, good)
    big = root / "train" / "plain" / "big 41 MP ü.jpg"
    Image.new("RGB", BIG, (10, 200, 30)).save(big, "JPEG", quality=90)
    good[str(big)] = ((10, 200, 30), 6)

    def junk(relative: str, content: bytes, reason: str | None) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        if reason is not None:
            bad[str(path)] = reason

    noisy_jpeg, noisy_png = _jpeg_bytes(_noise()), _png_bytes(_noise(seed=1))
    junk("train/red circle/corrupt.png", np.random.default_rng(3).bytes(300), "not a readable image")
    junk("train/red circle/empty.jpg", b"", "empty file")
    junk("train/blå/truncated.jpg", noisy_jpeg[: len(noisy_jpeg) // 2], "truncated")
    junk("train/blå/truncated half.png", noisy_png[: len(noisy_png) // 2], "")
    junk("train/plain/notes.jpg", b"shopping list: milk, eggs\n" * 20, "not a readable image")
    junk("train/plain/README.txt", b"these are my photos\n", "not an image file")
    junk("train/README.txt", b"dataset readme\n", "not inside a class folder")
    junk("train/plain/.DS_Store", b"\0\0\0\1Bud1" * 10, None)  # hidden: ignored silently
    junk("train/plain/._00 rgb.png", b"\0\5\26\7AppleDouble", None)
    junk("train/.DS_Store", b"\0\0\0\1Bud1", None)
    junk("train/.ipynb_checkpoints/00.png", _png_bytes(_noise((4, 4))), None)  # hidden folder: no class
    junk("test/plain/bad.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "")
    junk("test/notes.md", b"# notes\n", "not inside a class folder")
    junk("test/.DS_Store", b"\0", None)
    link = root / "test" / "blå" / "broken link.png"
    link.symlink_to(root / "nowhere.png")
    bad[str(link)] = "does not exist"
    return root, good, bad


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


# ---------------------------------------------------------------- prediction_for_one.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small untrained model in the self-describing checkpoint format (quicker than a training run)."""
    import model_builder

    classes = ["circle", "cross", "stripes"]
    model = model_builder.build_model("mobilenet_v3_small", len(classes), 32)
    path = tmp_path_factory.mktemp("model") / "best_model.pth"
    torch.save({"arch": "mobilenet_v3_small", "num_classes": len(classes), "class_names": classes,
                "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def good_images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("good images")
    paths = [folder / "one.png", folder / "two ø.jpg"]
    _noise(seed=5).save(paths[0])
    _noise(seed=6).save(paths[1])
    return [str(path) for path in paths]


def _bad_images(folder: Path) -> dict[str, str]:
    """Bad image arguments and the reason each must be reported with."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.jpg").write_text("not a picture")
    (folder / "empty.png").write_bytes(b"")
    noisy = _jpeg_bytes(_noise())
    (folder / "truncated.jpg").write_bytes(noisy[: len(noisy) // 2])
    return {str(folder / "missing.png"): "does not exist",
            str(folder / "text.jpg"): "not a readable image", str(folder / "empty.png"): "empty file",
            str(folder / "truncated.jpg"): "truncated"}


def test_each_bad_image_alone_is_one_clear_line_and_exit_1(checkpoint, tmp_path, capsys):
    for image, reason in _bad_images(tmp_path / "bad").items():
        assert prediction_for_one.main(["--model", str(checkpoint), "--json", image]) == 1
        captured = capsys.readouterr()
        assert json.loads(captured.out)[0]["image"] == image
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and image in lines[0] and reason in lines[0]


def test_mixed_batch_predicts_the_good_images_and_reports_the_bad(checkpoint, good_images, tmp_path):
    bad = _bad_images(tmp_path / "bad ø")
    images = [good_images[0], *bad, good_images[1]]
    result = subprocess.run([sys.executable, str(ROOT / "prediction_for_one.py"), "--model", str(checkpoint),
                             "--json", *images], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    predictions = json.loads(result.stdout)
    assert [p["image"] for p in predictions] == images
    assert "top" in predictions[0] and "top" in predictions[-1]
    for prediction in predictions[1:-1]:
        assert bad[prediction["image"]] in prediction["error"]
    for image in bad:
        assert image in result.stderr
    assert f"{len(bad)} of {len(images)} images could not be read" in result.stderr


def test_bad_checkpoints_are_one_clear_line_and_exit_2(checkpoint, good_images, tmp_path, capsys):
    image = good_images[0]
    assert prediction_for_one.main(["--model", str(checkpoint), image]) == 0  # the intact one works
    assert "circle" in capsys.readouterr().out
    data = checkpoint.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    wrong = torch.load(checkpoint, weights_only=True)
    wrong["state_dict"] = {key: value[..., :1] if value.dim() else value for key, value in wrong["state_dict"].items()}
    torch.save(wrong, tmp_path / "wrong shapes.pth")
    (tmp_path / "a folder.pth").mkdir()
    cases = {"missing.pth": "does not exist", "truncated.pth": "damaged, truncated",
             "random.pth": "damaged, truncated", "empty.pth": "damaged, truncated", "foreign.pth": "lacks 'arch'",
             "tensor.pth": "holds a Tensor", "wrong shapes.pth": "weights do not rebuild",
             "a folder.pth": "is a folder"}
    for name, reason in cases.items():
        model = str(tmp_path / name)
        code = prediction_for_one.main(["--model", model, image])
        captured = capsys.readouterr()
        assert captured.out == "", name
        assert_one_sentence_exit_2(code, captured.err, model, reason)


def log_entry(line: str) -> tuple[str, str]:
    """A line of skipped_files.log read back: the file name (a Python string literal) and the reason after it."""
    literal = next(tokenize.generate_tokens(io.StringIO(line).readline))
    return ast.literal_eval(literal.string), line[literal.end[1]:].removeprefix(": ")


def test_experiment_completes_on_the_hostile_folder_and_lists_what_it_skipped(hostile, tmp_path, capsys):
    from conftest import SMALL_MODELS, TINY_FLAGS

    import experiment

    root, good, bad = hostile
    run_dir = tmp_path / "run"
    code = experiment.main(["--data-dir", str(root), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            *TINY_FLAGS, *SMALL_MODELS, "--teacher-epochs", "1",
                            "--student-epochs", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"Skipped {len(bad)} unreadable files" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [item["path"] for item in summary["skipped_files"]] == sorted(bad)
    log = (run_dir / "skipped_files.log").read_text(encoding="utf-8").splitlines()
    assert [log_entry(line)[0] for line in log] == sorted(bad)
    assert summary["dataset"]["sizes"] == {"train": 30, "val": 10, "test": 12}
    assert "skipped files" in (run_dir / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------- a model file's description

# A change to a usable description, and what the one sentence about it must say.
BAD_DESCRIPTIONS = {
    "fewer class names than outputs": ({"class_names": ["circle", "cross"]},
                                       "its 'class_names' holds 2 names, but"),
    "a mean of two values": ({"mean": [0.5, 0.5]},
                             "its 'mean' must be a list of 3 finite numbers, one per colour channel, not [0.5, 0.5]"),
    "the image size as text": ({"image_size": "8"}, "its 'image_size' must be an integer from 8 to 1024 (pixels), "
                                                    "not '8'"),
    "an image size beyond the range": ({"image_size": 4096}, "its 'image_size' must be an integer from 8 to 1024"),
    "an unknown resize mode": ({"resize": "stretch"}, "its 'resize' must be one of squash, center-crop, not 'stretch'"),
    "a std of zero": ({"std": [0.0, 0.25, 0.25]}, "its 'std' must be a list of 3 finite positive numbers"),
    "an infinite mean": ({"mean": [float("inf"), 0.5, 0.5]}, "its 'mean' must be a list of 3 finite numbers"),
    "class names that are not text": ({"class_names": [1, 2, 3]}, "its 'class_names' must be a non-empty list of "
                                                                  "distinct, non-empty class names"),
}


@pytest.fixture(scope="module")
def small_model_files(tmp_path_factory) -> tuple[dict, torch.nn.Module, Path]:
    """A usable description of a tiny 3-class classifier, the classifier, and a folder holding one image."""
    import model_builder

    torch.manual_seed(0)
    model = model_builder.build_model("resnet8", 3, 32).eval()
    description = {"arch": "resnet8", "num_classes": 3, "class_names": ["circle", "cross", "stripes"],
                   "image_size": 32, "resize": "squash", "mean": [0.5] * 3, "std": [0.25] * 3, "epoch": 1,
                   "history": [], "state_dict": model.state_dict()}
    folder = tmp_path_factory.mktemp("model files")
    _noise(seed=7).save(folder / "image.png")
    return description, model, folder


@pytest.mark.parametrize("case", sorted(BAD_DESCRIPTIONS))
def test_a_checkpoint_whose_description_cannot_be_used_is_one_sentence(case, small_model_files, capsys):
    description, _, folder = small_model_files
    change, message = BAD_DESCRIPTIONS[case]
    path = folder / f"{case}.pth"
    checkpoints.save_checkpoint(path, {**description, **change})
    code = prediction_for_one.main(["--model", str(path), str(folder / "image.png")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, f"'{path}' is not a usable model file", message)


def test_num_classes_must_count_the_class_names(small_model_files, capsys):
    description, _, folder = small_model_files
    checkpoints.save_checkpoint(folder / "four.pth", {**description, "num_classes": 4})
    code = prediction_for_one.main(["--model", str(folder / "four.pth"), str(folder / "image.png")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "its 'class_names' holds 3 names, but its "
                                                              "'num_classes' says 4 classes")


def test_an_exported_model_whose_metadata_cannot_be_used_is_one_sentence(small_model_files, capsys):
    import onnx

    from results import deploy

    description, model, folder = small_model_files
    metadata = {key: description[key] for key in ("arch", "class_names", "image_size", "resize", "mean", "std")}
    deploy.export_onnx(model, folder / "model.onnx", 32, metadata)
    assert prediction_for_one.main(["--model", str(folder / "model.onnx"), str(folder / "image.png")]) == 0
    capsys.readouterr()
    for case, (change, message) in BAD_DESCRIPTIONS.items():
        graph = onnx.load(str(folder / "model.onnx"))
        graph.metadata_props[0].value = json.dumps({**metadata, **change})
        path = folder / f"{case}.onnx"
        onnx.save(graph, str(path))
        code = prediction_for_one.main(["--model", str(path), str(folder / "image.png")])
        expected = "but the model gives 3 classes" if case == "fewer class names than outputs" else message
        assert_one_sentence_exit_2(code, capsys.readouterr().err, f"'{path}'", expected)


def test_predict_images_refuses_a_description_that_does_not_fit_the_classifier(small_model_files, monkeypatch,
                                                                                 capsys):
    description, _, folder = small_model_files
    usable = {key: description[key] for key in checkpoints.DESCRIPTION_KEYS}
    image = str(folder / "image.png")
    three_outputs = lambda images: torch.zeros(len(images), 3)  # noqa: E731  (a stub classifier)
    for change, message in (({"class_names": ["circle", "cross"]}, "holds 2 names, but the model gives 3 classes"),
                            BAD_DESCRIPTIONS["a mean of two values"]):
        with pytest.raises(errors.SettingsError, match=re.escape(message)):
            prediction_for_one.predict_images(three_outputs, {**usable, **change}, [image], 3)
        # Through the command line: one sentence and exit 2, never a traceback (prediction ran outside the try).
        monkeypatch.setattr(prediction_for_one, "load_classifier",
                            lambda path, device, change=change: (three_outputs, {**usable, **change}))
        code = prediction_for_one.main(["--model", "stub.pth", image])
        assert_one_sentence_exit_2(code, capsys.readouterr().err, "'stub.pth'", message)


@pytest.mark.parametrize("case", ["a std of zero", "a mean of two values", "an unknown resize mode",
                                  "the image size as text"])
def test_a_teacher_checkpoint_whose_description_cannot_be_used_is_refused_before_any_work(
        case, small_model_files, tmp_path, capsys):
    import experiment

    description, _, folder = small_model_files
    change, message = BAD_DESCRIPTIONS[case]
    path = tmp_path / "teacher.pth"
    checkpoints.save_checkpoint(path, {**description, **change})
    code = experiment.main(["--teacher-checkpoint", str(path), "--output-dir", str(tmp_path / "run")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, f"'{path}' is not a usable model file", message)
    assert not (tmp_path / "run").exists()


def test_a_weights_file_with_an_unusable_normalization_is_refused(small_model_files, tmp_path, capsys):
    import experiment

    description, _, _ = small_model_files
    checkpoints.save_checkpoint(tmp_path / "weights.pth", {**description, "std": [0.0, 0.25, 0.25]})
    code = experiment.main(["--student-model", "resnet8", "--student-weights", str(tmp_path / "weights.pth"),
                            "--output-dir", str(tmp_path / "run")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "its 'std' must be a list of 3 finite positive numbers")
    assert not (tmp_path / "run").exists()


def test_a_file_name_holding_a_newline_cannot_fake_lines_of_the_skipped_files_log(tmp_path, capsys):
    from results import evaluation

    faked = "photo.jpg: not a readable image\n/data/cat/secret.jpg"
    skipped = [{"path": str(tmp_path / faked), "reason": "not a readable image (unknown format)"},
               {"path": str(tmp_path / "it's \"quoted\" ø.png"), "reason": "truncated image\n(line two)"}]
    evaluation.write_skipped_files(tmp_path, skipped)
    lines = (tmp_path / "skipped_files.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    for line, entry in zip(lines, skipped, strict=True):
        assert log_entry(line) == (entry["path"], " ".join(entry["reason"].split()))
    assert "Skipped 2 unreadable files" in capsys.readouterr().out
