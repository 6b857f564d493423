"""Finding and reading images: ImageFolder splits, the bundled digits dataset, and batch loaders.

Every image is decoded once (by `decode_image`), converted to RGB and resized into a uint8
tensor; training batches are augmented as whole tensors on the training device.

Real folders are messy, so every file is checked before any training starts:

- Files that cannot be decoded (corrupt, truncated, empty, text saved as .jpg, too large), files
  without an image extension inside class folders, and files lying directly in a split folder
  are skipped; each is listed with a one-line reason in `DatasetSplits.skipped_files`.
- Hidden files and folders (names starting with '.', such as .DS_Store, ._photo.jpg or
  .ipynb_checkpoints) are ignored silently at every level: never used, never listed.
- A missing split folder, a class without a usable image, classes that differ between splits and
  too few images to carve a validation split stop the run with one `DataError` message (naming
  every difference between the splits and every empty class folder at once).

A data root holds either train/ [val/] test/ split folders or only class folders; in the
second layout the test split is carved first, then validation from the rest (both stratified
and seeded), and `--max-per-class` may cap the training split; `DatasetSplits.carving` records
every carving.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split
from torchvision import transforms
from torchvision.transforms import v2

import utils

DEFAULT_CACHE_DIR = Path(os.environ.get("KD_CACHE_DIR", Path.home() / ".cache" / "kd_pipeline"))
DIGITS_FOLDER_NAME = "sklearn_digits_v1"
DIGITS_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test, stratified
DIGITS_SPLIT_SEED = 0
DECODE_WORKERS_THRESHOLD = 2000  # images; below this, worker start-up costs more than it saves
# torchvision's ImageFolder extensions, plus GIF (its first frame is used).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
TRANSPARENT_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
CACHE_VERSION = "v2"  # bump when decoding changes, so no stale cache file is trusted
RESIZE_MODES = ("squash", "center-crop")  # squash: whole image to S x S; center-crop: central square
AUGMENT_POLICIES = ("basic", "trivialaugment")  # basic: crop + flip; trivialaugment: then TrivialAugmentWide
SPLIT_FOLDERS = ("train", "val", "test")


class DataError(Exception):
    """A problem with the user's data that should stop the run with one clear sentence."""


class UnreadableImage(Exception):
    """A file that cannot be decoded as an image; the message is a one-line reason (no path)."""


@dataclass
class ImageTensors:
    """A split: uint8 images (N, 3, S, S) decoded once, int64 labels (N,) and the source paths.

    `images` is None when the split is streamed from disk (it did not fit the memory budget).
    """

    images: torch.Tensor | None
    labels: torch.Tensor
    paths: list[str]
    image_size: int
    resize: str = "squash"
    decode_device: torch.device | None = None  # where its images were decoded (see gpu_decoding); streaming decodes there too

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetSplits:
    """The three splits, their shared class names and the training normalization."""

    train: ImageTensors
    val: ImageTensors
    test: ImageTensors
    class_names: list[str]
    mean: list[float]
    std: list[float]
    val_source: str  # the val folder, or how validation was carved from train
    streamed: bool = False
    # Files of all splits that were not used: {"path": ..., "reason": ...}, sorted by path.
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    # How each split was obtained (folders, carved fractions, subset, seed, per-class counts), JSON-ready.
    carving: dict[str, Any] = field(default_factory=dict)


