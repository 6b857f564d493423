"""Shared fixtures and helpers: a private dataset cache, tiny image folders, one finished tiny run, the check
of a user error's one sentence, and hand-computed distillation terms; and the helpers that tests in more than
one file use (the hostile folder and small model files, pretrained-weights files offline, sweep flags and
storage passwords, summaries of collapsed runs). hostile_images.py and cifar_batches.py make the image and
CIFAR files."""

from __future__ import annotations

import ast
import atexit
import io
import math
import os
import shutil
import sys
import tempfile
import tokenize
import urllib.error
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from hostile_images import BIG, CLASSES, _jpeg_bytes, _noise, _png_bytes, _write_good
from PIL import Image
from torchvision import models

import experiment
from config import command_line, settings
from core import records

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


def tiny_distillation(name: str, teacher_arch: str, student_arch: str, **settings):
    """(frozen teacher, student, criterion of method `name`) for 3 classes at 16 px, seeded; settings as in
    `method_setup`. The caller closes the criterion."""
    import KD_engine
    import model_builder

    torch.manual_seed(0)
    teacher = KD_engine.freeze(model_builder.build_model(teacher_arch, 3, 16))
    student = model_builder.build_model(student_arch, 3, 16)
    setup = method_setup(teacher_arch, student_arch, image_size=16, **settings)
    return teacher, student, KD_engine.make_criterion(name, teacher, student, setup)


