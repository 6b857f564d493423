"""Train a teacher, a baseline student and a distilled student, and report what distillation bought.

Usage: python experiment.py [flags]        (python experiment.py --help lists them)

Edit the constants below to change the defaults, or pass the matching flags.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import data_setup
import engine
import KD_engine
import model_builder
import utils

# ---------------------------------------------------------------- settings (edit, or pass flags)
DATA_DIR: str | None = None  # a folder holding train/ [val/] test/; None: the bundled digits
TRAIN_DIR: str | None = None  # per-split folders override DATA_DIR's
VAL_DIR: str | None = None  # without a val folder, validation is carved out of train
TEST_DIR: str | None = None
OUTPUT_DIR: str | None = None  # None: runs/<timestamp>
TEACHER_MODEL = "VGG16"  # also the KD literature's small-image networks (resnet32x4, wrn_40_2, ...) or any torchvision classifier
STUDENT_MODEL = "ResNet18"
TEACHER_CHECKPOINT: str | None = None  # a trained teacher's best_model.pth: skips teacher training
TEACHER_WEIGHTS: str | None = None  # teacher's start: a torchvision weights name (DEFAULT, IMAGENET1K_V1) or a state-dict file; None: random
STUDENT_WEIGHTS: str | None = None  # the same for every student (baseline and distilled alike)
TEACHER_EPOCHS = 6
STUDENT_EPOCHS = 3
PATIENCE: int | None = None  # stop a model after this many epochs without a better validation SELECT_METRIC; None or 0: off
SELECT_METRIC = "top1"  # validation metric that picks each model's best epoch: top1, loss or f1_macro (ties: lower loss)
LABEL_SMOOTHING = 0.0  # label smoothing of every model's hard-label CE term (never of the distillation term)
CLASS_WEIGHTS = "none"  # none, or balanced: CE class weights n_images / (n_classes * images of the class), from train
OPTIMIZER = "adamw"  # adamw, or sgd (with Nesterov momentum)
TEACHER_LR = 2e-3  # peak learning rate of the one-cycle schedule (try 0.05 with sgd)
STUDENT_LR = 2e-3
WEIGHT_DECAY = 0.05  # decoupled for adamw; try 5e-4 with sgd
MOMENTUM = 0.9  # sgd only
BATCH_SIZE = 32  # images per optimizer step (small data learns more per epoch from more steps)
EVAL_BATCH_SIZE = 256  # images per evaluation forward pass (larger is faster; no gradients kept)
IMAGE_SIZE = 32  # pixels; images are resized to IMAGE_SIZE x IMAGE_SIZE
T = 4.0  # distillation temperature
ALPHA = 0.5  # weight of the hard-label CE term; (1 - ALPHA) weighs the distillation term
KD_METHODS = "kd"  # comma-separated, one distilled student each: kd (Hinton), fitnet, dkd, at
BETA: float | None = None  # fitnet / at: loss = ALPHA*CE + (1-ALPHA)*KD + BETA*feature; None: the references' weight (fitnet 100, at 1000) times ALPHA
FEATURE_LAYERS: str | None = None  # fitnet / at: "teacher_layer:student_layer,..."; None: the references' pairs of the models' stages
DKD_ALPHA = 1.0  # dkd: weight of the target-class term (the paper's value)
DKD_BETA = 8.0  # dkd: weight of the non-target-class term (the paper's CIFAR value)
DKD_WARMUP_EPOCHS: int | None = None  # dkd: linear warm-up per optimizer step over this many epochs; None: the paper's share (20 of 240) of all steps
SEEDS: str | None = None  # e.g. "0,1,2": repeat every student per seed (teacher once); None: SEED only
VAL_FRACTION = 0.1  # of train, carved (stratified) when there is no val/ folder
TEST_FRACTION = 0.2  # of all images, carved (stratified) first when the data folder holds only class folders
MAX_PER_CLASS: int | None = None  # cap the training split at this many images per class (quick checks); None: all
RESIZE = "squash"  # squash (whole image to a square) or center-crop (central square: keeps photos' proportions)
AUGMENT = "basic"  # basic (random crop + flip) or trivialaugment (then TrivialAugmentWide per image)
BALANCED_SAMPLER = False  # draw training images with probability inversely proportional to their class's count
HFLIP = "auto"  # horizontal-flip augmentation: on, off, or auto (off for the digits, on otherwise)
CROP_PADDING = 4  # pixels of random-crop shift at 32 px (scaled with IMAGE_SIZE)
SEED = 0
DEVICE = "auto"  # auto, cpu, cuda, cuda:1, ...
PRECISION = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32 or bf16
MEMORY_BUDGET_MB = 4096  # decoded images above this many MiB are streamed from disk instead
WORKERS = min(4, os.cpu_count() or 1)  # decoding processes (first decode, and streaming)
DECODE_CACHE = True  # keep decoded images in a cache file so the next run skips decoding
CACHE_TEACHER_LOGITS = False  # compute the teacher's logits once; needs a deterministic view
COMPILE = "auto"  # torch.compile the models: on, off, or auto (on for long CUDA runs; see engine.resolve_compile)
TENSORBOARD = False  # also write TensorBoard scalars under RUN/tensorboard/<model>
EXPORT = "none"  # none, or onnx: write RUN/<model>/model.onnx, checked against PyTorch
ONNX_TOLERANCE = 1e-4  # largest allowed |logit difference| between ONNX Runtime and PyTorch

ROLES = ("teacher", "student_baseline", "student_kd")
RESULTS = "results.json"
TRAIN_STATE = "train_state.pth"  # per model: everything needed to continue after its last finished epoch
SPLITS = ("train", "val", "test")
SUMMARY_TEST_KEYS = ("top1", "top3", "precision_macro", "recall_macro", "f1_macro", "auc_macro")


class SettingsError(Exception):
    """A setting the user gave is invalid."""


class StopRequested(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send before preempting a job), handled as Ctrl-C is."""


class Interrupted(Exception):
    """The run was stopped (Ctrl-C or SIGTERM); every finished epoch is saved in `run_dir`."""

    def __init__(self, run_dir: Path, signum: int) -> None:
        super().__init__(str(run_dir))
        self.run_dir, self.signum = run_dir, signum


# Exceptions the stop signals raise (SIGINT: Python's own KeyboardInterrupt).
STOP_SIGNALS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: StopRequested}


def stop_signal(error: KeyboardInterrupt) -> int:
    """The signal behind a stop: SIGTERM for StopRequested, SIGINT for any other KeyboardInterrupt."""
    return signal.SIGTERM if isinstance(error, StopRequested) else signal.SIGINT


def request_stop(signum: int, frame: Any) -> None:
    """Signal handler: stop the run as Ctrl-C does (the exception type tells which signal)."""
    raise STOP_SIGNALS[signum]


