"""What the methods with an initialization stage share (RepDistiller's two-stage methods: ab, fsp and ft).

RepDistiller trains them in two stages (train_student.py, helper/pretrain.py `init`): first, for
`--init_epochs` epochs (30), some modules alone by SGD on the method's own loss (AB: its connectors and the
student's feature layers; FSP: the student's feature layers; FT: the paraphraser of the teacher's map); then
the student's usual epochs. This module holds the setting of the stage's epochs, the student's feature layers
(all but its classifier, RepDistiller's `get_feat_modules`), the hooks a stage reads maps with, and
`StagedMethod`, the base of the methods whose distillation happens in the stage alone (ab, fsp).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from methods.base import InitStage, Method, Setting, Setup, TeacherOutputs, non_negative
from methods.feature_maps import SETTINGS, FeatureHooks, pre_activation_layers, teacher_shapes
from methods.kd import distillation_loss

INIT_EPOCHS = Setting(int, 30, "ab/ft/fsp: epochs of the initialization stage trained before the student's epochs "
                      "(AB's connectors and the student's feature layers, FT's paraphraser, FSP's student feature "
                      "layers; RepDistiller's --init_epochs)", check=non_negative, rule="must be >= 0")


def layer_maps(model: nn.Module, layers: Sequence[str], image_size: int, pre_activation: bool) -> dict[str, bool]:
    """The layers hooked for `layers` with whether each one's input is taken: with `pre_activation`, a layer whose
    output comes from a ReLU is read as that ReLU's input (RepDistiller's `preact=True`)."""
    before = pre_activation_layers(model, layers, image_size) if pre_activation else {}
    return {before.get(layer, layer): layer in before for layer in layers}


def feature_modules(student: nn.Module) -> nn.ModuleList:
    """The student's layers but its classifier (RepDistiller's `get_feat_modules`): every top-level child but the
    last one declared, which is the classifier in every network model_builder builds."""
    children = list(student.children())
    if len(children) < 2 or not any(isinstance(module, nn.Linear) for module in children[-1].modules()):
        raise ValueError(f"{type(student).__name__} does not end in a linear classifier, so its feature layers "
                         "(all but the classifier) cannot be told apart for the initialization stage.")
    return nn.ModuleList(children[:-1])


class LayerTaps:
    """Hooks of one initialization stage on the teacher's layers and, where it reads the student's too, on the
    student's (each a `layer_maps` dict)."""

    def __init__(self, teacher: nn.Module, teacher_layers: dict[str, bool], student: nn.Module | None = None,
                 student_layers: dict[str, bool] | None = None) -> None:
        self.teacher, self.student = teacher, student
        self.teacher_hooks = FeatureHooks(teacher, list(teacher_layers), before_names(teacher_layers))
        self.student_hooks = None
        if student is not None and student_layers is not None:
            self.student_hooks = FeatureHooks(student, list(student_layers), before_names(student_layers))

    def teacher_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's maps on `images`, computed without a graph (not in inference mode: a loss's backward
        saves them, which an inference tensor cannot be)."""
        with torch.no_grad():
            self.teacher(images)
        return self.teacher_hooks.take()

    def student_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The student's maps on `images`, in its graph."""
        self.student(images)
        return self.student_hooks.take()

    def close(self) -> None:
        """Take every hook off."""
        self.teacher_hooks.remove()
        if self.student_hooks is not None:
            self.student_hooks.remove()


def before_names(layers: dict[str, bool]) -> set[str]:
    """The layers of a `layer_maps` dict whose input is taken."""
    return {name for name, before in layers.items() if before}


class StagedMethod(Method):
    """A method whose distillation happens in its initialization stage: on the (teacher layer, student layer)
    pairs, the stage trains `stage_modules` (from the pairs' shapes) and the student's feature layers on
    `stage_loss`; the student's epochs then train it on the run's Hinton mix, alpha * CE + (1 - alpha) * KD.
    (The reference's second stage is CE alone: its -b multiplies a term it sets to 0, helper/loops.py.)
    Both maps are read before their final ReLU where `pre_activation` says so."""

    settings = {"feature_layers": SETTINGS["feature_layers"], "init_epochs": INIT_EPOCHS}
    pre_activation: ClassVar[bool] = False
    reference_weight: ClassVar[float]  # RepDistiller's -b for resnet32x4 -> resnet8x4 (a weight of a zero term)
    reference_weights: ClassVar[dict[str, float]] = {"ce": 1.0, "kd": 0.0}

    def __init__(self, teacher: nn.Module, student: nn.Module, setup: Setup) -> None:
        super().__init__(teacher, student, setup)
        pairs = list(setup.layer_pairs) if setup.layer_pairs is not None else self.default_pairs(teacher, student)
        size = setup.image_size
        self.stage_teacher_layers = layer_maps(teacher, [t for t, _ in pairs], size, self.pre_activation)
        self.stage_student_layers = layer_maps(student, [s for _, s in pairs], size, self.pre_activation)
        shapes = list(zip(teacher_shapes(student, self.stage_student_layers, size),
                          teacher_shapes(teacher, self.stage_teacher_layers, size), strict=True))
        self.stage_modules = self.make_stage_modules(shapes)

    @classmethod
    def default_pairs(cls, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
        """The (teacher layer, student layer) pairs the reference distills."""
        raise NotImplementedError

    def make_stage_modules(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> nn.Module | None:
        """What the stage trains beside the student's feature layers, from the pairs' (student, teacher) shapes
        (ValueError where the reference cannot pair them)."""
        return None

    def stage_loss(self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        """The stage's loss between the student's hooked maps and the teacher's."""
        raise NotImplementedError

    def init_stage(self, teacher: nn.Module, student: nn.Module) -> InitStage | None:
        epochs = self.config.init_epochs
        if epochs == 0:
            return None
        trains = nn.ModuleList([feature_modules(student)])
        if self.stage_modules is not None:
            device = next(student.parameters()).device
            trains.append(self.stage_modules.to(device, memory_format=torch.channels_last))
        taps = LayerTaps(teacher, self.stage_teacher_layers, student, self.stage_student_layers)

        def loss(images: torch.Tensor) -> torch.Tensor:
            teacher_maps = taps.teacher_maps(images)
            return self.stage_loss(taps.student_maps(images), teacher_maps)

        return InitStage(trains, loss, epochs, close=taps.close)

    def weights(self) -> dict:
        return {"init_stages": {self.name: {"epochs": self.config.init_epochs}}}

    def loss(self, student_logits: torch.Tensor, teacher: TeacherOutputs, labels: torch.Tensor,
             ) -> dict[str, torch.Tensor]:
        return distillation_loss(student_logits, teacher.logits, labels, self.config.temperature, self.config.alpha,
                                 self.hard_loss)
