"""Every setting of a run in one place: `Config` with each field's flag, and the checks made before any
work (`command_line` reads them from flags, settings files and a resumed run's config.json).

Each Config field declares its flag (group, help, choices) beside its type; the type says whether
the flag takes an integer, a number, a word or on/off, and whether leaving it unset (None) is
allowed. Defaults are not written here: they are `experiment.py`'s constants, read when the parser
is built (`Config.from_constants`), so editing a constant changes the default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

import data_setup
import engine
import KD_engine
import model_builder
from core import compute, records, schedules, secrets
from core.errors import SettingsError
from data import decoding
from methods import base, feature_maps

MLFLOW_INSTALL = "pip install -r requirements-dev.txt"  # what --track mlflow needs installed (MLflow is optional)
GROUPS = ("data", "models", "training", "distillation methods", "sweep", "speed", "output")


@dataclass(frozen=True)
class Flag:
    """How a Config field appears on the command line (its type comes from the field's annotation)."""

    group: str
    help: str
    choices: tuple[str, ...] | None = None
    unset: str | None = None  # what leaving out a flag whose default is None means, as --help shows it
    const: str | None = None  # the value of the flag given alone (--compile)
    constant: str | None = None  # experiment.py's constant, when it is not the field's name in capitals


PRUNER_STARTUP_TRIALS = 5  # a sweep's pruner judges no trial before this many have completed (Optuna's default)


def flag(group: str, help: str, **details: Any) -> Any:
    """A Config field (no default of its own: experiment.py's constants are the defaults) with its flag."""
    return field(metadata={"flag": Flag(group, help, **details)})




@dataclass
class RunSettings:
    """The settings every run has; `Config` adds each distillation method's own (`methods.base.declared_settings`)."""

    data_dir: str | None = flag("data", "folder holding train/ [val/] test/ class folders, or only class folders "
                                "(test and validation are then carved)", unset="the bundled digits")
    train_dir: str | None = flag("data", "training split folder (overrides --data-dir)", unset="train/ of --data-dir")
    val_dir: str | None = flag("data", "validation split folder", unset="carved from train")
    test_dir: str | None = flag("data", "test split folder (overrides --data-dir)", unset="test/ of --data-dir")
    output_dir: str | None = flag("output", "run directory", unset="runs/<timestamp>")
    teacher_model: str = flag("models", "teacher architecture: VGG16, ResNet18, a small-image network of the KD "
                              "literature (resnet32x4, wrn_40_2, vgg13, ...) or a torchvision classifier")
    student_model: str = flag("models", "student architecture. Up to 64 px a small-image network of the KD literature "
                              "(resnet8x4, resnet20, wrn_16_2, ...) is cheap; above 64 px choose a torchvision one "
                              "(mobilenet_v3_small, shufflenet_v2_x1_0, resnet18, ...): the literature's networks do "
                              "not shrink the image in their stem, so their cost grows with its square (resnet8x4: "
                              "0.35 GFLOPs an image at 32 px, 5.7 at 128 px)")
    teacher_checkpoint: str | None = flag("models", "reuse this trained teacher (best_model.pth) instead of training "
                                          "one", unset="train a teacher")
    teacher_weights: str | None = flag(
        "models", "start the teacher from torchvision weights (DEFAULT, IMAGENET1K_V1, ...: read from the torch hub "
        "cache, $TORCH_HOME) or from a state-dict file; layers that do not fit are re-initialized, and inputs are "
        "normalized as the weights expect", unset="random initialization")
    student_weights: str | None = flag("models", "the same for every student (baseline and distilled alike)",
                                       unset="random initialization")
    teacher_epochs: int = flag("training", "teacher's training epochs (its schedule spans them all); 0 with "
                               "--teacher-weights: the teacher as loaded, evaluated and never trained")
    student_epochs: int = flag("training", "each student's training epochs")
    patience: int | None = flag("training", "stop a model after this many epochs without a better validation "
                                "--select-metric (0: off); the best epoch is still the one kept, and the one-cycle "
                                "schedule stays planned for all epochs", unset="off")
    select_metric: str = flag("training", "validation metric that picks each model's best epoch (ties: lower "
                              "validation loss)", choices=engine.SELECT_METRICS)
    label_smoothing: float = flag("training", "label smoothing of the hard-label cross-entropy of every model; in "
                                  "distillation only the CE term is smoothed, the teacher's soft targets are used as "
                                  "they are")
    class_weights: str = flag("training", "balanced: weigh each class's cross-entropy by n_images / (n_classes * its "
                              "training images)", choices=("none", "balanced"))
    optimizer: str = flag("training", "adamw, or sgd with Nesterov momentum", choices=("adamw", "sgd"))
    teacher_lr: float = flag("training", "teacher's peak learning rate")
    student_lr: float = flag("training", "students' peak learning rate")
    weight_decay: float = flag("training", "weight decay (decoupled for adamw)")
    momentum: float = flag("training", "sgd only")
    nesterov: bool = flag("training", "sgd: Nesterov momentum (--no-nesterov: classical momentum, as the KD "
                          "references train)")
    lr_schedule: str = flag("training", "onecycle (per step); step: times --lr-decay after each of --milestones; "
                            "cosine: down to 0 over the run (step and cosine change the rate per epoch, as the "
                            "references do)", choices=schedules.SCHEDULES)
    milestones: str | None = flag("training", "step: the epochs after which the rate decays, comma-separated (the "
                                  "references: 150,180,210 of 240)", unset="none; step needs them")
    lr_decay: float = flag("training", "step: the factor the rate is multiplied by at each milestone")
    warmup_epochs: int = flag("training", "step and cosine: epochs of linear warm-up (epoch e of N trains at "
                              "e / (N + 1) of the rate)")
    batch_size: int = flag("training", "images per optimizer step (per process under torchrun)")
    eval_batch_size: int = flag("training", "images per evaluation pass")
    image_size: int = flag("data", "images are resized to this many pixels square; above 64 px the models are "
                           "torchvision's full definitions, a VGG with a compact head (global pooling, one linear "
                           "layer) unless its --*-weights load torchvision's 4096-wide one (VGG16: 134M parameters)")
    temperature: float = flag("training", "distillation temperature T of kd, dkd, dist and the feature methods' KD "
                              "term (4 in the references' CIFAR configs, DIST_KD's too)", constant="T")
    alpha: float = flag("training", "weight of the hard-label CE term (1 - alpha weighs the KD term)")
    loss_weights: str = flag("distillation methods", "alpha: each method's loss is --alpha * CE + (1 - alpha) * its "
                             "distillation terms at their --*-weight settings (feature methods: + --beta * term); "
                             "reference: each method's loss at its reference's own weights per part and per "
                             "teacher/student pair (kd 0.1 CE + 0.9 KD, dist 1 CE + 2 DIST, fitnet 1 CE + 100 hint, "
                             "...; docs/methods.md lists them), --alpha and the methods' weight settings then "
                             "unused (--beta and --dkd-beta refused)", choices=(base.ALPHA_MIX, base.REFERENCE_MIX))
    kd_methods: str = flag("distillation methods",
                           f"comma-separated, one student each: {', '.join(KD_engine.method_names())}")
    seeds: str | None = flag("distillation methods", "comma-separated seeds: every student is trained once per seed",
                             unset="--seed alone")
    comparison_correction: str = flag(
        "distillation methods", "with several distilled students every two students (the baseline too) are compared "
        "head to head; holm: their p-values are corrected by Holm's step-down over the whole family of pairs before a "
        "pair is said to differ; none: each pair's raw p (with many pairs some then differ by chance)",
        choices=records.COMPARISON_CORRECTIONS)
    sweep: str | None = flag("sweep", "search settings of the distilled student with Optuna, on the validation split: "
                             "comma-separated name=low:high (uniform), name=low:high:log or name=a|b|c, e.g. "
                             "temperature=1:10:log,alpha=0.1:0.9 (also method=kd|dkd)", unset="one run, no search")
    trials: int = flag("sweep", "trials of the sweep, over all its workers together")
    trials_per_pass: int = flag("sweep", "a worker asks Optuna for this many trials at once and trains their students "
                                "in one pass over the data (as --lockstep trains a seed's students: each batch drawn "
                                "once, the teacher run once on it); a pruned trial leaves the pass, the others go on; "
                                "when a searched setting changes the training batches (batch_size), each trial trains "
                                "alone")
    prune_after: int | None = flag("sweep", "the median pruner judges a trial only from this epoch on (and never at "
                                   "its last), against the trials that reached that epoch, and only once "
                                   f"{PRUNER_STARTUP_TRIALS} trials have completed and {PRUNER_STARTUP_TRIALS} have "
                                   "reported that epoch: early epochs' scores still jump by several points; the "
                                   "trial's epochs or more: no pruning", unset="half of the trial's epochs")
    study_storage: str | None = flag("sweep", "join a study shared by several workers: an RDB URL "
                                     "(postgresql://user:password@host/db) or an Optuna journal file's path on a "
                                     "shared filesystem; the password is never written anywhere",
                                     unset="RUN/sweep.db, an SQLite file for one worker")
    study_name: str | None = flag("sweep", "the study's name in --study-storage (needed with it)",
                                  unset="the run directory's name")
    val_fraction: float = flag("data", "fraction of train carved for validation when there is no val/")
    test_fraction: float = flag("data", "fraction of all images carved as the test split when the data folder holds "
                                "only class folders")
    max_per_class: int | None = flag("data", "train on a stratified, seeded subset of at most this many images per "
                                     "class (validation and test stay whole)", unset="every image")
    resize: str = flag("data", "squash: the whole image to the square; center-crop: shorter side to the size, then the "
                       "central square", choices=decoding.RESIZE_MODES)
    augment: str = flag("data", "basic: random crop and flip; trivialaugment: then torchvision's TrivialAugmentWide on "
                        "every training image", choices=data_setup.AUGMENT_POLICIES)
    balanced_sampler: bool = flag("data", "draw training images with replacement, with probability inversely "
                                  "proportional to their class's count")
    hflip: str = flag("data", "horizontal-flip augmentation (auto: off for the bundled digits)",
                      choices=("auto", "on", "off"))
    crop_padding: int = flag("data", "random-crop shift in pixels at 32 px (scaled with image size; 0 disables)")
    seed: int = flag("training", "seed for initialization, the validation split, shuffling and augmentation")
    device: str = flag("training", "auto, cpu, cuda or cuda:N")
    precision: str = flag("training", "auto: bf16 on CUDA and on CPUs with native bf16",
                          choices=("auto", "fp32", "bf16"))
    memory_budget_mb: float = flag("speed", "decoded images above this size are streamed from disk")
    workers: int = flag("speed", "decoding worker processes")
    decode_cache: bool = flag("speed", "keep decoded images in a cache file for the next run")
    cache_teacher_logits: bool = flag("speed", "compute the teacher's logits once per image; only with a deterministic "
                                      "view (--crop-padding 0 --hflip off)")
    compile: str = flag("speed", "torch.compile each model's training step, the model with its loss (on CUDA with "
                        f"CUDA graphs; batches of one size: an epoch's smaller last batch is left out); auto: "
                        f"{compute.COMPILE_AUTO_RULE}; --compile alone: on", choices=("auto", "on", "off"), const="on")
    lockstep: str = flag("speed", "train the students of a seed in one pass over the data: each batch drawn once, "
                         "the teacher run once on it, then every student's own step (the same results as one at a "
                         "time in fp32); auto: whenever a seed has two students or more and --compile is off for them; "
                         "students' weights and optimizer states above --memory-budget-mb (CUDA: the free memory) "
                         "split into several passes", choices=("auto", "on", "off"))
    eval_test_every_epoch: bool = flag("output", "also evaluate the test split after every epoch, for figures "
                                       "comparable with papers' tables (the best epoch is still chosen on validation)")
    tensorboard: bool = flag("output", "write TensorBoard curves under RUN/tensorboard (needs the tensorboard package)")
    export: str = flag("output", "onnx: export every trained model to RUN/<model>/model.onnx (dynamic batch) and "
                       "check it", choices=("none", "onnx"))
    track: str = flag("output", "mlflow: also log the run to MLflow, a child run per model (settings, every epoch, "
                      f"test metrics, verdicts, best_model.pth); needs {MLFLOW_INSTALL}; see docs/tracking.md",
                      choices=("off", "mlflow"))
    tracking_uri: str | None = flag("output", "--track mlflow: the tracking server (http://host:5000) or store; "
                                    "a password in it is never written", unset="$MLFLOW_TRACKING_URI, else "
                                    "mlflow.db (SQLite) beside the run directory")
    experiment_name: str | None = flag("output", "--track mlflow: the MLflow experiment", unset="the data's name")

    @classmethod
    def from_constants(cls, constants: Mapping[str, Any]) -> Config:
        """The Config of `constants` (experiment.py's module namespace): each field from its constant; a method's
        setting without a constant takes the default its method's file declares."""
        return Config(**{name: constants[constant_name(name)] if constant_name(name) in constants
                         else METHOD_SETTINGS[name].default for name in FIELDS})


METHOD_SETTINGS = base.declared_settings()
Config = dataclasses.make_dataclass("Config", [
    (name, setting.type, flag("distillation methods", setting.help, unset=setting.unset))
    for name, setting in METHOD_SETTINGS.items()], bases=(RunSettings,))
Config.__doc__ = "Every setting of a run; saved in config.json and in every checkpoint."
Config.__module__ = __name__
FIELDS: dict[str, Flag] = {spec.name: spec.metadata["flag"] for spec in dataclasses.fields(Config)}
TYPES: dict[str, Any] = typing.get_type_hints(Config)
PATH_SETTINGS = ("data_dir", "train_dir", "val_dir", "test_dir", "output_dir", "teacher_checkpoint",
                 "teacher_weights", "student_weights")  # a weights name (DEFAULT, ...) has no "~" to expand


def constant_name(name: str) -> str:
    """The experiment.py constant a field's default comes from ("temperature" -> "T", "alpha" -> "ALPHA")."""
    return FIELDS[name].constant or name.upper()


def value_type(name: str) -> type:
    """The type of a setting's value (int, float, str or bool), whether or not it may also be None."""
    return next(arg for arg in typing.get_args(TYPES[name]) or (TYPES[name],) if arg is not type(None))


def nullable(name: str) -> bool:
    """Whether a setting may be left unset (None), as its declared type says."""
    hint = TYPES[name]
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def saved_config(config: Config) -> dict[str, Any]:
    """A Config as config.json and every checkpoint store it: a storage or tracking URL's password left out."""
    return {**asdict(config), "study_storage": without_password(config.study_storage),
            "tracking_uri": without_password(config.tracking_uri)}


HIDDEN = secrets.HIDDEN


def without_password(url: str | None) -> str | None:
    """A storage URL with its password (user:password@..., or a password-like query item) replaced by ***."""
    return secrets.masked_url(url)


# ---------------------------------------------------------------- checks and what settings imply


def expand_user_paths(config: Config) -> Config:
    """'~' in a path setting means the home folder, as in a shell (which leaves --data-dir=~/x alone)."""
    paths = {key: os.path.expanduser(getattr(config, key)) for key in PATH_SETTINGS if getattr(config, key) is not None}
    return replace(config, **paths)


def is_bundled(config: Config) -> bool:
    """True when the run uses the bundled digits (no data folder configured)."""
    return config.data_dir is None and config.train_dir is None and config.test_dir is None


def augmentation(config: Config) -> data_setup.Augmentation:
    """Random-crop shift (scaled with the image size), flip and TrivialAugmentWide, as configured."""
    pad = round(config.crop_padding * config.image_size / 32)
    hflip = config.hflip == "on" or (config.hflip == "auto" and not is_bundled(config))
    return data_setup.Augmentation(pad=pad, hflip=hflip, trivialaugment=config.augment == "trivialaugment")


def kd_methods(config: Config) -> list[str]:
    """The distillation methods asked for, in order, each known and named once."""
    known = KD_engine.method_names()
    methods = [method.strip().lower() for method in config.kd_methods.split(",") if method.strip()]
    unknown = [method for method in methods if method not in known]
    if not methods or unknown or len(set(methods)) != len(methods):
        named = f": '{unknown[0]}' is not a method; it" if unknown else ""
        raise SettingsError(f"--kd-methods{named} must list distinct methods of {', '.join(known)} "
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


def layer_pairs(config: Config) -> list[tuple[str, str]] | None:
    """--feature-layers as (teacher layer, student layer) pairs; None: each feature method's own."""
    if config.feature_layers is None:
        return None
    try:
        return feature_maps.parse_feature_layers(config.feature_layers)
    except ValueError as error:
        raise SettingsError(f"--feature-layers: {error}") from None


def method_setup(config: Config, steps_per_epoch: int = 1, hard_loss: engine.HardLoss = F.cross_entropy,
                 train_labels: torch.Tensor | None = None) -> KD_engine.Setup:
    """What every distillation method of the run is told (see `methods.base.Setup`)."""
    try:
        archs = [model_builder.architecture_name(name) for name in (config.teacher_model, config.student_model)]
    except model_builder.UnknownModelError:
        archs = [config.teacher_model, config.student_model]  # validate() names the unknown model
    return KD_engine.Setup(config, *archs, image_size=config.image_size, epochs=config.student_epochs,
                           steps_per_epoch=steps_per_epoch, hard_loss=hard_loss, layer_pairs=layer_pairs(config),
                           train_labels=train_labels)


def image_budget_mb(config: Config) -> float:
    """The part of --memory-budget-mb left for decoded images once the chosen methods' memory per training image
    (`Method.memory_per_image`: CRD's memory bank) is counted against it, for every image (an upper bound: only
    training images have a bank row) and every method (as if their students trained at once)."""
    kept = sum(KD_engine.method_class(name).memory_per_image for name in kd_methods(config))
    pixels = 3 * config.image_size**2
    return config.memory_budget_mb * pixels / (pixels + kept)


def method_weights(config: Config) -> dict[str, Any]:
    """The weights each distillation method of the run resolved (per teacher / student pair where its reference
    has them), as config.json's `resolved` records them; each method is built once on the meta device, which
    also checks that it can distill these two models at this image size (layers, map shapes)."""
    teacher = model_builder.build_on_meta(config.teacher_model, 10, config.image_size)
    student = model_builder.build_on_meta(config.student_model, 10, config.image_size)
    setup, weights = method_setup(config), {}
    for name in kd_methods(config):
        method_class = KD_engine.method_class(name)
        try:
            with torch.device("meta"):
                method = method_class(teacher, student, setup)
        except ValueError as error:
            given_layers = " --feature-layers" if method_class.uses_features and config.feature_layers else ""
            raise SettingsError(f"--kd-methods {name}{given_layers}: {error}") from None
        method.close()
        for key, value in method.resolved_weights().items():
            weights[key] = {**weights[key], **value} if isinstance(value, dict) and key in weights else value
    return weights


def _range_checks(config: Config) -> list[tuple[bool, str]]:
    """(holds, the sentence when it does not) for every setting with a range."""
    smallest, largest = decoding.IMAGE_SIZES
    return [
        (config.temperature > 0, f"--temperature must be > 0 (got {config.temperature})."),
        (0 <= config.alpha <= 1, f"--alpha must be between 0 and 1 (got {config.alpha})."),
        (config.student_epochs >= 1, f"--student-epochs must be at least 1 (got {config.student_epochs})."),
        (config.teacher_epochs >= 0, f"--teacher-epochs must be at least 0 (got {config.teacher_epochs})."),
        (config.teacher_epochs > 0 or config.teacher_checkpoint is not None or config.teacher_weights is not None,
         "--teacher-epochs 0 uses the teacher as --teacher-weights gives it: give --teacher-weights, or train the "
         "teacher for at least 1 epoch."),
        (config.batch_size >= 1, f"--batch-size must be at least 1 (got {config.batch_size})."),
        (config.eval_batch_size >= 1, f"--eval-batch-size must be at least 1 (got {config.eval_batch_size})."),
        (smallest <= config.image_size <= largest,
         f"--image-size must be between {smallest} and {largest} (got {config.image_size})."),
        (config.teacher_lr > 0, f"--teacher-lr must be > 0 (got {config.teacher_lr})."),
        (config.student_lr > 0, f"--student-lr must be > 0 (got {config.student_lr})."),
        (config.weight_decay >= 0, f"--weight-decay must be >= 0 (got {config.weight_decay})."),
        (0 <= config.momentum < 1, f"--momentum must be in [0, 1) (got {config.momentum})."),
        (config.lr_decay > 0, f"--lr-decay must be > 0 (got {config.lr_decay})."),
        (config.warmup_epochs >= 0, f"--warmup-epochs must be >= 0 (got {config.warmup_epochs})."),
        (0 < config.val_fraction < 1, f"--val-fraction must be between 0 and 1 (got {config.val_fraction})."),
        (0 < config.test_fraction < 1, f"--test-fraction must be between 0 and 1 (got {config.test_fraction})."),
        (config.max_per_class is None or config.max_per_class >= 1,
         f"--max-per-class must be at least 1 (got {config.max_per_class})."),
        (config.crop_padding >= 0, f"--crop-padding must be >= 0 (got {config.crop_padding})."),
        (config.memory_budget_mb >= 0, f"--memory-budget-mb must be >= 0 (got {config.memory_budget_mb})."),
        (config.workers >= 0, f"--workers must be >= 0 (got {config.workers})."),
        ((config.patience or 0) >= 0, f"--patience must be >= 0 (got {config.patience})."),
        (0 <= config.label_smoothing < 1, f"--label-smoothing must be in [0, 1) (got {config.label_smoothing})."),
        (config.trials >= 1, f"--trials must be at least 1 (got {config.trials})."),
        (config.trials_per_pass >= 1, f"--trials-per-pass must be at least 1 (got {config.trials_per_pass})."),
        (config.prune_after is None or config.prune_after >= 1,
         f"--prune-after must be at least 1 epoch (got {config.prune_after})."),
        (config.sweep is not None or (config.study_storage is None and config.study_name is None),
         "--study-storage and --study-name name a sweep's study: give --sweep too."),
        (config.track == "mlflow" or (config.tracking_uri is None and config.experiment_name is None),
         "--tracking-uri and --experiment-name say where --track mlflow logs: give --track mlflow too."),
        (config.lockstep != "on" or config.compile != "on",
         "--lockstep on trains the students eagerly in one pass, where --compile on would compile each: give "
         "--lockstep off to compile them, or leave --compile at auto."),
        (config.sweep is None or not config.eval_test_every_epoch,
         "--eval-test-every-epoch cannot go with --sweep: a sweep's trials must not see the test split."),
        (not config.cache_teacher_logits or augmentation(config) == data_setup.Augmentation(0, False),
         "--cache-teacher-logits needs a deterministic training view: add --crop-padding 0 --hflip off --augment basic "
         "(with random augmentation the teacher must see each new view)."),
    ]


def _require_packages(config: Config) -> None:
    """Stop when an output the settings ask for needs a package that is not installed."""
    if config.export == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise SettingsError("--export onnx needs: pip install onnx onnxscript onnxruntime") from None
    if config.track == "mlflow":
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise SettingsError(f"--track mlflow needs MLflow, an optional package: {MLFLOW_INSTALL}") from None
    if config.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise SettingsError("--tensorboard needs the tensorboard package: pip install tensorboard") from None


def trained_epochs(config: Config) -> dict[str, int]:
    """The epochs of every model the run trains, by who it is ("the teacher", "each student")."""
    teacher_trains = config.teacher_checkpoint is None and config.teacher_epochs > 0
    return {**({"the teacher": config.teacher_epochs} if teacher_trains else {}), "each student": config.student_epochs}


def milestones(config: Config) -> list[int]:
    """The step schedule's milestones (none for the other schedules), checked against every trained model's epochs."""
    try:
        return schedules.checked_milestones(config.lr_schedule, config.milestones, config.warmup_epochs,
                                            trained_epochs(config))
    except ValueError as error:
        raise SettingsError(str(error)) from None


def validate(config: Config) -> None:
    """Stop with one clear sentence on a setting that cannot work, before any training."""
    for holds, sentence in _range_checks(config):
        if not holds:
            raise SettingsError(sentence)
    milestones(config)
    seeds(config)
    listed = kd_methods(config)
    for name in listed:
        method = KD_engine.method_class(name)
        for sentence in method.check(config):
            raise SettingsError(sentence)
        if config.loss_weights == base.ALPHA_MIX and method.same_under_alpha in listed:
            raise SettingsError(f"--kd-methods lists {method.same_under_alpha} and {name}, the same loss under "
                                f"--loss-weights alpha (they differ only under the references' weights): list one "
                                f"of them, or give --loss-weights reference.")
    _require_packages(config)
    for name in (config.teacher_model, config.student_model):
        try:
            model_builder.check_input_size(name, config.image_size)
        except ValueError as error:
            raise SettingsError(str(error)) from None
    method_weights(config)


def check_classes(config: Config, num_classes: int) -> None:
    """Stop with one sentence, before any training, where a chosen method cannot learn from the data's classes."""
    for name in kd_methods(config):
        for sentence in KD_engine.method_class(name).check_classes(num_classes):
            raise SettingsError(sentence)


def adopt_teacher_checkpoint(config: Config, checkpoint: dict[str, Any], given: set[str] | None) -> Config:
    """The teacher's architecture, image size and resize mode come from its checkpoint (normalization
    too, see `trainer.normalization`); a setting the user gave (`given`; None: every setting) that
    says otherwise is refused. Checkpoints written before --resize existed were squashed."""
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


def adopted_settings(config: Config, checkpoint: dict[str, Any]) -> str:
    """One line naming every setting a reused teacher's checkpoint decides, with the values the run takes."""
    mean, std = (", ".join(f"{value:.3g}" for value in checkpoint[key]) for key in ("mean", "std"))
    return (f"The teacher checkpoint '{config.teacher_checkpoint}' sets --teacher-model {config.teacher_model}, "
            f"--image-size {config.image_size}, --resize {config.resize} and the input normalization (mean {mean}; "
            f"std {std}).")


def check_output_dir(config: Config, resume: bool) -> None:
    """Refuse to start a new run in a folder that already holds one."""
    if not resume and config.output_dir is not None and (Path(config.output_dir) / "config.json").is_file():
        raise SettingsError(f"'{config.output_dir}' already holds a run: choose another --output-dir, "
                            f"or continue that run with --resume {config.output_dir}")
