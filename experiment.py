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
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
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
TEACHER_MODEL = "VGG16"  # any torchvision classifier name also works
STUDENT_MODEL = "ResNet18"
TEACHER_CHECKPOINT: str | None = None  # a trained teacher's best_model.pth: skips teacher training
TEACHER_EPOCHS = 6
STUDENT_EPOCHS = 3
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
BETA = 0.25  # fitnet / at: weight of the feature term; loss = ALPHA*CE + BETA*feature + (1-ALPHA-BETA)*KD
FEATURE_LAYERS: str | None = None  # fitnet / at: "teacher_layer:student_layer,..."; None: defaults per model pair
DKD_ALPHA = 1.0  # dkd: weight of the target-class term (the paper's value)
DKD_BETA = 8.0  # dkd: weight of the non-target-class term (the paper's CIFAR value)
DKD_WARMUP_EPOCHS: int | None = None  # dkd: linear warm-up; None: the paper's share (20 of 240 epochs), at least 1
SEEDS: str | None = None  # e.g. "0,1,2": repeat every student per seed (teacher once); None: SEED only
VAL_FRACTION = 0.1  # of train, carved (stratified) when there is no val/ folder
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


class Interrupted(Exception):
    """The user stopped the run (Ctrl-C); every finished epoch is saved in `run_dir`."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


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
    teacher_epochs: int
    student_epochs: int
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
    beta: float
    feature_layers: str | None
    dkd_alpha: float
    dkd_beta: float
    dkd_warmup_epochs: int | None
    seeds: str | None
    val_fraction: float
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


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags; their defaults are the constants at the top of this file."""
    parser = argparse.ArgumentParser(
        description="Knowledge distillation: train a teacher, a baseline student and a distilled "
        "student, then compare them. Without data flags the bundled handwritten digits are used.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=DATA_DIR, help="folder holding train/ [val/] test/ class folders")
    data.add_argument("--train-dir", default=TRAIN_DIR, help="training split folder (overrides --data-dir)")
    data.add_argument("--val-dir", default=VAL_DIR, help="validation split folder (else carved from train)")
    data.add_argument("--test-dir", default=TEST_DIR, help="test split folder (overrides --data-dir)")
    data.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="fraction of train carved for validation when there is no val/")
    data.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="images are resized to this many pixels square")
    data.add_argument("--hflip", choices=["auto", "on", "off"], default=HFLIP, help="horizontal-flip augmentation (auto: off for the bundled digits)")
    data.add_argument("--crop-padding", type=int, default=CROP_PADDING, help="random-crop shift in pixels at 32 px (scaled with image size; 0 disables)")
    models = parser.add_argument_group("models")
    models.add_argument("--teacher-model", default=TEACHER_MODEL, help="teacher architecture (VGG16, ResNet18 or a torchvision classifier)")
    models.add_argument("--student-model", default=STUDENT_MODEL, help="student architecture")
    models.add_argument("--teacher-checkpoint", default=TEACHER_CHECKPOINT, help="reuse this trained teacher (best_model.pth) instead of training one")
    training = parser.add_argument_group("training")
    training.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS)
    training.add_argument("--student-epochs", type=int, default=STUDENT_EPOCHS)
    training.add_argument("--optimizer", choices=["adamw", "sgd"], default=OPTIMIZER, help="adamw, or sgd with Nesterov momentum")
    training.add_argument("--teacher-lr", type=float, default=TEACHER_LR, help="teacher's peak learning rate")
    training.add_argument("--student-lr", type=float, default=STUDENT_LR, help="students' peak learning rate")
    training.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    training.add_argument("--momentum", type=float, default=MOMENTUM, help="sgd only")
    training.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    training.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE, help="images per evaluation pass")
    training.add_argument("--temperature", type=float, default=T, help="distillation temperature T")
    training.add_argument("--alpha", type=float, default=ALPHA, help="weight of the hard-label CE term (1 - alpha weighs the KD term)")
    training.add_argument("--seed", type=int, default=SEED)
    methods = parser.add_argument_group("distillation methods")
    methods.add_argument("--kd-methods", default=KD_METHODS, help=f"comma-separated, one student each: {', '.join(KD_engine.METHODS)}")
    methods.add_argument("--beta", type=float, default=BETA, help="fitnet/at: weight of the feature term (alpha + beta <= 1)")
    methods.add_argument("--feature-layers", default=FEATURE_LAYERS, help="fitnet/at: teacher_layer:student_layer pairs, comma-separated")
    methods.add_argument("--dkd-alpha", type=float, default=DKD_ALPHA, help="dkd: weight of the target-class term")
    methods.add_argument("--dkd-beta", type=float, default=DKD_BETA, help="dkd: weight of the non-target-class term")
    methods.add_argument("--dkd-warmup-epochs", type=int, default=DKD_WARMUP_EPOCHS, help="dkd: warm-up epochs (default: 1/12 of the student epochs)")
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
    parser.add_argument("--output-dir", default=OUTPUT_DIR, help="run directory (default: runs/<timestamp>)")
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
        (config.crop_padding >= 0, f"--crop-padding must be >= 0 (got {config.crop_padding})."),
        (config.memory_budget_mb >= 0, f"--memory-budget-mb must be >= 0 (got {config.memory_budget_mb})."),
        (config.workers >= 0, f"--workers must be >= 0 (got {config.workers})."),
        (not config.cache_teacher_logits or augmentation(config) == data_setup.Augmentation(0, False),
         "--cache-teacher-logits needs a deterministic training view: add --crop-padding 0 --hflip off "
         "(with random augmentation the teacher must see each new view)."),
    ]
    for ok, message in checks:
        if not ok:
            raise SettingsError(message)
    methods = kd_methods(config)
    seeds(config)
    if any(method in KD_engine.FEATURE_METHODS for method in methods):
        if not (0 <= config.beta and config.alpha + config.beta <= 1):
            raise SettingsError(f"--beta must be >= 0 with --alpha + --beta <= 1 (got alpha {config.alpha}, beta {config.beta}).")
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
    if config.teacher_checkpoint is not None and not Path(config.teacher_checkpoint).is_file():
        raise SettingsError(f"--teacher-checkpoint '{config.teacher_checkpoint}' is not a file.")
    for name in (config.teacher_model, config.student_model):
        try:
            model_builder.check_input_size(name, config.image_size)
        except ValueError as error:
            raise SettingsError(str(error)) from None


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


