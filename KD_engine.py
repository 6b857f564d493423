"""Knowledge distillation's step and its methods' registry.

The step (`DistillationStep`) is the plain training step plus a frozen teacher: the teacher runs in eval mode
under inference mode on exactly the batch the student sees (the same augmented view), never reaches an
optimizer, and yields what the student's method needs (its logits, and the feature maps the method hooks); the
method (one file each in methods/, found by name: `method_names`, `method_class`) turns both models' outputs
into the loss and its parts. The methods' formulas, weights and citations are in their files and in
docs/methods.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import engine
import methods  # noqa: F401  (imports every method's file, which registers it)
from core import compute
from methods import base, feature_maps
from methods.base import Method, Setup, TeacherOutputs
from methods.kd import kd_loss

LOSS_PARTS_BASE = {"loss": "total", "ce": "CE"}


def method_names() -> list[str]:
    """The registered methods' names, in the literature's order (year of publication, then name)."""
    return list(base.REGISTRY)


def method_class(name: str) -> type[Method]:
    """The method registered as `name` (ValueError naming the known ones otherwise)."""
    return base.method_class(name)


def loss_parts() -> dict[str, str]:
    """Every loss part a criterion can report (besides the logits), with its label on plots."""
    parts = dict(LOSS_PARTS_BASE)
    for method in base.REGISTRY.values():
        parts.update(method.parts)
    return parts


def freeze(teacher: nn.Module) -> nn.Module:
    """Put a teacher in eval mode and stop its parameters from receiving gradients."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_forward(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The teacher's logits, computed without a graph and usable in the student's graph."""
    # Not inference mode: the losses' backward passes save the teacher's outputs, which an inference tensor cannot
    # be, so each output would need a copy out of it (a kernel per step and per hooked map).
    with torch.no_grad():
        return teacher(images)


