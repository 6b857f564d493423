"""The splits a run trains, selects and tests on: ImageFolder trees (or the bundled digits), carved
and checked, decoded once into uint8 tensors, and the loaders that batch and augment them.

Real folders are messy, so every file is checked before any training starts:

- Files that cannot be decoded (corrupt, truncated, empty, text saved as .jpg, too large), files
  without an image extension inside class folders, and files lying directly in a split folder
  are skipped; each is listed with a one-line reason in `DatasetSplits.skipped_files`.
- A missing split folder, a class without a usable image, classes that differ between splits and
  too few images to carve a validation split stop the run with one `errors.DataError` message
  (naming every difference between the splits and every empty class folder at once).

A data root holds either train/ [val/] test/ split folders or only class folders (`folders`); in
the second layout the test split is carved first, then validation from the rest (both stratified
and seeded), and `--max-per-class` may cap the training split; `DatasetSplits.carving` records
every carving. A CIFAR-10 / CIFAR-100 folder in torchvision's Python format (`cifar_files`) gives
its official train and test splits. Training batches are augmented as whole tensors on the device.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torchvision.transforms import v2

import utils
from core import errors, records
from data import cifar_files, decoding, epoch_plan, folders

DEFAULT_CACHE_DIR = Path(os.environ.get("KD_CACHE_DIR", Path.home() / ".cache" / "kd_pipeline"))
DIGITS_FOLDER_NAME = "sklearn_digits_v1"
DIGITS_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test, stratified
DIGITS_SPLIT_SEED = 0
AUGMENT_POLICIES = ("basic", "trivialaugment")  # basic: crop + flip; trivialaugment: then TrivialAugmentWide


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
    # Where its images were decoded (see decoding.gpu_decoding); streaming decodes there too.
    decode_device: torch.device | None = None

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
    train_idx, rest_idx = train_test_split(indices, test_size=val_frac + test_frac, stratify=targets,
                                           random_state=DIGITS_SPLIT_SEED)
    val_idx, test_idx = train_test_split(rest_idx, test_size=test_frac / (val_frac + test_frac),
                                         stratify=targets[rest_idx], random_state=DIGITS_SPLIT_SEED)
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
        raise errors.DataError(f"Data folder '{root}' does not exist.")
    carve_test = root is not None and train_dir is None and test_dir is None and folders.holds_only_class_folders(root)
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
            raise errors.DataError(f"No {name} folder given: pass --data-dir or --{name}-dir.")
        if folder is not None and not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "does not exist"
            raise errors.DataError(f"The {name} folder '{folder}' {problem}.")
    return train, val, test  # type: ignore[return-value]


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
        raise errors.DataError(f"Too few {source} to carve a stratified {share} {split} split: {problem}; {remedy}.")
    try:
        train_idx, val_idx = train_test_split(indices, test_size=n_val, stratify=labels, random_state=seed)
    except ValueError as error:
        raise errors.DataError(f"Cannot carve a stratified {share} {split} split from {len(labels)} {source} "
                        f"({errors.one_line(error)}); {remedy}.") from None
    return np.sort(train_idx), np.sort(val_idx)


def stratified_subset(labels: Sequence[int], per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `per_class` samples of every class, drawn at random (seeded)."""
    labels = np.asarray(labels)
    generator = np.random.default_rng(seed)
    chosen = [generator.permutation(np.flatnonzero(labels == label))[:per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


@dataclass
class _UsableImages:
    """The readable candidate images of one split folder."""

    paths: list[str]
    labels: list[int]
    images: torch.Tensor | None  # decoded while checking (in-memory mode, when no check record was cached)


def _check_folder(
    scan: folders.FolderScan, image_size: int, stream: bool, workers: int, cache_dir: Path | None,
    resize: str = "squash", decode_device: torch.device | None = None,
) -> tuple[_UsableImages, list[dict[str, str]]]:
    """The readable candidate images of a split folder, and its skipped files with their reasons
    (every candidate is decoded once to find the unreadable ones; in streaming mode the pixels are dropped)."""
    paths = [path for path, _ in scan.samples]
    images, failed = decoding.check_files(paths, image_size, not stream, workers, cache_dir, resize, decode_device)
    keep = [i for i in range(len(paths)) if i not in failed]
    usable = _UsableImages([paths[i] for i in keep], [scan.samples[i][1] for i in keep], images)
    skipped = scan.skipped + [{"path": paths[i], "reason": reason} for i, reason in failed.items()]
    return usable, skipped


def _split_tensors(
    usable: _UsableImages, indices: Sequence[int] | None, image_size: int, stream: bool, workers: int,
    cache_dir: Path | None, resize: str = "squash", decode_device: torch.device | None = None,
) -> ImageTensors:
    chosen = range(len(usable.paths)) if indices is None else indices
    paths = [usable.paths[i] for i in chosen]
    labels = torch.tensor([usable.labels[i] for i in chosen], dtype=torch.long)
    if stream:
        images = None
    elif usable.images is not None:  # decoded by the check: keep them, and cache them per split
        images = usable.images if indices is None else usable.images[torch.as_tensor(np.asarray(indices))]
        if cache_dir is not None:
            decoding.cache_decoded(paths, images, image_size, cache_dir, resize, decode_device)
    else:
        images = decoding.decode_cached(paths, image_size, workers, cache_dir, resize, decode_device)
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
        chunks = decoding.readable_batches(split.paths, split.image_size, workers, split.resize, split.decode_device)
    count = 0
    for chunk in chunks:
        pixels = chunk.to(torch.float64).div_(255).transpose(0, 1).reshape(3, -1)
        total += pixels.sum(dim=1).cpu()
        total_sq += pixels.square().sum(dim=1).cpu()
        count += pixels.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)  # no division by zero
    return mean.tolist(), std.tolist()


@dataclass(frozen=True, kw_only=True)
class DataDescription:
    """Which images a run learns from and how they become its splits (see `load_splits`)."""

    image_size: int  # pixels a side, every image fitted to the square by `resize`
    val_fraction: float  # of the training pool, carved as validation when there is no validation folder
    seed: int  # seeds every carving
    data_dir: str | None = None  # a data root (split folders, class folders or CIFAR files); all None: the digits
    train_dir: str | None = None
    val_dir: str | None = None
    test_dir: str | None = None
    test_fraction: float = 0.2  # of a root of class folders only, carved as the test split
    max_per_class: int | None = None  # caps the training split's images per class
    resize: str = "squash"
    memory_budget_mb: float = float("inf")  # decoded splits larger than this are streamed from disk
    workers: int = 0  # decoding processes
    cache_dir: Path | None = None  # where decoded images are kept between runs (None: not kept)
    decode_device: torch.device | None = None  # a CUDA device decodes JPEGs on its GPU


def load_splits(data: DataDescription) -> DatasetSplits:
    """Find, check and decode the train / val / test splits `data` describes (carving val from train if absent).

    A data root of class folders only gives the training pool: the test split is carved from it first, then
    validation; a CIFAR folder gives its official train and test splits. `max_per_class` caps the training split
    after validation is carved (validation and test are kept whole). Every carving is stratified and seeded, and
    described in `DatasetSplits.carving`. Splits whose decoded size exceeds the memory budget are streamed from
    disk by worker processes instead of being decoded once into memory. Either way every image is decoded once up
    front, and unreadable files are left out (listed in `skipped_files`), so a streamed epoch never meets one; a
    CUDA `decode_device` decodes JPEGs on its GPU (see `decoding.decoded_batches`). Folder problems raise
    errors.DataError before anything is decoded where possible, and always before training.
    """
    from_root = data.data_dir is not None and data.train_dir is None and data.test_dir is None
    found = cifar_files.find(data.data_dir) if from_root else None
    if found is not None:
        if data.val_dir is not None:
            raise errors.DataError("--val-dir cannot be combined with CIFAR files: validation is carved from their "
                                   "training batches (--val-fraction).")
        cifar = cifar_files.read(*found, data.image_size, data.memory_budget_mb)
        usable = {split: _UsableImages(*cifar.pool(split)) for split in ("train", "test")}
        class_names, test_path, val_path = cifar.class_names, cifar.test_file, None
        skipped, stream, cache_dir = [], False, None  # already in memory: nothing to skip, stream or cache
    else:
        usable, class_names, skipped, stream, test_path, val_path = _folder_pool(data)
        cache_dir = data.cache_dir
    carved = carve_training_pool(usable["train"].labels, class_names, data.seed,
                                 data.test_fraction if test_path is None else None,
                                 data.val_fraction if val_path is None else None, data.max_per_class)
    # A split with its own folder is that folder whole; a carved one is its indices into train's.
    tensors = {name: _split_tensors(usable[name] if name in usable else usable["train"], carved.get(name),
                                    data.image_size, stream, data.workers, cache_dir, data.resize, data.decode_device)
               for name in ("train", "val", "test")}
    pool_size = len(usable["train"].labels)
    del usable
    carving = describe_carving(tensors, class_names, carved, pool_size, test_path, val_path, data)
    if found is not None:
        carving["layout"] = f"torchvision's {found[0].name} Python format"
    mean, std = channel_stats(tensors["train"], data.workers)
    unique = {(item["path"], item["reason"]) for item in skipped}
    skipped_files = [{"path": path, "reason": reason} for path, reason in sorted(unique)]
    return DatasetSplits(tensors["train"], tensors["val"], tensors["test"], class_names, mean, std,
                         carving["validation"], streamed=stream, skipped_files=skipped_files, carving=carving)


def _folder_pool(
    data: DataDescription,
) -> tuple[dict[str, _UsableImages], list[str], list[dict[str, str]], bool, Path | None, Path | None]:
    """The usable images of each split folder (see `load_splits`), the class names, the skipped files, whether
    the images are streamed, and the test and validation folders (None: carved)."""
    train_path, val_path, test_path = resolve_split_dirs(data.data_dir, data.train_dir, data.val_dir, data.test_dir)
    roots = {"train": train_path, **({"val": val_path} if val_path is not None else {}),
             **({"test": test_path} if test_path is not None else {})}
    scans = {split: folders.image_folder(root, split) for split, root in roots.items()}
    class_names = folders.check_classes(scans)  # cheap: before any decoding
    total_images = sum(len(scan.samples) for scan in scans.values())
    stream = total_images * 3 * data.image_size**2 / 2**20 > data.memory_budget_mb
    usable: dict[str, _UsableImages] = {}
    skipped: list[dict[str, str]] = []
    for split, scan in scans.items():
        usable[split], split_skipped = _check_folder(scan, data.image_size, stream, data.workers, data.cache_dir,
                                                     data.resize, data.decode_device)
        folders.require_every_class(split, scan, usable[split].labels, split_skipped)
        skipped += split_skipped
    return usable, class_names, skipped, stream, test_path, val_path


def describe(
    data: DatasetSplits, normalization: str, class_weights: list[float] | None = None,
) -> records.DatasetRecord:
    """The record of a run's data for config.json and summary.json (`normalization`: where mean and std come from)."""
    return records.DatasetRecord(
        class_names=data.class_names,
        sizes={split: len(getattr(data, split)) for split in records.SPLITS},
        images_per_class={split: {"min": min(counts.values()), "max": max(counts.values())}
                          for split, counts in data.carving["class_counts"].items()},
        validation=data.val_source, carving=data.carving, mean=data.mean, std=data.std, normalization=normalization,
        storage="streamed from disk" if data.streamed else "decoded once into memory",
        class_weights=None if class_weights is None else dict(zip(data.class_names, class_weights, strict=True)),
    )


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
    pool_size: int, test_path: Path | None, val_path: Path | None, data: DataDescription,
) -> dict[str, Any]:
    """How each split was obtained, in words and numbers (for config.json and the report)."""
    subset = None
    if data.max_per_class is not None:
        uncapped = pool_size - sum(len(carved[key]) for key in ("test", "val") if key in carved)
        subset = (f"at most {data.max_per_class} images per class (stratified, seed {data.seed}): "
                  f"{len(tensors['train'])} of {uncapped} training images")
    rest = "train" if test_path is not None else "the images left after the test split"
    return {
        "layout": "class folders only" if test_path is None else "split folders",
        "test": (f"carved from all images ({_share(data.test_fraction)}, stratified, seed {data.seed})"
                 if test_path is None else str(test_path)),
        "validation": (f"carved from {rest} ({_share(data.val_fraction)}, stratified, seed {data.seed})"
                       if val_path is None else str(val_path)),
        "train_subset": subset,
        "seed": data.seed,
        "test_fraction": data.test_fraction if test_path is None else None,
        "val_fraction": data.val_fraction if val_path is None else None,
        "max_per_class": data.max_per_class,
        "class_counts": {split: dict(zip(class_names, np.bincount(tensors[split].labels.numpy(),
                                                                  minlength=len(class_names)).tolist(), strict=True))
                         for split in ("train", "val", "test")},
    }


