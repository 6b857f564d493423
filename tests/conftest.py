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


def hand_dkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
             ) -> tuple[float, float]:
    """DKD's TCKD and NCKD by plain Python: T^2 * batch-mean KL(teacher || student) of each split."""
    tckd = nckd = 0.0
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), labels.tolist(), strict=True):
        p_s, p_t = hand_softmax(s_row, temperature), hand_softmax(t_row, temperature)
        tckd += hand_kl([p_t[label], 1 - p_t[label]], [p_s[label], 1 - p_s[label]])
        others = [i for i in range(len(s_row)) if i != label]
        nckd += hand_kl(hand_softmax([t_row[i] for i in others], temperature),
                        hand_softmax([s_row[i] for i in others], temperature))
    scale = temperature**2 / len(labels)
    return tckd * scale, nckd * scale


def hand_pearson(first: list[float], second: list[float]) -> float:
    """Pearson correlation with DIST_KD's eps in the denominator, by plain Python."""
    mean_first, mean_second = sum(first) / len(first), sum(second) / len(second)
    first, second = [v - mean_first for v in first], [v - mean_second for v in second]
    norms = math.sqrt(sum(v * v for v in first)) * math.sqrt(sum(v * v for v in second))
    return sum(a * b for a, b in zip(first, second, strict=True)) / (norms + 1e-8)


def hand_dist(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    """DIST_KD's DIST with beta = gamma = 1: T^2 * (1 - mean row correlation + 1 - mean column correlation)."""
    p_s = [hand_softmax(row, temperature) for row in student]
    p_t = [hand_softmax(row, temperature) for row in teacher]
    inter = 1 - sum(hand_pearson(s, t) for s, t in zip(p_s, p_t, strict=True)) / len(p_s)
    columns = range(len(p_s[0]))
    intra = 1 - sum(hand_pearson([row[c] for row in p_s], [row[c] for row in p_t]) for c in columns) / len(columns)
    return temperature**2 * (inter + intra)


def hand_standardize(rows: list[list[float]]) -> list[list[float]]:
    """The logit-standardization reference's normalize(): (x - mean) / (1e-7 + unbiased std), per row."""
    out = []
    for row in rows:
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        out.append([(v - mean) / (1e-7 + std) for v in row])
    return out


# Three samples of three classes, for the relation (DIST) and standardized methods' hand computations.
STUDENT3 = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, -1.0, 0.0]])
TEACHER3 = torch.tensor([[3.0, 0.0, -2.0], [0.0, 1.0, 2.0], [0.5, 0.5, -0.5]])
LABELS3 = torch.tensor([0, 2, 1])


def method_setup(teacher_arch: str = "vgg16_bn", student_arch: str = "resnet18", *, image_size: int = 32,
                 epochs: int = 1, steps_per_epoch: int = 1, layer_pairs=None, **settings):
    """A methods.base.Setup whose config is experiment's defaults with `settings` (temperature=..., ...) replaced."""
    import dataclasses

    import experiment
    from methods import base

    config = dataclasses.replace(experiment.default_config(), **settings)
    return base.Setup(config, teacher_arch, student_arch, image_size=image_size, epochs=epochs,
                      steps_per_epoch=steps_per_epoch, layer_pairs=layer_pairs)


def logit_method_outputs(name: str, **settings) -> dict[str, torch.Tensor]:
    """A logit method's step on STUDENT3 / TEACHER3 / LABELS3 (the teacher's logits given as cached), T 4 and
    alpha 0.5 unless `settings` say otherwise."""
    import KD_engine

    setup = method_setup(**{"temperature": 4.0, "alpha": 0.5, **settings})
    criterion = KD_engine.make_criterion(name, torch.nn.Identity(), torch.nn.Identity(), setup)
    return criterion(torch.nn.Identity(), STUDENT3, LABELS3, TEACHER3)


def tiny_convnet(width: int, classes: int = 3) -> torch.nn.Sequential:
    """conv (index 0) -> BN -> ReLU (2) -> strided conv (3) -> ReLU (4) -> pooled linear head."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


@pytest.fixture(scope="module")
def real_models():
    """The default teacher and student (VGG16, ResNet18) for 10 classes at 32 px."""
    import model_builder

    torch.manual_seed(0)
    return model_builder.build_model("VGG16", 10, 32), model_builder.build_model("ResNet18", 10, 32)
