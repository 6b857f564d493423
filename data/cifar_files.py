"""torchvision's CIFAR-10 and CIFAR-100 Python format, read as it is: straight into uint8 tensors,
with the official train / test split and the class names and order of the dataset's metadata.

A `cifar-10-batches-py` folder holds `data_batch_1` ... `data_batch_5`, `test_batch` and
`batches.meta`; a `cifar-100-python` folder holds `train`, `test` and `meta`. Each file is a pickled
dict: "data" a uint8 array of N rows of 3,072 values (32 x 32 red, then green, then blue, row by
row), the labels ("labels", or CIFAR-100's "fine_labels") a list of N class indices, and the
metadata the class names ("label_names" / "fine_label_names") in label order.

The files are recognized by their names and checked by that layout, never by checksum (a re-packed
copy is as good as the original). A pickle can name any Python callable to run while it loads, so
the files are read by an unpickler that admits only a few harmless builtins and numpy's array
classes: a crafted file is refused before it runs anything, the promise `weights_only` gives for
checkpoints. What those may allocate is bounded before they allocate it (`pickle_limits`), and a file larger
than the memory budget is not read. Every problem is one `errors.DataError` sentence.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import utils
from core import errors
from data import decoding, folders, pickle_limits

SIDE = 32  # pixels: every CIFAR image is 32 x 32
ROW = 3 * SIDE * SIDE


@dataclass(frozen=True)
class Layout:
    """The file names and dict keys of one CIFAR variant."""

    name: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels: str
    class_names: str


CIFAR10 = Layout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{index}" for index in range(1, 6)),
                 "test_batch", "batches.meta", "labels", "label_names")
CIFAR100 = Layout("CIFAR-100", "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names")
LAYOUTS = (CIFAR10, CIFAR100)

# All that a CIFAR pickle needs to load (Python 2's originals, and copies re-packed by Python 3 at any
# protocol): numpy's array reconstruction under its numpy 1 and numpy 2 names, the codec that Python 3's
# protocol 2 writes bytes with, and a few inert builtin types. Nothing that could run a command.
ADMITTED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    *((module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset", "bytearray")),
}
# The admitted callables that could be asked to allocate without limit, replaced by their guarded forms.
GUARDED = {"ndarray": lambda _: pickle_limits.NdarrayName(), "_reconstruct": pickle_limits.reconstruct,
           "_frombuffer": pickle_limits.frombuffer, "dtype": pickle_limits.dtype,
           "bytearray": pickle_limits.from_text, "encode": pickle_limits.from_text}
SHOWN_KEYS = 5  # of a file's dict, in a message about a missing entry


@dataclass
class CifarSplits:
    """The official splits of a CIFAR folder: uint8 images (N, 3, S, S), int64 labels, class names."""

    layout: Layout
    folder: Path
    class_names: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def test_file(self) -> Path:
        return self.folder / self.layout.test

    def pool(self, split: str) -> tuple[list[str], list[int], torch.Tensor]:
        """A split ("train" or "test") as names ("<folder>:train[<index>]"), labels and images, in the files' order."""
        images, labels = (self.train_images, self.train_labels) if split == "train" else (self.test_images,
                                                                                         self.test_labels)
        return [f"{self.folder}:{split}[{index}]" for index in range(len(labels))], labels.tolist(), images


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings, numbers and numpy arrays, and refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ADMITTED:
            raise pickle.UnpicklingError(f"it asks for {utils.printable(f'{module}.{name}', 80)}, which no CIFAR "
                                         "file holds; nothing was run")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # numpy 2's name, without its warning
        found = super().find_class(module, name)
        return GUARDED[name](found) if name in GUARDED else found


def find(data_dir: str | Path) -> tuple[Layout, Path] | None:
    """The CIFAR variant and folder `data_dir` holds: a `cifar-10-batches-py` / `cifar-100-python` folder
    (by its name, or by two or more of its file names, so a copy under another name works too), or a folder
    holding one. None for anything else."""
    root = Path(data_dir)
    if not root.is_dir():
        return None
    for layout in LAYOUTS:
        files = {*layout.train, layout.test, layout.meta}
        if root.name == layout.folder or sum((root / name).is_file() for name in files) >= 2:
            return layout, root
    inside = [(layout, root / layout.folder) for layout in LAYOUTS if (root / layout.folder).is_dir()]
    if len(inside) > 1:
        raise errors.DataError(f"Data folder '{root}' holds both {CIFAR10.folder}/ and {CIFAR100.folder}/: "
                               "point --data-dir at the one to use.")
    return inside[0] if inside else None


