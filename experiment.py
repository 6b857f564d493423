"""Train a teacher, a baseline student and a distilled student, and report what distillation bought.

Usage: python experiment.py [flags]        (python experiment.py --help lists them)

Edit the constants below to change the defaults, or pass the matching flags.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

import data_setup
import engine
import model_builder
import utils
from config import command_line, settings
from core import compute, errors, plots, records
from results import comparisons, deploy, evaluation, ledger, report, significance, tracking
from sweep import search
from training import checkpoints, lockstep, model_run

# ---------------------------------------------------------------- settings (edit, or pass flags)
DATA_DIR: str | None = None  # a folder holding train/ [val/] test/; None: the bundled digits
TRAIN_DIR: str | None = None  # per-split folders override DATA_DIR's
VAL_DIR: str | None = None  # without a val folder, validation is carved out of train
TEST_DIR: str | None = None
OUTPUT_DIR: str | None = None  # None: runs/<timestamp>
TEACHER_MODEL = "VGG16"  # also the KD literature's small-image networks (resnet32x4, ...) or any torchvision classifier
STUDENT_MODEL = "ResNet18"
TEACHER_CHECKPOINT: str | None = None  # a trained teacher's best_model.pth: skips teacher training
TEACHER_WEIGHTS: str | None = None  # the teacher's start: a torchvision weights name (DEFAULT, ...) or a weights file
STUDENT_WEIGHTS: str | None = None  # the same for every student (baseline and distilled alike); None: random
TEACHER_EPOCHS = 6
STUDENT_EPOCHS = 3
PATIENCE: int | None = None  # stop a model after this many epochs without a better validation SELECT_METRIC; None: off
SELECT_METRIC = "top1"  # validation metric that picks each model's best epoch: top1, loss or f1_macro
LABEL_SMOOTHING = 0.0  # label smoothing of every model's hard-label CE term (never of the distillation term)
CLASS_WEIGHTS = "none"  # none, or balanced: CE class weights n_images / (n_classes * images of the class), from train
OPTIMIZER = "adamw"  # adamw, or sgd (with Nesterov momentum)
TEACHER_LR = 2e-3  # peak learning rate of the one-cycle schedule (try 0.05 with sgd)
STUDENT_LR = 2e-3
WEIGHT_DECAY = 0.05  # decoupled for adamw; try 5e-4 with sgd
MOMENTUM = 0.9  # sgd only
NESTEROV = True  # sgd: Nesterov momentum; False: classical momentum, as the KD references train
LR_SCHEDULE = "onecycle"  # onecycle (per step), step (per epoch, at MILESTONES) or cosine (per epoch, down to 0)
MILESTONES: str | None = None  # step: epochs after which the rate is multiplied by LR_DECAY, e.g. "150,180,210"
LR_DECAY = 0.1  # step: the factor at each milestone
WARMUP_EPOCHS = 0  # step and cosine: epochs of linear warm-up
BATCH_SIZE = 32  # images per optimizer step (small data learns more per epoch from more steps)
EVAL_BATCH_SIZE = 256  # images per evaluation forward pass (larger is faster; no gradients kept)
IMAGE_SIZE = 32  # pixels; images are resized to IMAGE_SIZE x IMAGE_SIZE
T = 4.0  # distillation temperature
ALPHA = 0.5  # weight of the hard-label CE term; (1 - ALPHA) weighs the distillation term
LOSS_WEIGHTS = "alpha"  # alpha: every method's loss mixed by ALPHA; reference: each method at its reference's weights
KD_METHODS = "kd"  # comma-separated, one distilled student each: kd (Hinton), fitnet, dkd, at, dist, kd_ls, dkd_ls,
# dist_ls, reviewkd (python experiment.py --help lists them all)
# Each method's own settings (--dkd-beta, --beta, ...) default to its reference's values, declared in its file in
# methods/; a constant named after the flag (DKD_BETA = 6.0) here overrides that default.
SEEDS: str | None = None  # e.g. "0,1,2": repeat every student per seed (teacher once); None: SEED only
COMPARISON_CORRECTION = "holm"  # holm or none: how several distilled students' head-to-head p-values are corrected
SWEEP: str | None = None  # e.g. "temperature=1:10:log,alpha=0.1:0.9": search them with Optuna (see sweep/search.py)
TRIALS = 20  # trials of a sweep, over all its workers
TRIALS_PER_PASS = 1  # trials a sweep's worker trains in one pass over the data (see docs/sweeps.md)
PRUNE_AFTER: int | None = None  # epochs a sweep's trial trains before the pruner may stop it; None: half its epochs
STUDY_STORAGE: str | None = None  # a sweep's shared study: RDB URL or journal file; None: RUN/sweep.db
STUDY_NAME: str | None = None  # the study's name in STUDY_STORAGE; None: the run directory's name
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
COMPILE = "auto"  # torch.compile each training step: on, off, or auto (long CUDA runs; see compute.resolve_compile)
LOCKSTEP = "auto"  # students of a seed trained in one pass, the teacher run once per batch: auto, on or off
EVAL_TEST_EVERY_EPOCH = False  # also record test top-1 after every epoch (papers' figures); selection stays on val
TENSORBOARD = False  # also write TensorBoard scalars under RUN/tensorboard/<model>
EXPORT = "none"  # none, or onnx: write RUN/<model>/model.onnx, checked against PyTorch
TRACK = "off"  # off, or mlflow: also log every run to MLflow (pip install -r requirements-dev.txt; docs/tracking.md)
TRACKING_URI: str | None = None  # an MLflow server (http://host:5000); None: $MLFLOW_TRACKING_URI, else runs/mlflow.db
EXPERIMENT_NAME: str | None = None  # the MLflow experiment; None: the data's name


def default_config() -> settings.Config:
    """The constants above as settings, read when called: a constant edited (or patched) is the new default."""
    return settings.Config.from_constants(globals())


# ---------------------------------------------------------------- the run


def run_experiment(
    config: settings.Config, resume: bool = False, given: set[str] | None = None,
) -> records.RunSummary | None:
    """The whole pipeline: data, teacher, baseline student, distilled students, reports.

    With `resume`, `config.output_dir` is an interrupted run: finished models are kept and the
    model in training continues after its last finished epoch. `given` names the settings the
    user set explicitly (None: all of them); a teacher checkpoint supplies the others it decides.
    Everything that can be checked is checked before the run directory is made. Returns the
    summary (None on the ranks of a torchrun job other than rank 0).
    """
    start = time.perf_counter()
    config, teacher_checkpoint = checked_settings(config, given)
    context, dataset = prepare_run(config, teacher_checkpoint, start, resume)
    try:
        with context.saver:  # every checkpoint is on disk before the run ends, however it ends
            teacher, teacher_row = obtain_teacher(context, teacher_checkpoint)
            students = train_students(context, teacher)
            if not compute.is_main_process():
                return None
            summary = summarize(context, dataset, teacher_row, students)
            publish(context, summary)
            return summary
    except KeyboardInterrupt as stop:
        if compute.is_main_process():
            context.clock.record()  # the stopped sitting counts up to now
        raise checkpoints.Interrupted(context.run_dir, checkpoints.stop_signal(stop)) from None


def run_sweep(
    config: settings.Config, resume: bool = False, given: set[str] | None = None,
) -> records.RunSummary | None:
    """--sweep: the teacher once, one distilled student per trial judged on the validation split, then the
    best trial's student tested against a baseline trained with its settings and seed, reported as a run is.

    Workers given the same --study-storage and --output-dir share the study and the run directory (see
    sweep/search.py); the first to find every trial finished writes the report and returns the summary (the others
    None).
    """
    start = time.perf_counter()
    config, teacher_checkpoint = checked_settings(config, given)
    config, plan = search.prepare(config)
    joining = not resume and search.joins_run(config, plan)  # another worker made the run directory
    context, dataset = prepare_run(config, teacher_checkpoint, start, resume or joining, joining)
    kept = evaluation.RESUMED_KEPT if resume else search.JOINED_KEPT  # a new sitting finding a teacher: a worker's
    try:
        with context.saver, search.Worker(context, plan, dataset) as worker:
            teacher, teacher_row = worker.study.once("teacher", functools.partial(obtain_teacher, context,
                                                                                   teacher_checkpoint, kept))
            best = worker.run_trials(teacher)
            with worker.study.exclusive("report"):
                if worker.outcome.reported():
                    return None
                students = train_students(best.context, teacher, adopt_best_student(best.context, best.folder))
                summary = summarize(best.context, dataset, teacher_row, students)
                worker.outcome.complete(summary, best)
                publish(best.context, summary)
                return summary
    except KeyboardInterrupt as stop:
        if compute.is_main_process():
            context.clock.record()  # the stopped sitting counts up to now
        raise checkpoints.Interrupted(context.run_dir, checkpoints.stop_signal(stop)) from None


def prepare_run(
    config: settings.Config, teacher_checkpoint: dict[str, Any] | None, start: float, resume: bool,
    joining: bool = False,
) -> tuple[model_run.Context, records.DatasetRecord]:
    """Everything before the first model: initial weights, processes, data (checked), the run directory and
    config.json (`start`: when this sitting began; `joining`: a sweep's worker joining the run directory another
    made). Returns the run's context and its data's record."""
    pretrained = model_run.read_initial_weights(config)
    settings.check_output_dir(config, resume)
    device, amp_dtype, world = start_processes(config)
    data = load_data(config, device)
    settings.check_classes(config, len(data.class_names))
    model_run.check_initial_weights(config, pretrained, len(data.class_names))
    if teacher_checkpoint is not None:
        checkpoints.check_teacher_fits(config.teacher_checkpoint, teacher_checkpoint, data.class_names)
    data.mean, data.std, normalization = model_builder.input_normalization(teacher_checkpoint, pretrained,
                                                                           (data.mean, data.std))
    class_weights = engine.class_weights(data.train.labels, len(data.class_names)) \
        if config.class_weights == "balanced" else None
    context = make_context(config, data, device, amp_dtype, evaluation.make_run_dir(config.output_dir), pretrained,
                           class_weights, start, resume)
    dataset = data_setup.describe(data, normalization, class_weights)
    announce(context, dataset, world, resume, joining)
    return tracking.attach(context), dataset


def checked_settings(
    config: settings.Config, given: set[str] | None,
) -> tuple[settings.Config, dict[str, Any] | None]:
    """The run's settings, with '~' expanded and what a reused teacher's checkpoint decides, all checked;
    and that checkpoint, read (None without --teacher-checkpoint)."""
    config = settings.expand_user_paths(config)
    if config.teacher_weights is not None and config.teacher_checkpoint is not None:
        raise errors.SettingsError("--teacher-weights starts a teacher's training, but --teacher-checkpoint skips it: "
                                   "give one of them.")
    teacher_checkpoint = None
    if config.teacher_checkpoint is not None:
        teacher_checkpoint = checkpoints.read_teacher_checkpoint(config.teacher_checkpoint)
        config = settings.adopt_teacher_checkpoint(config, teacher_checkpoint, given)
        if compute.is_main_process():
            print(settings.adopted_settings(config, teacher_checkpoint))
    settings.validate(config)
    return config, teacher_checkpoint


def start_processes(config: settings.Config) -> tuple[torch.device, torch.dtype | None, int]:
    """The run's device and precision, and its number of processes (joining torchrun's group)."""
    try:
        device = compute.resolve_device(config.device)
    except (RuntimeError, ValueError) as error:
        raise errors.SettingsError(f"--device {config.device!r} is not usable: {error}") from None
    _, world, local_rank = compute.init_distributed()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    compute.enable_autotuning(device)
    return device, compute.resolve_amp_dtype(config.precision, device), world


def load_data(config: settings.Config, device: torch.device) -> data_setup.DatasetSplits:
    """The run's train / val / test splits, checked and decoded."""
    return data_setup.load_splits(data_setup.DataDescription(
        data_dir=config.data_dir, train_dir=config.train_dir, val_dir=config.val_dir, test_dir=config.test_dir,
        image_size=config.image_size, val_fraction=config.val_fraction, seed=config.seed,
        test_fraction=config.test_fraction, max_per_class=config.max_per_class, resize=config.resize,
        memory_budget_mb=settings.image_budget_mb(config), workers=config.workers,
        cache_dir=data_setup.DEFAULT_CACHE_DIR if config.decode_cache else None, decode_device=device,
    ))


