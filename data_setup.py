"""Finding and reading images: ImageFolder splits, the bundled digits dataset, and batch loaders.

Every image is decoded once (through torchvision's ImageFolder), converted to RGB and resized
into a uint8 tensor; training batches are augmented as whole tensors on the training device.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split
from torchvision import datasets, transforms

import utils

DEFAULT_CACHE_DIR = Path(os.environ.get("KD_CACHE_DIR", Path.home() / ".cache" / "kd_pipeline"))
DIGITS_FOLDER_NAME = "sklearn_digits_v1"
DIGITS_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test, stratified
DIGITS_SPLIT_SEED = 0
DECODE_WORKERS_THRESHOLD = 2000  # images; below this, worker start-up costs more than it saves


class DataError(Exception):
    """A problem with the user's data that should stop the run with one clear sentence."""


@dataclass
class ImageTensors:
    """A split: uint8 images (N, 3, S, S) decoded once, int64 labels (N,) and the source paths.

    `images` is None when the split is streamed from disk (it did not fit the memory budget).
    """

    images: torch.Tensor | None
    labels: torch.Tensor
    paths: list[str]
    image_size: int

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


def resolve_split_dirs(
    data_dir: str | None, train_dir: str | None, val_dir: str | None, test_dir: str | None
) -> tuple[Path, Path | None, Path]:
    """Work out the train / val / test folders from a data root and per-split overrides.

    With neither a data root nor split folders, the bundled digits dataset is used.
    A missing val folder is returned as None (validation is then carved from train).
    """
    if data_dir is None and train_dir is None and test_dir is None:
        data_dir = str(bundled_digits_dir())
    root = Path(data_dir) if data_dir else None
    if root is not None and not root.is_dir():
        raise DataError(f"Data folder '{root}' does not exist.")
    train = Path(train_dir) if train_dir else (root / "train" if root else None)
    test = Path(test_dir) if test_dir else (root / "test" if root else None)
    if val_dir:
        val: Path | None = Path(val_dir)
    elif root is not None and (root / "val").is_dir():
        val = root / "val"
    else:
        val = None
    for name, folder in (("train", train), ("test", test), ("val", val if val_dir else None)):
        if name != "val" and folder is None:
            raise DataError(f"No {name} folder given: pass --data-dir or --{name}-dir.")
        if folder is not None and not folder.is_dir():
            raise DataError(f"The {name} folder '{folder}' does not exist.")
    return train, val, test  # type: ignore[return-value]


def image_folder(root: Path) -> datasets.ImageFolder:
    """Index an ImageFolder tree (class sub-folders of images), with a clear error if it has none."""
    try:
        return datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(f"Cannot read images from '{root}': {error}") from None


def check_same_classes(folders: dict[str, datasets.ImageFolder]) -> list[str]:
    """Return the shared class names, or stop naming the classes that differ between splits."""
    reference_split, reference = next(iter(folders.items()))
    for split, folder in folders.items():
        if folder.classes != reference.classes:
            only_here = sorted(set(folder.classes) - set(reference.classes))
            only_there = sorted(set(reference.classes) - set(folder.classes))
            raise DataError(
                f"Class folders differ between {reference_split} and {split}: "
                f"only in {split}: {only_here or 'none'}; only in {reference_split}: {only_there or 'none'}."
            )
    return list(reference.classes)