def _load(path: Path, layout: Layout, memory_budget_mb: float = float("inf")) -> dict[str, Any]:
    """One CIFAR file's dict, its keys as text (Python 2's files give bytes under some readings): a file over the
    memory budget is not read, and one whose objects nest too deep is refused before any is built."""
    if path.stat().st_size / 2**20 > memory_budget_mb:
        raise errors.DataError(f"The {layout.name} file '{path}' is larger than --memory-budget-mb "
                               f"{memory_budget_mb:g}: raise the budget or check the file.")
    try:
        raw = path.read_bytes()
        pickle_limits.deepest_nesting(raw)
        content = _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()
    except Exception as error:  # damaged, truncated or crafted: all the user's file to replace
        raise errors.DataError(f"Cannot read the {layout.name} file '{path}': "
                               f"{errors.one_line(error, brief=True)}.") from None
    if not isinstance(content, dict):
        raise errors.DataError(f"The {layout.name} file '{path}' holds a {type(content).__name__}, not the "
                               "dict of torchvision's CIFAR format.")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def _field(content: dict[str, Any], key: str, path: Path, layout: Layout) -> Any:
    if key not in content:
        held = [utils.printable(str(name), 40) for name in list(content)[:SHOWN_KEYS]]
        more = f" and {len(content) - SHOWN_KEYS:,} more" if len(content) > SHOWN_KEYS else ""
        raise errors.DataError(f"The {layout.name} file '{path}' has no '{key}' entry (it holds "
                               f"{', '.join(held) or 'nothing'}{more}).")
    return content[key]


def _read_batch(path: Path, layout: Layout, num_classes: int,
                memory_budget_mb: float = float("inf")) -> tuple[np.ndarray, np.ndarray]:
    """A batch file's images as (N, 3, 32, 32) uint8 and its labels, checked against the documented layout."""
    content = _load(path, layout, memory_budget_mb)
    data, labels = _field(content, "data", path, layout), _field(content, layout.labels, path, layout)
    problem = None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == ROW):
        shape = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        problem = f"its 'data' is {shape}, not uint8 rows of {ROW} values"
    else:
        try:
            labels = np.array(labels, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            problem = f"its '{layout.labels}' is not a list of class indices"
    if problem is None and len(labels) != len(data):
        problem = f"it has {len(data)} images but {len(labels)} labels"
    elif problem is None and len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        problem = f"its labels are not all class indices 0 to {num_classes - 1}"
    if problem is not None:
        raise errors.DataError(f"The {layout.name} file '{path}' is not in torchvision's format: {problem}.")
    return data.reshape(-1, 3, SIDE, SIDE), labels


def _class_names(path: Path, layout: Layout) -> list[str]:
    names = _field(_load(path, layout), layout.class_names, path, layout)
    if isinstance(names, list) and all(isinstance(name, bytes) for name in names):
        names = [name.decode("utf-8", errors="replace") for name in names]
    if not folders.are_class_names(names):
        raise errors.DataError(f"The {layout.name} file '{path}' does not list class names under "
                               f"'{layout.class_names}' ({folders.CLASS_NAMES_RULE}).")
    return names


def _check_classes(layout: Layout, folder: Path, class_names: list[str], labels: dict[str, np.ndarray]) -> None:
    """Every class of the metadata has images in both splits (so a stratified carve and every metric work)."""
    for split, split_labels in labels.items():
        counts = np.bincount(split_labels, minlength=len(class_names))
        empty = [name for name, count in zip(class_names, counts.tolist(), strict=True) if count == 0]
        if empty:
            raise errors.DataError(f"The {layout.name} folder '{folder}' has no {split} images of "
                                   f"class{'es' if len(empty) > 1 else ''} {', '.join(map(repr, empty))}.")


def _check_budget(layout: Layout, image_count: int, image_size: int, memory_budget_mb: float) -> None:
    """Refuse images over the memory budget: they cannot be streamed from disk as image files can."""
    needed = image_count * 3 * image_size**2 / 2**20
    if needed > memory_budget_mb:
        raise errors.DataError(f"{layout.name}'s images at {image_size} px take {needed:,.0f} MiB, over "
                               f"--memory-budget-mb {memory_budget_mb:g}: raise the budget or lower --image-size.")


def _at_size(images: np.ndarray, image_size: int) -> torch.Tensor:
    """32 px images as a tensor at the run's size, resized as decoded image files are."""
    tensor = torch.from_numpy(images)
    if image_size == SIDE:
        return tensor
    return torch.cat([decoding.fit_to_square(chunk, image_size) for chunk in tensor.split(4096)])


def read(layout: Layout, folder: Path, image_size: int = SIDE,
         memory_budget_mb: float = float("inf")) -> CifarSplits:
    """The official train and test splits of a CIFAR folder (see the module's docstring), at `image_size`."""
    missing = [name for name in (*layout.train, layout.test, layout.meta) if not (folder / name).is_file()]
    if missing:
        expected = ", ".join((*layout.train, layout.test, layout.meta))
        raise errors.DataError(f"The {layout.name} folder '{folder}' lacks {', '.join(missing)}: torchvision's "
                               f"{layout.name} Python format holds {expected}.")
    class_names = _class_names(folder / layout.meta, layout)
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    for name in (*layout.train, layout.test):  # the budget is checked before each file and before any copy
        batches.append(_read_batch(folder / name, layout, len(class_names), memory_budget_mb))
        _check_budget(layout, sum(len(labels) for _, labels in batches), image_size, memory_budget_mb)
    test_images, test_labels = batches.pop()
    train_images, train_labels = np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
    _check_classes(layout, folder, class_names, {"training": train_labels, "test": test_labels})
    return CifarSplits(layout, folder, class_names, _at_size(train_images, image_size), torch.from_numpy(train_labels),
                       _at_size(np.array(test_images), image_size), torch.from_numpy(test_labels))
