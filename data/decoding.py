"""Reading image files into uint8 tensors: the one Pillow decode, JPEG decoding on the GPU (nvJPEG),
and a cache of decoded images and of which files are unreadable.

Every image is converted to RGB and fitted to a square (`fit_to_square`) once; a file that cannot
be decoded gets a one-line reason instead (`UnreadableImage`), so a run can skip it and say why.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

import utils
from core import errors

DECODE_WORKERS_THRESHOLD = 2000  # images; below this, worker start-up costs more than it saves
TRANSPARENT_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
CACHE_VERSION = "v2"  # bump when decoding changes, so no stale cache file is trusted
RESIZE_MODES = ("squash", "center-crop")  # squash: whole image to S x S; center-crop: central square
IMAGE_SIZES = (8, 1024)  # the smallest and largest square side (px) images are fitted to


class UnreadableImage(Exception):
    """A file that cannot be decoded as an image; the message is a one-line reason (no path)."""



def _unreadable_reason(path: str, error: Exception) -> str:
    """A one-line reason why `path` could not be decoded."""
    if isinstance(error, FileNotFoundError):
        return "file does not exist"
    if isinstance(error, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, Image.DecompressionBombError):
        return f"image too large to decode safely ({errors.one_line(error)})"
    if isinstance(error, UnidentifiedImageError):
        try:
            empty = os.path.getsize(path) == 0
        except OSError:
            empty = False
        return "empty file (0 bytes)" if empty else "not a readable image (unknown format or damaged header)"
    message = errors.one_line(error)
    if "truncated" in message.lower():
        return f"truncated image ({message})"
    return f"damaged image data ({type(error).__name__}: {message})"


def _grey_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float greyscale array to 0..255 (not clip it)."""
    if mode.startswith("I;16"):
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    values = np.nan_to_num(array.astype(np.float32))
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0 and high <= 1:
        low, scale = 0.0, 255.0
    elif low >= 0 and high <= 255:
        low, scale = 0.0, 1.0
    elif low >= 0 and high <= 65535:  # 16-bit data held in a 32-bit mode (e.g. older Pillow's PNGs)
        low, scale = 0.0, 255 / 65535
    else:
        scale = 255 / max(high - low, 1e-12)
    return np.clip(np.round((values - low) * scale), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB.

    16-bit and other wide greyscale modes (I;16, I, F) are scaled to 0..255: mid-grey 32768
    becomes 128, where Pillow's own convert would clip it to white. Transparency (alpha channels,
    palette or colour-key transparency) is composited onto TRANSPARENT_BACKGROUND (white), so
    the colour stored under transparent pixels never leaks in. CMYK, palette, 1-bit and
    greyscale use Pillow's conversions.
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = Image.fromarray(_grey_to_uint8(np.asarray(image), image.mode))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_to_square(
    image: Image.Image | torch.Tensor, image_size: int, resize: str = "squash",
) -> Image.Image | torch.Tensor:
    """An image (Pillow's, or a tensor decoded on the GPU) as `image_size` x `image_size`: squashed
    whole ("squash", the aspect ratio is lost) or its central square scaled to that size
    ("center-crop": the shorter side fills it, the longer side's ends are cut off equally)."""
    if resize == "center-crop":
        side = min(transforms.functional.get_image_size(image))
        image = transforms.functional.center_crop(image, [side, side])
    return transforms.functional.resize(image, [image_size, image_size], antialias=True)


def decode_image(path: str, image_size: int, resize: str = "squash") -> torch.Tensor:
    """Read one image file as an RGB uint8 tensor (3, S, S): the one decode used everywhere.

    The image is fitted to the square by `fit_to_square` (`resize`: squash or center-crop).
    Colours are converted by `to_rgb`; multi-frame files give their first frame. Large images:
    JPEGs are decoded directly at a reduced scale (Pillow's draft mode, still at least S x S),
    and any image up to Pillow's hard decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS,
    about 179 megapixels by default) is decoded, without the warning Pillow gives above
    MAX_IMAGE_PIXELS; a 40-megapixel photo is used. Larger images, and files that are missing,
    empty, truncated or not images at all, raise UnreadableImage with a one-line reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format == "JPEG":
                    image.draft(None, (image_size, image_size))
                image.load()
                rgb = to_rgb(image)
        return transforms.functional.pil_to_tensor(fit_to_square(rgb, image_size, resize))
    except Exception as error:  # Pillow's format plugins raise many kinds of errors for damaged files
        raise UnreadableImage(_unreadable_reason(path, error)) from None


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded on access (in worker processes when loaded through a DataLoader):
    item i is (i, image, "") or, for a file that cannot be decoded, (i, None, reason)."""

    def __init__(self, paths: Sequence[str], image_size: int, resize: str = "squash") -> None:
        self.paths, self.image_size, self.resize = list(paths), image_size, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, decode_image(self.paths[index], self.image_size, self.resize), ""
        except UnreadableImage as error:
            return index, None, str(error)


