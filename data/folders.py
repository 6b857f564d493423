"""Split folders as a user lays them out: which layout a data root has, the class folders of a
split and their candidate image files (by name only), and the checks that every split has the
same classes, each with images.

Hidden files and folders (names starting with '.', such as .DS_Store, ._photo.jpg or
.ipynb_checkpoints) are ignored silently at every level: never used, never listed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from core import errors

# torchvision's ImageFolder extensions, plus GIF (its first frame is used).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLIT_FOLDERS = ("train", "val", "test")
MAX_CLASS_NAME = 255  # characters: a class is a folder's name, which filesystems keep under 256 bytes
CLASS_NAMES_RULE = f"a non-empty list of distinct, non-empty class names of at most {MAX_CLASS_NAME} characters"


def are_class_names(value: Any) -> bool:
    """Whether `value` can name a classifier's classes (CLASS_NAMES_RULE): read from a file, it is checked, since
    every prediction and report shows one and a name must say which class it is."""
    return (isinstance(value, list) and len(value) > 0 and len(set(map(repr, value))) == len(value)
            and all(isinstance(name, str) and 0 < len(name.strip()) and len(name) <= MAX_CLASS_NAME
                    for name in value))


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
        having = " and ".join(f"{name}/" for name in present)
        raise errors.DataError(f"Data folder '{root}' has {having} but no {missing}: "
                        "give it train/ and test/ (val/ is optional), or only class folders "
                        "(the test and validation splits are then carved from them).")
    try:
        has_folders = any(entry.is_dir() and not _hidden(entry.name) for entry in os.scandir(root))
    except OSError as error:
        raise errors.DataError(f"Cannot read the data folder '{root}': {error.strerror or error}.") from None
    if not has_folders:
        raise errors.DataError(f"Data folder '{root}' holds neither train/ and test/ folders nor class folders "
                               "(one sub-folder of images per class), nor torchvision's CIFAR-10 / CIFAR-100 Python "
                               "files (cifar-10-batches-py/, cifar-100-python/).")
    return True



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
        raise errors.DataError(f"Cannot read the {split} folder '{root}': {error.strerror or error}.") from None
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
        raise errors.DataError(f"The {split} folder '{root}' has no class folders "
                               "(one sub-folder of images per class).")
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
    raise errors.DataError(" ".join(problems) + " Every split needs the same class folders, each holding images.")


def require_every_class(split: str, scan: FolderScan, labels: Sequence[int], skipped: list[dict[str, str]]) -> None:
    """Stop, naming the class and split, when every image file of a class folder was unreadable
    (folders without image files were refused before decoding, by `check_classes`)."""
    empty = _empty_classes(scan.classes, labels)
    if not empty:
        return
    if len(empty) > 1:
        names = ", ".join(f"'{name}'" for name in empty)
        raise errors.DataError(f"The classes {names} in the {split} folder '{scan.root}' have no usable images.")
    bad = _skipped_under(scan.root, empty[0], skipped)
    raise errors.DataError(f"The class '{empty[0]}' in the {split} folder '{scan.root}' has no usable images: "
                    f"{len(bad)} file{'s were' if len(bad) > 1 else ' was'} skipped, "
                    f"e.g. '{bad[0]['path']}' ({bad[0]['reason']}).")


# What a carved split is taken from, and what to do when there are too few images for it.