def make_context(
    config: settings.Config, data: data_setup.DatasetSplits, device: torch.device, amp_dtype: torch.dtype | None,
    run_dir: Path, pretrained: dict[str, model_builder.Pretrained], class_weights: list[float] | None,
    start: float, resume: bool,
) -> model_run.Context:
    """What every model of the run shares, with an evaluation loader per split, and the clock of the run's
    sittings (this one began at `start`; `resume`: earlier ones count too)."""
    shard = compute.rank_and_world()
    eval_loaders = {split: data_setup.BatchLoader(getattr(data, split), config.eval_batch_size, data.mean, data.std,
                                                  device, workers=config.workers, shard=shard)
                    for split in records.SPLITS}
    return model_run.Context(config, data, device, amp_dtype, run_dir, eval_loaders, checkpoints.BackgroundSaver(),
                           checkpoints.Sittings(run_dir, start, resume), pretrained,
                           engine.hard_label_loss(config.label_smoothing, class_weights, device))


def announce(
    context: model_run.Context, dataset: records.DatasetRecord, world: int, resume: bool, joining: bool = False,
) -> None:
    """Write config.json (a new run) or clear what an interrupted write left (a resumed one; not when `joining`
    a sweep's run directory, where the other workers' writes are under way), say what the run is about to do,
    and list the skipped files (rank 0 alone)."""
    if not compute.is_main_process():
        return
    config, data, run_dir = context.config, context.data, context.run_dir
    precision = compute.precision_name(context.amp_dtype)
    orphans = utils.remove_orphans(run_dir) if resume and not joining else []
    if orphans:
        print(f"Removed {len(orphans)} unfinished temporary file{'s' if len(orphans) > 1 else ''} that the "
              f"interruption left ({', '.join(str(path.relative_to(run_dir)) for path in orphans[:3])}"
              f"{', ...' if len(orphans) > 3 else ''}).")
    if not resume:
        resolved = {"device": str(context.device), "precision": precision, "processes": world,
                    **settings.method_weights(config)}
        evaluation.write_run_config(run_dir, config, resolved, dataset)
    opening = "Joining the sweep's run directory" if joining else "Resuming the run in" if resume else "Run directory:"
    print(f"{opening} {run_dir}  |  device {context.device}, "
          f"{precision}, {world} process{'es' if world > 1 else ''}  |  {len(data.class_names)} classes, "
          f"train/val/test = {len(data.train)}/{len(data.val)}/{len(data.test)} images")
    evaluation.write_skipped_files(run_dir, data.skipped_files)
    peer = deploy.peer_flops(config.student_model, len(data.class_names), config.image_size)
    if peer is not None:
        print(f"note: {significance.peer_sentence(peer)}")


