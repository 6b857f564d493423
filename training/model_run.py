"""Training one model of a run: its start (seeded, or from pretrained weights), its optimizer and
schedule, its criterion, and `engine.fit` with a checkpoint after every epoch so an interrupted
run continues where it stopped.

What every model of a run shares (settings, data, device, output folder) travels in a `Context`.
"""

from __future__ import annotations

import copy
import functools
import random
from dataclasses import dataclass, field
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
from config import settings
from core import compute, host_weights, records, schedules
from core.errors import SettingsError
from training import checkpoints, init_stage


@dataclass
class Context:
    """What every model of a run shares: settings, data, device and output folder."""

    config: settings.Config
    data: data_setup.DatasetSplits
    device: torch.device
    amp_dtype: torch.dtype | None
    run_dir: Path
    eval_loaders: dict[str, data_setup.BatchLoader]
    saver: checkpoints.BackgroundSaver  # writes the per-epoch checkpoints while training goes on
    clock: checkpoints.Sittings  # the run's wall time over its sittings, recorded after every epoch
    pretrained: dict[str, model_builder.Pretrained] = field(default_factory=dict)  # see read_initial_weights
    hard_loss: engine.HardLoss = F.cross_entropy  # every model's hard-label term
    # A model's epoch callback by its name, beside the run's files (e.g. an experiment tracker); None: none.
    epoch_observer: Callable[[str], EpochLog | None] = lambda name: None

    def train_loader(self, seed: int, teacher_logits: torch.Tensor | None = None) -> data_setup.BatchLoader:
        """A fresh training loader: the same seed gives every model the same batches; `teacher_logits`
        (one row per training image) go with each batch to the criterion.

        Under torchrun every rank takes its shard of each epoch: --batch-size is per process.
        """
        config = self.config
        loader = data_setup.BatchLoader(
            self.data.train, config.batch_size, self.data.mean, self.data.std, self.device,
            settings.augmentation(config), seed=seed, workers=config.workers, shard=compute.rank_and_world(),
            balanced=config.balanced_sampler,
        )
        if teacher_logits is not None:
            loader.teacher_logits = teacher_logits.to(self.device)
        return loader

    def save_epoch_files(self, files: dict[Path, dict[str, Any]]) -> None:
        """Hand one epoch's checkpoints to the background writer, and record the run's wall time."""
        self.saver.save(files)
        self.clock.record()

    def description(self) -> dict[str, Any]:
        """What a checkpoint of this run records beside its weights (see `checkpoints.make_checkpoint`)."""
        return {"class_names": self.data.class_names, "image_size": self.config.image_size,
                "resize": self.config.resize, "mean": self.data.mean, "std": self.data.std,
                "config": settings.saved_config(self.config)}

    def save_as_best(self, folder: Path, role: str, arch: str, model: nn.Module, fit: engine.FitResult) -> None:
        """Save `model` as `folder`'s best_model.pth, of epoch `fit.best_epoch` with `fit.history` (rank 0 only)."""
        if compute.is_main_process():
            checkpoints.save_checkpoint(folder / checkpoints.BEST_MODEL, checkpoints.make_checkpoint(
                self.description(), role, arch, checkpoints.model_weights(model), fit.best_epoch, fit.history,
                checkpoints.head_of(model)))

    def initial_weights(self, role: str) -> model_builder.Pretrained | None:
        """The weights a model of this role starts from (the teacher's, or the students' shared ones), if any."""
        return self.pretrained.get("teacher" if role == records.TEACHER else "student")


def batch_stream(config: settings.Config) -> tuple[Any, ...]:
    """What a training loader's batches are made of besides the seed (see `Context.train_loader`): models whose
    settings give the same one draw the same batches, so they can share a lockstep pass."""
    return config.batch_size, config.image_size, config.balanced_sampler, settings.augmentation(config)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a run can be repeated exactly on the CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- where a model starts