def handle_stop_signals() -> None:
    """Make SIGTERM stop a run as Ctrl-C does, unless it was inherited as ignored (then it stays ignored)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, request_stop)


@dataclass
class Config:
    """Every setting of a run; saved in config.json and in every checkpoint."""

    data_dir: str | None
    train_dir: str | None
    val_dir: str | None
    test_dir: str | None
    output_dir: str | None
    teacher_model: str
    student_model: str
    teacher_checkpoint: str | None
    teacher_weights: str | None
    student_weights: str | None
    teacher_epochs: int
    student_epochs: int
    patience: int | None
    select_metric: str
    label_smoothing: float
    class_weights: str
    optimizer: str
    teacher_lr: float
    student_lr: float
    weight_decay: float
    momentum: float
    batch_size: int
    eval_batch_size: int
    image_size: int
    temperature: float
    alpha: float
    kd_methods: str
    beta: float | None
    feature_layers: str | None
    dkd_alpha: float
    dkd_beta: float
    dkd_warmup_epochs: int | None
    seeds: str | None
    val_fraction: float
    test_fraction: float
    max_per_class: int | None
    resize: str
    augment: str
    balanced_sampler: bool
    hflip: str
    crop_padding: int
    seed: int
    device: str
    precision: str
    memory_budget_mb: float
    workers: int
    decode_cache: bool
    cache_teacher_logits: bool
    compile: str
    tensorboard: bool
    export: str


# What leaving out a flag whose default is None means, as --help shows it.
UNSET_MEANS = {
    "data_dir": "the bundled digits", "train_dir": "train/ of --data-dir", "val_dir": "carved from train",
    "test_dir": "test/ of --data-dir", "output_dir": "runs/<timestamp>", "teacher_checkpoint": "train a teacher",
    "teacher_weights": "random initialization", "student_weights": "random initialization", "patience": "off",
    "feature_layers": "the references' pairs for the two models", "list_layers": "train",
    "beta": "the references' weight ("
            + ", ".join(f"{method} {weight:g}" for method, weight in KD_engine.FEATURE_WEIGHTS.items()) + ") times --alpha",
    "dkd_warmup_epochs": "the paper's 20 of 240 epochs, as a share of all steps",
    "seeds": "--seed alone", "max_per_class": "every image", "config": "the constants in experiment.py", "resume": "a new run", "report_only": "train",
}
EXAMPLES = """examples:
  your own photos (class folders in train/ and test/), starting from ImageNet weights at 224 px:
    python experiment.py --data-dir ~/photos --image-size 224 --teacher-weights DEFAULT --student-weights DEFAULT \\
        --teacher-lr 1e-4 --student-lr 5e-4 --teacher-epochs 15 --student-epochs 15 --patience 3
  CIFAR-sized data (32 px) on a GPU:
    python experiment.py --data-dir cifar10 --teacher-epochs 30 --student-epochs 30 --batch-size 256 --workers 8
  a quick check that everything runs:
    python experiment.py --teacher-epochs 1 --student-epochs 1
  repeat a run with one setting changed:
    python experiment.py --config runs/<run>/config.json --alpha 0.7
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default once; for a default of None, what leaving the flag out means (UNSET_MEANS)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None and action.dest in UNSET_MEANS:
            return f"{action.help} (default: {UNSET_MEANS[action.dest]})"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags; their defaults are the constants at the top of this file."""
    parser = argparse.ArgumentParser(
        description="Knowledge distillation: train a teacher, a baseline student and a distilled student,\n"
        "then compare them. Without data flags the bundled handwritten digits are used.",
        formatter_class=HelpFormatter, epilog=EXAMPLES,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=DATA_DIR, help="folder holding train/ [val/] test/ class folders, or only class folders (test and validation are then carved)")
    data.add_argument("--train-dir", default=TRAIN_DIR, help="training split folder (overrides --data-dir)")
    data.add_argument("--val-dir", default=VAL_DIR, help="validation split folder")
    data.add_argument("--test-dir", default=TEST_DIR, help="test split folder (overrides --data-dir)")
    data.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="fraction of train carved for validation when there is no val/")
    data.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                      help="fraction of all images carved as the test split when the data folder holds only class folders")
    data.add_argument("--max-per-class", type=int, default=MAX_PER_CLASS,
                      help="train on a stratified, seeded subset of at most this many images per class (validation and test stay whole)")
    data.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                      help="images are resized to this many pixels square; above 64 px the models are torchvision's full "
                           "definitions (VGG16: 134M parameters instead of 14.7M)")
    data.add_argument("--resize", choices=data_setup.RESIZE_MODES, default=RESIZE,
                      help="squash: the whole image to the square; center-crop: shorter side to the size, then the central square")
    data.add_argument("--augment", choices=data_setup.AUGMENT_POLICIES, default=AUGMENT,
                      help="basic: random crop and flip; trivialaugment: then torchvision's TrivialAugmentWide on every training image")
    data.add_argument("--balanced-sampler", action=argparse.BooleanOptionalAction, default=BALANCED_SAMPLER,
                      help="draw training images with replacement, with probability inversely proportional to their class's count")
    data.add_argument("--hflip", choices=["auto", "on", "off"], default=HFLIP, help="horizontal-flip augmentation (auto: off for the bundled digits)")
    data.add_argument("--crop-padding", type=int, default=CROP_PADDING, help="random-crop shift in pixels at 32 px (scaled with image size; 0 disables)")
    models = parser.add_argument_group("models")
    models.add_argument("--teacher-model", default=TEACHER_MODEL, help="teacher architecture: VGG16, ResNet18, a small-image network of the KD literature (resnet32x4, wrn_40_2, vgg13, ...) or a torchvision classifier")
    models.add_argument("--student-model", default=STUDENT_MODEL, help="student architecture")
    models.add_argument("--teacher-checkpoint", default=TEACHER_CHECKPOINT, help="reuse this trained teacher (best_model.pth) instead of training one")
    models.add_argument("--teacher-weights", default=TEACHER_WEIGHTS,
                        help="start the teacher from torchvision weights (DEFAULT, IMAGENET1K_V1, ...: read from the torch hub "
                             "cache, $TORCH_HOME) or from a state-dict file; layers that do not fit are re-initialized, and "
                             "inputs are normalized as the weights expect")
    models.add_argument("--student-weights", default=STUDENT_WEIGHTS, help="the same for every student (baseline and distilled alike)")
    training = parser.add_argument_group("training")
    training.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS, help="teacher's training epochs (its one-cycle schedule spans them all)")
    training.add_argument("--student-epochs", type=int, default=STUDENT_EPOCHS, help="each student's training epochs")
    training.add_argument("--patience", type=int, default=PATIENCE,
                          help="stop a model after this many epochs without a better validation --select-metric (0: off); the "
                               "best epoch is still the one kept, and the one-cycle schedule stays planned for all epochs")
    training.add_argument("--select-metric", choices=engine.SELECT_METRICS, default=SELECT_METRIC,
                          help="validation metric that picks each model's best epoch (ties: lower validation loss)")
    training.add_argument("--optimizer", choices=["adamw", "sgd"], default=OPTIMIZER, help="adamw, or sgd with Nesterov momentum")
    training.add_argument("--teacher-lr", type=float, default=TEACHER_LR, help="teacher's peak learning rate")
    training.add_argument("--student-lr", type=float, default=STUDENT_LR, help="students' peak learning rate")
    training.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="weight decay (decoupled for adamw)")
    training.add_argument("--momentum", type=float, default=MOMENTUM, help="sgd only")
    training.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per optimizer step (per process under torchrun)")
    training.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE, help="images per evaluation pass")
    training.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING,
                          help="label smoothing of the hard-label cross-entropy of every model; in distillation only the CE "
                               "term is smoothed, the teacher's soft targets are used as they are")
    training.add_argument("--class-weights", choices=["none", "balanced"], default=CLASS_WEIGHTS,
                          help="balanced: weigh each class's cross-entropy by n_images / (n_classes * its training images)")
    training.add_argument("--temperature", type=float, default=T, help="distillation temperature T")
    training.add_argument("--alpha", type=float, default=ALPHA, help="weight of the hard-label CE term (1 - alpha weighs the KD term)")
    training.add_argument("--seed", type=int, default=SEED, help="seed for initialization, the validation split, shuffling and augmentation")
    methods = parser.add_argument_group("distillation methods")
    methods.add_argument("--kd-methods", default=KD_METHODS, help=f"comma-separated, one student each: {', '.join(KD_engine.METHODS)}")
    methods.add_argument("--beta", type=float, default=BETA, help="fitnet/at: weight of the feature term, beside alpha*CE + (1-alpha)*KD")
    methods.add_argument("--feature-layers", default=FEATURE_LAYERS, help="fitnet/at: teacher_layer:student_layer pairs, comma-separated "
                         "(see --list-layers)")
    methods.add_argument("--dkd-alpha", type=float, default=DKD_ALPHA, help="dkd: weight of the target-class term")
    methods.add_argument("--dkd-beta", type=float, default=DKD_BETA, help="dkd: weight of the non-target-class term")
    methods.add_argument("--dkd-warmup-epochs", type=int, default=DKD_WARMUP_EPOCHS,
                         help="dkd: epochs of linear warm-up of the DKD term, ramped per optimizer step")
    methods.add_argument("--seeds", default=SEEDS, help="comma-separated seeds: every student is trained once per seed")
    training.add_argument("--device", default=DEVICE, help="auto, cpu, cuda or cuda:N")
    training.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=PRECISION, help="auto: bf16 on CUDA and on CPUs with native bf16")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--memory-budget-mb", type=float, default=MEMORY_BUDGET_MB, help="decoded images above this size are streamed from disk")
    speed.add_argument("--workers", type=int, default=WORKERS, help="decoding worker processes")
    speed.add_argument("--decode-cache", action=argparse.BooleanOptionalAction, default=DECODE_CACHE, help="keep decoded images in a cache file for the next run")
    speed.add_argument("--cache-teacher-logits", action=argparse.BooleanOptionalAction, default=CACHE_TEACHER_LOGITS,
                       help="compute the teacher's logits once per image; only with a deterministic view (--crop-padding 0 --hflip off)")
    speed.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off"], default=COMPILE,
                       help="torch.compile the models (auto: only on CUDA, for runs long enough to pay for compiling; --compile alone: on)")
    parser.add_argument("--output-dir", default=OUTPUT_DIR, help="run directory")
    parser.add_argument("--export", choices=["none", "onnx"], default=EXPORT,
                        help="onnx: export every trained model to RUN/<model>/model.onnx (dynamic batch) and check it")
    parser.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=TENSORBOARD,
                        help="write TensorBoard curves under RUN/tensorboard (needs the tensorboard package)")
    return parser


def validate(config: Config) -> None:
    """Stop with one clear sentence on a setting that cannot work, before any training."""
    checks = [
        (config.temperature > 0, f"--temperature must be > 0 (got {config.temperature})."),
        (0 <= config.alpha <= 1, f"--alpha must be between 0 and 1 (got {config.alpha})."),
        (config.student_epochs >= 1, f"--student-epochs must be at least 1 (got {config.student_epochs})."),
        (config.teacher_epochs >= 1 or config.teacher_checkpoint is not None,
         f"--teacher-epochs must be at least 1 (got {config.teacher_epochs})."),
        (config.batch_size >= 1, f"--batch-size must be at least 1 (got {config.batch_size})."),
        (config.eval_batch_size >= 1, f"--eval-batch-size must be at least 1 (got {config.eval_batch_size})."),
        (8 <= config.image_size <= 1024, f"--image-size must be between 8 and 1024 (got {config.image_size})."),
        (config.teacher_lr > 0, f"--teacher-lr must be > 0 (got {config.teacher_lr})."),
        (config.student_lr > 0, f"--student-lr must be > 0 (got {config.student_lr})."),
        (config.weight_decay >= 0, f"--weight-decay must be >= 0 (got {config.weight_decay})."),
        (0 <= config.momentum < 1, f"--momentum must be in [0, 1) (got {config.momentum})."),
        (0 < config.val_fraction < 1, f"--val-fraction must be between 0 and 1 (got {config.val_fraction})."),
        (0 < config.test_fraction < 1, f"--test-fraction must be between 0 and 1 (got {config.test_fraction})."),
        (config.max_per_class is None or config.max_per_class >= 1,
         f"--max-per-class must be at least 1 (got {config.max_per_class})."),
        (config.crop_padding >= 0, f"--crop-padding must be >= 0 (got {config.crop_padding})."),
        (config.memory_budget_mb >= 0, f"--memory-budget-mb must be >= 0 (got {config.memory_budget_mb})."),
        (config.workers >= 0, f"--workers must be >= 0 (got {config.workers})."),
        ((config.patience or 0) >= 0, f"--patience must be >= 0 (got {config.patience})."),
        (0 <= config.label_smoothing < 1, f"--label-smoothing must be in [0, 1) (got {config.label_smoothing})."),
        (not config.cache_teacher_logits or augmentation(config) == data_setup.Augmentation(0, False),
         "--cache-teacher-logits needs a deterministic training view: add --crop-padding 0 --hflip off --augment basic "
         "(with random augmentation the teacher must see each new view)."),
    ]
    for ok, message in checks:
        if not ok:
            raise SettingsError(message)
    methods = kd_methods(config)
    seeds(config)
    if any(method in KD_engine.FEATURE_METHODS for method in methods):
        if config.beta is not None and config.beta < 0:
            raise SettingsError(f"--beta must be >= 0 (got {config.beta}).")
        feature_weights(config)
        feature_pairs(config)
    if "dkd" in methods and not (config.dkd_alpha >= 0 and config.dkd_beta >= 0 and (config.dkd_warmup_epochs or 0) >= 0):
        raise SettingsError("--dkd-alpha, --dkd-beta and --dkd-warmup-epochs must be >= 0.")
    if config.export == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise SettingsError("--export onnx needs: pip install onnx onnxscript onnxruntime") from None
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise SettingsError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    for name in (config.teacher_model, config.student_model):
        try:
            model_builder.check_input_size(name, config.image_size)
        except ValueError as error:
            raise SettingsError(str(error)) from None


PATH_SETTINGS = ("data_dir", "train_dir", "val_dir", "test_dir", "output_dir", "teacher_checkpoint",
                 "teacher_weights", "student_weights")  # a weights name (DEFAULT, ...) has no "~" to expand


def expand_user_paths(config: Config) -> Config:
    """'~' in a path setting means the home folder, as in a shell (which leaves --data-dir=~/x alone)."""
    paths = {key: os.path.expanduser(getattr(config, key)) for key in PATH_SETTINGS if getattr(config, key) is not None}
    return replace(config, **paths)


def kd_methods(config: Config) -> list[str]:
    """The distillation methods asked for, in order, each known and named once."""
    methods = [method.strip().lower() for method in config.kd_methods.split(",") if method.strip()]
    unknown = [method for method in methods if method not in KD_engine.METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise SettingsError(f"--kd-methods must list distinct methods of {', '.join(KD_engine.METHODS)} "
                            f"(got '{config.kd_methods}').")
    return methods


def seeds(config: Config) -> list[int]:
    """The seeds every student is trained under (the teacher and the data split use the first)."""
    if config.seeds is None:
        return [config.seed]
    try:
        values = [int(seed) for seed in config.seeds.split(",") if seed.strip()]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values):
        raise SettingsError(f"--seeds must be distinct integers separated by commas (got '{config.seeds}').")
    return values


def feature_pairs(config: Config) -> dict[str, list[tuple[str, str]]]:
    """Each fitnet / at method's layer pairs (teacher, student), checked on the meta device: the
    layers exist, and the method can distill their maps at the run's image size."""
    pairs = {}
    if not set(kd_methods(config)) & set(KD_engine.FEATURE_METHODS):
        return pairs  # no models to build for the check
    try:
        teacher = model_builder.build_on_meta(config.teacher_model, 10, config.image_size)
        student = model_builder.build_on_meta(config.student_model, 10, config.image_size)
        with torch.device("meta"):
            for method in (m for m in kd_methods(config) if m in KD_engine.FEATURE_METHODS):
                pairs[method] = (KD_engine.parse_feature_layers(config.feature_layers) if config.feature_layers
                                 else KD_engine.default_feature_layers(method, teacher, student))
                KD_engine.check_feature_pairs(method, teacher, student, pairs[method], config.image_size)
    except ValueError as error:
        raise SettingsError(f"--feature-layers: {error}") from None
    return pairs