def obtain_teacher(
    context: model_run.Context, checkpoint: dict[str, Any] | None, kept: str = evaluation.RESUMED_KEPT,
) -> tuple[nn.Module, records.ModelRow]:
    """The teacher (kept from an interrupted run, loaded from --teacher-checkpoint or --teacher-weights, or trained)
    and its row (`kept`: why an existing one was kept, as evaluation.finished_row says it)."""
    config, folder = context.config, context.run_dir / records.TEACHER
    row = evaluation.finished_row(folder, records.TEACHER, kept)
    if row is not None:
        path = folder / checkpoints.BEST_MODEL
        return model_run.load_model(context, checkpoints.read_state(path), path), row
    if checkpoint is not None:
        teacher, row = adopt_checkpoint(context, records.TEACHER, checkpoint, folder, config.teacher_checkpoint)
        if compute.is_main_process():
            print(f"[teacher] reused from {config.teacher_checkpoint} (epoch {checkpoint['epoch']})")
        return teacher, replace(row, reused_from=str(config.teacher_checkpoint))
    arch = model_builder.architecture_name(config.teacher_model)
    if config.teacher_epochs == 0:  # --teacher-weights as they are: evaluated and reported, never trained
        teacher, fit = model_run.model_as_loaded(context, records.TEACHER, arch, folder)
    else:
        teacher, fit = model_run.train_model(context, records.TEACHER, arch, config.teacher_epochs, config.teacher_lr,
                                           functools.partial(model_run.supervised_criterion, context), folder,
                                           config.seed)
    return teacher, evaluation.evaluate_model(context, records.TEACHER, arch, teacher, fit, folder)


