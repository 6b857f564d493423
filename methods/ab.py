"""Activation boundaries (Heo, Lee, Yun and Choi, "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons", AAAI 2019), as RepDistiller trains it: in an initialization stage, connectors of the
student's stage maps and the student's feature layers learn the teacher's activation boundaries (both models'
maps before their final ReLU, RepDistiller's feat[1:-1] with preact=True), then the student trains on CE
(RepDistiller scripts/run_cifar_distill.sh `-a 0 -b 1`; its -b multiplies a second-stage term of 0).

The stage's loss (distiller_zoo/AB.py) is, per stage pair i of n, with margin m = 1 and the connector's map s:

    2^(i - n + 1) * sum((s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0]) / batch * 3 / 1000

summed over the pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from methods.base import register
from methods.feature_maps import stage_pairs
from methods.fitnet import HintRegressor, HintRegressors
from methods.two_stage import StagedMethod

MARGIN = 1.0  # RepDistiller's ABLoss margin
SCALE = 3 / 1000  # RepDistiller's ABLoss: each pair's sum is divided by the batch size, by 1000 and times 3


def connector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """RepDistiller's Connector for one pair (models/util.py): nothing where the maps have the same channels and
    size, else FitNets' regressor convolution and a BN, without its ReLU (ConvReg with use_relu=False)."""
    if tuple(student_shape[-3:-1]) == tuple(teacher_shape[-3:-1]):
        return nn.Identity()
    return nn.Sequential(*list(HintRegressor(student_shape, teacher_shape))[:2])


def ab_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
            margin: float = MARGIN) -> torch.Tensor:
    """The activation-boundary loss of the connected student maps and the teacher's pre-activation maps."""
    count, batch = len(student_maps), student_maps[0].shape[0]
    terms = []
    for index, (student, teacher) in enumerate(zip(student_maps, teacher_maps, strict=True)):
        student, teacher = student.float(), teacher.float()
        wrongly_on = (student + margin).pow(2) * ((student > -margin) & (teacher <= 0))
        wrongly_off = (student - margin).pow(2) * ((student <= margin) & (teacher > 0))
        terms.append(2.0 ** (index - count + 1) * (wrongly_on + wrongly_off).sum())
    return torch.stack(terms).sum() / batch * SCALE


@register
class AB(StagedMethod):
    """Activation boundaries, learnt in the initialization stage through connectors."""

    name = "ab"
    year = 2019
    citation = "Heo et al., AAAI 2019; RepDistiller distiller_zoo/AB.py, models/util.py, helper/pretrain.py"
    pre_activation = True
    reference_weight = 1.0

    @classmethod
    def default_pairs(cls, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
        """The stage outputs without the stem (RepDistiller's feat[1:-1])."""
        return stage_pairs(teacher, student)

    def make_stage_modules(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> nn.Module:
        """One `connector` per pair."""
        return HintRegressors(shapes, connector)

    def stage_loss(self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        return ab_loss(self.stage_modules(student_maps), teacher_maps)