def feature_pairs(config: Config) -> list[tuple[str, str]]:
    """fitnet / at layer pairs (teacher, student), checked to exist in both models."""
    try:
        pairs = (KD_engine.parse_feature_layers(config.feature_layers) if config.feature_layers
                 else KD_engine.default_feature_layers(config.teacher_model, config.student_model))
        with torch.device("meta"):
            teacher = model_builder.build_model(config.teacher_model, 10, config.image_size)
            student = model_builder.build_model(config.student_model, 10, config.image_size)
    except ValueError as error:
        raise SettingsError(f"--feature-layers: {error}") from None
    for model, names, which in ((teacher, [t for t, _ in pairs], "teacher"), (student, [s for _, s in pairs], "student")):
        missing = sorted(set(names) - dict(model.named_modules()).keys())
        if missing:
            raise SettingsError(f"--feature-layers: the {which} has no layer named {', '.join(missing)}.")
    return pairs


def student_roles(config: Config) -> list[str]:
    """The students of a run: the baseline, then one per distillation method (student_kd is Hinton's)."""
    return ["student_baseline"] + [f"student_{method}" for method in kd_methods(config)]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a run can be repeated exactly on the CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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

    def train_loader(self, seed: int) -> data_setup.BatchLoader:
        """A fresh training loader: the same seed gives every model the same batches.

        Under torchrun every rank takes its shard of each epoch: --batch-size is per process.
        """
        config = self.config
        return data_setup.BatchLoader(
            self.data.train, config.batch_size, self.data.mean, self.data.std, self.device,
            augmentation(config), seed=seed, workers=config.workers, shard=engine.rank_and_world(),
        )