def sgd(stage, lr: float = 0.05) -> torch.optim.SGD:
    """RepDistiller's optimizer (momentum 0.9, weight decay 5e-4) over an initialization stage's modules."""
    return torch.optim.SGD(stage.trains.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


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


def maps_of_every_size_order(generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) batches of 3 maps, 5 and 7 channels, drawn from `generator` one pair at a time: the
    student's as large as the teacher's, larger, then smaller (4 / 4, 8 / 4, 2 / 4 px); the student's requires grad."""
    for student_size, teacher_size in ((4, 4), (8, 4), (2, 4)):
        student = torch.randn(3, 5, student_size, student_size, generator=generator).requires_grad_()
        yield student, torch.randn(3, 7, teacher_size, teacher_size, generator=generator)


@pytest.fixture(scope="module")
def real_models():
    """The default teacher and student (VGG16, ResNet18) for 10 classes at 32 px."""
    import model_builder

    torch.manual_seed(0)
    return model_builder.build_model("VGG16", 10, 32), model_builder.build_model("ResNet18", 10, 32)


def _same(first, second) -> bool:
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and torch.equal(first, second)
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(_same(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)):
        return type(first) is type(second) and len(first) == len(second) and all(map(_same, first, second))
    return first == second


ONE_EPOCH = ["--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "8", "--seed", "0", "--device", "cpu",
             "--val-fraction", "0.25"]


def default_config(**changes) -> settings.Config:
    """The settings of a plain `python experiment.py`, with `changes`."""
    parser = command_line.build_parser(experiment.default_config())
    return replace(settings.Config(**{name: parser.get_default(name) for name in settings.Config.__dataclass_fields__}),
                   **changes)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A train/ and test/ tree with good images in every colour mode plus every kind of bad file.

    Returns (root, {good path: (expected RGB, tolerance)}, {bad path: expected reason fragment}).
    """
    root = tmp_path_factory.mktemp("hostile ø")
    good: dict[str, tuple] = {}
    bad: dict[str, str] = {}
    for label, name in enumerate(sorted(CLASSES)):
        _write_good(root / "train" / name, label, 13, 0, good)  # every kind once
        _write_good(root / "test" / name, label, 4, 5, good)
    big = root / "train" / "plain" / "big 41 MP ü.jpg"
    Image.new("RGB", BIG, (10, 200, 30)).save(big, "JPEG", quality=90)
    good[str(big)] = ((10, 200, 30), 6)

    def junk(relative: str, content: bytes, reason: str | None) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        if reason is not None:
            bad[str(path)] = reason

    noisy_jpeg, noisy_png = _jpeg_bytes(_noise()), _png_bytes(_noise(seed=1))
    junk("train/red circle/corrupt.png", np.random.default_rng(3).bytes(300), "not a readable image")
    junk("train/red circle/empty.jpg", b"", "empty file")
    junk("train/blå/truncated.jpg", noisy_jpeg[: len(noisy_jpeg) // 2], "truncated")
    junk("train/blå/truncated half.png", noisy_png[: len(noisy_png) // 2], "")
    junk("train/plain/notes.jpg", b"shopping list: milk, eggs\n" * 20, "not a readable image")
    junk("train/plain/README.txt", b"these are my photos\n", "not an image file")
    junk("train/README.txt", b"dataset readme\n", "not inside a class folder")
    junk("train/plain/.DS_Store", b"\0\0\0\1Bud1" * 10, None)  # hidden: ignored silently
    junk("train/plain/._00 rgb.png", b"\0\5\26\7AppleDouble", None)
    junk("train/.DS_Store", b"\0\0\0\1Bud1", None)
    junk("train/.ipynb_checkpoints/00.png", _png_bytes(_noise((4, 4))), None)  # hidden folder: no class
    junk("test/plain/bad.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "")
    junk("test/notes.md", b"# notes\n", "not inside a class folder")
    junk("test/.DS_Store", b"\0", None)
    link = root / "test" / "blå" / "broken link.png"
    link.symlink_to(root / "nowhere.png")
    bad[str(link)] = "does not exist"
    return root, good, bad


# ---------------------------------------------------------------- prediction_for_one.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small untrained model in the self-describing checkpoint format (quicker than a training run)."""
    import model_builder

    classes = ["circle", "cross", "stripes"]
    model = model_builder.build_model("mobilenet_v3_small", len(classes), 32)
    path = tmp_path_factory.mktemp("model") / "best_model.pth"
    torch.save({"arch": "mobilenet_v3_small", "num_classes": len(classes), "class_names": classes,
                "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def good_images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("good images")
    paths = [folder / "one.png", folder / "two ø.jpg"]
    _noise(seed=5).save(paths[0])
    _noise(seed=6).save(paths[1])
    return [str(path) for path in paths]


def _bad_images(folder: Path) -> dict[str, str]:
    """Bad image arguments and the reason each must be reported with."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.jpg").write_text("not a picture")
    (folder / "empty.png").write_bytes(b"")
    noisy = _jpeg_bytes(_noise())
    (folder / "truncated.jpg").write_bytes(noisy[: len(noisy) // 2])
    return {str(folder / "missing.png"): "does not exist",
            str(folder / "text.jpg"): "not a readable image", str(folder / "empty.png"): "empty file",
            str(folder / "truncated.jpg"): "truncated"}


def log_entry(line: str) -> tuple[str, str]:
    """A line of skipped_files.log read back: the file name (a Python string literal) and the reason after it."""
    literal = next(tokenize.generate_tokens(io.StringIO(line).readline))
    return ast.literal_eval(literal.string), line[literal.end[1]:].removeprefix(": ")


# ---------------------------------------------------------------- a model file's description

# A change to a usable description, and what the one sentence about it must say.
BAD_DESCRIPTIONS = {
    "fewer class names than outputs": ({"class_names": ["circle", "cross"]},
                                       "its 'class_names' holds 2 names, but"),
    "a mean of two values": ({"mean": [0.5, 0.5]},
                             "its 'mean' must be a list of 3 finite numbers, one per colour channel, not [0.5, 0.5]"),
    "the image size as text": ({"image_size": "8"}, "its 'image_size' must be an integer from 8 to 1024 (pixels), "
                                                    "not '8'"),
    "an image size beyond the range": ({"image_size": 4096}, "its 'image_size' must be an integer from 8 to 1024"),
    "an unknown resize mode": ({"resize": "stretch"}, "its 'resize' must be one of squash, center-crop, not 'stretch'"),
    "a std of zero": ({"std": [0.0, 0.25, 0.25]}, "its 'std' must be a list of 3 finite positive numbers"),
    "an infinite mean": ({"mean": [float("inf"), 0.5, 0.5]}, "its 'mean' must be a list of 3 finite numbers"),
    "class names that are not text": ({"class_names": [1, 2, 3]}, "its 'class_names' must be a non-empty list of "
                                                                  "distinct, non-empty class names"),
}


@pytest.fixture(scope="module")
def small_model_files(tmp_path_factory) -> tuple[dict, torch.nn.Module, Path]:
    """A usable description of a tiny 3-class classifier, the classifier, and a folder holding one image."""
    import model_builder

    torch.manual_seed(0)
    model = model_builder.build_model("resnet8", 3, 32).eval()
    description = {"arch": "resnet8", "num_classes": 3, "class_names": ["circle", "cross", "stripes"],
                   "image_size": 32, "resize": "squash", "mean": [0.5] * 3, "std": [0.25] * 3, "epoch": 1,
                   "history": [], "state_dict": model.state_dict()}
    folder = tmp_path_factory.mktemp("model files")
    _noise(seed=7).save(folder / "image.png")
    return description, model, folder


def class_folders_only(root: Path, per_class: int, seed: int = 0) -> Path:
    """root/<class>/<n>.png with no train/ or test/ folder (the split name "" puts classes at the root)."""
    return make_image_folder(root, {"": per_class}, seed=seed)


# ---------------------------------------------------------------- 23.1: models that answer one class


def collapsed_run(share: float = 1.0, top1: float = 0.4575) -> tuple[records.RunSummary, dict]:
    """Two classes ('ants' 70, 'bees' 83 test images); the distilled student answers 'ants' for `share` of them."""
    models = {"teacher": model_row(0.85, test_top_class="bees", test_top_class_share=0.55),
              "student_baseline": model_row(0.8, test_top_class="bees", test_top_class_share=0.5),
              "student_kd": model_row(top1, test_top_class="ants", test_top_class_share=share, mcnemar_p=1.0,
                                      gain_significant=False)}
    summary = run_summary(models, sizes={"train": 220, "val": 60, "test": 153},
                          images_per_class={"train": {"min": 100, "max": 120}, "val": {"min": 28, "max": 32},
                                            "test": {"min": 70, "max": 83}})
    summary.dataset.class_names = ["ants", "bees"]
    summary.dataset.carving = {"class_counts": {"test": {"ants": 70, "bees": 83}}}
    histories = {role: {"best_epoch": 2, "epochs": [{"val": {"top1": 0.5, "f1_macro": 0.4}},
                                                     {"val": {"top1": 0.6, "f1_macro": 0.5}}]}
                 for role in models}
    return summary, histories


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture
def offline(tmp_path, monkeypatch) -> list[str]:
    """An empty torch hub cache in `tmp_path`, and a network that refuses every download (the URLs tried are listed)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    tried = []

    def refuse(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tried


def hub_file(weights: models.WeightsEnum) -> Path:
    """The path torch.hub uses for `weights`: $TORCH_HOME/hub/checkpoints/<the URL's file name>."""
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def fabricate(path: Path, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return state_dict


def imagenet_resnet18() -> dict[str, torch.Tensor]:
    """A state dict shaped as torchvision's ImageNet ResNet18 weights (1000 classes, 7x7 stem), random values."""
    torch.manual_seed(1)
    return models.resnet18(num_classes=1000).state_dict()


def optimizer(lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


RESUME_FLAGS = [
    "--val-fraction", "0.25", "--teacher-epochs", "2", "--student-epochs", "4", "--batch-size", "8",
    "--image-size", "32", "--seed", "0", "--device", "cpu",
]


SECRET = "s3cret-Value"


def settings_of(argv: list[str]) -> dict:
    """The Config fields the command line would run with."""
    _, args, _ = command_line.parse_command_line(argv, experiment.default_config())
    return {key: args[key] for key in settings.Config.__dataclass_fields__}


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def speed_row(latency: float, iqr: list[float]) -> dict:
    return {"latency_ms": latency, "latency_ms_iqr": iqr, "throughput_img_s": 1000 / latency,
            "throughput_img_s_iqr": [1000 / iqr[1], 1000 / iqr[0]]}


SWEEP_FLAGS = [
    "--teacher-model", "resnet8", "--student-model", "resnet8", "--teacher-epochs", "1", "--student-epochs", "1",
    "--batch-size", "16", "--image-size", "16", "--precision", "fp32", "--val-fraction", "0.25", "--device", "cpu",
    "--seed", "0", "--sweep", "temperature=1:10:log,alpha=0.1:0.9",
]
SPEC = SWEEP_FLAGS[SWEEP_FLAGS.index("--sweep") + 1]


PASSWORD = "hunter2-sweep"


def journal_study(path: Path, name: str) -> optuna.Study:
    """A study kept in a journal file, opened as a reader would."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


def tied_logits(rows: int = 300, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16-rounded logits where every third row ties its two (or more) highest classes exactly."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=generator).bfloat16().float()
    top = logits.max(dim=1, keepdim=True).values
    logits[::3] = torch.where(torch.rand(rows // 3, classes, generator=generator) < 0.4, top[::3], logits[::3])
    return logits, torch.randint(classes, (rows,), generator=generator)


class RoundedByBf16(torch.nn.Module):
    """Two logits 1.0 and 1.001 times the image's first pixel: bf16 rounds the second weight to 1.0 (a tie, so
    class 0), fp32 keeps it (class 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [1.001]]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(images[:, :1, 0, 0])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked `long` first, the rest in their order: xdist's workers then share the long ones from the
    start instead of one of them taking a long test while the other has finished (longest first)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