def stratified_split(
    labels: Sequence[int], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into disjoint, class-stratified train and validation index arrays."""
    labels = np.asarray(labels)
    indices = np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    n_val = int(np.ceil(val_fraction * len(labels)))
    if counts.min() < 2 or n_val < len(classes) or len(labels) - n_val < len(classes):
        raise DataError(
            f"Too few training images ({len(labels)}, smallest class {counts.min()}) to carve a "
            f"stratified {val_fraction:.0%} validation split; add a val/ folder or more images."
        )
    train_idx, val_idx = train_test_split(
        indices, test_size=n_val, stratify=labels, random_state=seed
    )
    return np.sort(train_idx), np.sort(val_idx)


def decode_image(path: str, image_size: int) -> torch.Tensor:
    """Read one image file as an RGB uint8 tensor (3, S, S): the one decode used everywhere."""
    with Image.open(path) as image:
        image = transforms.functional.resize(image.convert("RGB"), [image_size, image_size], antialias=True)
        return transforms.functional.pil_to_tensor(image)


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded on access (in worker processes when loaded through a DataLoader)."""

    def __init__(self, paths: Sequence[str], image_size: int) -> None:
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode_image(self.paths[index], self.image_size)


def file_loader(paths: Sequence[str], image_size: int, workers: int, **options) -> torch.utils.data.DataLoader:
    """A DataLoader decoding image files (batches of 256 unless `options` give a batch sampler).

    It has its own generator: without one a DataLoader draws a seed from the global RNG,
    which would shift the dropout masks of the model being trained, so streaming or decoding
    would change results.
    """
    if "batch_sampler" not in options:
        options["batch_size"] = 256
    return torch.utils.data.DataLoader(ImageFiles(paths, image_size), num_workers=workers,
                                       generator=torch.Generator().manual_seed(0), **options)


def _decode_all(paths: Sequence[str], image_size: int, workers: int) -> torch.Tensor:
    """Decode every file once into one uint8 tensor, in worker processes for large sets."""
    workers = workers if len(paths) >= DECODE_WORKERS_THRESHOLD else 0
    return torch.cat(list(file_loader(paths, image_size, workers)))


def _cache_key(paths: Sequence[str], image_size: int) -> str:
    """A digest of the files' paths, sizes and modification times and the image size."""
    digest = hashlib.sha256(f"v1 {image_size}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def decode_cached(paths: Sequence[str], image_size: int, workers: int, cache_dir: Path | None) -> torch.Tensor:
    """Decoded uint8 images of `paths`; with a cache folder, a second run reads them from one file.

    The cache file is keyed by every file's path, size and modification time, so any change
    to the images makes a new key (and a fresh decode).
    """
    if cache_dir is None:
        return _decode_all(paths, image_size, workers)
    cache_file = Path(cache_dir) / "decoded" / f"{_cache_key(paths, image_size)}.pt"
    if cache_file.is_file():
        try:
            images = torch.load(cache_file, weights_only=True)
            if images.shape == (len(paths), 3, image_size, image_size) and images.dtype == torch.uint8:
                return images
        except Exception:  # an unreadable cache file is rebuilt, never trusted
            pass
    images = _decode_all(paths, image_size, workers)
    with utils.atomic_path(cache_file) as temporary:
        torch.save(images, temporary)
    return images


def _split_samples(
    folder: datasets.ImageFolder, indices: Sequence[int] | None, image_size: int,
    stream: bool, workers: int, cache_dir: Path | None,
) -> ImageTensors:
    chosen = range(len(folder.samples)) if indices is None else indices
    paths = [folder.samples[i][0] for i in chosen]
    labels = torch.tensor([folder.samples[i][1] for i in chosen], dtype=torch.long)
    images = None if stream else decode_cached(paths, image_size, workers, cache_dir)
    return ImageTensors(images, labels, paths, image_size)


def channel_stats(split: ImageTensors, workers: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a split's pixels, as fractions of 255.

    Accumulated in float64 chunk by chunk, so it works for in-memory and streamed splits alike.
    """
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    if split.images is not None:
        chunks: Iterable[torch.Tensor] = split.images.split(4096)
    else:
        chunks = file_loader(split.paths, split.image_size, workers)
    count = 0
    for chunk in chunks:
        pixels = chunk.to(torch.float64).div_(255).transpose(0, 1).reshape(3, -1)
        total += pixels.sum(dim=1)
        total_sq += pixels.square().sum(dim=1)
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
) -> DatasetSplits:
    """Find, check and decode the train / val / test splits (carving val from train if absent).

    Splits whose decoded size exceeds `memory_budget_mb` in total are streamed from disk by
    `workers` processes instead of being decoded once into memory.
    """
    train_path, val_path, test_path = resolve_split_dirs(data_dir, train_dir, val_dir, test_dir)
    folders = {"train": image_folder(train_path)}
    if val_path is not None:
        folders["val"] = image_folder(val_path)
    folders["test"] = image_folder(test_path)
    class_names = check_same_classes(folders)
    total_images = sum(len(folder.samples) for folder in folders.values())
    stream = total_images * 3 * image_size**2 / 2**20 > memory_budget_mb
    split = lambda name, indices=None: _split_samples(  # noqa: E731
        folders[name], indices, image_size, stream, workers, cache_dir)
    if val_path is None:
        train_idx, val_idx = stratified_split(folders["train"].targets, val_fraction, seed)
        train, val = split("train", train_idx), split("train", val_idx)
        val_source = f"carved from train ({val_fraction:.0%}, stratified, seed {seed})"
    else:
        train, val = split("train"), split("val")
        val_source = str(val_path)
    test = split("test")
    mean, std = channel_stats(train, workers)
    return DatasetSplits(train, val, test, class_names, mean, std, val_source, streamed=stream)


@dataclass
class Augmentation:
    """Batch augmentation settings: random crop after zero padding, optional horizontal flip."""

    pad: int
    hflip: bool


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Randomly shift each image of a batch by up to `pad` pixels, filling with zeros."""
    if pad == 0:
        return images
    n, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    rows = (offsets[0][:, None] + torch.arange(height)).to(images.device)
    cols = (offsets[1][:, None] + torch.arange(width)).to(images.device)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing gathers (N, H, W, C); move channels back in front.
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left to right."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class InMemoryImages:
    """Batches gathered from a decoded uint8 tensor kept on the training device."""

    def __init__(self, images: torch.Tensor, device: torch.device) -> None:
        self.images = images.to(device)

    def fetch(self, index_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        for index in index_batches:
            yield self.images[index.to(self.images.device)]


class StreamingImages:
    """Batches decoded from disk by DataLoader worker processes, in exactly the given order."""

    def __init__(self, paths: Sequence[str], image_size: int, workers: int, pin_memory: bool) -> None:
        self.paths, self.image_size = paths, image_size
        self.workers, self.pin_memory = workers, pin_memory

    def fetch(self, index_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        yield from file_loader(self.paths, self.image_size, self.workers, pin_memory=self.pin_memory,
                               batch_sampler=[index.tolist() for index in index_batches])


class BatchLoader:
    """Yield normalized float batches `(images, labels)` of a split.

    Training loaders reshuffle and augment every epoch from their own seeded generator, so two
    loaders built with the same seed produce identical batches, whether the split sits in memory
    or is streamed from disk. Evaluation loaders are deterministic and unaugmented. When
    `teacher_logits` (one row per sample) is set, batches are `(images, labels, teacher_logits)`.

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
        if data.images is not None:
            self.source: InMemoryImages | StreamingImages = InMemoryImages(data.images, self.device)
        else:
            self.source = StreamingImages(data.paths, data.image_size, workers, self.device.type == "cuda")

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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.augmentation is not None else torch.arange(n)
        index_batches = list(self._shard(order).split(self.batch_size))
        for index, images in zip(index_batches, self.source.fetch(index_batches)):
            images = images.to(self.device, non_blocking=True)
            if self.augmentation is not None:
                images = random_crop(images, self.augmentation.pad, self.generator)
                if self.augmentation.hflip:
                    images = random_hflip(images, self.generator)
            images = ((images.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            index = index.to(self.device)
            if self.teacher_logits is None:
                yield images, self.labels[index]
            else:
                yield images, self.labels[index], self.teacher_logits[index]