def augmentation(config: Config) -> data_setup.Augmentation:
    """Random-crop shift (scaled with the image size) and flip, as configured."""
    pad = round(config.crop_padding * config.image_size / 32)
    hflip = config.hflip == "on" or (config.hflip == "auto" and not is_bundled(config))
    return data_setup.Augmentation(pad=pad, hflip=hflip)


def is_bundled(config: Config) -> bool:
    """True when the run uses the bundled digits (no data folder configured)."""
    return config.data_dir is None and config.train_dir is None and config.test_dir is None


def make_checkpoint(
    context: Context, role: str, arch: str, model: nn.Module, epoch: int, history: list[dict[str, Any]]
) -> dict[str, Any]:
    """A self-describing checkpoint: weights plus everything needed to rebuild and use them."""
    return {
        "role": role,
        "arch": arch,
        "num_classes": len(context.data.class_names),
        "class_names": list(context.data.class_names),
        "image_size": context.config.image_size,
        "mean": list(context.data.mean),
        "std": list(context.data.std),
        "config": asdict(context.config),
        "epoch": epoch,
        "history": history,
        "state_dict": cpu_weights(model),
    }


def new_model(context: Context, arch: str, seed: int, training_images: int = 0) -> nn.Module:
    """Build an untrained model on the run's device (seeded, so students of one seed start identical),
    compiled when --compile says so for a model that will train on `training_images` images."""
    seed_everything(seed)
    model = model_builder.build_model(arch, len(context.data.class_names), context.config.image_size)
    model = model.to(context.device, memory_format=torch.channels_last)
    if engine.rank_and_world()[1] > 1:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    compile_model = engine.resolve_compile(context.config.compile, context.device, training_images)
    return torch.compile(model) if compile_model else model


