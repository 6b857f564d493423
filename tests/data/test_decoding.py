"""Image decoding (data.decoding): the decode cache, resize modes, large images, and the GPU decoder's path
against the CPU's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import CPU, CUDA
from PIL import Image

import data_setup
from data import decoding


def test_decode_image_matches_training_decode(tiny_data):
    splits = data_setup.load_splits(data_setup.DataDescription(data_dir=str(tiny_data), image_size=16,
                                                               val_fraction=0.25, seed=0))
    path = splits.test.paths[4]
    assert torch.equal(decoding.decode_image(path, 16), splits.test.images[4])
    assert Path(path).parent.name == splits.class_names[int(splits.test.labels[4])]


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


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


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


def test_gpu_decoding_only_for_cuda():
    assert decoding.gpu_decoding(CUDA) and decoding.gpu_decoding(torch.device("cuda", 1))
    assert not decoding.gpu_decoding(CPU) and not decoding.gpu_decoding(None)


def _photo(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: size[1], : size[0]]
    smooth = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) * 127 // sum(size)], axis=-1)
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def mixed_folder(tmp_path) -> dict[str, Path]:
    """One file of each kind the GPU path must tell apart."""
    files = {
        "rgb": tmp_path / "rgb.jpg", "rgb_large": tmp_path / "rgb_large.jpeg", "grey": tmp_path / "grey.jpg",
        "cmyk": tmp_path / "cmyk.jpg", "png": tmp_path / "image.png", "truncated": tmp_path / "truncated.jpg",
        "text": tmp_path / "notes.jpg", "empty": tmp_path / "empty.jpg",
    }
    Image.fromarray(_photo((16, 16), 0)).save(files["rgb"], quality=90)
    Image.fromarray(_photo((40, 28), 1)).save(files["rgb_large"], quality=90)
    Image.fromarray(_photo((16, 16), 2)[..., 0]).save(files["grey"], quality=90)
    Image.fromarray(_photo((16, 16), 3)).convert("CMYK").save(files["cmyk"], quality=90)
    Image.fromarray(_photo((16, 16), 4)).save(files["png"])
    complete = files["rgb_large"].read_bytes()
    files["truncated"].write_bytes(complete[: len(complete) * 2 // 3])
    files["text"].write_text("not an image")
    files["empty"].write_bytes(b"")
    return files


def test_only_complete_rgb_or_grey_jpegs_go_to_the_gpu_decoder(mixed_folder):
    for kind, path in mixed_folder.items():
        data = decoding.gpu_jpeg_bytes(str(path))
        assert (data is not None) == (kind in ("rgb", "rgb_large", "grey")), kind
        if data is not None:
            assert data.dtype == torch.uint8 and bytes(data.numpy()) == path.read_bytes()
    assert decoding.gpu_jpeg_bytes(str(mixed_folder["rgb"].parent / "missing.jpg")) is None


def _checked(paths, decode_device, resize="squash"):
    """Every batch of decoded_batches for `paths` in a shuffled order: {index: image}, {index: reason}."""
    order = [[5, 1, 7], [0, 6, 3], [2, 4]]
    images, failed = {}, {}
    for batch, (decoded, failures) in zip(
            order, decoding.decoded_batches(paths, 16, 0, resize, decode_device, batch_sampler=order), strict=True):
        good = [index for index in batch if index not in failures]
        assert decoded is None or len(decoded) == len(good)
        images.update(zip(good, [] if decoded is None else decoded, strict=True))
        failed.update(failures)
    return images, failed


@pytest.mark.parametrize("resize", ["squash", "center-crop"])
def test_gpu_path_keeps_the_cpu_paths_images_order_and_skip_reasons(mixed_folder, monkeypatch, resize):
    paths = [str(path) for path in mixed_folder.values()]
    pil_images, pil_failed = _checked(paths, None, resize)
    monkeypatch.setattr(decoding, "gpu_decoding", lambda device: device is not None)  # the CUDA path, on the CPU
    tensor_images, tensor_failed = _checked(paths, CPU, resize)
    assert tensor_failed == pil_failed and set(pil_failed) == {5, 6, 7}  # truncated, text, empty
    assert tensor_images.keys() == pil_images.keys()
    names = list(mixed_folder)
    for index, image in tensor_images.items():
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
        difference = (image.int() - pil_images[index].int()).abs().float().mean().item()
        if names[index] in ("cmyk", "png"):  # not JPEGs for the GPU decoder: Pillow's pixels exactly
            assert difference == 0, names[index]
        else:  # another decoder (and resize) for the same picture
            assert difference < 4, names[index]


def test_a_jpeg_the_gpu_decoder_refuses_goes_through_pillow(mixed_folder, monkeypatch):
    """nvJPEG fails a whole batch for one file it cannot take: each file is retried alone, and the
    refused one is decoded by Pillow, exactly as on the CPU."""
    refused = mixed_folder["rgb"].read_bytes()
    original = torchvision.io.decode_jpeg

    def picky_decoder(data, *args, **kwargs):
        if isinstance(data, list) or bytes(data.numpy()) == refused:
            raise RuntimeError("nvjpegDecodeBatched failed")
        return original(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky_decoder)
    monkeypatch.setattr(decoding, "gpu_decoding", lambda device: device is not None)
    paths = [str(mixed_folder[kind]) for kind in ("grey", "rgb", "truncated")]
    images, failed = _checked(paths * 3, CPU)
    assert torch.equal(images[1], decoding.decode_image(paths[1], 16))
    assert (images[0].float() - decoding.decode_image(paths[0], 16).float()).abs().mean() < 4
    assert failed[2].startswith("truncated image") or failed[2].startswith("damaged image")


def test_gpu_decoded_streaming_and_in_memory_batches_are_identical(tmp_path, monkeypatch):
    """With GPU decoding (here on the CPU) the first decode and the streamed epochs use the same
    decoder, so their batches stay identical; its decode cache is kept apart from Pillow's."""
    for split, count in (("train", 10), ("test", 4)):
        for label in ("a", "b"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_photo((20 + i, 20), i + 7 * (label == "b"))).save(folder / f"{i}.jpg")
    monkeypatch.setattr(decoding, "gpu_decoding", lambda device: device is not None)
    common = data_setup.DataDescription(data_dir=str(tmp_path / "data"), image_size=16, val_fraction=0.25, seed=0)
    in_memory = data_setup.load_splits(replace(common, cache_dir=tmp_path / "cache", decode_device=CPU))
    streamed = data_setup.load_splits(replace(common, memory_budget_mb=0, workers=2, decode_device=CPU))
    pillow = data_setup.load_splits(replace(common, cache_dir=tmp_path / "cache"))
    assert streamed.streamed and streamed.train.images is None and streamed.train.decode_device == CPU
    assert in_memory.mean == pytest.approx(streamed.mean)
    assert not torch.equal(in_memory.train.images, pillow.train.images)  # another decoder, another cache file
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 6
    for split in ("train", "val", "test"):
        loaders = [data_setup.BatchLoader(getattr(s, split), 3, s.mean, s.std, CPU, data_setup.Augmentation(2, True),
                                          seed=1, workers=2) for s in (in_memory, streamed)]
        for _ in range(2):
            reference, other = [list(loader) for loader in loaders]
            assert len(reference) == len(other) == len(loaders[0])
            for (xa, ya), (xb, yb) in zip(reference, other, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