def adopt_checkpoint(
    context: model_run.Context, role: str, checkpoint: dict[str, Any], folder: Path, path: str | Path | None = None,
    train_seconds: float = 0.0,
) -> tuple[nn.Module, records.ModelRow]:
    """A model trained elsewhere (a reused teacher, a sweep's best trial; `path`: its file, named in errors) as
    this run's `role`: its checkpoint saved in `folder` with this run's description, then evaluated and reported
    as a trained model is."""
    model = model_run.load_model(context, checkpoint, path)
    fit = engine.FitResult(history=checkpoint.get("history", []), best_epoch=checkpoint["epoch"],
                           train_seconds=train_seconds)
    context.save_as_best(folder, role, checkpoint["arch"], model, fit)
    return model, evaluation.evaluate_model(context, role, checkpoint["arch"], model, fit, folder)


Students = dict[str, dict[int, tuple[records.ModelRow, Path]]]  # role -> seed -> (its row, its folder)


def train_students(context: model_run.Context, teacher: nn.Module, kept: Students | None = None) -> Students:
    """Every student of the run, per seed: trained and reported (a seed's students in one pass, see
    training/lockstep.py), kept from an interrupted run, or in `kept`."""
    config = context.config
    arch = model_builder.architecture_name(config.student_model)
    frozen_teacher, teacher_logits = model_run.distillation_teacher(context, teacher)
    seeds = settings.seeds(config)
    students: Students = {role: dict((kept or {}).get(role, {}))
                          for role in records.student_roles(settings.kd_methods(config))}
    for seed in seeds:
        pending, roles = [], {}
        for role in students:
            if seed in students[role]:
                continue
            folder = records.model_folder(context.run_dir, role, seed, seeds)
            name = records.model_name(role, seed, seeds)
            row = evaluation.finished_row(folder, name)
            if row is None:
                criterion, cached = model_run.student_criterion(context, role, frozen_teacher, teacher_logits)
                pending.append(lockstep.Student(name, folder, criterion, cached))
                roles[name] = role
            else:
                students[role][seed] = (row, folder)

        def report(student: lockstep.Student, model: nn.Module, fit: engine.FitResult, seed: int = seed,
                   roles: dict[str, str] = roles) -> None:
            row = evaluation.evaluate_model(context, student.name, arch, model, fit, student.folder)
            students[roles[student.name]][seed] = (row, student.folder)

        lockstep.train_students(context, arch, seed, pending, report)
    return students


