"""FitNets (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), as RepDistiller and mdistiller train it:
the MSE between a conv + BN + ReLU regressor of the student's map and the teacher's map, on one middle layer pair
(the references' hint layer), weight 100 beside CE 1 (RepDistiller scripts/run_cifar_distill.sh, mdistiller's
FITNET.LOSS.FEAT_WEIGHT).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import model_builder
from methods.base import register
from methods.feature_maps import SETTINGS, FeatureMethod

HINT_STAGE = 2  # the references' hint_layer: an index into (stem, stage 1, stage 2, ...)


class HintRegressor(nn.Sequential):
    """FitNets' regressor as the references build it: a convolution, BN and ReLU from the student's
    (C, H, W) map to the teacher's shape.

    The convolution halves a map twice the teacher's size (3x3, stride 2), doubles one half its
    size (4x4 transposed, stride 2), and otherwise shrinks a map at least as large by a valid
    convolution of kernel 1 + the size difference (1x1 for equal sizes).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        (s_channels, s_height, s_width), (t_channels, t_height, t_width) = student_shape[-3:], teacher_shape[-3:]
        if (s_height, s_width) == (2 * t_height, 2 * t_width):
            conv: nn.Module = nn.Conv2d(s_channels, t_channels, 3, stride=2, padding=1)
        elif (2 * s_height, 2 * s_width) == (t_height, t_width):
            conv = nn.ConvTranspose2d(s_channels, t_channels, 4, stride=2, padding=1)
        elif s_height >= t_height and s_width >= t_width:
            conv = nn.Conv2d(s_channels, t_channels, (1 + s_height - t_height, 1 + s_width - t_width))
        else:
            raise ValueError(f"FitNets cannot regress a student map of {s_height}x{s_width} onto a teacher map of "
                             f"{t_height}x{t_width} (the student's must be at least as large, or half as large).")
        super().__init__(conv, nn.BatchNorm2d(t_channels), nn.ReLU(inplace=True))


class HintRegressors(nn.Module):
    """One `HintRegressor` (or what `make` builds) per layer pair, from the pairs' (student shape, teacher shape)."""

    def __init__(self, shapes: Iterable[tuple[Sequence[int], Sequence[int]]],
                 make: Callable[[Sequence[int], Sequence[int]], nn.Module] = HintRegressor) -> None:
        super().__init__()
        self.regressors = nn.ModuleList(make(student, teacher) for student, teacher in shapes)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [regressor(feature) for regressor, feature in zip(self.regressors, features, strict=True)]


def fitnet_loss(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor], regressors: nn.Module,
) -> torch.Tensor:
    """FitNets' hint loss: MSE(regressor(student map), teacher map), a mean over every element,
    summed over layer pairs (the references use one pair)."""
    regressed = regressors(student_features)
    pairs = zip(regressed, teacher_features, strict=True)
    return torch.stack([F.mse_loss(student.float(), teacher.float()) for student, teacher in pairs]).sum()


@register
class FitNet(FeatureMethod):
    """FitNets' hint loss through a trained regressor."""

    name = "fitnet"
    year = 2014
    citation = "Romero et al., ICLR 2015; RepDistiller distiller_zoo/FitNet.py, mdistiller distillers/FitNet.py"
    parts = {"feature": "FitNets feature MSE"}
    settings = SETTINGS
    reference_weight = 100.0
    reference_weights = {"ce": 1.0, "kd": 0.0, "feature": 100.0}  # RepDistiller -r 1 -a 0 -b 100
    part = "feature"

    @classmethod
    def default_pairs(cls, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
        """The pair of stage outputs at HINT_STAGE."""
        teacher_stages, student_stages = model_builder.feature_stages(teacher), model_builder.feature_stages(student)
        if min(len(teacher_stages), len(student_stages)) <= HINT_STAGE:
            raise ValueError(f"FitNets' hint stage {HINT_STAGE} needs models with at least {HINT_STAGE} stages "
                             "after the stem.")
        return [(teacher_stages[HINT_STAGE], student_stages[HINT_STAGE])]

    def make_trainable(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> nn.Module:
        return HintRegressors(shapes)

    def feature_loss(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                     ) -> torch.Tensor:
        return fitnet_loss(student_features, teacher_features, self._trainable)
