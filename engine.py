"""Plain training and evaluation: one training epoch, one evaluation pass, and the epoch loop.

The loop is shared with distillation: what is optimized is decided by a *criterion*, a callable
`criterion(model, images, labels, *extra) -> {"loss": ..., "logits": ..., <named loss parts>}`,
where `extra` is whatever a batch carries after its labels (e.g. cached teacher logits).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import utils
from core import compute, host_weights

Batches = Iterable[tuple[torch.Tensor, ...]]  # (images, labels, *extra)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; `batch` is the first such batch (from 1)."""

    def __init__(self, batch: int, message: str = "") -> None:
        super().__init__(message or f"non-finite loss at batch {batch}")
        self.batch = batch


HardLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> batch-mean loss


def class_weights(labels: torch.Tensor, num_classes: int) -> list[float]:
    """Scikit-learn's 'balanced' class weights from training labels: n_samples / (n_classes * count of the class)."""
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels.cpu().numpy())
    return [float(weight) for weight in weights]


def hard_label_loss(
    label_smoothing: float = 0.0, weights: Sequence[float] | None = None, device: torch.device | str = "cpu",
) -> HardLoss:
    """The cross-entropy every model's hard-label term uses: plain, label-smoothed and/or class-weighted.

    With class weights, a batch's loss is the weighted mean (divided by the sum of its samples' weights).
    """
    weight = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