def feature_weights(config: Config) -> dict[str, float]:
    """The weight of each fitnet / at method's feature term (--beta, or the references' balance)."""
    try:
        return {method: KD_engine.feature_weight(method, config.alpha, config.beta)
                for method in kd_methods(config) if method in KD_engine.FEATURE_METHODS}
    except ValueError as error:
        raise SettingsError(str(error)) from None


def student_roles(config: Config) -> list[str]:
    """The students of a run: the baseline, then one per distillation method (student_kd is Hinton's)."""
    return ["student_baseline"] + [f"student_{method}" for method in kd_methods(config)]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a run can be repeated exactly on the CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_initial_weights(config: Config) -> dict[str, model_builder.Pretrained]:
    """--teacher-weights and --student-weights, read before any work ("teacher" / "student"; absent: random start).

    A torchvision name is read from the torch hub cache, downloaded there first when missing and possible.
    """
    weights = {}
    for role, setting, arch in (("teacher", config.teacher_weights, config.teacher_model),
                                ("student", config.student_weights, config.student_model)):
        if setting is not None:
            try:
                weights[role] = model_builder.read_pretrained(arch, setting)
            except model_builder.WeightsError as error:
                raise SettingsError(f"--{role}-weights {setting}: {error}") from None
    return weights


def check_initial_weights(config: Config, weights: dict[str, model_builder.Pretrained], num_classes: int) -> None:
    """Stop when initial weights fit no layer of their model; say which layers they leave re-initialized."""
    for role, pretrained in weights.items():
        arch = config.teacher_model if role == "teacher" else config.student_model
        model = model_builder.build_on_meta(arch, num_classes, config.image_size)
        try:
            record = model_builder.pretrained_fit(model, pretrained)[1]
        except model_builder.WeightsError as error:
            raise SettingsError(f"--{role}-weights: {error}") from None
        if engine.is_main_process():
            print(f"The {role} starts from {record['weights']}: {record['loaded_tensors']} of {record['model_tensors']} "
                  f"tensors loaded; re-initialized (no tensor of that shape in the file): {', '.join(record['reinitialized']) or 'none'}")


def initial_weights(context: Context, role: str) -> model_builder.Pretrained | None:
    """The weights a model of this role starts from (the teacher's, or the students' shared ones), if any."""
    return context.pretrained.get("teacher" if role == "teacher" else "student")


def pretrained_normalization(weights: dict[str, model_builder.Pretrained]) -> tuple[list[float], list[float], str] | None:
    """Mean and std the initial weights expect (the teacher's before the students'), and where they come from."""
    for role in ("teacher", "student"):
        pretrained = weights.get(role)
        if pretrained is not None and pretrained.mean is not None:
            return pretrained.mean, pretrained.std, f"{role} weights {pretrained.source}"
    return None


# ---------------------------------------------------------------- one model