@dataclass
class Augmentation:
    """Batch augmentation settings: random crop after zero padding, optional horizontal flip,
    then optionally torchvision's TrivialAugmentWide on every image."""

    pad: int
    hflip: bool
    trivialaugment: bool = False


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
    """A split's decoded uint8 images on the training device: as decoded for evaluation (a batch is a
    slice), `padded_channels_last` for training (a batch is one `crop_and_flip` gather)."""

    def __init__(self, images: torch.Tensor, device: torch.device, pad: int | None) -> None:
        images = images.to(device)
        self.images = images if pad is None else epoch_plan.padded_channels_last(images, pad)

    def batches(self, bounds: list[tuple[int, int]], plan: epoch_plan.EpochPlan | None) -> Iterator[torch.Tensor]:
        """uint8 batches: the positions `bounds` of the split (no plan) or of the epoch's plan, cropped and flipped."""
        for start, stop in bounds:
            yield self.images[start:stop] if plan is None else epoch_plan.crop_and_flip(
                self.images, plan.samples[start:stop], plan.rows[start:stop], plan.cols[start:stop])


class StreamingImages:
    """Batches decoded from disk (read by DataLoader worker processes), in exactly the given order."""

    def __init__(self, data: ImageTensors, workers: int, device: torch.device, pad: int | None) -> None:
        self.paths, self.image_size, self.decode_device = data.paths, data.image_size, data.decode_device
        self.resize, self.workers, self.device, self.pad = data.resize, workers, device, pad
        # Decoded batches travel to a GPU faster from pinned memory (GPU-decoded ones are there already).
        self.pin_memory = device.type == "cuda" and not decoding.gpu_decoding(data.decode_device)

    def batches(self, bounds: list[tuple[int, int]], plan: epoch_plan.EpochPlan | None) -> Iterator[torch.Tensor]:
        """As `InMemoryImages.batches`, each batch read from the files."""
        order = list(range(len(self.paths))) if plan is None else plan.order.tolist()
        reads = decoding.readable_batches(self.paths, self.image_size, self.workers, self.resize, self.decode_device,
                                          pin_memory=self.pin_memory,
                                          batch_sampler=[order[start:stop] for start, stop in bounds])
        for (start, stop), images in zip(bounds, reads, strict=True):
            images = images.to(self.device, non_blocking=True)
            yield images if plan is None else epoch_plan.crop_and_flip(
                epoch_plan.padded_channels_last(images, self.pad), torch.arange(stop - start, device=self.device),
                plan.rows[start:stop], plan.cols[start:stop])