class Criterion:
    """What the loop optimizes: `criterion(model, images, labels, *extra)` gives {"loss": ..., "logits": ...,
    <named loss parts>}. `trainable` is what the optimizer trains beside the model (a distillation method's
    regressors, ...) or None; with `needs_sample_indices` the training loader appends each batch's sample indices
    to `extra` (CRD's memory bank); `set_epoch(epoch)` is called before each epoch (from 1); `close()` once
    training ends."""

    trainable: nn.Module | None = None
    needs_sample_indices: bool = False  # batches must end with their images' indices in the training split

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 *extra: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Told which epoch (from 1) is about to run."""

    def close(self) -> None:
        """Release what the criterion holds on models (hooks)."""


class SupervisedCriterion(Criterion):
    """Cross-entropy on the hard labels (plain training); `hard_loss` may smooth or weight it."""

    def __init__(self, hard_loss: HardLoss = F.cross_entropy) -> None:
        self.hard_loss = hard_loss

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(images)
        loss = self.hard_loss(logits.float(), labels)
        return {"loss": loss, "logits": logits}


def progress(batches: Batches, description: str) -> Iterable:
    # disable=None hides the bar when output is not a terminal (logs, CI); only rank 0 shows one.
    return tqdm(batches, desc=description, leave=False, disable=None if compute.is_main_process() else True,
                dynamic_ncols=True)


class EpochSteps:
    """One training epoch taken a step at a time (`step(images, labels, *extra)` per batch, then `metrics()`):
    what `train_one_epoch` runs, and what lockstep training interleaves between several models on one stream."""

    def __init__(
        self, model: nn.Module, criterion: Criterion, optimizer: torch.optim.Optimizer, class_names: Sequence[str],
        device: torch.device, steps: int, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        model.train()
        self.model, self.criterion, self.optimizer, self.scheduler = model, criterion, optimizer, scheduler
        self.class_names, self.device, self.amp_dtype, self.steps = class_names, device, amp_dtype, steps
        self.parts: list[str] = []
        self.rows: torch.Tensor | None = None
        self.one: torch.Tensor | None = None
        self.all_logits: list[torch.Tensor] = []
        self.all_labels: list[torch.Tensor] = []

    def step(self, images: torch.Tensor, labels: torch.Tensor, *extra: torch.Tensor) -> None:
        """One optimizer step on one batch; its loss parts, logits and labels are kept on the device."""
        with compute.autocast(self.device, self.amp_dtype):
            outputs = self.criterion(self.model, images, labels, *extra)
        loss = outputs["loss"]
        if self.rows is None:  # made once: the loss parts' names are known from the first step
            self.parts = [name for name in outputs if name != "logits"]
            self.rows = torch.empty((self.steps, len(self.parts)), device=loss.device)
            self.one = torch.ones_like(loss)  # the loss's gradient with respect to itself, not made anew every step
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(self.one)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        torch.stack([outputs[name].detach() for name in self.parts], out=self.rows[len(self.all_labels)])
        self.all_logits.append(outputs["logits"].detach())
        self.all_labels.append(labels)

    def metrics(self) -> dict[str, Any]:
        """The epoch's metrics (see `train_one_epoch`); NonFiniteLossError when a step's loss was not finite."""
        batch_sizes = np.array([len(labels) for labels in self.all_labels])
        return training_metrics(self.rows[: len(batch_sizes)], self.parts, batch_sizes,
                                torch.cat(self.all_logits).float(), torch.cat(self.all_labels), self.class_names)


def train_one_epoch(
    model: nn.Module,
    data_loader: Batches,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    class_names: Sequence[str],
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp_dtype: torch.dtype | None = None,
    description: str = "train",
) -> dict[str, Any]:
    """Train for one epoch and return its metrics.

    Raises NonFiniteLossError (with the first bad batch, counted from 1) when the loss of any
    batch was NaN or infinite.

    A step holds the model, the loss and the optimizer, and nothing that makes the host wait for
    the device: each step's loss parts go into one row of a buffer made at the first step, and its
    logits and labels are kept as they are. At the end the buffer and the metrics' counts (see
    `utils.metric_counts`) are read in one copy; the non-finite check reads the loss column.
    Loss parts are averaged per sample over the whole epoch (not a mean of batch means);
    classification metrics come from the training-mode logits of the augmented batches. Under
    torchrun each rank trains on its shard and the epoch's sums and counts are combined over all ranks.

    Returns:
        {"loss": ..., <other loss parts>, "samples": ..., "top1": ..., "top3": ..., "f1_macro": ..., ...}
    """
    epoch = EpochSteps(model, criterion, optimizer, class_names, device, len(data_loader), scheduler, amp_dtype)
    for batch in progress(data_loader, description):
        epoch.step(*batch)
    return epoch.metrics()


def training_metrics(
    rows: torch.Tensor, parts: list[str], batch_sizes: np.ndarray, logits: torch.Tensor, labels: torch.Tensor,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """The end of `train_one_epoch`: the epoch's loss parts (per sample) and metrics from its per-step rows
    (`parts` in columns), batch sizes, logits and labels, read to the host in one copy."""
    counts = compute.sum_over_ranks(utils.metric_counts(logits, labels, len(class_names)))
    host = torch.cat([rows.flatten().double(), counts]).cpu().numpy()
    values = host[: rows.numel()].reshape(rows.shape).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(values[:, parts.index("loss")]))
    # Every rank must stop together, or the others would wait forever in the next collective.
    first_bad = int(compute.reduce_over_ranks(np.array([bad[0] if len(bad) else -1]), rows.device, "max")[0])
    if first_bad >= 0:
        raise NonFiniteLossError(first_bad + 1)
    # Summed step by step in float32, as a running sum on the device would be (the same value, bit for bit).
    sums = np.add.accumulate(values * batch_sizes[:, None].astype(np.float32), axis=0, dtype=np.float32)[-1]
    sums = compute.reduce_over_ranks(sums, rows.device, "sum")
    metrics = utils.metrics_from_counts(host[rows.numel():], class_names)
    means = {name: float(total / np.float32(metrics["samples"])) for name, total in zip(parts, sums, strict=True)}
    return {**means, **metrics}


@torch.inference_mode()
def predict(
    model: nn.Module, data_loader: Batches, device: torch.device, amp_dtype: torch.dtype | None = None,
    description: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32) and labels of every sample of a loader, in eval mode, on the device they were computed on.

    Under torchrun each rank predicts its shard and the results are gathered in rank order.
    """
    # Not the DDP forward: shards may differ in length, and evaluation needs no gradient sync.
    module = compute.unwrap(model, keep_compiled=True).eval()
    all_logits, all_labels = [], []
    for images, labels, *_ in progress(data_loader, description):
        with compute.autocast(device, amp_dtype):
            all_logits.append(module(images))
        all_labels.append(labels)
    return compute.gather_rows(torch.cat(all_logits).float()), compute.gather_rows(torch.cat(all_labels))