@dataclass
class Context:
    """What every model of a run shares: settings, data, device and output folder."""

    config: Config
    data: data_setup.DatasetSplits
    device: torch.device
    amp_dtype: torch.dtype | None
    run_dir: Path
    eval_loaders: dict[str, data_setup.BatchLoader]
    saver: utils.BackgroundSaver  # writes the per-epoch checkpoints while training goes on
    pretrained: dict[str, model_builder.Pretrained] = field(default_factory=dict)  # see read_initial_weights
    hard_loss: engine.HardLoss = F.cross_entropy  # every model's hard-label term

    def train_loader(self, seed: int) -> data_setup.BatchLoader:
        """A fresh training loader: the same seed gives every model the same batches.

        Under torchrun every rank takes its shard of each epoch: --batch-size is per process.
        """
        config = self.config
        return data_setup.BatchLoader(
            self.data.train, config.batch_size, self.data.mean, self.data.std, self.device,
            augmentation(config), seed=seed, workers=config.workers, shard=engine.rank_and_world(),
            balanced=config.balanced_sampler,
        )


def augmentation(config: Config) -> data_setup.Augmentation:
    """Random-crop shift (scaled with the image size), flip and TrivialAugmentWide, as configured."""
    pad = round(config.crop_padding * config.image_size / 32)
    hflip = config.hflip == "on" or (config.hflip == "auto" and not is_bundled(config))
    return data_setup.Augmentation(pad=pad, hflip=hflip, trivialaugment=config.augment == "trivialaugment")


def is_bundled(config: Config) -> bool:
    """True when the run uses the bundled digits (no data folder configured)."""
    return config.data_dir is None and config.train_dir is None and config.test_dir is None


def make_checkpoint(
    context: Context, role: str, arch: str, model: nn.Module, epoch: int, history: list[dict[str, Any]],
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """A self-describing checkpoint: weights (`weights`, or the model's `cpu_weights`) plus everything
    needed to rebuild and use them."""
    return {
        "role": role,
        "arch": arch,
        "num_classes": len(context.data.class_names),
        "class_names": list(context.data.class_names),
        "image_size": context.config.image_size,
        "resize": context.config.resize,
        "mean": list(context.data.mean),
        "std": list(context.data.std),
        "config": asdict(context.config),
        "epoch": epoch,
        "history": history,
        "state_dict": cpu_weights(model) if weights is None else weights,
    }


def new_model(
    context: Context, arch: str, seed: int, pretrained: model_builder.Pretrained | None = None, training_images: int = 0,
) -> nn.Module:
    """Build an untrained model on the run's device (seeded, so students of one seed start identical),
    starting from `pretrained` where its tensors fit, compiled when --compile says so for a model
    that will train on `training_images` images."""
    seed_everything(seed)
    model = model_builder.build_model(arch, len(context.data.class_names), context.config.image_size)
    if pretrained is not None:
        model_builder.load_pretrained(model, pretrained)
    model = model.to(context.device, memory_format=torch.channels_last)
    if engine.rank_and_world()[1] > 1:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    compile_model = engine.resolve_compile(context.config.compile, context.device, training_images)
    return torch.compile(model) if compile_model else model


def make_optimizer(config: Config, model: nn.Module, lr: float, criterion: engine.Criterion) -> torch.optim.Optimizer:
    """The optimizer for the model's parameters and the criterion's own trainable part, if any
    (e.g. FitNets' regressor); a teacher's parameters never reach one."""
    parameters = list(model.parameters())
    if getattr(criterion, "trainable", None) is not None:
        parameters += list(criterion.trainable.parameters())
    # One fused kernel per step rather than a chain of element-wise passes over every weight (about half
    # the optimizer's time on the CPU); offered on CPU and CUDA.
    fused = parameters[0].device.type in ("cpu", "cuda")
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum,
                               nesterov=config.momentum > 0, weight_decay=config.weight_decay, fused=fused)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay, fused=fused)


def rng_states() -> dict[str, Any]:
    """Every random generator's state, in types a weights_only checkpoint can hold."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put every random generator back where `rng_states()` found it."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def train_model(
    context: Context, role: str, arch: str, epochs: int, lr: float,
    make_criterion: Callable[[nn.Module, int], engine.Criterion], folder: Path, seed: int,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[nn.Module, engine.FitResult]:
    """Train one model with a one-cycle schedule; the best-on-validation epoch is kept.

    `make_criterion(model, steps_per_epoch)` gives the loss (feature methods hook into the model it is given).
    `teacher_logits` (one row per training image) are handed to the criterion with each batch.
    After every epoch the whole training state goes to <folder>/train_state.pth; when that
    file exists (an interrupted run), training continues after its last finished epoch.
    """
    config = context.config
    model = new_model(context, arch, seed, initial_weights(context, role), epochs * len(context.data.train))
    train_loader = context.train_loader(seed)
    criterion = make_criterion(model, len(train_loader))
    if teacher_logits is not None:
        train_loader.teacher_logits = teacher_logits.to(context.device)
    optimizer = make_optimizer(config, model, lr, criterion)
    steps = epochs * len(train_loader)
    # OneCycleLR divides by its phase lengths: very short runs (a few steps) need a longer warm-up share.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(steps, 4), pct_start=0.25 if steps >= 8 else 0.5
    )
    trainable = getattr(criterion, "trainable", None)
    checkpoint_path = folder / "best_model.pth"
    state_path = folder / TRAIN_STATE
    resume, best_weights = None, {}
    if state_path.is_file():
        resume = restore_training(read_state(state_path), model, optimizer, scheduler, trainable, train_loader)
        best_weights = resume[1]
        if engine.is_main_process():
            print(f"[{role}] resuming after epoch {len(resume[0].history)} of {epochs}")

    @finish_before_interrupt
    def save_epoch(result: engine.FitResult) -> None:
        """best_model.pth when the epoch is the best so far, then the state to resume from."""
        if not engine.is_main_process():
            return
        epoch = len(result.history)
        weights = cpu_weights(model)  # one copy serves the state and, at a best epoch, best_model.pth
        files = {}
        if result.best_epoch == epoch:
            files[checkpoint_path] = make_checkpoint(context, role, arch, model, epoch, result.history, weights)
            best_weights.clear()
            best_weights.update(files[checkpoint_path]["state_dict"])
        files[state_path] = {
            "role": role, "arch": arch, "model": weights,
            # The best weights travel with the state rather than being read back from best_model.pth:
            # a kill between writing that file and this one would pair them with the wrong epoch.
            "best_model": None if result.best_epoch == epoch else best_weights,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "criterion": None if trainable is None else trainable.state_dict(),
            "loader_generator": train_loader.generator.get_state(), "rng": rng_states(),
            "history": result.history, "best_epoch": result.best_epoch, "train_seconds": result.train_seconds,
            "best_val_logits": result.best_val_outputs[0], "best_val_labels": result.best_val_outputs[1],
        }
        context.saver.save(files)

    writer = tensorboard_writer(context, folder)
    try:
        result = engine.fit(
            model, train_loader, context.eval_loaders["val"], criterion, optimizer, epochs,
            context.data.class_names, context.device, scheduler, context.amp_dtype,
            on_epoch=None if writer is None else lambda record: log_scalars(writer, record), name=role,
            on_epoch_end=save_epoch, resume=resume, select_metric=config.select_metric, patience=config.patience,
        )
    finally:
        if writer is not None:
            writer.close()
        if hasattr(criterion, "close"):
            criterion.close()  # its hooks must not outlive training (export, reports)
    return model, result


def restore_training(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, trainable: nn.Module | None, train_loader: data_setup.BatchLoader,
) -> tuple[engine.FitResult, dict[str, torch.Tensor]]:
    """Put a saved training state back in place; return what `engine.fit` needs to continue."""
    model_builder.unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if trainable is not None:
        trainable.load_state_dict(state["criterion"])
    train_loader.generator.set_state(state["loader_generator"])
    set_rng_states(state["rng"])
    result = engine.FitResult(history=state["history"], best_epoch=state["best_epoch"],
                              train_seconds=state["train_seconds"],
                              best_val_outputs=(state["best_val_logits"], state["best_val_labels"]))
    return result, state["model"] if state["best_model"] is None else state["best_model"]


def finish_before_interrupt(function: Callable[..., None]) -> Callable[..., None]:
    """Run `function` with Ctrl-C and SIGTERM held back until it returns, so a save it makes is never
    cut short; a signal that arrived meanwhile then stops the run. A signal inherited as ignored
    (e.g. SIGINT in a background job of a non-interactive shell) stays ignored."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return function(*args, **kwargs)
        received: list[int] = []
        held = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS
                if signal.getsignal(signum) not in (signal.SIG_IGN, None)}
        for signum in held:
            signal.signal(signum, lambda signum, frame: received.append(signum))
        try:
            function(*args, **kwargs)
        finally:
            for signum, previous in held.items():
                signal.signal(signum, previous)
        if received:
            raise STOP_SIGNALS[received[0]]

    return wrapper