def read_initial_weights(config: settings.Config) -> dict[str, model_builder.Pretrained]:
    """--teacher-weights and --student-weights, read before any work ("teacher" / "student"; absent: random start);
    SettingsError naming every one that cannot be read, or whose normalization is unusable."""
    requested = {role: (arch, setting) for role, arch, setting in (
        ("teacher", config.teacher_model, config.teacher_weights),
        ("student", config.student_model, config.student_weights)) if setting is not None}
    try:
        weights = model_builder.read_initial_weights(requested)
    except model_builder.WeightsError as error:
        raise SettingsError(str(error)) from None
    for pretrained in weights.values():
        if pretrained.mean is not None:  # e.g. a run's checkpoint as weights: the run uses its normalization
            checkpoints.check_description(pretrained.file, {"mean": pretrained.mean, "std": pretrained.std},
                                          required=())
    return weights


def check_initial_weights(
    config: settings.Config, weights: dict[str, model_builder.Pretrained], num_classes: int,
) -> None:
    """Stop when initial weights fit no layer of their model; say which layers they leave re-initialized."""
    archs = {"teacher": config.teacher_model, "student": config.student_model}
    try:
        fits = model_builder.check_initial_weights(weights, archs, num_classes, config.image_size,
                                                   ("teacher",) if config.teacher_epochs == 0 else ())
    except model_builder.WeightsError as error:
        raise SettingsError(str(error)) from None
    if compute.is_main_process():
        for role, record in fits.items():
            print(model_builder.fit_sentence(role, record))


# ---------------------------------------------------------------- one model


def place_model(context: Context, model: nn.Module) -> nn.Module:
    """A model on the run's device in channels_last, wrapped for torchrun's processes. (With --compile,
    `train_model` compiles its training step, the model inside.)"""
    model = model.to(context.device, memory_format=torch.channels_last)
    if compute.rank_and_world()[1] > 1:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def new_model(
    context: Context, arch: str, seed: int, pretrained: model_builder.Pretrained | None = None,
) -> nn.Module:
    """An untrained model on the run's device (seeded, so students of one seed start identical),
    starting from `pretrained` where its tensors fit (see `place_model`), with the head that suits
    its start (`model_builder.default_head`)."""
    seed_everything(seed)
    model = model_builder.build_model(arch, len(context.data.class_names), context.config.image_size,
                                      model_builder.default_head(pretrained))
    if pretrained is not None:
        model_builder.load_pretrained(model, pretrained)
    return place_model(context, model)


def model_as_loaded(context: Context, role: str, arch: str, folder: Path) -> tuple[nn.Module, engine.FitResult]:
    """A model that is not trained (the teacher with --teacher-epochs 0): its initial weights as they are, saved
    as its best_model.pth of epoch 0, with an empty history."""
    model = new_model(context, arch, context.config.seed, context.initial_weights(role))
    fit = engine.FitResult()
    context.save_as_best(folder, role, arch, model, fit)
    return model, fit


def load_model(context: Context, checkpoint: dict[str, Any], path: str | Path | None = None) -> nn.Module:
    """A trained model rebuilt from its checkpoint (`checkpoints.load_model`; `path`, the file it was read
    from, names it in errors), placed as the run's models are."""
    return place_model(context, checkpoints.load_model(checkpoint, path))


def make_optimizer(
    config: settings.Config, model: nn.Module, lr: float, criterion: engine.Criterion,
) -> torch.optim.Optimizer:
    """The optimizer for the model's parameters and the criterion's own trainable part, if any
    (e.g. FitNets' regressor); a teacher's parameters never reach one."""
    parameters = list(model.parameters())
    if criterion.trainable is not None:
        parameters += list(criterion.trainable.parameters())
    return optimizer_for(config, parameters, lr)


def optimizer_for(config: settings.Config, parameters: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The run's optimizer (--optimizer at its momentum and weight decay) over `parameters`."""
    # One fused kernel per step rather than a chain of element-wise passes over every weight (about half
    # the optimizer's time on the CPU); offered on CPU and CUDA.
    fused = parameters[0].device.type in ("cpu", "cuda")
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay,
                               fused=fused)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay, fused=fused)