def metrics_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> dict[str, Any]:
    """Cross-entropy loss plus every classification metric of a split, AUC included (scikit-learn, on the host):
    the final evaluation's."""
    metrics = {"loss": F.cross_entropy(logits, labels).item()}
    metrics.update(utils.classification_metrics(logits, labels, class_names))
    return metrics


def epoch_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """Cross-entropy loss, top-1, top-3 and precision / recall / F1 of a split, counted on the logits'
    device and read in one copy: an epoch's validation (no AUC, see `utils.metrics_from_counts`)."""
    loss = F.cross_entropy(logits, labels)
    host = torch.cat([loss.double()[None], utils.metric_counts(logits, labels, len(class_names))]).cpu().numpy()
    return {"loss": float(np.float32(host[0])), **utils.metrics_from_counts(host[1:], class_names)}


def evaluate(
    model: nn.Module,
    data_loader: Batches,
    class_names: Sequence[str],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    description: str = "eval",
) -> dict[str, Any]:
    """Evaluate a model on a loader: cross-entropy loss and classification metrics."""
    logits, labels = predict(model, data_loader, device, amp_dtype, description)
    return metrics_from_logits(logits, labels, class_names)


SELECT_METRICS = ("top1", "loss", "f1_macro")  # validation metrics a model's best epoch can be chosen by


def selection_key(metrics: dict[str, Any], metric: str = "top1") -> tuple[float, ...]:
    """Larger is better: the metric (the loss negated; an undefined F1 worst of all), then the lower loss."""
    if metric == "loss":
        return (-metrics["loss"],)
    value = metrics[metric]
    return (-math.inf if value is None else value, -metrics["loss"])


def is_better(candidate: dict[str, Any], best: dict[str, Any] | None, metric: str = "top1") -> bool:
    """Model selection: the better validation `metric` wins (see `selection_key`); a tie goes to the lower loss."""
    return best is None or selection_key(candidate, metric) > selection_key(best, metric)