def cpu_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the plain model's weights as contiguous CPU tensors (what every checkpoint stores).

    Always a copy, on the CPU too: weights kept as the best epoch's must not follow later training.
    """
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in model_builder.unwrap(model).state_dict().items()}


def read_state(path: Path) -> dict[str, Any]:
    """Read a checkpoint this run wrote (without running code from it), or say why it cannot be used."""
    try:
        return utils.load_checkpoint(path)
    except Exception as error:  # a damaged or foreign file is the user's to remove
        raise SettingsError(f"Cannot read '{path}': {error!r}. Delete it to start that model afresh.") from None


def tensorboard_writer(context: Context, folder: Path):
    """A SummaryWriter for one model (RUN/tensorboard/<model folder>), or None without --tensorboard (or off rank 0)."""
    if not context.config.tensorboard or not engine.is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(context.run_dir / "tensorboard" / folder.relative_to(context.run_dir)))


def log_scalars(writer, record: dict[str, Any]) -> None:
    """One epoch's numbers as TensorBoard scalars: loss parts, accuracy, F1, AUC, learning rate."""
    epoch = record["epoch"]
    writer.add_scalar("lr", record["lr"], epoch)
    for split in ("train", "val"):
        for name, value in record[split].items():
            if isinstance(value, float):
                writer.add_scalar(f"{split}/{name}", value, epoch)
    writer.flush()


def read_teacher_checkpoint(path: str) -> dict[str, Any]:
    """Read a teacher checkpoint (without running code from it), with a clear error if unusable."""
    if not Path(path).is_file():
        raise SettingsError(f"--teacher-checkpoint '{path}' is not a file.")
    try:
        checkpoint = utils.load_checkpoint(path)
        for key in ("arch", "class_names", "image_size", "mean", "std", "epoch", "state_dict"):
            checkpoint[key]
    except Exception as error:  # any unreadable or foreign file is the user's to fix
        raise SettingsError(f"Cannot read teacher checkpoint '{path}': {error!r}") from None
    return checkpoint


def adopt_teacher_checkpoint(config: Config, checkpoint: dict[str, Any], given: set[str] | None) -> Config:
    """The teacher's architecture, image size and resize mode come from its checkpoint (normalization
    too, see run_experiment); a setting the user gave (`given`; None: every setting) that says
    otherwise is refused. Checkpoints written before --resize existed were squashed."""
    path = config.teacher_checkpoint
    try:
        named = model_builder.architecture_name(config.teacher_model)
    except model_builder.UnknownModelError:
        named = config.teacher_model
    resize = checkpoint.get("resize", "squash")
    conflicts = {
        "teacher_model": (named != checkpoint["arch"], f"holds a {checkpoint['arch']}"),
        "image_size": (config.image_size != checkpoint["image_size"], f"was trained at {checkpoint['image_size']} px"),
        "resize": (config.resize != resize, f"was trained on images resized by {resize}"),
    }
    for key, (differs, fact) in conflicts.items():
        if differs and (given is None or key in given):
            raise SettingsError(f"--{key.replace('_', '-')} {getattr(config, key)} contradicts the teacher checkpoint "
                                f"'{path}', which {fact}; leave the flag out to use the checkpoint's.")
    return replace(config, teacher_model=checkpoint["arch"], image_size=checkpoint["image_size"], resize=resize)


def check_teacher_fits(path: str, checkpoint: dict[str, Any], class_names: list[str]) -> None:
    """Refuse a teacher checkpoint whose classes or weights do not fit this run (checked on the meta device)."""
    if checkpoint["class_names"] != class_names:
        raise SettingsError(f"Teacher checkpoint '{path}' was trained on classes {checkpoint['class_names']}, "
                            f"not this data's {class_names}.")
    model = model_builder.build_on_meta(checkpoint["arch"], len(class_names), checkpoint["image_size"])
    try:
        model.load_state_dict(checkpoint["state_dict"], assign=True)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:2]]
        raise SettingsError(f"Teacher checkpoint '{path}' does not hold weights of a {checkpoint['arch']} for "
                            f"{len(class_names)} classes ({'; '.join(details) or error}).") from None


def load_teacher(context: Context, checkpoint: dict[str, Any]) -> tuple[nn.Module, engine.FitResult]:
    """Rebuild a trained teacher from its checkpoint (checked beforehand by `check_teacher_fits`)."""
    model = new_model(context, checkpoint["arch"], context.config.seed)
    model_builder.unwrap(model).load_state_dict(checkpoint["state_dict"])
    history = checkpoint.get("history", [])
    return model, engine.FitResult(history=history, best_epoch=checkpoint["epoch"], train_seconds=0.0)


def report_model(
    context: Context, role: str, arch: str, model: nn.Module, fit: engine.FitResult, folder: Path,
) -> dict[str, Any]:
    """Evaluate the selected model on every split and write its folder of metrics, plots and reports.

    Every rank takes part in the evaluation; only rank 0 writes files.
    """
    from torchinfo import summary as torchinfo_summary

    class_names = context.data.class_names
    outputs = {split: engine.predict(model, context.eval_loaders[split], context.device, context.amp_dtype, f"{role} {split}")
               for split in SPLITS if not (split == "val" and fit.best_val_outputs is not None)}
    if fit.best_val_outputs is not None:
        # The selected weights are the best epoch's: its validation pass already holds these outputs.
        outputs["val"] = fit.best_val_outputs
    outputs = {split: outputs[split] for split in SPLITS}
    results = {split: engine.metrics_from_logits(*outputs[split], class_names) for split in SPLITS}
    row = {
        "arch": arch, **model_builder.describe(model), "best_epoch": fit.best_epoch,
        "epochs_trained": len(fit.history), "stopped_early": fit.stopped_early,
        "train_seconds": round(fit.train_seconds, 2), "test": {key: results["test"][key] for key in SUMMARY_TEST_KEYS},
    }
    pretrained = initial_weights(context, role)
    if pretrained is not None:
        row["pretrained"] = model_builder.pretrained_fit(model, pretrained)[1]
    if not engine.is_main_process():
        return row
    context.saver.wait()  # best_model.pth is measured below, and the training state removed
    row.update(deployment_figures(context, model, folder / "best_model.pth"))
    if context.config.export == "onnx":
        row["export"] = export_model(context, role, arch, model, folder)
    for split, (logits, labels) in outputs.items():
        results[split]["per_class"] = utils.per_class_scores(logits, labels, class_names)
        utils.write_text(folder / f"classification_report_{split}.txt", utils.report_text(logits, labels, class_names))
        utils.plot_confusion(
            utils.confusion(logits, labels, len(class_names)), class_names,
            f"{role}: {split} confusion matrix", folder / f"confusion_matrix_{split}.png",
        )
    utils.write_json(folder / "history.json", {"best_epoch": fit.best_epoch, "epochs": fit.history})
    utils.write_text(folder / "training_metrics.txt", f"{role} ({arch}), best epoch {fit.best_epoch} by validation {context.config.select_metric}\n" + utils.history_table(fit.history))
    utils.write_text(folder / "detailed_metrics.txt", f"{role} ({arch}) at its best epoch {fit.best_epoch}\n\n" + utils.metrics_table(results))
    stats = torchinfo_summary(model_builder.unwrap(model), input_size=(1, 3, context.config.image_size, context.config.image_size),
                              device=context.device, mode="eval", verbose=0)
    utils.write_text(folder / "model_summary.txt", str(stats) + "\n")
    if fit.history:
        utils.plot_curves(fit.history, "loss", f"{role}: loss", folder / "loss_curve.png")
        utils.plot_curves(fit.history, "top1", f"{role}: top-1 accuracy", folder / "accuracy_curve.png")
    utils.plot_topk(results, f"{role}: top-1 and top-3 accuracy", folder / "top1_top3_comparison.png")
    # Written last: its presence marks the model as finished for --resume.
    utils.write_json(folder / RESULTS, {"model": role, **row, "test_correct": utils.correct_flags(*outputs["test"]),
                                        "splits": results})
    (folder / TRAIN_STATE).unlink(missing_ok=True)
    return row


def finished_row(folder: Path, name: str) -> dict[str, Any] | None:
    """The summary row of a model an interrupted run already finished, or None."""
    path = folder / RESULTS
    if not path.is_file():
        return None
    results = utils.read_json(path)
    if engine.is_main_process():
        (folder / TRAIN_STATE).unlink(missing_ok=True)
        print(f"[{name}] finished before the interruption: kept as it was")
    return {key: value for key, value in results.items() if key not in ("model", "test_correct", "splits")}


