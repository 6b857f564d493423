"""Shared fixtures and helpers: a private dataset cache, tiny image folders, one finished tiny run, the check
of a user error's one sentence, and hand-computed distillation terms."""

from __future__ import annotations

import atexit
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The bundled dataset is written into this cache; keep tests away from the user's home (and leave nothing behind).
if "KD_CACHE_DIR" not in os.environ:
    os.environ["KD_CACHE_DIR"] = tempfile.mkdtemp(prefix="kd-test-cache-")
    atexit.register(shutil.rmtree, os.environ["KD_CACHE_DIR"], ignore_errors=True)
# Under pytest-xdist (the README's `-n 2`) the workers share the machine's cores: one thread each, in the worker
# and in the runs it starts, rather than every process's thread pool spinning for all the cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY_CLASSES = ("circle", "cross", "stripes")
# Small networks of the KD literature, for end-to-end runs that test the pipeline rather than the default models
# (VGG16 and ResNet18 cost a hundred times more per image; the tiny_run fixture keeps them).
SMALL_MODELS = ["--teacher-model", "resnet14", "--student-model", "resnet8"]
TINY_FLAGS = [
    "--teacher-epochs", "2", "--student-epochs", "2", "--batch-size", "8",
    "--image-size", "32", "--seed", "0", "--device", "cpu",
]


def _pattern(kind: str, rng: np.random.Generator, size: int = 12) -> np.ndarray:
    """A small RGB image of one of three easy-to-tell shapes, with noise."""
    y, x = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    if kind == "circle":
        mask = (x - centre) ** 2 + (y - centre) ** 2 < (size / 3) ** 2
    elif kind == "cross":
        mask = (np.abs(x - centre) < 1.5) | (np.abs(y - centre) < 1.5)
    else:
        mask = (y // 2) % 2 == 0
    image = np.where(mask[..., None], [220, 200, 60], [30, 40, 90]).astype(float)
    image += rng.normal(0, 20, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Write an ImageFolder tree: root/<split>/<class>/<n>.png with `per_class[split]` images each."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name in TINY_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_pattern(name, rng)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Three classes; 12 train images a class (validation carved from them) and 5 test images."""
    return make_image_folder(tmp_path_factory.mktemp("tiny"), {"train": 12, "test": 5})


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """One finished end-to-end run of the experiment on the tiny data."""
    import experiment

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            "--tensorboard", "--export", "onnx", *TINY_FLAGS])
    assert code == 0
    return run_dir


def model_row(top1: float, **fields):
    """A summary.json row (records.ModelRow) with test top-1 `top1`; the other fields as given, or plausible."""
    from core import records

    values = {"arch": "resnet8", "params": 1000, "size_mb": 0.1, "best_epoch": 1, "epochs_trained": 1,
              "stopped_early": False, "train_seconds": 1.0, "test": {"top1": top1}}
    return records.ModelRow(**{**values, **fields})


def run_summary(models: dict, sizes: dict | None = None, images_per_class: dict | None = None, seeds=(0,)):
    """A summary.json record (records.RunSummary) of `models` ({role: ModelRow}) on data of these split sizes."""
    from core import records

    sizes = sizes or {"train": 800, "val": 100, "test": 100}
    images_per_class = images_per_class or {split: {"min": size // 10, "max": size // 10}
                                            for split, size in sizes.items()}
    dataset = records.DatasetRecord(class_names=[str(index) for index in range(10)], sizes=sizes,
                                   images_per_class=images_per_class, validation="carved", carving={},
                                   mean=[0.5] * 3, std=[0.25] * 3, normalization="the training split's own",
                                   storage="decoded once into memory")
    return records.RunSummary(models=models, seeds=list(seeds), skipped_files=[], dataset=dataset, device="cpu",
                             precision="fp32", wall_seconds=1.0, finished_at="2026-11-30T12:00:00")


def assert_one_sentence_exit_2(code: int, err: str, *fragments: str) -> str:
    """Check how an error the user caused ends: exit code 2 and, on stderr, one line "error: <sentence>"
    holding every fragment, without a traceback. Returns that line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# Logits and labels the distillation tests compute by hand: two samples, three classes.
STUDENT = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
TEACHER = torch.tensor([[3.0, 0.0, -2.0], [0.0, 1.0, 2.0]])
LABELS = torch.tensor([0, 2])


def hand_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    """softmax(row / temperature) by plain Python."""
    exps = [math.exp(value / temperature) for value in row]
    return [value / sum(exps) for value in exps]


def hand_kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum_i p_i log(p_i / q_i) of two distributions, by plain Python."""
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def hand_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Hinton's distillation term by plain Python: T^2 times KL(softmax(teacher / T) || softmax(student / T)),
    summed over classes and averaged over samples (batchmean)."""
    rows = list(zip(student.tolist(), teacher.tolist(), strict=True))
    total = sum(hand_kl(hand_softmax(t_row, temperature), hand_softmax(s_row, temperature)) for s_row, t_row in rows)
    return temperature**2 * total / len(rows)