@dataclass
class FitResult:
    """What the epoch loop produced: per-epoch history, the chosen epoch and timing.

    `best_val_outputs` holds the (logits, labels) of the validation pass at the best epoch,
    so a report of the selected model need not predict the validation split again.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    train_seconds: float = 0.0
    best_val_outputs: tuple[torch.Tensor, torch.Tensor] | None = None
    stopped_early: bool = False

    def epochs_without_improvement(self) -> int:
        """Finished epochs since the best one (what early stopping counts, so a resumed run counts on)."""
        return len(self.history) - self.best_epoch


def _ignore(*args: Any) -> None:
    """A hook nobody asked for."""


@dataclass
class FitHooks:
    """What `fit` tells its caller, and when (each hook optional)."""

    on_epoch: Callable[[dict[str, Any]], None] = _ignore  # every epoch's record (e.g. for TensorBoard, a pruner)
    on_best: Callable[[int, list[dict[str, Any]]], None] = _ignore  # (epoch, history) when an epoch beats the best
    on_epoch_end: Callable[[FitResult], None] = _ignore  # last in each epoch (to save what a resumed run needs)
    log: Callable[[str], None] = print  # the epoch's line, on rank 0


@dataclass
class Selection:
    """How `fit` chooses the best epoch and when it stops early."""

    metric: str = "top1"  # the validation metric (see `is_better`)
    patience: int | None = None  # epochs in a row without improving after which training stops (None or 0: off)


def fit(
    model: nn.Module, train_loader: Batches, val_loader: Batches, criterion: Criterion,
    optimizer: torch.optim.Optimizer, epochs: int, class_names: Sequence[str], device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, amp_dtype: torch.dtype | None = None, *,
    name: str = "model", hooks: FitHooks | None = None, selection: Selection | None = None,
    resume: tuple[FitResult, dict[str, torch.Tensor]] | None = None,
    weights: host_weights.WeightSnapshots | None = None,
) -> FitResult:
    """Train for `epochs` epochs, choose the best epoch on validation data, and restore it.

    After every epoch the model is evaluated on the validation loader; when it beats the best so far by
    `selection.metric` (see `is_better`) its weights are kept and `hooks.on_best` is called (`FitHooks`: the
    others). At the end the best weights are loaded back into `model`: what the caller tests, saves or distills
    from is the selected model, not the last epoch.
    The best weights are kept in host memory, in `weights` (a caller that saves checkpoints passes its
    own, so each epoch's weights are copied to the host once; see `host_weights.WeightSnapshots`).
    Validation metrics are counted on the device (`epoch_metrics`: no AUC, which the final evaluation gives).

    `resume=(result so far, best weights of the unwrapped model)` continues after `len(result.history)`
    finished epochs; the caller restores model, optimizer, scheduler, loader and RNG states beforehand. A
    criterion with `set_epoch(epoch)` is told each epoch (from 1) before it starts. With `selection.patience`,
    training stops once that many epochs in a row have not improved on the best, counted from the
    history, so a resumed run stops where an uninterrupted one would. A scheduler keeps its plan over `epochs`.
    """
    fitting = Fitting(model, val_loader, criterion, optimizer, epochs, class_names, device, scheduler, amp_dtype,
                      name=name, hooks=hooks, selection=selection, resume=resume, weights=weights)
    return train_epochs(fitting, train_loader)


def train_epochs(fitting: Fitting, train_loader: Batches) -> FitResult:
    """`fitting`'s epochs, one after another, on `train_loader` (what `fit` runs)."""
    while (epoch := fitting.next_epoch()) is not None:
        epoch_start = time.perf_counter()
        steps = fitting.begin_epoch(epoch, len(train_loader))
        for batch in progress(train_loader, f"{fitting.name} epoch {epoch}/{fitting.epochs}"):
            steps.step(*batch)
        fitting.end_epoch(steps, time.perf_counter() - epoch_start)
    return fitting.finish()


class Fitting:
    """`fit`'s epoch loop as steps a driver calls: `next_epoch()` (None: done), `begin_epoch(epoch, steps)` (an
    `EpochSteps` to feed the epoch's batches), `end_epoch(steps, seconds)` (validation, selection, hooks),
    `finish()` (the best weights restored, the result). `fit` drives one model; lockstep training drives several
    on one stream of batches. Arguments are `fit`'s."""

    def __init__(
        self, model: nn.Module, val_loader: Batches, criterion: Criterion, optimizer: torch.optim.Optimizer,
        epochs: int, class_names: Sequence[str], device: torch.device,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, amp_dtype: torch.dtype | None = None, *,
        name: str = "model", hooks: FitHooks | None = None, selection: Selection | None = None,
        resume: tuple[FitResult, dict[str, torch.Tensor]] | None = None,
        weights: host_weights.WeightSnapshots | None = None,
    ) -> None:
        self.model, self.val_loader, self.criterion, self.optimizer = model, val_loader, criterion, optimizer
        self.epochs, self.class_names, self.device, self.scheduler = epochs, class_names, device, scheduler
        self.amp_dtype, self.name = amp_dtype, name
        self.hooks, self.selection = hooks or FitHooks(), selection or Selection()
        self.result, best_state = resume if resume is not None else (FitResult(), None)
        self.weights = weights if weights is not None else host_weights.WeightSnapshots()
        if best_state is not None:
            self.weights.best = best_state
        self.best_val = self.result.history[self.result.best_epoch - 1]["val"] if self.result.best_epoch else None
        self.lr = 0.0

    def next_epoch(self) -> int | None:
        """The epoch to train next (from 1), or None once the epochs or the patience have run out."""
        epoch = len(self.result.history) + 1
        if epoch > self.epochs or _patience_ran_out(self.result, self.selection, self.epochs, self.name,
                                                    self.hooks.log):
            return None
        return epoch

    def begin_epoch(self, epoch: int, steps: int) -> EpochSteps:
        """Start epoch `epoch` of `steps` optimizer steps: the criterion is told, and the model set to train."""
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.criterion.set_epoch(epoch)
        return EpochSteps(self.model, self.criterion, self.optimizer, self.class_names, self.device, steps,
                          self.scheduler, self.amp_dtype)

    def end_epoch(self, steps: EpochSteps, train_seconds: float) -> None:
        """Close the epoch whose training took `train_seconds`: validate, select, tell the hooks, log its line."""
        validation_start = time.perf_counter()
        epoch, result, hooks = len(self.result.history) + 1, self.result, self.hooks
        train_metrics = _epoch_metrics_or_stop(steps, self.name, epoch, result.best_epoch)
        val_logits, val_labels = predict(self.model, self.val_loader, self.device, self.amp_dtype, f"{self.name} val")
        seconds = train_seconds + time.perf_counter() - validation_start
        record = {"epoch": epoch, "lr": self.lr, "train": train_metrics,
                  "val": epoch_metrics(val_logits, val_labels, self.class_names), "seconds": seconds}
        result.history.append(record)
        hooks.on_epoch(record)
        improved = is_better(record["val"], self.best_val, self.selection.metric)
        if improved:
            self.best_val, result.best_epoch = record["val"], epoch
            result.best_val_outputs = (val_logits.cpu(), val_labels.cpu())
            self.weights.take_best(self.model)
            hooks.on_best(epoch, result.history)
        result.train_seconds += seconds
        hooks.on_epoch_end(result)
        # Logged once on_epoch_end has handed the epoch to the checkpoint writer: unless the process is
        # killed outright, an epoch shown as done is on disk when the run ends, and a resume will not repeat it.
        if compute.is_main_process():
            line = utils.history_table([record], len(self.class_names)).strip()
            hooks.log(f"[{self.name}] {line}" + ("  *best" if improved else ""))

    def finish(self) -> FitResult:
        """The result, with the best epoch's weights loaded back into the model."""
        if self.weights.best is not None:
            compute.unwrap(self.model).load_state_dict(self.weights.best)
        return self.result


def _patience_ran_out(
    result: FitResult, selection: Selection, epochs: int, name: str, log: Callable[[str], None],
) -> bool:
    """Whether early stopping ends training now (marking the result so, and saying why)."""
    patience = selection.patience
    if not (patience and result.best_epoch and result.epochs_without_improvement() >= patience):
        return False
    result.stopped_early = True
    if compute.is_main_process():
        log(f"[{name}] stopped early after epoch {len(result.history)} of {epochs}: validation {selection.metric} has "
            f"not improved for {patience} epoch{'s' if patience > 1 else ''} (best epoch {result.best_epoch})")
    return True


def _epoch_metrics_or_stop(steps: EpochSteps, name: str, epoch: int, best_epoch: int) -> dict[str, Any]:
    """The epoch's training metrics, with a non-finite loss told in one sentence: where, and which checkpoint is
    kept."""
    try:
        return steps.metrics()
    except NonFiniteLossError as error:
        kept = (f"the last good checkpoint, epoch {best_epoch}, is kept" if best_epoch
                else "no epoch had finished, so there is no checkpoint")
        raise NonFiniteLossError(error.batch, (
            f"{name}: the training loss became NaN or infinite at epoch {epoch}, batch {error.batch}; "
            f"training stopped ({kept}). A lower learning rate usually helps."
        )) from None