def read_test_correct(folder: Path) -> np.ndarray:
    """Which test images a finished model classified correctly (test-split order), from its results.json."""
    results = utils.read_json(folder / RESULTS)
    if "test_correct" not in results:
        raise SettingsError(f"'{folder / RESULTS}' was written by an earlier version without per-image test results; "
                            "delete it to train that model again.")
    return utils.parse_correct_flags(results["test_correct"])


def deployment_figures(context: Context, model: nn.Module, checkpoint: Path) -> dict[str, Any]:
    """File size and FLOPs per image (speed is measured once every model exists: `measure_deployment`)."""
    return {
        "file_mb": round(checkpoint.stat().st_size / 2**20, 3),
        "flops_per_image": model_builder.flops_per_image(model, context.config.image_size),
    }


def measure_deployment(context: Context, models: dict[str, tuple[str, Path]]) -> dict[str, dict[str, Any]]:
    """Latency and throughput of the models {role: (arch, folder)}, loaded from their best_model.pth
    (so a resumed run measures them all too) and measured interleaved on the run's device."""
    loaded = {}
    for role, (arch, folder) in models.items():
        model = model_builder.build_model(arch, len(context.data.class_names), context.config.image_size)
        model.load_state_dict(read_state(folder / "best_model.pth")["state_dict"])
        loaded[role] = model.to(context.device, memory_format=torch.channels_last)
    return engine.measure_speeds(loaded, context.config.image_size, context.device, context.amp_dtype)


def export_model(context: Context, role: str, arch: str, model: nn.Module, folder: Path) -> dict[str, Any]:
    """Write <model folder>/model.onnx and check it against PyTorch on real validation images."""
    path = folder / "model.onnx"
    metadata = {"arch": arch, "class_names": context.data.class_names, "image_size": context.config.image_size,
                "resize": context.config.resize, "mean": context.data.mean, "std": context.data.std, "role": role}
    plain = model_builder.unwrap(model)
    utils.export_onnx(plain, path, context.config.image_size, metadata)
    images = next(iter(context.eval_loaders["val"]))[0][:64]
    difference = utils.onnx_parity(plain, path, images)
    passed = difference <= ONNX_TOLERANCE
    if not passed:
        print(f"warning: {role}'s ONNX export differs from PyTorch by {difference:.2e} (> {ONNX_TOLERANCE:.0e})")
    return {"onnx": str(path.relative_to(context.run_dir)), "checked_images": len(images),
            "max_abs_diff": difference, "tolerance": ONNX_TOLERANCE, "passed": passed}


def deployment_table(summary: dict[str, Any], roles: list[str]) -> str:
    """Size and speed of every model on this run's device, and each one's speed-up over the teacher
    ("unclear" where the latency spreads overlap)."""
    header = ["model", "params", "file MB", "GFLOPs/img", "latency ms", "latency IQR", "img/s @64", "img/s IQR", "speed-up"]
    spread = lambda low_high, digits: "-".join(f"{value:.{digits}f}" for value in low_high)  # noqa: E731
    rows, unclear = [], []
    for role in roles:
        row = summary[role]
        clear = role == "teacher" or row["speedup_clear"]
        if not clear:
            unclear.append(f"{role} {row['speedup_over_teacher']:.2f}x")
        rows.append([role, f"{row['params']:,}", f"{row['file_mb']:.1f}", f"{row['flops_per_image'] / 1e9:.3f}",
                     f"{row['latency_ms']:.2f}", spread(row["latency_ms_iqr"], 2), f"{row['throughput_img_s']:.1f}",
                     spread(row["throughput_img_s_iqr"], 1), f"{row['speedup_over_teacher']:.2f}x" if clear else "unclear"])
    notes = ["medians and interquartile ranges over interleaved rounds; speed-up = the teacher's median latency / the model's"]
    if unclear:
        notes.append("unclear: the model's and the teacher's latency interquartile ranges overlap, so this measurement "
                     f"cannot tell which is faster (median ratios: {', '.join(unclear)})")
    return utils.text_table(header, rows) + "".join(note + "\n" for note in notes)


# ---------------------------------------------------------------- the run


def comparison_table(summary: dict[str, Any], roles: list[str]) -> str:
    """The final table: one row per model with size, training time and test metrics (of the first seed),
    then, over several seeds, mean +- std of test top-1 and of the gain over the baseline; below it every
    distilled student's gain with its verdict (significant or within noise)."""
    seeds = summary.get("seeds", [])
    several = len(seeds) > 1
    metrics = ("top1", "top3", "f1_macro", "auc_macro")
    header = ["model", "arch", "params", "MB", "best ep", "train", *metrics]
    if several:
        header += ["top1 mean+-std", "gain mean+-std", "gain 95% interval"]
    spread = lambda row, key: f"{100 * row[key + '_mean']:.2f}+-{100 * row[key + '_std']:.2f}" if key + "_mean" in row else ""  # noqa: E731
    rows = []
    for role in roles:
        row = summary[role]
        cells = [role, row["arch"], f"{row['params']:,}", f"{row['size_mb']:.1f}", str(row["best_epoch"]),
                 utils.format_seconds(row["train_seconds"]), *(utils.format_metric(row["test"][k]) for k in metrics)]
        if several:
            interval = row.get("gain_top1_ci95")
            cells += [spread(row, "test_top1"), spread(row, "gain_top1"),
                      "" if interval is None else f"[{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]"]
        rows.append(cells)
    lines = [utils.text_table(header, rows, left=2).rstrip("\n")]
    for role in roles[2:]:
        row = summary[role]
        gain = row["test"]["top1"] - summary["student_baseline"]["test"]["top1"]
        line = (f"{role.removeprefix('student_')} gain (test top-1, {role} - student_baseline): {100 * gain:+.2f} points"
                + (f" (seed {seeds[0]})" if several else "") + f", {utils.verdict(row['mcnemar_p'])} by the exact McNemar test")
        if several:
            line += (f"; over seeds {', '.join(map(str, seeds))}: {100 * row['gain_top1_mean']:+.2f} +- "
                     f"{100 * row['gain_top1_std']:.2f} points, {utils.verdict(row['gain_top1_p'], row['gain_significant'])}")
        lines.append(line)
    if len(roles) > 2:
        lines.append("significant: " + ("the 95% Student-t interval of the per-seed paired gains excludes zero (t-test p < 0.05)"
                                        if several else "exact McNemar test of the paired test predictions, p < 0.05"))
    if several:
        lines.append(f"seeds {', '.join(map(str, seeds))}: the teacher is trained once (seed {seeds[0]}); "
                     "per-model columns are the first seed's, mean+-std over all seeds (sample std)")
    return "\n".join(lines) + "\n"