def file_loader(
    paths: Sequence[str], image_size: int, workers: int, files: type[ImageFiles] = ImageFiles,
    resize: str = "squash", **options,
) -> torch.utils.data.DataLoader:
    """A DataLoader decoding image files through `files` (batches of 256 unless `options` give a
    batch sampler), each fitted to the square by `resize`.

    It has its own generator: without one a DataLoader draws a seed from the global RNG,
    which would shift the dropout masks of the model being trained, so streaming or decoding
    would change results.
    """
    if "batch_sampler" not in options:
        options["batch_size"] = 256
    return torch.utils.data.DataLoader(files(paths, image_size, resize), num_workers=workers,
                                       generator=torch.Generator().manual_seed(0), **options)


def _collate_checked(batch: list[tuple[int, torch.Tensor | None, str]]) -> tuple[torch.Tensor | None, dict[int, str]]:
    """One stacked tensor of a batch's readable images (few shared tensors) and the failures."""
    good = [image for _, image, _ in batch if image is not None]
    return (torch.stack(good) if good else None), {index: reason for index, image, reason in batch if image is None}


def gpu_decoding(device: torch.device | None) -> bool:
    """Whether images are decoded on `device` (nvJPEG) rather than by Pillow on the CPU: on CUDA only."""
    return device is not None and torch.device(device).type == "cuda"


def decoded_batches(
    paths: Sequence[str], image_size: int, workers: int, resize: str = "squash",
    decode_device: torch.device | None = None, **options,
) -> Iterator[tuple[torch.Tensor | None, dict[int, str]]]:
    """Decode files batch by batch: (the readable images, in batch order; {index: reason} of the others).

    On the CPU every file goes through `decode_image` in `workers` processes. On CUDA
    (`gpu_decoding`) the workers only read JPEG files, which are decoded on the GPU
    (`_decode_batch_on`); other files still go through `decode_image`. `options` go to the DataLoader.
    """
    if not gpu_decoding(decode_device):
        yield from file_loader(paths, image_size, workers, resize=resize, collate_fn=_collate_checked, **options)
        return
    for batch in file_loader(paths, image_size, workers, _EncodedImageFiles, resize,
                             collate_fn=_EncodedBatch.collate, **options):
        yield _decode_batch_on(decode_device, batch, paths, image_size, resize)


def readable_batches(
    paths: Sequence[str], image_size: int, workers: int, resize: str = "squash",
    decode_device: torch.device | None = None, **options,
) -> Iterator[torch.Tensor]:
    """`decoded_batches` of files checked before: one that has become unreadable since stops the run."""
    for images, failed in decoded_batches(paths, image_size, workers, resize, decode_device, **options):
        if failed:
            index, reason = min(failed.items())
            raise errors.DataError(f"Cannot read image '{paths[index]}': {reason}.")
        yield images


