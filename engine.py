"""Plain training and evaluation: one training epoch, one evaluation pass, and the epoch loop.

The loop is shared with distillation: what is optimized is decided by a *criterion*, a callable
`criterion(model, images, labels, *extra) -> {"loss": ..., "logits": ..., <named loss parts>}`,
where `extra` is whatever a batch carries after its labels (e.g. cached teacher logits).
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import utils

Batches = Iterable[tuple[torch.Tensor, ...]]  # (images, labels, *extra)
Criterion = Callable[..., dict[str, torch.Tensor]]


class SupervisedCriterion:
    """Cross-entropy on the hard labels (plain training)."""

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "logits": logits}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for reduced precision, or a no-op when `dtype` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _progress(batches: Batches, description: str) -> Iterable:
    # disable=None hides the bar when output is not a terminal (logs, CI).
    return tqdm(batches, desc=description, leave=False, disable=None, dynamic_ncols=True)


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

    Loss parts are averaged per sample over the whole epoch (not a mean of batch means);
    classification metrics come from the training-mode logits of the augmented batches.
    Running sums stay on the device, so the loop never waits for the host.

    Returns:
        {"loss": ..., <other loss parts>, "top1": ..., "top3": ..., "f1_macro": ..., ...}
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    all_logits, all_labels = [], []
    for images, labels, *extra in _progress(data_loader, description):
        with autocast(device, amp_dtype):
            outputs = criterion(model, images, labels, *extra)
        optimizer.zero_grad(set_to_none=True)
        outputs["loss"].backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        batch_size = labels.shape[0]
        for name, value in outputs.items():
            if name != "logits":
                sums[name] = sums.get(name, 0) + value.detach().float() * batch_size
        all_logits.append(outputs["logits"].detach().float())
        all_labels.append(labels)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics = {name: (total / len(labels)).item() for name, total in sums.items()}
    metrics.update(utils.classification_metrics(logits, labels, class_names))
    return metrics


@torch.inference_mode()
def predict(
    model: nn.Module, data_loader: Batches, device: torch.device, amp_dtype: torch.dtype | None = None,
    description: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and labels of every sample of a loader, in eval mode."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels, *_ in _progress(data_loader, description):
        with autocast(device, amp_dtype):
            all_logits.append(model(images).float())
        all_labels.append(labels)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels).cpu()


def metrics_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> dict[str, Any]:
    """Cross-entropy loss plus every classification metric of a split."""
    metrics = {"loss": F.cross_entropy(logits, labels).item()}
    metrics.update(utils.classification_metrics(logits, labels, class_names))
    return metrics


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


def is_better(candidate: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Model selection: higher validation top-1 wins; a tie goes to the lower validation loss."""
    if best is None:
        return True
    return (candidate["top1"], -candidate["loss"]) > (best["top1"], -best["loss"])


@dataclass
class FitResult:
    """What the epoch loop produced: per-epoch history, the chosen epoch and timing."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    train_seconds: float = 0.0


def fit(
    model: nn.Module,
    train_loader: Batches,
    val_loader: Batches,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    class_names: Sequence[str],
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp_dtype: torch.dtype | None = None,
    on_best: Callable[[int, list[dict[str, Any]]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
    name: str = "model",
) -> FitResult:
    """Train for `epochs` epochs, choose the best epoch on validation data, and restore it.

    After every epoch the model is evaluated on the validation loader; when it beats the
    best so far (see `is_better`) its weights are kept and `on_best(epoch, history)` is called
    (to save a checkpoint); `on_epoch(record)` sees every epoch's record (e.g. for TensorBoard).
    When training ends the best weights are loaded back into `model`,
    so what the caller tests, saves or distills from is the selected model, not the last epoch.
    """
    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    best_val: dict[str, Any] | None = None
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(
            model, train_loader, criterion, optimizer, class_names, device, scheduler, amp_dtype,
            description=f"{name} epoch {epoch}/{epochs}",
        )
        val_metrics = evaluate(model, val_loader, class_names, device, amp_dtype, f"{name} val")
        record = {
            "epoch": epoch, "lr": lr, "train": train_metrics, "val": val_metrics,
            "seconds": time.perf_counter() - epoch_start,
        }
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        improved = is_better(val_metrics, best_val)
        log(f"[{name}] " + utils.history_table([record]).strip() + ("  *best" if improved else ""))
        if improved:
            best_val, result.best_epoch = val_metrics, epoch
            best_state = copy.deepcopy(model.state_dict())
            if on_best is not None:
                on_best(epoch, result.history)
    result.train_seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


def resolve_device(setting: str) -> torch.device:
    """'auto' picks CUDA when available, else the CPU; other values are used as given."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device '{setting}' was requested but CUDA is not available here.")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the processor computes bf16 natively (AVX512-BF16 or AMX), where bf16 is faster."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision: 'auto' uses bf16 on CUDA and on CPUs with native bf16, else fp32 (None)."""
    if setting == "fp32":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