def make_run_dir(output_dir: str | None) -> Path:
    """The run directory: as given, or a new runs/<timestamp> folder (rank 0 decides for all)."""
    if not engine.is_main_process():
        return Path(engine.broadcast_object(None))
    if output_dir is not None:
        path = Path(output_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / stamp
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path("runs") / f"{stamp}-{suffix}"
    path.mkdir(parents=True, exist_ok=True)
    return Path(engine.broadcast_object(str(path)))


def run_experiment(config: Config, resume: bool = False, given: set[str] | None = None) -> dict[str, Any]:
    """The whole pipeline: data, teacher, baseline student, distilled student, reports.

    With `resume`, `config.output_dir` is an interrupted run: finished models are kept and the
    model in training continues after its last finished epoch. `given` names the settings the
    user set explicitly (None: all of them); a teacher checkpoint supplies the others it decides.
    Everything that can be checked is checked before the run directory is made.
    """
    start = time.perf_counter()
    config = expand_user_paths(config)
    if config.teacher_weights is not None and config.teacher_checkpoint is not None:
        raise SettingsError("--teacher-weights starts a teacher's training, but --teacher-checkpoint skips it: give one of them.")
    teacher_checkpoint = None if config.teacher_checkpoint is None else read_teacher_checkpoint(config.teacher_checkpoint)
    if teacher_checkpoint is not None:
        config = adopt_teacher_checkpoint(config, teacher_checkpoint, given)
    validate(config)
    pretrained = read_initial_weights(config)
    if not resume and config.output_dir is not None and (Path(config.output_dir) / "config.json").is_file():
        raise SettingsError(f"'{config.output_dir}' already holds a run: choose another --output-dir, "
                            f"or continue that run with --resume {config.output_dir}")
    try:
        device = engine.resolve_device(config.device)
    except (RuntimeError, ValueError) as error:
        raise SettingsError(f"--device {config.device!r} is not usable: {error}") from None
    rank, world, local_rank = engine.init_distributed()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    engine.enable_autotuning(device)
    main_process = rank == 0
    amp_dtype = engine.resolve_amp_dtype(config.precision, device)
    data = data_setup.load_splits(
        config.data_dir, config.train_dir, config.val_dir, config.test_dir,
        config.image_size, config.val_fraction, config.seed, config.memory_budget_mb, config.workers,
        data_setup.DEFAULT_CACHE_DIR if config.decode_cache else None,
        resize=config.resize, test_fraction=config.test_fraction, max_per_class=config.max_per_class, decode_device=device,
    )
    check_initial_weights(config, pretrained, len(data.class_names))
    normalization = "the training split's own"
    if teacher_checkpoint is not None:
        check_teacher_fits(config.teacher_checkpoint, teacher_checkpoint, data.class_names)
        # The teacher expects inputs normalized as in its own training; students share them.
        data.mean, data.std = teacher_checkpoint["mean"], teacher_checkpoint["std"]
        normalization = "the teacher checkpoint's"
    elif (expected := pretrained_normalization(pretrained)) is not None:
        data.mean, data.std, normalization = expected
    weights = engine.class_weights(data.train.labels, len(data.class_names)) if config.class_weights == "balanced" else None
    run_dir = make_run_dir(config.output_dir)
    eval_loaders = {
        split: data_setup.BatchLoader(getattr(data, split), config.eval_batch_size, data.mean, data.std, device,
                                      workers=config.workers, shard=(rank, world))
        for split in SPLITS
    }
    context = Context(config, data, device, amp_dtype, run_dir, eval_loaders, utils.BackgroundSaver(), pretrained,
                      engine.hard_label_loss(config.label_smoothing, weights, device))
    dataset = {
        "class_names": data.class_names,
        "sizes": {split: len(getattr(data, split)) for split in SPLITS},
        "images_per_class": {split: {"min": min(counts.values()), "max": max(counts.values())}
                             for split, counts in data.carving["class_counts"].items()},
        "validation": data.val_source,
        "carving": data.carving,
        "mean": data.mean, "std": data.std, "normalization": normalization,
        "storage": "streamed from disk" if data.streamed else "decoded once into memory",
        **({} if weights is None else {"class_weights": dict(zip(data.class_names, weights))}),
    }
    precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    if main_process:
        if not resume:
            resolved = {"device": str(device), "precision": precision, "processes": world, "feature_weights": feature_weights(config)}
            utils.write_json(run_dir / "config.json", {**asdict(config), "resolved": resolved, "dataset": dataset})
        print(("Resuming " if resume else "") + f"Run directory: {run_dir}  |  device {device}, {precision}, {world} process{'es' if world > 1 else ''}  |  "
              f"{len(data.class_names)} classes, train/val/test = {len(data.train)}/{len(data.val)}/{len(data.test)} images")

    if main_process and data.skipped_files:
        log = "".join(f"{entry['path']}: {entry['reason']}\n" for entry in data.skipped_files)
        utils.write_text(run_dir / "skipped_files.log", log)
        print(f"Skipped {len(data.skipped_files)} unreadable file{'s' if len(data.skipped_files) > 1 else ''} "
              f"(listed in {run_dir / 'skipped_files.log'} and summary.json)")
    try:
        with context.saver:  # every checkpoint is on disk before the run ends, however it ends
            return train_and_report(context, start, dataset, precision, teacher_checkpoint)
    except KeyboardInterrupt as stop:
        raise Interrupted(run_dir, stop_signal(stop)) from None


def train_and_report(
    context: Context, start: float, dataset: dict[str, Any], precision: str, teacher_checkpoint: dict[str, Any] | None,
) -> dict[str, Any]:
    """Train (or, in a resumed run, keep) each model in turn, report it, then compare them all."""
    config, run_dir, device, amp_dtype = context.config, context.run_dir, context.device, context.amp_dtype
    teacher_arch = model_builder.architecture_name(config.teacher_model)
    student_arch = model_builder.architecture_name(config.student_model)
    teacher, summary = obtain_teacher(context, teacher_arch, teacher_checkpoint)
    teacher_logits = None
    if config.cache_teacher_logits:
        # validate() made sure the training view is deterministic: one pass serves every epoch.
        teacher_logits, _ = engine.predict(teacher, context.eval_loaders["train"], device, amp_dtype, "teacher logits")
    # The teacher is frozen on every rank; unwrapped, its forward needs no other rank.
    frozen_teacher = engine.store_for_autocast(engine.local_module(teacher), amp_dtype)
    pairs = feature_pairs(config)
    run_seeds = seeds(config)
    rows: dict[str, dict[int, dict[str, Any]]] = {role: {} for role in student_roles(config)}
    folders: dict[str, dict[int, Path]] = {role: {} for role in rows}
    model_folders = {"teacher": run_dir / "teacher"}  # every trained model's name -> its folder
    for seed in run_seeds:
        for role in rows:
            method = role.removeprefix("student_")
            folder = run_dir / role if seed == run_seeds[0] else run_dir / role / f"seed_{seed}"
            name = role if len(run_seeds) == 1 else f"{role} seed {seed}"
            row = finished_row(folder, name)
            if row is None:
                if role == "student_baseline":
                    make_criterion, cached = functools.partial(supervised_criterion, context), None
                else:
                    make_criterion = functools.partial(distillation_criterion, context, method, frozen_teacher, pairs)
                    cached = teacher_logits if method not in KD_engine.FEATURE_METHODS else None
                student, fit = train_model(context, name, student_arch, config.student_epochs, config.student_lr,
                                           make_criterion, folder, seed, cached)
                row = report_model(context, name, student_arch, student, fit, folder)
            rows[role][seed], folders[role][seed], model_folders[name] = row, folder, folder
    if not engine.is_main_process():
        return summary
    correct = {role: {seed: read_test_correct(folder) for seed, folder in by_seed.items()} for role, by_seed in folders.items()}
    for role, by_seed in rows.items():
        summary[role] = {**by_seed[run_seeds[0]], **utils.top1_spread(by_seed)}
        if role != "student_baseline":
            summary[role].update(utils.gain_statistics(by_seed, rows["student_baseline"], correct[role], correct["student_baseline"]))
    if "student_kd" in summary:
        summary["kd_gain_top1"] = summary["student_kd"]["test"]["top1"] - summary["student_baseline"]["test"]["top1"]
    roles = ["teacher", *rows]
    speeds = measure_deployment(context, {"teacher": (teacher_arch, run_dir / "teacher"),
                                          **{role: (student_arch, folders[role][run_seeds[0]]) for role in rows}})
    for role in roles:
        summary[role].update(speeds[role])
        summary[role].update(utils.speedup(speeds["teacher"], speeds[role]) if role != "teacher" else {"speedup_over_teacher": 1.0})
    summary["seeds"] = run_seeds
    summary["skipped_files"] = context.data.skipped_files
    summary["dataset"] = dataset
    summary["device"], summary["precision"] = str(device), precision
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    summary["finished_at"] = datetime.now().isoformat(timespec="seconds")
    summary["warnings"] = utils.sanity_warnings(
        summary, {name: utils.read_json(folder / "history.json") for name, folder in model_folders.items()})
    table = comparison_table(summary, roles) + "\nDeployment on " + str(device) + f" ({precision}):\n" + deployment_table(summary, roles)
    utils.write_json(run_dir / "summary.json", summary)
    utils.write_text(run_dir / "comparison.txt", table)
    utils.plot_comparison({role: summary[role] for role in roles}, run_dir / "comparison.png")
    report = utils.write_report(run_dir)
    ledger = run_dir.parent / "experiments.csv"
    utils.append_ledger(ledger, ledger_row(config, summary, run_dir))
    warnings = "".join(f"warning: {warning}\n" for warning in summary["warnings"])
    print("\n" + table + warnings + f"Wall time {utils.format_seconds(summary['wall_seconds'])}. Results in {run_dir}, "
          f"report {report}, ledger {ledger}")
    return summary


def obtain_teacher(
    context: Context, arch: str, checkpoint: dict[str, Any] | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher (kept from an interrupted run, loaded from --teacher-checkpoint, or trained) and its summary."""
    config, folder = context.config, context.run_dir / "teacher"
    row = finished_row(folder, "teacher")
    if row is not None:
        teacher = new_model(context, arch, config.seed)
        model_builder.unwrap(teacher).load_state_dict(read_state(folder / "best_model.pth")["state_dict"])
        return teacher, {"teacher": row}
    if checkpoint is not None:
        teacher, fit = load_teacher(context, checkpoint)
        if engine.is_main_process():
            utils.save_checkpoint(folder / "best_model.pth",
                                  make_checkpoint(context, "teacher", arch, teacher, fit.best_epoch, fit.history))
            print(f"[teacher] reused from {config.teacher_checkpoint} (epoch {fit.best_epoch})")
        row = {**report_model(context, "teacher", arch, teacher, fit, folder), "reused_from": str(config.teacher_checkpoint)}
        return teacher, {"teacher": row}
    teacher, fit = train_model(context, "teacher", arch, config.teacher_epochs, config.teacher_lr,
                               functools.partial(supervised_criterion, context), folder, config.seed)
    return teacher, {"teacher": report_model(context, "teacher", arch, teacher, fit, folder)}


def supervised_criterion(context: Context, model: nn.Module, steps_per_epoch: int) -> engine.Criterion:
    """The hard-label loss alone (the teacher's and the baseline's), smoothed / class-weighted as set."""
    return engine.SupervisedCriterion(context.hard_loss)


def distillation_criterion(
    context: Context, method: str, teacher: nn.Module, pairs: dict[str, list[tuple[str, str]]], student: nn.Module,
    steps_per_epoch: int,
) -> engine.Criterion:
    """The loss of one distillation method, from the run's settings (`pairs`: each feature method's layers)."""
    config = context.config
    warmup_steps = KD_engine.dkd_warmup_steps(config.student_epochs, steps_per_epoch, config.dkd_warmup_epochs)
    return KD_engine.make_criterion(
        method, teacher, student, temperature=config.temperature, alpha=config.alpha, beta=config.beta,
        pairs=pairs.get(method), dkd_alpha=config.dkd_alpha, dkd_beta=config.dkd_beta,
        dkd_warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch, image_size=config.image_size,
        hard_loss=context.hard_loss,
    )


def ledger_row(config: Config, summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One line of the runs ledger: what was run, with which key settings, and how it scored."""
    dataset = "bundled digits" if is_bundled(config) else (config.data_dir or config.train_dir)
    distilled = [role for role in student_roles(config) if role != "student_baseline"]
    return {
        "finished_at": summary["finished_at"], "run_dir": str(run_dir), "dataset": dataset,
        **{key: getattr(config, key) for key in ("teacher_model", "student_model", "student_epochs", "optimizer",
                                                  "student_lr", "temperature", "alpha", "batch_size", "image_size", "seed")},
        # A reused teacher was not trained in this run: its checkpoint stands where its training settings would.
        "teacher_checkpoint": config.teacher_checkpoint or "",
        "teacher_epochs": "" if config.teacher_checkpoint else config.teacher_epochs,
        "teacher_lr": "" if config.teacher_checkpoint else config.teacher_lr,
        "kd_methods": ",".join(kd_methods(config)), "seeds": ",".join(map(str, seeds(config))),
        **{f"{role}_top1": round(summary[role]["test"]["top1"], 6) if role in summary else None for role in ROLES},
        "distilled_top1": " ".join(f"{role.removeprefix('student_')}={summary[role]['test']['top1']:.6f}" for role in distilled),
        "kd_gain_top1": round(summary["kd_gain_top1"], 6) if "kd_gain_top1" in summary else None,
        "wall_seconds": summary["wall_seconds"],
    }


def rebuild_report(run_dir: str) -> None:
    """--report-only: write RUN/report.html again from the run's files, without training."""
    if not (Path(run_dir) / "summary.json").is_file():
        raise SettingsError(f"--report-only '{run_dir}' is not a finished run directory (no summary.json).")
    print(f"Report written: {utils.write_report(run_dir)}")


def layer_list(model: str, image_size: int) -> str:
    """--list-layers: the model's layers and their output shapes, or a SettingsError for a model or size that cannot work."""
    try:
        return model_builder.layer_table(model, image_size)
    except ValueError as error:
        raise SettingsError(str(error)) from None


def resumed_config(run_dir: str, args: dict[str, Any], parser: argparse.ArgumentParser) -> Config | None:
    """--resume: the interrupted run's own settings (None when the run has already finished).

    A setting the run's config.json lacks (a run made before that setting existed) takes its default.
    """
    changed = sorted(f"--{key.replace('_', '-')}" for key, value in args.items() if value != parser.get_default(key))
    if changed:
        raise SettingsError(f"--resume continues with the run's saved settings; leave out {', '.join(changed)}.")
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise SettingsError(f"--resume '{run_dir}' is not a run directory (it has no config.json).")
    if (path / "summary.json").is_file():
        print(f"Run '{run_dir}' has already finished: nothing to resume.")
        return None
    saved = utils.read_json(path / "config.json")
    try:  # values as the flags read them (an older run's compile: true is "on")
        settings = checked_settings({key: saved[key] for key in Config.__dataclass_fields__ if key in saved},
                                    parser, source=str(path / "config.json"))
    except ValueError as error:
        raise SettingsError(str(error)) from None
    return Config(**{**{key: settings.get(key, parser.get_default(key)) for key in Config.__dataclass_fields__},
                     "output_dir": str(path)})


def checked_settings(settings: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> dict[str, Any]:
    """`settings` keyed by Config's fields, converted and checked as the parser's flags would be (ValueError)."""
    actions = {action.dest: action for action in parser._actions if action.dest in Config.__dataclass_fields__}
    nullable = {name for name, field_ in Config.__dataclass_fields__.items() if "None" in str(field_.type)}
    return utils.check_settings(settings, actions, nullable, source=source)


def config_file_settings(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """--config: the settings of a YAML or JSON file with config.json's keys, checked as the flags would be.

    "resolved" and "dataset" (what a run records beside its settings) are ignored. A run's own
    config.json (it has "resolved") repeats that run in a new folder: its output_dir is ignored too.
    """
    try:
        settings = utils.read_settings(path)
        if "resolved" in settings:
            settings.pop("output_dir", None)
        for key in ("resolved", "dataset"):
            settings.pop(key, None)
        return checked_settings(settings, parser, source=path)
    except ValueError as error:
        raise SettingsError(str(error)) from None


def command_line_parser() -> argparse.ArgumentParser:
    """The settings' flags (build_parser) and the ones that choose what to do with them."""
    parser = build_parser()
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="read settings from a YAML or JSON file with config.json's keys (a run's own config.json "
                             "repeats that run in a new folder); flags given beside it override it")
    parser.add_argument("--report-only", metavar="RUN", default=None,
                        help="only rebuild RUN/report.html from a finished run's files, then stop")
    parser.add_argument("--resume", metavar="RUN", default=None,
                        help="continue the interrupted run in RUN with its saved settings")
    parser.add_argument("--list-layers", metavar="MODEL", default=None,
                        help="only print MODEL's layer names with their output shapes at --image-size, then stop")
    return parser


def parse_command_line(argv: list[str] | None) -> tuple[argparse.ArgumentParser, dict[str, Any], set[str]]:
    """The parser, the parsed flags and the settings the user gave (flags and --config file keys, as
    opposed to defaults); a --config file's settings stand in for the defaults beneath the flags."""
    parser = command_line_parser()
    args = vars(parser.parse_args(argv))
    from_file: dict[str, Any] = {}
    if args["config"] is not None:
        if args["resume"] is not None:
            raise SettingsError("--resume continues with the run's saved settings; leave out --config.")
        from_file = config_file_settings(os.path.expanduser(args["config"]), parser)
        parser.set_defaults(**from_file)
        args = vars(parser.parse_args(argv))
    return parser, args, given_settings(argv) | set(from_file)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the experiment, and turn user errors into one sentence and exit code 2.

    Ctrl-C stops the run with exit code 130 and says how to resume it; a NaN or infinite loss
    stops it with exit code 1.
    """
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    handle_stop_signals()
    try:
        parser, args, given = parse_command_line(argv)
        report_only, resume = (None if path is None else os.path.expanduser(path) for path in (args.pop("report_only"), args.pop("resume")))
        list_layers = args.pop("list_layers")
        args.pop("config")
        if report_only is not None:
            rebuild_report(report_only)
            return 0
        if list_layers is not None:
            print(layer_list(list_layers, args["image_size"]), end="")
            return 0
        config = Config(**args) if resume is None else resumed_config(resume, args, parser)
        if config is not None:
            run_experiment(config, resume=resume is not None, given=given)
    except (SettingsError, data_setup.DataError, model_builder.UnknownModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except engine.NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Interrupted as interrupted:
        if engine.is_main_process():
            print(f"\nInterrupted ({signal.Signals(interrupted.signum).name}). Every finished epoch is saved; "
                  f"continue with: python experiment.py --resume {interrupted.run_dir}", file=sys.stderr)
        return 128 + interrupted.signum
    except KeyboardInterrupt as stop:
        print(f"\nInterrupted ({signal.Signals(stop_signal(stop)).name}) before any training: nothing to resume.",
              file=sys.stderr)
        return 128 + stop_signal(stop)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm_handler)
    return 0


def given_settings(argv: list[str] | None) -> set[str]:
    """The settings whose flags appear on the command line (as opposed to defaults)."""
    absent = object()
    probe = build_parser()
    probe.set_defaults(**dict.fromkeys(Config.__dataclass_fields__, absent))
    return {key for key, value in vars(probe.parse_known_args(argv)[0]).items() if value is not absent}


if __name__ == "__main__":
    sys.exit(main())
