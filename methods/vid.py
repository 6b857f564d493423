"""Variational information distillation (Ahn et al., "Variational Information Distillation for Knowledge Transfer",
CVPR 2019), as RepDistiller trains it (distiller_zoo/VID.py `VIDLoss`, the authors' code; train_student.py builds one
per pair of stage outputs, feat[1:-1], as VIDLoss(s, t, t)): per stage pair, the larger map average-pooled to the
smaller's size, a regressor of 1x1 convolutions without bias (student channels -> teacher channels, ReLU, -> teacher
channels, ReLU, -> teacher channels) predicts the mean of a Gaussian over the teacher's map, with one variance per
teacher channel, softplus(log_scale) + 1e-5, starting at 5; the loss is the negative log-likelihood without its
constant, 0.5 * ((mean - teacher)^2 / variance + log variance), a mean over every element; summed over the pairs.
The regressors and variances are trained with the student. Weight 1 beside CE 1 (RepDistiller
scripts/run_cifar_distill.sh).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import register
from methods.feature_maps import SETTINGS, PairLosses, PairSumMethod, match_spatial

VID_INITIAL_VARIANCE, VID_EPS = 5.0, 1e-5  # VIDLoss(init_pred_var=5.0, eps=1e-5)


class VariationalRegressor(nn.Module):
    """One stage pair's `regressor` (the mean) and `log_scale` (the variances' softplus inverse, per teacher
    channel); called on the student's and the teacher's maps, it gives VID's negative log-likelihood."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        hidden = teacher_channels  # the reference's num_mid_channel
        self.regressor = nn.Sequential(nn.Conv2d(student_channels, hidden, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(hidden, hidden, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(hidden, teacher_channels, 1, bias=False))
        initial = math.log(math.expm1(VID_INITIAL_VARIANCE - VID_EPS))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), initial))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student, teacher = match_spatial(student, teacher)
        mean = self.regressor(student)
        variance = (F.softplus(self.log_scale) + VID_EPS).view(1, -1, 1, 1)
        return (0.5 * ((mean - teacher).pow(2) / variance + variance.log())).mean()


@register
class VID(PairSumMethod):
    """Variational information distillation over the stage pairs, its regressors trained with the student."""

    name = "vid"
    year = 2019
    citation = "Ahn et al., CVPR 2019; RepDistiller distiller_zoo/VID.py"
    parts = {"vid": "VID (negative log-likelihood)"}
    settings = SETTINGS
    reference_weight = 1.0
    reference_weights = {"ce": 1.0, "kd": 0.0, "vid": 1.0}
    part = "vid"

    def make_trainable(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> nn.Module:
        """A `VariationalRegressor` per stage pair, from its maps' channels."""
        return PairLosses(VariationalRegressor(student[-3], teacher[-3]) for student, teacher in shapes)
