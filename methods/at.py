"""Attention transfer (Zagoruyko and Komodakis, "Paying More Attention to Attention", ICLR 2017), as RepDistiller
and mdistiller compute it: the squared difference of L2-normalized p=2 attention maps, averaged over samples and
positions, summed over the stage pairs; weight 1000 beside CE 1 (RepDistiller scripts/run_cifar_distill.sh,
mdistiller's AT.LOSS.FEAT_WEIGHT).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from methods.base import register
from methods.feature_maps import SETTINGS, FeatureMethod, match_spatial


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a (N, C, H, W) map (p = 2): the channel mean of squares, flattened, unit L2 norm."""
    return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), dim=1)


def at_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention transfer as the references compute it: per layer pair, the squared difference of
    the attention maps averaged over samples and positions (the larger map pooled to the smaller
    one's size first); summed over pairs."""
    losses = []
    for student, teacher in zip(student_features, teacher_features, strict=True):
        student, teacher = match_spatial(student, teacher)
        losses.append((attention_map(student) - attention_map(teacher)).pow(2).mean())
    return torch.stack(losses).sum()


@register
class AT(FeatureMethod):
    """Attention transfer over the stage pairs."""

    name = "at"
    year = 2017
    citation = "Zagoruyko & Komodakis, ICLR 2017; RepDistiller distiller_zoo/AT.py, mdistiller distillers/AT.py"
    parts = {"at": "attention transfer"}
    settings = SETTINGS
    reference_weight = 1000.0
    reference_weights = {"ce": 1.0, "kd": 0.0, "at": 1000.0}  # RepDistiller -r 1 -a 0 -b 1000
    part = "at"

    def feature_loss(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                     ) -> torch.Tensor:
        return at_loss(student_features, teacher_features)