def supervised_criterion(context: Context, model: nn.Module, steps_per_epoch: int) -> engine.Criterion:
    """The hard-label loss alone (the teacher's and the baseline's), smoothed / class-weighted as set."""
    return engine.SupervisedCriterion(context.hard_loss)


def distillation_criterion(
    context: Context, method: str, teacher: nn.Module, student: nn.Module, steps_per_epoch: int,
) -> engine.Criterion:
    """The distillation step of one method, from the run's settings."""
    setup = settings.method_setup(context.config, steps_per_epoch, context.hard_loss, context.data.train.labels)
    return KD_engine.make_criterion(method, teacher, student, setup)


def student_criterion(
    context: Context, role: str, teacher: nn.Module, teacher_logits: torch.Tensor | None,
) -> tuple[Callable[[nn.Module, int], engine.Criterion], torch.Tensor | None]:
    """How to make a student role's criterion (see `train_model`), and the cached teacher logits it can
    use: none for the baseline, nor for methods that need the teacher's feature maps (the teacher runs)."""
    if role == records.BASELINE:
        return functools.partial(supervised_criterion, context), None
    method = records.method_of(role)
    cached = None if KD_engine.method_class(method).uses_features else teacher_logits
    return functools.partial(distillation_criterion, context, method, teacher), cached


def distillation_teacher(context: Context, teacher: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
    """The teacher as distilled students use it (frozen, unwrapped, under autocast a copy stored for it), and its
    logits on the training split when --cache-teacher-logits asks for them (else None). `teacher` itself keeps its
    fp32 weights: its figures are always its own, whatever copy serves distillation."""
    teacher_logits = None
    if context.config.cache_teacher_logits:
        # validate() made sure the training view is deterministic: one pass serves every epoch.
        teacher_logits, _ = engine.predict(teacher, context.eval_loaders["train"], context.device, context.amp_dtype,
                                           "teacher logits")
    # The teacher is frozen on every rank; without its DDP wrapper, its forward needs no other rank.
    served = compute.unwrap(teacher, keep_compiled=True)
    if context.amp_dtype is not None:
        served = copy.deepcopy(served)  # storing for autocast casts layers in place: never the reported teacher's
    return compute.store_for_autocast(served, context.amp_dtype), teacher_logits


EpochLog = Callable[[dict[str, Any]], None]  # sees every epoch's record (see engine.fit's on_epoch)


def epoch_test_recorder(context: Context, model: nn.Module, role: str) -> EpochLog | None:
    """With --eval-test-every-epoch, a callback adding the test split's top-1 to every epoch's record ("test"),
    for figures comparable with papers' tables; None without it. It chooses nothing: selection stays on validation.
    Every rank takes part (the test pass gathers over them)."""
    if not context.config.eval_test_every_epoch:
        return None

    def record_test(record: dict[str, Any]) -> None:
        logits, labels = engine.predict(model, context.eval_loaders["test"], context.device, context.amp_dtype,
                                        f"{role} test")
        record["test"] = {"top1": utils.topk_accuracy(logits, labels, 1)}

    return record_test


def chain(*callbacks: EpochLog | None) -> EpochLog:
    """One epoch callback that calls the given ones (None: left out) in order."""
    chosen = [callback for callback in callbacks if callback is not None]

    def each_epoch(record: dict[str, Any]) -> None:
        for callback in chosen:
            callback(record)

    return each_epoch


def tensorboard_logger(context: Context, folder: Path) -> tuple[EpochLog | None, Callable[[], None]]:
    """With --tensorboard (on rank 0), a callback writing one epoch's numbers under RUN/tensorboard/<model
    folder> (loss parts, accuracy, precision / recall / F1, learning rate), and how to close it; else (None, a
    no-op)."""
    if not context.config.tensorboard or not compute.is_main_process():
        return None, lambda: None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(context.run_dir / "tensorboard" / folder.relative_to(context.run_dir)))

    def log(record: dict[str, Any]) -> None:
        epoch = record["epoch"]
        writer.add_scalar("lr", record["lr"], epoch)
        for split in ("train", "val"):
            for name, value in record[split].items():
                if isinstance(value, float):
                    writer.add_scalar(f"{split}/{name}", value, epoch)
        writer.flush()

    return log, writer.close