def adopt_best_student(context: model_run.Context, trial_folder: Path) -> Students:
    """A sweep's best trial's student (trained on `trial_folder`) as the first seed's distilled student of the
    run: tested once, now, and reported as a trained student is."""
    role = records.distilled_role(settings.kd_methods(context.config)[0])
    seed = settings.seeds(context.config)[0]
    folder = context.run_dir / role
    row = evaluation.finished_row(folder, role)
    if row is None:
        path = trial_folder / checkpoints.BEST_MODEL
        checkpoint = checkpoints.read_state(path)
        seconds = sum(epoch.get("seconds", 0.0) for epoch in checkpoint.get("history", []))
        row = adopt_checkpoint(context, role, checkpoint, folder, path, seconds)[1]
    return {role: {seed: (row, folder)}}


def summarize(
    context: model_run.Context, dataset: records.DatasetRecord, teacher_row: records.ModelRow, students: Students,
) -> records.RunSummary:
    """Every model's row with its seed spread, gain verdict and deployment speed, and the run's warnings.

    The wall time counts every sitting of a resumed run (`context.clock`)."""
    config, run_dir = context.config, context.run_dir
    seeds = settings.seeds(config)
    rows = {role: {seed: row for seed, (row, _) in by_seed.items()} for role, by_seed in students.items()}
    correct = {role: {seed: evaluation.read_test_correct(folder) for seed, (_, folder) in by_seed.items()}
               for role, by_seed in students.items()}
    models = {records.TEACHER: replace(teacher_row, **significance.teacher_against_baseline(
        evaluation.read_test_correct(run_dir / records.TEACHER), rows[records.BASELINE], correct[records.BASELINE],
        teacher_row.test["top1"]))}
    peer = deploy.peer_flops(config.student_model, len(dataset.class_names), config.image_size)
    for role, by_seed in rows.items():
        statistics = {} if role == records.BASELINE else significance.gain_statistics(
            by_seed, rows[records.BASELINE], correct[role], correct[records.BASELINE])
        models[role] = replace(by_seed[seeds[0]], **significance.top1_spread(by_seed), **statistics, flops_peer=peer)
    folders = {records.TEACHER: run_dir / records.TEACHER, **{role: students[role][seeds[0]][1] for role in students}}
    speeds = deploy.measure_saved_models(folders, config.image_size, context.device, context.amp_dtype,
                                         records.TEACHER)
    models = {role: replace(row, **speeds[role]) for role, row in models.items()}
    clock = context.clock
    summary = records.RunSummary(
        models=models, seeds=seeds, skipped_files=context.data.skipped_files, dataset=dataset,
        device=str(context.device), precision=compute.precision_name(context.amp_dtype),
        wall_seconds=round(clock.total(), 2), wall_seconds_last_sitting=round(clock.last(), 2),
        sittings=clock.count(), finished_at=datetime.now().isoformat(timespec="seconds"),
        **significance.headline_gain(models, dataset),
        comparisons=comparisons.head_to_head(correct, seeds, config.comparison_correction),
    )
    named = {records.model_name(role, seed, seeds): (row, folder)
             for seed in seeds for role, by_seed in students.items() for row, folder in [by_seed[seed]]}
    named = {records.TEACHER: (teacher_row, run_dir / records.TEACHER), **named}
    summary.label_test_figures()
    summary.warnings = significance.sanity_warnings(
        summary, {name: utils.read_json(folder / "history.json") for name, (_, folder) in named.items()},
        {name: row for name, (row, _) in named.items()}, config.select_metric)
    return summary