class SharedTeacherForward:
    """The teacher's forward run once per batch for several distillation steps (lockstep training): the first step
    to ask about a batch runs the teacher, and every step's hooks on it keep their maps from that one forward (the
    union of the layers the methods hook); the others are handed the same logits."""

    def __init__(self) -> None:
        self._key: tuple[nn.Module, torch.Tensor] | None = None
        self._logits: torch.Tensor | None = None
        self.calls = 0  # of `logits`, and the seconds its forwards took: the pass shares them among the callers
        self.seconds = 0.0

    def logits(self, teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on `images`, computed by the first caller of this batch (the batch is held, so no
        later tensor can take its identity)."""
        self.calls += 1
        if self._key is None or self._key[0] is not teacher or self._key[1] is not images:
            start = time.perf_counter()
            self._key, self._logits = (teacher, images), teacher_forward(teacher, images)
            self.seconds += time.perf_counter() - start
        return self._logits


class DistillationStep(engine.Criterion):
    """Engine criterion for one student distilled by one method from a frozen teacher.

    The teacher's hooks on the layers the method needs are put on here and taken off by `close()`. A batch may
    carry the teacher's logits precomputed (valid only when the training view is deterministic, and only for a
    method that needs no feature maps); then the teacher is not run at all.

    Returns (from a call) the method's loss and parts, and "logits" (the student's).
    """

    def __init__(self, teacher: nn.Module, method: Method) -> None:
        self.teacher = freeze(teacher)
        self.method = method
        self.trainable = method.trainable
        self.needs_sample_indices = method.needs_sample_indices
        layers = method.teacher_layers
        self.shared_forward: SharedTeacherForward | None = None  # set by lockstep training
        self.teacher_hooks = (feature_maps.FeatureHooks(teacher, list(layers), {n for n, before in layers.items()
                                                                                if before}) if layers else None)

    def set_epoch(self, epoch: int) -> None:
        self.method.set_epoch(epoch)

    def teacher_outputs(self, images: torch.Tensor, cached_logits: torch.Tensor | None = None) -> TeacherOutputs:
        """The teacher's logits (`cached_logits` when given) and hooked maps on `images` (see `teacher_forward`)."""
        if cached_logits is not None and self.teacher_hooks is None:
            return TeacherOutputs(cached_logits)
        logits = teacher_forward(self.teacher, images) if self.shared_forward is None \
            else self.shared_forward.logits(self.teacher, images)
        if self.teacher_hooks is None:
            return TeacherOutputs(logits)
        return TeacherOutputs(logits, dict(zip(self.teacher_hooks.names, self.teacher_hooks.take(), strict=True)))

    def __call__(
        self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor, *extra: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """`extra`: the cached teacher logits, if any, then the sample indices where the method needs them."""
        self.method.begin_step(images.device)
        if self.needs_sample_indices:
            *extra, indices = extra
            self.method.take_sample_indices(indices)
        teacher = self.teacher_outputs(images, *extra)
        student_logits = student(images)
        outputs = {**self.method.combined_loss(student_logits, teacher, labels), "logits": student_logits}
        self.method.end_step()
        return outputs

    def close(self) -> None:
        """Take the method's hooks off the student and this step's off the teacher."""
        self.method.close()
        if self.teacher_hooks is not None:
            self.teacher_hooks.remove()


def library_setup(
    teacher_arch: str = "", student_arch: str = "", *, image_size: int = 32, epochs: int = 1, steps_per_epoch: int = 1,
    hard_loss: engine.HardLoss = F.cross_entropy, layer_pairs: list[tuple[str, str]] | None = None,
    train_labels: torch.Tensor | None = None, **settings: Any,
) -> Setup:
    """A `Setup` for a method used outside a run (your own loop, a benchmark): temperature 4, alpha 0.5, the alpha
    mix (loss_weights="reference": the method's reference's weights) and every registered method's own settings at
    their defaults, overridden by `settings` (dkd_beta=2.0, ...); `train_labels` (by sample index) for a method
    that keeps a memory of the training split (crd)."""
    values = {"temperature": 4.0, "alpha": 0.5, "loss_weights": base.ALPHA_MIX,
              **{name: setting.default for name, setting in base.declared_settings().items()}}
    unknown = set(settings) - set(values)
    if unknown:
        raise ValueError(f"Unknown method settings: {', '.join(sorted(unknown))}.")
    return Setup(SimpleNamespace(**{**values, **settings}), teacher_arch, student_arch, image_size=image_size,
                 epochs=epochs, steps_per_epoch=steps_per_epoch, hard_loss=hard_loss, layer_pairs=layer_pairs,
                 train_labels=train_labels)


def make_criterion(name: str, teacher: nn.Module, student: nn.Module, setup: Setup) -> DistillationStep:
    """The distillation step of the method called `name` between `teacher` and `student`; feature methods put
    hooks on both (the step's `close()` takes them off)."""
    method = method_class(name)(teacher, student, setup)
    try:
        return DistillationStep(teacher, method)
    except ValueError:
        method.close()
        raise


# ---------------------------------------------------------------- a library function


def knowledge_distillation_train(
    teacher_model: nn.Module,
    student_model: nn.Module,
    trainloader: Iterable[tuple[torch.Tensor, ...]],
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    teacher_percentage: float = 0.5,
    temperature: float = 2.0,
    device: torch.device | str | None = None,
) -> float:
    """Train a student for one epoch by Hinton distillation, for your own models and loop.

        loss = (1 - teacher_percentage) * criterion(student_logits, labels)
               + teacher_percentage * kd_loss(student_logits, teacher_logits, temperature)

    Args:
        teacher_model: any trained classifier; run in eval mode under inference mode. Its weights
            and requires_grad flags are left alone and its (per-module) training flags restored.
        student_model: the classifier to train, put in train mode.
        trainloader: yields (images, labels) batches.
        criterion: the hard-label loss as a batch mean, e.g. nn.CrossEntropyLoss().
        optimizer: over the student's parameters.
        teacher_percentage: weight of the soft (teacher) term, in [0, 1].
        temperature: softening temperature, > 0.
        device: where to train; None picks CUDA when available, else the CPU. Both models move there.

    Returns:
        The epoch's loss per sample: the sum of batch_loss * batch_size over the number of samples.
    """
    if not 0 <= teacher_percentage <= 1:
        raise ValueError(f"teacher_percentage must lie in [0, 1], got {teacher_percentage}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    device = compute.resolve_device("auto") if device is None else torch.device(device)
    teacher_model.to(device)
    student_model.to(device).train()
    total, samples = torch.zeros((), device=device), 0
    with feature_maps.eval_mode(teacher_model):
        for images, labels, *_ in trainloader:
            images, labels = images.to(device), labels.to(device)
            teacher_logits = teacher_forward(teacher_model, images)
            student_logits = student_model(images)
            loss = ((1 - teacher_percentage) * criterion(student_logits, labels)
                    + teacher_percentage * kd_loss(student_logits, teacher_logits, temperature))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * labels.shape[0]
            samples += labels.shape[0]
    if samples == 0:
        raise ValueError("trainloader yielded no samples.")
    return (total / samples).item()