def _restored(
    role: str, epochs: int, state_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, trainable: nn.Module | None, generator: torch.Generator,
) -> tuple[engine.FitResult, dict[str, torch.Tensor]] | None:
    """An interrupted model's progress and best weights so far, put back in place from `state_path`
    (None when there is no such file: training starts afresh)."""
    if not state_path.is_file():
        started = state_path.parent.is_dir() and any(  # it started before (not just its init stage), saved no epoch
            path.name != init_stage.INIT_STAGE for path in state_path.parent.iterdir())
        if started and compute.is_main_process():
            print(f"[{role}] no epoch of it was saved before the interruption: training it from epoch 1")
        return None
    resume = checkpoints.restore_training(checkpoints.read_state(state_path), model, optimizer, scheduler, trainable,
                                          generator)
    if compute.is_main_process():
        print(f"[{role}] resuming after epoch {len(resume[0].history)} of {epochs}")
    return resume


def _epoch_saver(
    context: Context, role: str, arch: str, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, trainable: nn.Module | None, generator: torch.Generator,
    weights: host_weights.WeightSnapshots, best_checkpoint: Callable[[dict[str, torch.Tensor], engine.FitResult],
                                                                 dict[str, Any]], state_path: Path,
) -> Callable[[engine.FitResult], None]:
    """What `engine.fit` calls after each epoch: best_model.pth when the epoch is the best so far, then the state
    to resume from, handed to the background writer from host buffers reused every epoch."""
    state_buffers = host_weights.HostBuffers()

    @checkpoints.finish_before_interrupt
    def save_epoch(result: engine.FitResult) -> None:
        if not compute.is_main_process():
            return
        context.saver.wait()
        epoch = len(result.history)
        best = result.best_epoch == epoch
        latest = weights.best if best else weights.take(model)  # a best epoch's weights were taken by engine.fit
        state = state_buffers.fill({"optimizer": optimizer.state_dict(),
                                    "criterion": None if trainable is None else trainable.state_dict()})
        files = {}
        if best:
            files[state_path.with_name(checkpoints.BEST_MODEL)] = best_checkpoint(latest, result)
        files[state_path] = checkpoints.training_state(
            role, arch, latest, None if best else weights.best, state["optimizer"], scheduler, state["criterion"],
            generator, result)
        context.save_epoch_files(files)

    return save_epoch


@dataclass
class ModelTraining:
    """One model's training, set up and ready to run (see `prepare_training`): its epochs are driven by
    `engine.train_epochs` alone, or beside other models' by lockstep training; then `finish()`."""

    context: Context
    role: str
    model: nn.Module
    train_loader: data_setup.BatchLoader
    criterion: engine.Criterion
    fitting: engine.Fitting
    folder: Path
    best_checkpoint: Callable[[dict[str, torch.Tensor], engine.FitResult], dict[str, Any]]
    close_log: Callable[[], None]
    stage_seconds: float = 0.0  # a method's initialization stage, part of the model's training time

    def close(self) -> None:
        """Close its TensorBoard log and take its criterion's hooks off (they must not outlive training)."""
        self.close_log()
        self.criterion.close()

    def finish(self) -> tuple[nn.Module, engine.FitResult]:
        """The best weights back in the model, and best_model.pth given the whole history; the model and result."""
        result = self.fitting.finish()
        result.train_seconds += self.stage_seconds
        if compute.is_main_process() and 0 < result.best_epoch < len(result.history):
            # Written at its epoch, best_model.pth holds the history up to it; a reused teacher shows every epoch.
            self.context.saver.save({self.folder / checkpoints.BEST_MODEL: self.best_checkpoint(
                checkpoints.model_weights(self.model), result)})
        return self.model, result