def make_optimizer(config: Config, model: nn.Module, lr: float, criterion: engine.Criterion) -> torch.optim.Optimizer:
    """The optimizer for the model's parameters and the criterion's own trainable part, if any
    (e.g. a feature adapter); a teacher's parameters never reach one."""
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
    make_criterion: Callable[[nn.Module], engine.Criterion], folder: Path, seed: int,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[nn.Module, engine.FitResult]:
    """Train one model with a one-cycle schedule; the best-on-validation epoch is kept.

    `make_criterion(model)` gives the loss (feature methods hook into the model it is given).
    `teacher_logits` (one row per training image) are handed to the criterion with each batch.
    After every epoch the whole training state goes to <folder>/train_state.pth; when that
    file exists (an interrupted run), training continues after its last finished epoch.
    """
    config = context.config
    model = new_model(context, arch, seed, epochs * len(context.data.train))
    criterion = make_criterion(model)
    train_loader = context.train_loader(seed)
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
        files = {}
        if result.best_epoch == epoch:
            files[checkpoint_path] = make_checkpoint(context, role, arch, model, epoch, result.history)
            best_weights.clear()
            best_weights.update(files[checkpoint_path]["state_dict"])
        files[state_path] = {
            "role": role, "arch": arch, "model": cpu_weights(model),
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
            on_epoch_end=save_epoch, resume=resume,
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
    """Run `function` with Ctrl-C held back until it returns, so a save it makes is never cut short."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return function(*args, **kwargs)
        pressed = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
        try:
            function(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)
        if pressed:
            raise KeyboardInterrupt

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
    try:
        checkpoint = utils.load_checkpoint(path)
        for key in ("arch", "class_names", "image_size", "mean", "std", "epoch", "state_dict"):
            checkpoint[key]
    except Exception as error:  # any unreadable or foreign file is the user's to fix
        raise SettingsError(f"Cannot read teacher checkpoint '{path}': {error!r}") from None
    return checkpoint


def load_teacher(context: Context, checkpoint: dict[str, Any]) -> tuple[nn.Module, engine.FitResult]:
    """Rebuild a trained teacher from its checkpoint, checking it fits this run's data."""
    path = context.config.teacher_checkpoint
    arch, class_names = checkpoint["arch"], checkpoint["class_names"]
    expected_arch = model_builder.torchvision_name(context.config.teacher_model)
    if arch != expected_arch:
        raise SettingsError(f"Teacher checkpoint '{path}' holds a {arch}, but --teacher-model is {expected_arch}.")
    if class_names != context.data.class_names:
        raise SettingsError(f"Teacher checkpoint '{path}' was trained on classes {class_names}, not this data's {context.data.class_names}.")
    if checkpoint["image_size"] != context.config.image_size:
        raise SettingsError(f"Teacher checkpoint '{path}' was trained at {checkpoint['image_size']} px; pass --image-size {checkpoint['image_size']}.")
    model = new_model(context, arch, context.config.seed)
    model_builder.unwrap(model).load_state_dict(checkpoint["state_dict"])
    history = checkpoint.get("history", [])
    return model, engine.FitResult(history=history, best_epoch=checkpoint["epoch"], train_seconds=0.0)


def report_model(
    context: Context, role: str, arch: str, model: nn.Module, fit: engine.FitResult, folder: Path,
) -> dict[str, Any]:
    """Evaluate the selected model on every split and write its folder of metrics, plots and reports.

    Every rank takes part in the evaluation; only rank 0 measures speed and writes files.
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
        "train_seconds": round(fit.train_seconds, 2), "test": {key: results["test"][key] for key in SUMMARY_TEST_KEYS},
    }
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
    utils.write_text(folder / "training_metrics.txt", f"{role} ({arch}), best epoch {fit.best_epoch} by validation top-1\n" + utils.history_table(fit.history))
    utils.write_text(folder / "detailed_metrics.txt", f"{role} ({arch}) at its best epoch {fit.best_epoch}\n\n" + utils.metrics_table(results))
    stats = torchinfo_summary(model_builder.unwrap(model), input_size=(1, 3, context.config.image_size, context.config.image_size),
                              device=context.device, mode="eval", verbose=0)
    utils.write_text(folder / "model_summary.txt", str(stats) + "\n")
    if fit.history:
        utils.plot_curves(fit.history, "loss", f"{role}: loss", folder / "loss_curve.png")
        utils.plot_curves(fit.history, "top1", f"{role}: top-1 accuracy", folder / "accuracy_curve.png")
    utils.plot_topk(results, f"{role}: top-1 and top-3 accuracy", folder / "top1_top3_comparison.png")
    # Written last: its presence marks the model as finished for --resume.
    utils.write_json(folder / RESULTS, {"model": role, **row, "splits": results})
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
    return {key: value for key, value in results.items() if key not in ("model", "splits")}


def deployment_figures(context: Context, model: nn.Module, checkpoint: Path) -> dict[str, Any]:
    """File size, FLOPs per image, batch-1 latency and batch-64 throughput on the run's device."""
    speed = engine.measure_speed(model, context.config.image_size, context.device, context.amp_dtype)
    return {
        "file_mb": round(checkpoint.stat().st_size / 2**20, 3),
        "flops_per_image": model_builder.flops_per_image(model, context.config.image_size),
        **speed,
    }


def export_model(context: Context, role: str, arch: str, model: nn.Module, folder: Path) -> dict[str, Any]:
    """Write <model folder>/model.onnx and check it against PyTorch on real validation images."""
    path = folder / "model.onnx"
    metadata = {"arch": arch, "class_names": context.data.class_names, "image_size": context.config.image_size,
                "mean": context.data.mean, "std": context.data.std, "role": role}
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
    """Size and speed of every model on this run's device, and each one's speed-up over the teacher."""
    header = (f"{'model':<18}{'params':>12}{'file MB':>9}{'GFLOPs/img':>12}{'latency ms':>12}"
              f"{'img/s @64':>11}{'speed-up':>10}")
    lines = [header, "-" * len(header)]
    for role in roles:
        row = summary[role]
        lines.append(f"{role:<18}{row['params']:>12,}{row['file_mb']:>9.1f}{row['flops_per_image'] / 1e9:>12.3f}"
                     f"{row['latency_ms']:>12.2f}{row['throughput_img_s']:>11.1f}{row['speedup_over_teacher']:>9.2f}x")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the run


def comparison_table(summary: dict[str, Any], roles: list[str]) -> str:
    """The final table: one row per model with size, training time and test metrics (of the first seed),
    then, over several seeds, mean +- std of test top-1 and of the gain over the baseline."""
    several = len(summary.get("seeds", [])) > 1
    header = f"{'model':<18}{'arch':<11}{'params':>11}{'MB':>8}{'best ep':>8}{'train':>9}" + "".join(
        f"{k:>10}" for k in ("top1", "top3", "f1_macro", "auc_macro")
    ) + (f"{'top1 mean+-std':>17}{'gain mean+-std':>17}" if several else "")
    lines = [header, "-" * len(header)]
    spread = lambda row, key: f"{100 * row[key + '_mean']:.2f}+-{100 * row[key + '_std']:.2f}"  # noqa: E731
    for role in roles:
        row = summary[role]
        line = (f"{role:<18}{row['arch']:<11}{row['params']:>11,}{row['size_mb']:>8.1f}{row['best_epoch']:>8}"
                f"{utils.format_seconds(row['train_seconds']):>9}"
                + "".join(f"{utils.format_metric(row['test'][k]):>10}" for k in ("top1", "top3", "f1_macro", "auc_macro")))
        if several and "test_top1_mean" in row:
            line += f"{spread(row, 'test_top1'):>17}" + (f"{spread(row, 'gain_top1'):>17}" if role != "student_baseline" else "")
        lines.append(line)
    for role in roles[2:]:
        gain = summary[role]["test"]["top1"] - summary["student_baseline"]["test"]["top1"]
        lines.append(f"{role.removeprefix('student_')} gain (test top-1, {role} - student_baseline): {100 * gain:+.2f} points"
                     + (f" (seed {summary['seeds'][0]})" if several else ""))
    if several:
        lines.append(f"seeds {', '.join(map(str, summary['seeds']))}: the teacher is trained once (seed {summary['seeds'][0]}); "
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


def run_experiment(config: Config, resume: bool = False) -> dict[str, Any]:
    """The whole pipeline: data, teacher, baseline student, distilled student, reports.

    With `resume`, `config.output_dir` is an interrupted run: finished models are kept and the
    model in training continues after its last finished epoch.
    """
    start = time.perf_counter()
    validate(config)
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
    teacher_checkpoint = None if config.teacher_checkpoint is None else read_teacher_checkpoint(config.teacher_checkpoint)
    data = data_setup.load_splits(
        config.data_dir, config.train_dir, config.val_dir, config.test_dir,
        config.image_size, config.val_fraction, config.seed, config.memory_budget_mb, config.workers,
        data_setup.DEFAULT_CACHE_DIR if config.decode_cache else None, decode_device=device,
    )
    if teacher_checkpoint is not None:
        # The teacher expects inputs normalized as in its own training; students share them.
        data.mean, data.std = teacher_checkpoint["mean"], teacher_checkpoint["std"]
    run_dir = make_run_dir(config.output_dir)
    eval_loaders = {
        split: data_setup.BatchLoader(getattr(data, split), config.eval_batch_size, data.mean, data.std, device,
                                      workers=config.workers, shard=(rank, world))
        for split in SPLITS
    }
    context = Context(config, data, device, amp_dtype, run_dir, eval_loaders, utils.BackgroundSaver())
    dataset = {
        "class_names": data.class_names,
        "sizes": {split: len(getattr(data, split)) for split in SPLITS},
        "validation": data.val_source,
        "mean": data.mean, "std": data.std,
        "storage": "streamed from disk" if data.streamed else "decoded once into memory",
    }
    precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    if main_process:
        if not resume:
            resolved = {"device": str(device), "precision": precision, "processes": world}
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
    except KeyboardInterrupt:
        raise Interrupted(run_dir) from None


def train_and_report(
    context: Context, start: float, dataset: dict[str, Any], precision: str, teacher_checkpoint: dict[str, Any] | None,
) -> dict[str, Any]:
    """Train (or, in a resumed run, keep) each model in turn, report it, then compare them all."""
    config, run_dir, device, amp_dtype = context.config, context.run_dir, context.device, context.amp_dtype
    teacher_arch = model_builder.torchvision_name(config.teacher_model)
    student_arch = model_builder.torchvision_name(config.student_model)
    teacher, summary = obtain_teacher(context, teacher_arch, teacher_checkpoint)
    teacher_logits = None
    if config.cache_teacher_logits:
        # validate() made sure the training view is deterministic: one pass serves every epoch.
        teacher_logits, _ = engine.predict(teacher, context.eval_loaders["train"], device, amp_dtype, "teacher logits")
    # The teacher is frozen on every rank; unwrapped, its forward needs no other rank.
    frozen_teacher = engine.store_for_autocast(engine.local_module(teacher), amp_dtype)
    pairs = feature_pairs(config) if set(kd_methods(config)) & set(KD_engine.FEATURE_METHODS) else None
    run_seeds = seeds(config)
    rows: dict[str, dict[int, dict[str, Any]]] = {role: {} for role in student_roles(config)}
    for seed in run_seeds:
        for role in rows:
            method = role.removeprefix("student_")
            folder = run_dir / role if seed == run_seeds[0] else run_dir / role / f"seed_{seed}"
            name = role if len(run_seeds) == 1 else f"{role} seed {seed}"
            row = finished_row(folder, name)
            if row is None:
                if role == "student_baseline":
                    make_criterion, cached = (lambda model: engine.SupervisedCriterion()), None
                else:
                    make_criterion = functools.partial(distillation_criterion, context, method, frozen_teacher, pairs)
                    cached = teacher_logits if method not in KD_engine.FEATURE_METHODS else None
                student, fit = train_model(context, name, student_arch, config.student_epochs, config.student_lr,
                                           make_criterion, folder, seed, cached)
                row = report_model(context, name, student_arch, student, fit, folder)
            rows[role][seed] = row
    if not engine.is_main_process():
        return summary
    for role, by_seed in rows.items():
        summary[role] = {**by_seed[run_seeds[0]], **seed_statistics(by_seed, rows["student_baseline"])}
    if "student_kd" in summary:
        summary["kd_gain_top1"] = summary["student_kd"]["test"]["top1"] - summary["student_baseline"]["test"]["top1"]
    roles = ["teacher", *rows]
    for role in roles:
        summary[role]["speedup_over_teacher"] = round(summary["teacher"]["latency_ms"] / summary[role]["latency_ms"], 3)
    summary["seeds"] = run_seeds
    summary["skipped_files"] = context.data.skipped_files
    summary["dataset"] = dataset
    summary["device"], summary["precision"] = str(device), precision
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    summary["finished_at"] = datetime.now().isoformat(timespec="seconds")
    table = comparison_table(summary, roles) + "\nDeployment on " + str(device) + f" ({precision}):\n" + deployment_table(summary, roles)
    utils.write_json(run_dir / "summary.json", summary)
    utils.write_text(run_dir / "comparison.txt", table)
    utils.plot_comparison({role: summary[role] for role in roles}, run_dir / "comparison.png")
    report = utils.write_report(run_dir)
    ledger = run_dir.parent / "experiments.csv"
    utils.append_ledger(ledger, ledger_row(config, summary, run_dir))
    print("\n" + table + f"Wall time {utils.format_seconds(summary['wall_seconds'])}. Results in {run_dir}, "
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
                               lambda model: engine.SupervisedCriterion(), folder, config.seed)
    return teacher, {"teacher": report_model(context, "teacher", arch, teacher, fit, folder)}


def distillation_criterion(
    context: Context, method: str, teacher: nn.Module, pairs: list[tuple[str, str]] | None, student: nn.Module,
) -> engine.Criterion:
    """The loss of one distillation method, from the run's settings (`pairs`: fitnet / at layers)."""
    config = context.config
    warmup = config.dkd_warmup_epochs
    if warmup is None:
        warmup = max(1, round(config.student_epochs * 20 / 240))
    return KD_engine.make_criterion(
        method, teacher, student, temperature=config.temperature, alpha=config.alpha, beta=config.beta,
        pairs=pairs if method in KD_engine.FEATURE_METHODS else None,
        dkd_alpha=config.dkd_alpha, dkd_beta=config.dkd_beta, dkd_warmup_epochs=warmup, image_size=config.image_size,
    )


def seed_statistics(by_seed: dict[int, dict[str, Any]], baseline: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds of test top-1 and of the gain over the same seed's baseline."""
    if len(by_seed) < 2:
        return {}
    top1 = [row["test"]["top1"] for row in by_seed.values()]
    gains = [row["test"]["top1"] - baseline[seed]["test"]["top1"] for seed, row in by_seed.items()]
    return {
        "test_top1_by_seed": {str(seed): row["test"]["top1"] for seed, row in by_seed.items()},
        "test_top1_mean": statistics.mean(top1), "test_top1_std": statistics.stdev(top1),
        "gain_top1_mean": statistics.mean(gains), "gain_top1_std": statistics.stdev(gains),
    }


def ledger_row(config: Config, summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One line of the runs ledger: what was run, with which key settings, and how it scored."""
    dataset = "bundled digits" if is_bundled(config) else (config.data_dir or config.train_dir)
    return {
        "finished_at": summary["finished_at"], "run_dir": str(run_dir), "dataset": dataset,
        **{key: getattr(config, key) for key in ("teacher_model", "student_model", "teacher_epochs", "student_epochs",
                                                  "temperature", "alpha", "batch_size", "image_size", "seed")},
        **{f"{role}_top1": round(summary[role]["test"]["top1"], 6) if role in summary else None for role in ROLES},
        "kd_gain_top1": round(summary["kd_gain_top1"], 6) if "kd_gain_top1" in summary else None,
        "wall_seconds": summary["wall_seconds"],
    }


def rebuild_report(run_dir: str) -> None:
    """--report-only: write RUN/report.html again from the run's files, without training."""
    if not (Path(run_dir) / "summary.json").is_file():
        raise SettingsError(f"--report-only '{run_dir}' is not a finished run directory (no summary.json).")
    print(f"Report written: {utils.write_report(run_dir)}")


def resumed_config(run_dir: str, args: dict[str, Any], parser: argparse.ArgumentParser) -> Config | None:
    """--resume: the interrupted run's own settings (None when the run has already finished)."""
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
    return Config(**{**{key: saved[key] for key in Config.__dataclass_fields__}, "output_dir": str(path)})


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the experiment, and turn user errors into one sentence and exit code 2.

    Ctrl-C stops the run with exit code 130 and says how to resume it; a NaN or infinite loss
    stops it with exit code 1.
    """
    parser = build_parser()
    parser.add_argument("--report-only", metavar="RUN", default=None,
                        help="only rebuild RUN/report.html from a finished run's files, then stop")
    parser.add_argument("--resume", metavar="RUN", default=None,
                        help="continue the interrupted run in RUN with its saved settings")
    args = vars(parser.parse_args(argv))
    report_only, resume = args.pop("report_only"), args.pop("resume")
    try:
        if report_only is not None:
            rebuild_report(report_only)
            return 0
        config = Config(**args) if resume is None else resumed_config(resume, args, parser)
        if config is not None:
            run_experiment(config, resume=resume is not None)
    except (SettingsError, data_setup.DataError, model_builder.UnknownModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except engine.NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Interrupted as interrupted:
        if engine.is_main_process():
            print(f"\nInterrupted. Every finished epoch is saved; continue with: "
                  f"python experiment.py --resume {interrupted.run_dir}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nInterrupted before any training: nothing to resume.", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