class BatchLoader:
    """Yield normalized float batches `(images, labels)` of a split, in channels_last memory.

    Training loaders reshuffle and augment every epoch from their own seeded generator, so two
    loaders built with the same seed produce identical batches, whether the split sits in memory
    or is streamed from disk. An epoch's order, crop offsets and flips are drawn at its start and
    reach the device in one copy (see `epoch_plan`); a batch is then one gather (crop and flip, see
    `epoch_plan.crop_and_flip`) and its normalization. With `balanced`, a training epoch instead draws as many
    images as the split holds, with replacement, each with probability inversely proportional to its
    class's count (so every class is drawn equally often on average). Evaluation loaders are
    deterministic and unaugmented. When `teacher_logits` (one row per sample) is set, batches are
    `(images, labels, teacher_logits)`; with `sample_indices` set, batches end with their images' indices in the
    split (CRD's memory bank needs them), drawn from no generator. With `drop_last` (set it before iterating), a
    training epoch leaves out its last batch when that one is smaller than the others (unless it is the only one).

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
        self.sample_indices = False
        self.drop_last = False
        self.sample_weights = None
        if balanced:
            self.sample_weights = (1 / torch.bincount(data.labels).double())[data.labels]
        pad = None if augmentation is None else augmentation.pad
        if data.images is not None:
            self.source: InMemoryImages | StreamingImages = InMemoryImages(data.images, self.device, pad)
        else:
            self.source = StreamingImages(data, workers, self.device, pad)

    def _shard_length(self) -> int:
        return len(self._shard(torch.arange(len(self.data))))

    def __len__(self) -> int:
        samples = self._shard_length()
        if self.drop_last and self.augmentation is not None and samples > self.batch_size:
            return samples // self.batch_size
        return (samples + self.batch_size - 1) // self.batch_size

    def _bounds(self, first: int = 0) -> list[tuple[int, int]]:
        """(start, stop) of each of the epoch's batches, positions counted from `first`."""
        samples = self._shard_length()
        return [(first + start, first + min(start + self.batch_size, samples))
                for start in range(0, len(self) * self.batch_size, self.batch_size)]

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
        """The sample indices of one training epoch: shuffled (or class-balanced)."""
        n = len(self.data)
        if self.sample_weights is not None:
            return torch.multinomial(self.sample_weights, n, replacement=True, generator=self.generator)
        return torch.randperm(n, generator=self.generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.augmentation is None:  # the rank's contiguous block of the split (see `_shard`), in order
            plan, labels, teacher = None, self.labels, self.teacher_logits
            bounds = self._bounds(first=self.rank * -(-len(self.data) // self.world))
            samples = torch.arange(len(self.data), device=self.device)
        else:
            plan = epoch_plan.draw(self._shard(self._epoch_order()), self.augmentation.pad, self.augmentation.hflip,
                                   self.data.image_size, self.generator, self.device, self.labels, self.teacher_logits)
            labels, teacher, bounds, samples = plan.labels, plan.teacher_logits, self._bounds(), plan.samples
        for (start, stop), images in zip(bounds, self.source.batches(bounds, plan), strict=True):
            if plan is not None and self.augmentation.trivialaugment:
                images = trivial_augment(images, self.generator)
            batch = (self._normalize(images), labels[start:stop])
            batch = batch if teacher is None else (*batch, teacher[start:stop])
            yield (*batch, samples[start:stop]) if self.sample_indices else batch

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels to normalized floats: (pixel - mean) / std (the subtraction in float32, as for
        converted pixels), in the loader's memory format."""
        return ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format)