def prepare_training(
    context: Context, role: str, arch: str, epochs: int, lr: float, make_criterion: Callable[[nn.Module, int],
    engine.Criterion], folder: Path, seed: int, teacher_logits: torch.Tensor | None = None,
    on_epoch: EpochLog | None = None, compiled: bool | None = None,
) -> ModelTraining:
    """One model set up for `train_model` (whose arguments these are): model, loader, criterion, optimizer,
    schedule, restored progress and per-epoch saves. `compiled=False` keeps the step eager whatever --compile says
    (lockstep training); None: as --compile decides."""
    model = new_model(context, arch, seed, context.initial_weights(role))
    train_loader = context.train_loader(seed, teacher_logits)
    if compiled is None:
        compiled = compute.resolve_compile(context.config.compile, context.device, epochs * len(train_loader))
    train_loader.drop_last = compiled  # one batch size, so one compiled graph serves every step
    criterion = make_criterion(model, len(train_loader))
    train_loader.sample_indices = criterion.needs_sample_indices
    stage_seconds = init_stage.run(context, role, criterion, model, folder, seed,  # a resumed run reads it back
                                   functools.partial(optimizer_for, context.config), lr)
    optimizer = make_optimizer(context.config, model, lr, criterion)
    config = context.config
    scheduler = schedules.make_scheduler(optimizer, lr, epochs, len(train_loader), config.lr_schedule,
                                         settings.milestones(config), config.lr_decay, config.warmup_epochs)
    trainable = criterion.trainable
    state_path, head = folder / checkpoints.TRAIN_STATE, checkpoints.head_of(model)
    resume = _restored(role, epochs, state_path, model, optimizer, scheduler, trainable, train_loader.generator)
    # The epoch's weights are copied to the host once, into buffers the previous epoch's files are written
    # from: refilling them waits for that write.
    weights = host_weights.WeightSnapshots(before_refill=context.saver.wait)

    def best_checkpoint(best_weights: dict[str, torch.Tensor], result: engine.FitResult) -> dict[str, Any]:
        return checkpoints.make_checkpoint(context.description(), role, arch, best_weights, result.best_epoch,
                                           result.history, head)

    save_epoch = _epoch_saver(context, role, arch, model, optimizer, scheduler, trainable, train_loader.generator,
                              weights, best_checkpoint, state_path)
    step = compute.CompiledStep(criterion, context.device) if compiled else criterion
    log_epoch, close_log = tensorboard_logger(context, folder)
    fitting = engine.Fitting(
        model, context.eval_loaders["val"], step, optimizer, epochs, context.data.class_names, context.device,
        scheduler, context.amp_dtype, name=role,
        hooks=engine.FitHooks(on_epoch=chain(epoch_test_recorder(context, model, role), log_epoch,
                                             context.epoch_observer(role), on_epoch),
                              on_epoch_end=save_epoch),
        selection=engine.Selection(config.select_metric, config.patience), resume=resume, weights=weights)
    return ModelTraining(context, role, model, train_loader, criterion, fitting, folder, best_checkpoint, close_log,
                         stage_seconds)


def train_model(
    context: Context, role: str, arch: str, epochs: int, lr: float, make_criterion: Callable[[nn.Module, int],
    engine.Criterion], folder: Path, seed: int, teacher_logits: torch.Tensor | None = None,
    on_epoch: EpochLog | None = None,
) -> tuple[nn.Module, engine.FitResult]:
    """Train one model with the run's schedule (`schedules`); the best-on-validation epoch is kept.

    `make_criterion(model, steps_per_epoch)` gives the loss (feature methods hook into the model it is given).
    `teacher_logits` (one row per training image) go to the criterion with each batch; `on_epoch(record)` sees
    each validated epoch before its save (a sweep's pruner). With --compile (see `compute.resolve_compile`) the
    training step is compiled and every batch has one size. After every epoch the whole training state goes to
    <folder>/train_state.pth; when it exists (an interrupted run), training continues after its last epoch.
    At the end best_model.pth gets the whole history (every epoch trained, not only those up to the best).
    """
    training = prepare_training(context, role, arch, epochs, lr, make_criterion, folder, seed, teacher_logits,
                                on_epoch)
    try:
        engine.train_epochs(training.fitting, training.train_loader)
    finally:
        training.close()
    return training.finish()