def publish(context: model_run.Context, summary: records.RunSummary) -> None:
    """Write summary.json, the comparison table and chart, the HTML report and the ledger row; send the run to
    MLflow (--track mlflow); print the tables."""
    run_dir = context.run_dir
    table = report.comparison_table(summary) + "\n" + report.deployment_table(summary)
    context.clock.record()
    utils.write_json(run_dir / "summary.json", summary.to_dict())
    utils.write_text(run_dir / "comparison.txt", table + report.head_to_head_text(summary))
    plots.plot_comparison({role: row.test for role, row in summary.models.items()},
                          {role: row.params for role, row in summary.models.items()}, run_dir / "comparison.png",
                          len(summary.dataset.class_names))
    html = report.write_report(run_dir)
    ledger_path = run_dir.parent / "experiments.csv"
    ledger.append_ledger(ledger_path, ledger.ledger_row(context.config, summary, run_dir))
    tracking.finish(context)
    warnings = "".join(f"warning: {warning}\n" for warning in summary.warnings)
    print("\n" + table + report.head_to_head_text(summary, every_pair=False) + warnings
          + f"Wall time {report.wall_time(summary)}. Results in {run_dir}, "
          f"report {html}, ledger {ledger_path}")


# ---------------------------------------------------------------- entry points