def gpu_jpeg_bytes(path: str) -> torch.Tensor | None:
    """The bytes of a JPEG the GPU decoder may take in place of `decode_image`, or None.

    Only complete JPEGs (ending in the end-of-image marker) in RGB or greyscale within Pillow's
    size limit qualify. Everything else, other formats, CMYK and other colour spaces, truncated
    or damaged files, goes through `decode_image`, so its colours, or the reason it is skipped,
    stay those of the CPU path.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(3)
            if head != b"\xff\xd8\xff":  # not a JPEG: left for decode_image, without reading it all
                return None
            data = head + file.read()
        if not data.endswith(b"\xff\xd9"):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                    return None
    except Exception:  # any problem: decode_image will find it and say why
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class _EncodedImageFiles(ImageFiles):
    """Like ImageFiles, but a JPEG for the GPU decoder is returned as its bytes, (i, bytes, "")."""

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        data = gpu_jpeg_bytes(self.paths[index])
        return (index, data, "") if data is not None else super().__getitem__(index)


@dataclass
class _EncodedBatch:
    """A batch of `_EncodedImageFiles` items packed for the trip from a worker process: all JPEG
    bytes in one tensor and the images decoded in the worker in another (one shared-memory block
    each, where a tensor per file could run out of file descriptors)."""

    order: list[int]  # the batch's sample indices, in batch order
    jpeg_indices: list[int]
    jpeg_bytes: torch.Tensor  # every JPEG file's bytes, one after the other
    jpeg_lengths: list[int]
    decoded_indices: list[int]
    decoded: torch.Tensor | None
    failed: dict[int, str]

    @classmethod
    def collate(cls, items: list[tuple[int, torch.Tensor | None, str]]) -> "_EncodedBatch":
        jpegs = [(index, data) for index, data, _ in items if data is not None and data.dim() == 1]
        decoded = [(index, image) for index, image, _ in items if image is not None and image.dim() == 3]
        return cls(
            order=[index for index, _, _ in items],
            jpeg_indices=[index for index, _ in jpegs],
            jpeg_bytes=torch.cat([data for _, data in jpegs]) if jpegs else torch.empty(0, dtype=torch.uint8),
            jpeg_lengths=[len(data) for _, data in jpegs],
            decoded_indices=[index for index, _ in decoded],
            decoded=torch.stack([image for _, image in decoded]) if decoded else None,
            failed={index: reason for index, data, reason in items if data is None},
        )


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB images of JPEG bytes decoded on `device` (nvJPEG on CUDA), in one batch; when the batch
    fails, file by file, None marking each file the decoder refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: list[torch.Tensor] | torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    if not encoded:
        return []
    try:
        return list(decode(encoded))
    except Exception:  # one file the decoder refuses fails the whole batch: find which
        decoded: list[torch.Tensor | None] = []
        for data in encoded:
            try:
                decoded.append(decode(data))
            except Exception:
                decoded.append(None)
        return decoded


def _decode_batch_on(
    device: torch.device, batch: _EncodedBatch, paths: Sequence[str], image_size: int, resize: str = "squash",
) -> tuple[torch.Tensor | None, dict[int, str]]:
    """Finish a batch on `device`, as `_collate_checked` does on the CPU.

    JPEG bytes are decoded there and fitted to the square by `fit_to_square`; a JPEG the decoder refuses
    goes through `decode_image`, which decodes it or gives the reason it is skipped.
    """
    images = dict(zip(batch.decoded_indices, [] if batch.decoded is None else batch.decoded.to(device), strict=True))
    failed = dict(batch.failed)
    encoded = list(batch.jpeg_bytes.split(batch.jpeg_lengths))
    for index, image in zip(batch.jpeg_indices, _decode_jpegs(encoded, device), strict=True):
        if image is None:
            try:
                image = decode_image(paths[index], image_size, resize)
            except UnreadableImage as error:
                failed[index] = str(error)
                continue
        elif image.shape[-2:] != (image_size, image_size):
            image = fit_to_square(image, image_size, resize)
        images[index] = image.to(device)
    good = [images[index] for index in batch.order if index in images]
    return (torch.stack(good) if good else None), failed


def _decode_workers(paths: Sequence[str], workers: int) -> int:
    """Worker processes for decoding `paths` once: none for small sets, where start-up costs more."""
    return workers if len(paths) >= DECODE_WORKERS_THRESHOLD else 0


def _decode_all(
    paths: Sequence[str], image_size: int, workers: int, resize: str = "squash",
    decode_device: torch.device | None = None,
) -> torch.Tensor:
    """Decode every file once into one uint8 CPU tensor, in worker processes for large sets."""
    batches = readable_batches(paths, image_size, _decode_workers(paths, workers), resize, decode_device)
    return torch.cat([images.cpu() for images in batches])


def _decode_checked(
    paths: Sequence[str], image_size: int, workers: int, keep: bool, resize: str = "squash",
    decode_device: torch.device | None = None,
) -> tuple[torch.Tensor | None, dict[int, str]]:
    """Decode every file, skipping those that fail: the readable ones' images (when `keep`,
    in order, on the CPU) and {index: reason} for the others."""
    batches, failed = [], {}
    for images, failures in decoded_batches(paths, image_size, _decode_workers(paths, workers), resize, decode_device):
        failed.update(failures)
        if keep and images is not None:
            batches.append(images.cpu())
    if not keep:
        return None, failed
    images = torch.cat(batches) if batches else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
    return images, failed


def _cache_key(paths: Sequence[str], tag: str) -> str:
    """A digest of the files' paths, sizes and modification times and `tag` (what is cached)."""
    digest = hashlib.sha256(f"{CACHE_VERSION} {tag}".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            state = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError as error:
            state = f"error {error.errno}"
        digest.update(f"\0{os.path.abspath(path)}\0{state}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _decoder_tag(decode_device: torch.device | None) -> str:
    """What decoded the images, for cache keys: the GPU decoder's pixels differ slightly from Pillow's."""
    return " nvjpeg" if gpu_decoding(decode_device) else ""


def _decoded_cache_file(
    paths: Sequence[str], image_size: int, cache_dir: Path, resize: str = "squash",
    decode_device: torch.device | None = None,
) -> Path:
    tag = f"decoded {image_size} {resize}{_decoder_tag(decode_device)}"
    return Path(cache_dir) / "decoded" / f"{_cache_key(paths, tag)}.pt"


def _read_decoded(cache_file: Path, count: int, image_size: int) -> torch.Tensor | None:
    if cache_file.is_file():
        try:
            images = torch.load(cache_file, weights_only=True)
            if (isinstance(images, torch.Tensor) and images.dtype == torch.uint8
                    and images.shape == (count, 3, image_size, image_size)):
                return images
        except Exception:  # an unreadable cache file is rebuilt, never trusted
            pass
    return None


def _write_decoded(cache_file: Path, images: torch.Tensor) -> None:
    with utils.atomic_path(cache_file) as temporary:
        torch.save(images, temporary)


def decode_cached(
    paths: Sequence[str], image_size: int, workers: int, cache_dir: Path | None, resize: str = "squash",
    decode_device: torch.device | None = None,
) -> torch.Tensor:
    """Decoded uint8 images of `paths`; with a cache folder, a second run reads them from one file.

    The cache file is keyed by every file's path, size and modification time, the image size,
    the resize mode and the decoder, so any change to the images makes a new key (and a fresh
    decode). Every file must be readable (DataError).
    """
    if cache_dir is None:
        return _decode_all(paths, image_size, workers, resize, decode_device)
    cache_file = _decoded_cache_file(paths, image_size, cache_dir, resize, decode_device)
    images = _read_decoded(cache_file, len(paths), image_size)
    if images is None:
        images = _decode_all(paths, image_size, workers, resize, decode_device)
        _write_decoded(cache_file, images)
    return images


def _read_check_record(record: Path, count: int) -> dict[int, str] | None:
    """The unreadable files {index: reason} an earlier check of the same files found, if any."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        failed = {int(index): str(reason) for index, reason in data["failed"]}
        if data["count"] == count and all(0 <= index < count for index in failed):
            return failed
    except Exception:  # no record, or one that cannot be trusted: check again
        pass
    return None


def check_files(
    paths: Sequence[str], image_size: int, keep: bool, workers: int, cache_dir: Path | None,
    resize: str = "squash", decode_device: torch.device | None = None,
) -> tuple[torch.Tensor | None, dict[int, str]]:
    """Decode every file once to find the unreadable ones: the readable ones' images (when `keep`
    and the files were decoded now) and {index: reason} of the others. With a cache folder the result
    is recorded (keyed by the files' paths, sizes and modification times), so a later run neither
    checks again nor forgets the skips."""
    record = None
    if cache_dir is not None:
        tag = f"checked {image_size} {Image.MAX_IMAGE_PIXELS}{_decoder_tag(decode_device)}"
        record = Path(cache_dir) / "checked" / f"{_cache_key(paths, tag)}.json"
        failed = _read_check_record(record, len(paths))
        if failed is not None:
            return None, failed
    images, failed = _decode_checked(paths, image_size, workers, keep, resize, decode_device)
    if record is not None:
        utils.write_json(record, {"count": len(paths), "failed": sorted(failed.items())})
    return images, failed


def cache_decoded(
    paths: Sequence[str], images: torch.Tensor, image_size: int, cache_dir: Path, resize: str = "squash",
    decode_device: torch.device | None = None,
) -> None:
    """Keep images decoded elsewhere (by `check_files`) in the cache `decode_cached` reads, unless it has them."""
    cache_file = _decoded_cache_file(paths, image_size, cache_dir, resize, decode_device)
    if _read_decoded(cache_file, len(paths), image_size) is None:
        _write_decoded(cache_file, images)

