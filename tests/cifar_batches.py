"""CIFAR files in torchvision's Python format, well-formed, damaged or crafted, for the CIFAR tests."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

SMALL = ["--teacher-model", "resnet8", "--student-model", "resnet8", "--batch-size", "8", "--image-size", "32",
         "--seed", "0", "--device", "cpu", "--precision", "fp32", "--workers", "0"]


# ---------------------------------------------------------------- CIFAR files, fabricated


def cifar_batch(class_count: int, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Rows of 3,072 uint8 values (a fixed pattern per class plus noise) and their shuffled labels."""
    patterns = np.random.default_rng(99).integers(0, 256, (class_count, 3072))
    labels = np.repeat(np.arange(class_count), per_class)
    rng.shuffle(labels)
    noise = rng.integers(-40, 41, (len(labels), 3072))
    return np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8), labels.tolist()


def python2_style(content: object) -> bytes:
    """A pickle naming numpy as the original CIFAR files do (numpy.core.multiarray, protocol 2)."""
    return pickle.dumps(content, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar(folder: Path, variant: int, class_names: list[str], train_per_class: int,
                test_per_class: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    """torchvision's CIFAR-10 (`variant` 10: five training batches) or CIFAR-100 Python files in `folder`, the
    files written with several pickle protocols; returns each file's (data, labels)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    count = len(class_names)
    if variant == 10:
        files = {f"data_batch_{index}": cifar_batch(count, train_per_class, rng) for index in range(1, 6)}
        files["test_batch"] = cifar_batch(count, test_per_class, rng)
        labels_key, meta, names_key = "labels", "batches.meta", "label_names"
    else:
        files = {"train": cifar_batch(count, train_per_class, rng), "test": cifar_batch(count, test_per_class, rng)}
        labels_key, meta, names_key = "fine_labels", "meta", "fine_label_names"
    for index, (name, (data, labels)) in enumerate(files.items()):
        content = {"batch_label": name, labels_key: labels, "data": data, "filenames": [f"{i}.png" for i in labels]}
        protocol = 4 + index % 2
        (folder / name).write_bytes(python2_style(content) if index == 0 else pickle.dumps(content, protocol=protocol))
    (folder / meta).write_bytes(python2_style({names_key: class_names, "num_cases_per_batch": 10}))
    return files


def crafted_pickle(marker: Path) -> bytes:
    """A pickle that runs a shell command when an ordinary unpickler loads it."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return pickle.dumps({"data": Payload(), "labels": [0]})


def damage(folder: Path, case: str) -> None:
    """Spoil a CIFAR-10 folder the way `case` says."""
    batch = folder / "cifar-10-batches-py" / "data_batch_2"
    if case == "truncated":
        batch.write_bytes(batch.read_bytes()[:5000])
    elif case == "crafted":
        batch.write_bytes(crafted_pickle(folder / "marker"))
    elif case == "missing test":
        (folder / "cifar-10-batches-py" / "test_batch").unlink()
    elif case == "wrong layout":
        batch.write_bytes(pickle.dumps({"data": np.zeros((12, 1024), np.uint8), "labels": [0] * 12}))
    else:  # neither CIFAR's files nor an ImageFolder tree
        for path in (folder / "cifar-10-batches-py").iterdir():
            path.unlink()
        (folder / "cifar-10-batches-py").rmdir()
        (folder / "notes.txt").write_text("no data here")
