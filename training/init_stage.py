"""A distillation method's initialization stage (`methods.base.InitStage`), trained before the student's epochs
as RepDistiller's helper/pretrain.py `init` does: the run's optimizer over the stage's modules alone (RepDistiller's
is SGD at its run's learning rate, momentum and weight decay, as the recipes in configs/ are), without a schedule,
the teacher frozen, the student in eval mode but for the layers the stage trains, one pass over the training split
per epoch.

Its result (the state of every module it trained, and each epoch's loss) goes to <model folder>/init_stage.pth,
so that a resumed run puts it back instead of training the stage again; a stage interrupted before its end is
trained again from its start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

import engine
from core import compute, errors
from core.errors import SettingsError
from methods import base, feature_maps
from training import checkpoints

if TYPE_CHECKING:
    from training.model_run import Context

INIT_STAGE = "init_stage.pth"  # per model: the modules its method's initialization stage trained


def run(context: Context, role: str, criterion: engine.Criterion, model: nn.Module, folder: Path, seed: int,
        optimizer_for: Callable[[list[nn.Parameter], float], torch.optim.Optimizer], lr: float) -> float:
    """Train the initialization stage of the criterion's method, if it has one, by `optimizer_for(parameters,
    learning rate)` at `lr` times the stage's `lr_factor`, or put back the one a run that was interrupted saved in
    `folder`; the seconds the stage took to train (0 without one)."""
    method = getattr(criterion, "method", None)
    stage = None if method is None else method.init_stage(criterion.teacher, compute.unwrap(model))
    if stage is None:
        return 0.0
    path = folder / INIT_STAGE
    try:
        if path.is_file():
            seconds = restore(stage, path)
            if compute.is_main_process():
                print(f"[{role}] initialization stage of {stage.epochs} epochs restored from {path}")
            return seconds
        start = time.perf_counter()
        optimizer = optimizer_for(list(stage.trains.parameters()), lr * stage.lr_factor)
        losses = train_stage(stage, compute.unwrap(model), context.train_loader(seed), context.device,
                             context.amp_dtype, optimizer, role)
        seconds = time.perf_counter() - start
        if compute.is_main_process():
            folder.mkdir(parents=True, exist_ok=True)
            checkpoints.save_checkpoint(path, {"trains": stage.trains.state_dict(), "losses": losses,
                                               "seconds": seconds})
        return seconds
    finally:
        stage.close()


def restore(stage: base.InitStage, path: Path) -> float:
    """Put the modules a stage trained back from its file; the seconds it took (SettingsError when the file does
    not fit them)."""
    saved = checkpoints.read_state(path)
    try:
        stage.trains.load_state_dict(saved["trains"])
        return float(saved["seconds"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise SettingsError(f"'{path}' does not hold this model's initialization stage "
                            f"({errors.one_line(error)}). Delete it to train the stage again.") from None


def train_stage(stage: base.InitStage, student: nn.Module, loader: Iterable[tuple[torch.Tensor, ...]],
                device: torch.device, amp_dtype: torch.dtype | None, optimizer: torch.optim.Optimizer,
                role: str = "student") -> list[float]:
    """Train `stage.trains` alone by `optimizer` (over its parameters) for `stage.epochs` epochs over `loader`'s
    batches; each epoch's loss per sample. Under torchrun the stage's gradients are averaged over the ranks."""
    parameters = list(stage.trains.parameters())
    world = compute.rank_and_world()[1]
    losses = []
    with feature_maps.eval_mode(student):
        stage.trains.train()
        for epoch in range(1, stage.epochs + 1):
            total, samples = torch.zeros((), device=device), 0
            for images, *_ in loader:
                with compute.autocast(device, amp_dtype):
                    loss = stage.loss(images)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    for parameter in parameters:
                        if parameter.grad is not None:
                            dist.all_reduce(parameter.grad)
                            parameter.grad /= world
                optimizer.step()
                total += loss.detach() * images.shape[0]
                samples += images.shape[0]
            losses.append((total / max(samples, 1)).item())
            if not math.isfinite(losses[-1]):
                raise engine.NonFiniteLossError(0, f"the initialization stage's loss was {losses[-1]} in its epoch "
                                                   f"{epoch}: try a smaller --lr or fewer --init-epochs")
            if compute.is_main_process():
                print(f"[{role}] initialization stage epoch {epoch}/{stage.epochs}: loss {losses[-1]:.4f}")
    optimizer.zero_grad(set_to_none=True)
    return losses