def bundled_digits_dir(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Write scikit-learn's handwritten digits once as PNGs in an ImageFolder tree; return its root.

    The tree is built in a temporary folder and renamed into place, so an interrupted
    first run never leaves a half-written dataset behind.
    """
    root = Path(cache_dir) / DIGITS_FOLDER_NAME
    if (root / "test").is_dir():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; stretch to the full uint8 range.
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    targets = digits.target
    indices = np.arange(len(targets))
    train_frac, val_frac, test_frac = DIGITS_SPLIT_FRACTIONS
    train_idx, rest_idx = train_test_split(
        indices, test_size=val_frac + test_frac, stratify=targets, random_state=DIGITS_SPLIT_SEED
    )
    val_idx, test_idx = train_test_split(
        rest_idx,
        test_size=test_frac / (val_frac + test_frac),
        stratify=targets[rest_idx],
        random_state=DIGITS_SPLIT_SEED,
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    staging.chmod(utils.FOLDER_MODE)  # mkdtemp's private 0700 would survive the rename
    for split, split_idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        for i in split_idx:
            class_dir = staging / split / str(targets[i])
            class_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(class_dir / f"digit_{i:04d}.png")
    try:
        staging.rename(root)
    except OSError:
        # Another process finished first; its tree is identical.
        shutil.rmtree(staging, ignore_errors=True)
    return root


def holds_only_class_folders(root: Path) -> bool:
    """True for a data root of class folders only, False for one with train/ and test/ (val/ optional).

    A root with some split folders but not both train/ and test/ is ambiguous (is 'val' a class?)
    and stops with one sentence, as does a root with no sub-folders at all.
    """
    present = [name for name in SPLIT_FOLDERS if (root / name).is_dir()]
    if "train" in present and "test" in present:
        return False
    if present:
        missing = " and no ".join(f"{name}/" for name in ("train", "test") if name not in present)
        raise DataError(f"Data folder '{root}' has {' and '.join(f'{name}/' for name in present)} but no {missing}: "
                        "give it train/ and test/ (val/ is optional), or only class folders "
                        "(the test and validation splits are then carved from them).")
    try:
        has_folders = any(entry.is_dir() and not _hidden(entry.name) for entry in os.scandir(root))
    except OSError as error:
        raise DataError(f"Cannot read the data folder '{root}': {error.strerror or error}.") from None
    if not has_folders:
        raise DataError(f"Data folder '{root}' holds neither train/ and test/ folders nor class folders "
                        "(one sub-folder of images per class).")
    return True


def resolve_split_dirs(
    data_dir: str | None, train_dir: str | None, val_dir: str | None, test_dir: str | None
) -> tuple[Path, Path | None, Path | None]:
    """Work out the train / val / test folders from a data root and per-split overrides.

    With neither a data root nor split folders, the bundled digits dataset is used.
    A missing val folder is returned as None (validation is then carved from train). A data
    root holding only class folders (and no --train-dir / --test-dir) is returned as the train
    folder with test None: the test split is then carved from it.
    """
    if data_dir is None and train_dir is None and test_dir is None:
        data_dir = str(bundled_digits_dir())
    root = Path(data_dir) if data_dir else None
    if root is not None and not root.is_dir():
        raise DataError(f"Data folder '{root}' does not exist.")
    carve_test = root is not None and train_dir is None and test_dir is None and holds_only_class_folders(root)
    if carve_test:
        train, test = root, None
    else:
        train = Path(train_dir) if train_dir else (root / "train" if root else None)
        test = Path(test_dir) if test_dir else (root / "test" if root else None)
    if val_dir:
        val: Path | None = Path(val_dir)
    elif root is not None and (root / "val").is_dir():
        val = root / "val"
    else:
        val = None
    for name, folder in (("train", train), ("test", test), ("val", val if val_dir else None)):
        if folder is None and (name == "train" or (name == "test" and not carve_test)):
            raise DataError(f"No {name} folder given: pass --data-dir or --{name}-dir.")
        if folder is not None and not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "does not exist"
            raise DataError(f"The {name} folder '{folder}' {problem}.")
    return train, val, test  # type: ignore[return-value]


def _hidden(name: str) -> bool:
    """Hidden files and folders (.DS_Store, ._photo.jpg, .ipynb_checkpoints) are ignored silently."""
    return name.startswith(".")


@dataclass
class FolderScan:
    """One split folder indexed by file name only (nothing decoded yet).

    `samples` are the candidate images as (path, class index), in torchvision ImageFolder's
    order; `skipped` lists the other visible files: no image extension, or not in a class folder.
    """

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[dict[str, str]]

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def visible_files(folder: str) -> Iterator[str]:
    """Every file under `folder` (recursively, following links), hidden files and folders left
    out, in sorted order: folder by folder, file names sorted within each."""
    walked = []
    for directory, subfolders, files in os.walk(folder, followlinks=True):
        subfolders[:] = [name for name in subfolders if not _hidden(name)]
        walked.append((directory, files))
    for directory, files in sorted(walked):
        for file in sorted(files):
            if not _hidden(file):
                yield os.path.join(directory, file)


def is_image_name(path: str) -> bool:
    """True for a file name with one of the image extensions (IMAGE_EXTENSIONS, any case)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def image_folder(root: Path, split: str = "image") -> FolderScan:
    """Index an ImageFolder tree (one sub-folder of images per class, searched recursively)."""
    root_text = str(root)
    try:
        entries = sorted(os.scandir(root_text), key=lambda entry: entry.name)
    except OSError as error:
        raise DataError(f"Cannot read the {split} folder '{root}': {error.strerror or error}.") from None
    classes: list[str] = []
    skipped: list[dict[str, str]] = []
    for entry in entries:
        if _hidden(entry.name):
            continue
        if entry.is_dir():  # follows links, like ImageFolder
            classes.append(entry.name)
        else:
            skipped.append({"path": os.path.join(root_text, entry.name), "reason": "not inside a class folder"})
    if not classes:
        raise DataError(f"The {split} folder '{root}' has no class folders (one sub-folder of images per class).")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for path in visible_files(os.path.join(root_text, name)):
            if is_image_name(path):
                samples.append((path, label))
            else:
                extension = os.path.splitext(path)[1]
                kind = f"extension '{extension}'" if extension else "no extension"
                skipped.append({"path": path, "reason": f"not an image file ({kind})"})
    return FolderScan(Path(root), classes, samples, skipped)


def _listing(names: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _empty_classes(classes: Sequence[str], labels: Sequence[int]) -> list[str]:
    """The classes no label belongs to."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return [classes[index] for index in np.flatnonzero(counts == 0)]


def _skipped_under(root: Path, class_name: str, skipped: list[dict[str, str]]) -> list[dict[str, str]]:
    """The skipped files of one class folder."""
    prefix = os.path.join(str(root), class_name) + os.sep
    return [item for item in skipped if item["path"].startswith(prefix)]


def check_classes(folders: dict[str, FolderScan]) -> list[str]:
    """Return the shared class names, or stop with one message naming every difference between the
    splits (a class folder missing from some) and every class folder without image files (empty, or
    holding other files only), so a user can fix them all at once."""
    splits = list(folders)
    differences = []
    for name in sorted(set().union(*(folder.classes for folder in folders.values()))):
        having = [split for split in splits if name in folders[split].classes]
        if len(having) < len(splits):
            lacking = [split for split in splits if split not in having]
            differences.append(f"'{name}' is in {_listing(having)} but missing from {_listing(lacking)}")
    empty = []
    for split, folder in folders.items():
        for name in _empty_classes(folder.classes, folder.targets):
            others = [item["path"] for item in _skipped_under(folder.root, name, folder.skipped)]
            content = (f"it holds no image files, only {len(others)} other file{'s' if len(others) > 1 else ''} "
                       f"such as '{os.path.basename(others[0])}'" if others else "the folder is empty")
            empty.append(f"the class '{name}' in the {split} folder '{folder.root}' has no usable "
                         f"images ({content})")
    if not differences and not empty:
        return list(folders[splits[0]].classes)
    problems = [f"Class folders differ between splits: {'; '.join(differences)}."] if differences else []
    if empty:
        text = "; ".join(empty)
        problems.append(text[0].upper() + text[1:] + ".")
    raise DataError(" ".join(problems) + " Every split needs the same class folders, each holding images.")


def _require_every_class(split: str, scan: FolderScan, labels: Sequence[int], skipped: list[dict[str, str]]) -> None:
    """Stop, naming the class and split, when every image file of a class folder was unreadable
    (folders without image files were refused before decoding, by `check_classes`)."""
    empty = _empty_classes(scan.classes, labels)
    if not empty:
        return
    if len(empty) > 1:
        names = ", ".join(f"'{name}'" for name in empty)
        raise DataError(f"The classes {names} in the {split} folder '{scan.root}' have no usable images.")
    bad = _skipped_under(scan.root, empty[0], skipped)
    raise DataError(f"The class '{empty[0]}' in the {split} folder '{scan.root}' has no usable images: "
                    f"{len(bad)} file{'s were' if len(bad) > 1 else ' was'} skipped, "
                    f"e.g. '{bad[0]['path']}' ({bad[0]['reason']}).")


# What a carved split is taken from, and what to do when there are too few images for it.
CARVED_FROM = {
    "validation": ("training images", "add a val/ folder or more images"),
    "test": ("images", "add more images, or give the data folder train/ and test/ folders"),
}


def stratified_split(
    labels: Sequence[int], val_fraction: float, seed: int, class_names: Sequence[str] | None = None,
    split: str = "validation",
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into disjoint, class-stratified kept and carved (`split`) index arrays."""
    labels = np.asarray(labels)
    indices = np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    n_val = int(np.ceil(val_fraction * len(labels)))
    share = f"{100 * val_fraction:g}%"
    source, remedy = CARVED_FROM[split]
    if counts.min() < 2:
        smallest = int(classes[counts.argmin()])
        name = class_names[smallest] if class_names is not None else str(smallest)
        problem = f"class '{name}' has only {counts.min()} usable image (each class needs at least 2)"
    elif n_val < len(classes):
        problem = f"{share} of {len(labels)} images is {n_val}, fewer than the {len(classes)} classes"
    elif len(labels) - n_val < len(classes):
        problem = f"the {len(labels) - n_val} images left for training are fewer than the {len(classes)} classes"
    else:
        problem = None
    if problem is not None:
        raise DataError(f"Too few {source} to carve a stratified {share} {split} split: {problem}; {remedy}.")
    try:
        train_idx, val_idx = train_test_split(indices, test_size=n_val, stratify=labels, random_state=seed)
    except ValueError as error:
        raise DataError(f"Cannot carve a stratified {share} {split} split from {len(labels)} {source} "
                        f"({_one_line(error)}); {remedy}.") from None
    return np.sort(train_idx), np.sort(val_idx)


def stratified_subset(labels: Sequence[int], per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `per_class` samples of every class, drawn at random (seeded)."""
    labels = np.asarray(labels)
    generator = np.random.default_rng(seed)
    chosen = [generator.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unreadable_reason(path: str, error: Exception) -> str:
    """A one-line reason why `path` could not be decoded."""
    if isinstance(error, FileNotFoundError):
        return "file does not exist"
    if isinstance(error, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, Image.DecompressionBombError):
        return f"image too large to decode safely ({_one_line(error)})"
    if isinstance(error, UnidentifiedImageError):
        try:
            empty = os.path.getsize(path) == 0
        except OSError:
            empty = False
        return "empty file (0 bytes)" if empty else "not a readable image (unknown format or damaged header)"
    message = _one_line(error)
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


def fit_to_square(image: Image.Image | torch.Tensor, image_size: int, resize: str = "squash") -> Image.Image | torch.Tensor:
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
            raise DataError(f"Cannot read image '{paths[index]}': {reason}.")
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
    images = dict(zip(batch.decoded_indices, [] if batch.decoded is None else batch.decoded.to(device)))
    failed = dict(batch.failed)
    encoded = list(batch.jpeg_bytes.split(batch.jpeg_lengths))
    for index, image in zip(batch.jpeg_indices, _decode_jpegs(encoded, device)):
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
    paths: Sequence[str], image_size: int, workers: int, resize: str = "squash", decode_device: torch.device | None = None,
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
    paths: Sequence[str], image_size: int, cache_dir: Path, resize: str = "squash", decode_device: torch.device | None = None,
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


@dataclass
class _UsableImages:
    """The readable candidate images of one split folder."""

    paths: list[str]
    labels: list[int]
    images: torch.Tensor | None  # decoded while checking (in-memory mode, when no check record was cached)


def _check_folder(
    scan: FolderScan, image_size: int, stream: bool, workers: int, cache_dir: Path | None,
    resize: str = "squash", decode_device: torch.device | None = None,
) -> tuple[_UsableImages, list[dict[str, str]]]:
    """Decode every candidate image once to find the unreadable ones (in streaming mode the
    pixels are dropped). With a cache folder the result is recorded (keyed by the files' paths,
    sizes and modification times), so a later run neither checks again nor forgets the skips."""
    paths = [path for path, _ in scan.samples]
    record = None
    failed = None
    if cache_dir is not None:
        tag = f"checked {image_size} {Image.MAX_IMAGE_PIXELS}{_decoder_tag(decode_device)}"
        record = Path(cache_dir) / "checked" / f"{_cache_key(paths, tag)}.json"
        failed = _read_check_record(record, len(paths))
    images = None
    if failed is None:
        images, failed = _decode_checked(paths, image_size, workers, not stream, resize, decode_device)
        if record is not None:
            utils.write_json(record, {"count": len(paths), "failed": sorted(failed.items())})
    keep = [i for i in range(len(paths)) if i not in failed]
    usable = _UsableImages([paths[i] for i in keep], [scan.samples[i][1] for i in keep], images)
    skipped = scan.skipped + [{"path": paths[i], "reason": reason} for i, reason in failed.items()]
    return usable, skipped


def _split_tensors(
    usable: _UsableImages, indices: Sequence[int] | None, image_size: int,
    stream: bool, workers: int, cache_dir: Path | None, resize: str = "squash",
    decode_device: torch.device | None = None,
) -> ImageTensors:
    chosen = range(len(usable.paths)) if indices is None else indices
    paths = [usable.paths[i] for i in chosen]
    labels = torch.tensor([usable.labels[i] for i in chosen], dtype=torch.long)
    if stream:
        images = None
    elif usable.images is not None:  # decoded by the check: keep them, and cache them per split
        images = usable.images if indices is None else usable.images[torch.as_tensor(np.asarray(indices))]
        if cache_dir is not None:
            cache_file = _decoded_cache_file(paths, image_size, cache_dir, resize, decode_device)
            if _read_decoded(cache_file, len(paths), image_size) is None:
                _write_decoded(cache_file, images)
    else:
        images = decode_cached(paths, image_size, workers, cache_dir, resize, decode_device)
    return ImageTensors(images, labels, paths, image_size, resize, decode_device)


def channel_stats(split: ImageTensors, workers: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a split's pixels, as fractions of 255.

    Accumulated in float64 chunk by chunk, so it works for in-memory and streamed splits alike.
    """
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    if split.images is not None:
        chunks: Iterable[torch.Tensor] = split.images.split(4096)
    else:
        chunks = readable_batches(split.paths, split.image_size, workers, split.resize, split.decode_device)
    count = 0
    for chunk in chunks:
        pixels = chunk.to(torch.float64).div_(255).transpose(0, 1).reshape(3, -1)
        total += pixels.sum(dim=1).cpu()
        total_sq += pixels.square().sum(dim=1).cpu()
        count += pixels.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)  # no division by zero
    return mean.tolist(), std.tolist()


def load_splits(
    data_dir: str | None,
    train_dir: str | None,
    val_dir: str | None,
    test_dir: str | None,
    image_size: int,
    val_fraction: float,
    seed: int,
    memory_budget_mb: float = float("inf"),
    workers: int = 0,
    cache_dir: Path | None = None,
    *,
    resize: str = "squash",
    test_fraction: float = 0.2,
    max_per_class: int | None = None,
    decode_device: torch.device | None = None,
) -> DatasetSplits:
    """Find, check and decode the train / val / test splits (carving val from train if absent).

    A data root of class folders only gives the training pool: the test split (`test_fraction`)
    is carved from it first, then validation. `max_per_class` caps the training split (after
    validation is carved; validation and test are kept whole). Every carving is stratified and
    seeded by `seed`, and described in `DatasetSplits.carving`.

    Splits whose decoded size exceeds `memory_budget_mb` in total are streamed from disk by
    `workers` processes instead of being decoded once into memory. Either way every image is
    decoded once up front (fitted to the square by `resize`), and unreadable files are left out
    (listed in `skipped_files`), so a streamed epoch never meets one. With a CUDA `decode_device`
    JPEGs are decoded on that GPU, for the first decode and for streaming (see `decoded_batches`).
    Folder problems raise DataError before anything is decoded where possible, and always before training.
    """
    train_path, val_path, test_path = resolve_split_dirs(data_dir, train_dir, val_dir, test_dir)
    roots = {"train": train_path, **({"val": val_path} if val_path is not None else {}),
             **({"test": test_path} if test_path is not None else {})}
    scans = {split: image_folder(root, split) for split, root in roots.items()}
    class_names = check_classes(scans)  # cheap: before any decoding
    total_images = sum(len(scan.samples) for scan in scans.values())
    stream = total_images * 3 * image_size**2 / 2**20 > memory_budget_mb
    usable: dict[str, _UsableImages] = {}
    skipped: list[dict[str, str]] = []
    for split, scan in scans.items():
        usable[split], split_skipped = _check_folder(scan, image_size, stream, workers, cache_dir, resize, decode_device)
        _require_every_class(split, scan, usable[split].labels, split_skipped)
        skipped += split_skipped
    carved = carve_training_pool(usable["train"].labels, class_names, seed,
                                 test_fraction if test_path is None else None,
                                 val_fraction if val_path is None else None, max_per_class)
    # A split with its own folder is that folder whole; a carved one is its indices into train's.
    tensors = {name: _split_tensors(usable[name] if name in usable else usable["train"], carved.get(name),
                                    image_size, stream, workers, cache_dir, resize, decode_device)
               for name in ("train", "val", "test")}
    pool_size = len(usable["train"].labels)
    del usable
    carving = describe_carving(tensors, class_names, carved, pool_size, seed, test_path, val_path,
                               test_fraction, val_fraction, max_per_class)
    mean, std = channel_stats(tensors["train"], workers)
    unique = {(item["path"], item["reason"]) for item in skipped}
    skipped_files = [{"path": path, "reason": reason} for path, reason in sorted(unique)]
    return DatasetSplits(tensors["train"], tensors["val"], tensors["test"], class_names, mean, std,
                         carving["validation"], streamed=stream, skipped_files=skipped_files, carving=carving)


def carve_training_pool(
    labels: Sequence[int], class_names: Sequence[str], seed: int,
    test_fraction: float | None, val_fraction: float | None, max_per_class: int | None,
) -> dict[str, np.ndarray | None]:
    """Indices into the training folder's usable images of every split taken from it.

    The test split (when `test_fraction` is given) is carved first, then validation
    (`val_fraction`) from the rest; what remains is the training split, capped at
    `max_per_class` images a class when given ("train" is None when it is the whole folder).
    Every step is stratified and seeded, so the same files and settings give the same splits
    (and a resumed run the same data).
    """
    labels = np.asarray(labels)
    rest = np.arange(len(labels))
    carved: dict[str, np.ndarray] = {}
    for split, key, fraction in (("test", "test", test_fraction), ("validation", "val", val_fraction)):
        if fraction is not None:
            kept, taken = stratified_split(labels[rest], fraction, seed, class_names, split=split)
            rest, carved[key] = rest[kept], rest[taken]
    if max_per_class is not None:
        rest = rest[stratified_subset(labels[rest], max_per_class, seed)]
    carved["train"] = rest if len(rest) < len(labels) else None
    return carved


def _share(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def describe_carving(
    tensors: dict[str, ImageTensors], class_names: Sequence[str], carved: dict[str, np.ndarray | None],
    pool_size: int, seed: int, test_path: Path | None, val_path: Path | None,
    test_fraction: float, val_fraction: float, max_per_class: int | None,
) -> dict[str, Any]:
    """How each split was obtained, in words and numbers (for config.json and the report)."""
    subset = None
    if max_per_class is not None:
        uncapped = pool_size - sum(len(carved[key]) for key in ("test", "val") if key in carved)
        subset = (f"at most {max_per_class} images per class (stratified, seed {seed}): "
                  f"{len(tensors['train'])} of {uncapped} training images")
    rest = "train" if test_path is not None else "the images left after the test split"
    return {
        "layout": "class folders only" if test_path is None else "split folders",
        "test": (f"carved from all images ({_share(test_fraction)}, stratified, seed {seed})"
                 if test_path is None else str(test_path)),
        "validation": (f"carved from {rest} ({_share(val_fraction)}, stratified, seed {seed})"
                       if val_path is None else str(val_path)),
        "train_subset": subset,
        "seed": seed,
        "test_fraction": test_fraction if test_path is None else None,
        "val_fraction": val_fraction if val_path is None else None,
        "max_per_class": max_per_class,
        "class_counts": {split: dict(zip(class_names, np.bincount(tensors[split].labels.numpy(), minlength=len(class_names)).tolist()))
                         for split in ("train", "val", "test")},
    }


@dataclass
class Augmentation:
    """Batch augmentation settings: random crop after zero padding, optional horizontal flip,
    then optionally torchvision's TrivialAugmentWide on every image."""

    pad: int
    hflip: bool
    trivialaugment: bool = False


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`. To a GPU through pinned memory without blocking: a copy from ordinary
    memory makes the host wait for every queued kernel, once per batch."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Randomly shift each image of a batch by up to `pad` pixels, filling with zeros."""
    if pad == 0:
        return images
    n, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = to_device(torch.randint(0, 2 * pad + 1, (2, n), generator=generator), images.device)
    rows = offsets[0][:, None] + torch.arange(height, device=images.device)
    cols = offsets[1][:, None] + torch.arange(width, device=images.device)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing gathers (N, H, W, C); move channels back in front.
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left to right."""
    flip = to_device(torch.rand(images.shape[0], generator=generator) < 0.5, images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


_TRIVIAL_AUGMENT = v2.TrivialAugmentWide()


def trivial_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugmentWide (one random operation of random strength) on each uint8 image of a batch.

    torchvision draws its choices from the global RNG, which also drives dropout: it runs here
    on a forked global RNG seeded from `generator`, so the batch depends on the loader's seed
    alone and the global RNG is left exactly as it was. The per-image operations run on one CPU
    thread: on a single small image, waking a second thread costs far more than the work (about
    40x slower on a busy 2-core machine).
    """
    seed = int(torch.randint(2**62, (), generator=generator))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator torchvision draws from; never CUDA's
            return torch.stack([_TRIVIAL_AUGMENT(image) for image in images])
    finally:
        torch.set_num_threads(threads)


class InMemoryImages:
    """Batches gathered from a decoded uint8 tensor kept on the training device."""

    def __init__(self, images: torch.Tensor, device: torch.device) -> None:
        self.images = images.to(device)

    def fetch(self, index_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        for index in index_batches:
            yield self.images[to_device(index, self.images.device)]


class StreamingImages:
    """Batches decoded from disk (read by DataLoader worker processes), in exactly the given order."""

    def __init__(self, data: ImageTensors, workers: int, device: torch.device) -> None:
        self.paths, self.image_size, self.decode_device = data.paths, data.image_size, data.decode_device
        self.resize = data.resize
        self.workers = workers
        # Decoded batches travel to a GPU faster from pinned memory (GPU-decoded ones are there already).
        self.pin_memory = device.type == "cuda" and not gpu_decoding(data.decode_device)

    def fetch(self, index_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        yield from readable_batches(self.paths, self.image_size, self.workers, self.resize, self.decode_device,
                                    pin_memory=self.pin_memory, batch_sampler=[index.tolist() for index in index_batches])


class BatchLoader:
    """Yield normalized float batches `(images, labels)` of a split.

    Training loaders reshuffle and augment every epoch from their own seeded generator, so two
    loaders built with the same seed produce identical batches, whether the split sits in memory
    or is streamed from disk. With `balanced`, a training epoch instead draws as many images as
    the split holds, with replacement, each with probability inversely proportional to its
    class's count (so every class is drawn equally often on average). Evaluation loaders are
    deterministic and unaugmented. When `teacher_logits` (one row per sample) is set, batches
    are `(images, labels, teacher_logits)`.

    With `shard=(rank, world)` (torchrun) a loader yields only its rank's part: for training,
    every `world`-th index of the shared permutation, padded so all ranks take the same number
    of steps; for evaluation, one contiguous block, so gathering in rank order restores the split.
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        augmentation: Augmentation | None = None,
        seed: int = 0,
        channels_last: bool = True,
        workers: int = 0,
        shard: tuple[int, int] = (0, 1),
        balanced: bool = False,
    ) -> None:
        self.data = data
        self.rank, self.world = shard
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.augmentation = augmentation
        self.generator = torch.Generator().manual_seed(seed)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.labels = data.labels.to(self.device)
        self.teacher_logits: torch.Tensor | None = None
        self.sample_weights = None
        if balanced:
            self.sample_weights = (1 / torch.bincount(data.labels).double())[data.labels]
        if data.images is not None:
            self.source: InMemoryImages | StreamingImages = InMemoryImages(data.images, self.device)
        else:
            self.source = StreamingImages(data, workers, self.device)

    def __len__(self) -> int:
        return (len(self._shard(torch.arange(len(self.data)))) + self.batch_size - 1) // self.batch_size

    def _shard(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's part of an epoch's sample order."""
        if self.world == 1:
            return order
        if self.augmentation is not None:
            padding = (-len(order)) % self.world
            return torch.cat([order, order[:padding]])[self.rank :: self.world]
        block = -(-len(order) // self.world)
        return order[self.rank * block : (self.rank + 1) * block]

    def _epoch_order(self) -> torch.Tensor:
        """The sample indices of one epoch: shuffled (or class-balanced) for training, in order for evaluation."""
        n = len(self.data)
        if self.augmentation is None:
            return torch.arange(n)
        if self.sample_weights is not None:
            return torch.multinomial(self.sample_weights, n, replacement=True, generator=self.generator)
        return torch.randperm(n, generator=self.generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        index_batches = list(self._shard(self._epoch_order()).split(self.batch_size))
        for index, images in zip(index_batches, self.source.fetch(index_batches)):
            images = images.to(self.device, non_blocking=True)
            if self.augmentation is not None:
                images = random_crop(images, self.augmentation.pad, self.generator)
                if self.augmentation.hflip:
                    images = random_hflip(images, self.generator)
                if self.augmentation.trivialaugment:
                    images = trivial_augment(images, self.generator)
            images = ((images.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            index = to_device(index, self.device)
            if self.teacher_logits is None:
                yield images, self.labels[index]
            else:
                yield images, self.labels[index], self.teacher_logits[index]