def rebuild_report(run_dir: str, correction: str | None = None) -> None:
    """--report-only: compare the students head to head again from their results.json files (`correction`: the
    --comparison-correction given, else the run's own), update summary.json's `comparisons`, and write
    RUN/report.html again, without training."""
    if not (Path(run_dir) / "summary.json").is_file():
        raise errors.SettingsError(f"--report-only '{run_dir}' is not a finished run directory (no summary.json).")
    try:
        refresh_comparisons(Path(run_dir), correction)
        path = report.write_report(run_dir)
    except ValueError as error:
        raise errors.SettingsError(f"--report-only '{run_dir}': {error}.") from None
    print(f"Report written: {path}")


def refresh_comparisons(run_dir: Path, correction: str | None) -> None:
    """Recompute summary.json's head-to-head `comparisons` from the students' results.json files and print them;
    a run of fewer than two distilled students has none. ValueError naming a file that cannot serve."""
    data = report.read_run_file(run_dir / "summary.json")
    summary = records.RunSummary.from_dict(data, str(run_dir / "summary.json"))
    students = [role for role in summary.models if role != records.TEACHER]
    if not comparisons.several_distilled(students):
        return
    saved = report.read_run_file(run_dir / "config.json").get("comparison_correction")
    if correction is None:  # a run made before the setting existed takes the default
        correction = saved if saved in records.COMPARISON_CORRECTIONS else default_config().comparison_correction
    summary.comparisons = comparisons.compare_run(run_dir, students, summary.seeds, correction)
    utils.write_json(run_dir / "summary.json", {**data, "comparisons": summary.comparisons.to_dict()})
    print(report.head_to_head_text(summary, every_pair=False).lstrip("\n"), end="")


def layer_list(model: str, image_size: int) -> str:
    """--list-layers: the layers of a model and their output shapes (SettingsError for a model or size that fails)."""
    try:
        return model_builder.layer_table(model, image_size)
    except ValueError as error:
        raise errors.SettingsError(str(error)) from None


def run_command(argv: list[str] | None) -> None:
    """What the command line asks for: rebuild a report, send a run to MLflow, list layers, resume a run or a
    sweep, or start one."""
    parser, args, given = command_line.parse_command_line(argv, default_config())
    report_only, resume = (None if path is None else os.path.expanduser(path)
                           for path in (args.pop("report_only"), args.pop("resume")))
    list_layers, track_sync = args.pop("list_layers"), args.pop("track_sync")
    args.pop("config")
    if report_only is not None:
        rebuild_report(report_only, args["comparison_correction"] if "comparison_correction" in given else None)
    elif track_sync is not None:
        print(tracking.sync_finished_run(Path(os.path.expanduser(track_sync)),
                                         *(args[key] if key in given else None
                                           for key in ("tracking_uri", "experiment_name"))))
    elif list_layers is not None:
        print(layer_list(list_layers, args["image_size"]), end="")
    elif resume is not None:
        storage = args.pop("study_storage")  # a sweep's storage may be given again: its password is never saved
        config = command_line.resumed_config(resume, args, parser)
        if config is not None:
            config = search.resumed_storage(config, storage)
            (run_sweep if config.sweep is not None else run_experiment)(config, resume=True, given=given)
    else:
        config = settings.Config(**args)
        (run_sweep if config.sweep is not None else run_experiment)(config, given=given)


def main(argv: list[str] | None = None) -> int:
    """Run the command line, and turn user errors into one sentence and exit code 2.

    Ctrl-C stops the run with exit code 130 and says how to resume it; a NaN or infinite loss
    stops it with exit code 1.
    """
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    checkpoints.handle_stop_signals()
    try:
        run_command(argv)
    except (errors.SettingsError, errors.DataError, model_builder.UnknownModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except engine.NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except checkpoints.Interrupted as interrupted:
        if compute.is_main_process():
            print(f"\nInterrupted ({signal.Signals(interrupted.signum).name}). Every finished epoch is saved; "
                  f"continue with: python experiment.py --resume {interrupted.run_dir}", file=sys.stderr)
        return 128 + interrupted.signum
    except KeyboardInterrupt as stop:
        signum = checkpoints.stop_signal(stop)
        print(f"\nInterrupted ({signal.Signals(signum).name}) before any training: nothing to resume.", file=sys.stderr)
        return 128 + signum
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm_handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
