"""Similarity-preserving distillation (Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019), as
RepDistiller computes it (distiller_zoo/SP.py `Similarity`, checked by the paper's author) on the last stage's output
(RepDistiller's feat[-2]): each model's batch of maps flattened to (N, C*H*W), its N x N Gram matrix with every row
scaled to unit L2 norm, and the squared Frobenius norm of the two matrices' difference divided by N^2. Weight 3000
beside CE 1 (RepDistiller scripts/run_cifar_distill.sh).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import model_builder
from methods.base import register
from methods.feature_maps import SETTINGS, PairSumMethod


def similarity(features: torch.Tensor) -> torch.Tensor:
    """The (N, N) Gram matrix of the samples' flattened features, each row of unit L2 norm."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.T, p=2, dim=1)


def sp_pair_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||G_t - G_s||_F^2 / N^2 (see the module's docstring)."""
    return (similarity(teacher) - similarity(student)).pow(2).sum() / len(student) ** 2


@register
class SP(PairSumMethod):
    """Similarity-preserving KD on the last stage's output."""

    name = "sp"
    year = 2019
    citation = "Tung & Mori, ICCV 2019; RepDistiller distiller_zoo/SP.py"
    parts = {"sp": "SP (batch similarity)"}
    settings = SETTINGS
    reference_weight = 3000.0
    reference_weights = {"ce": 1.0, "kd": 0.0, "sp": 3000.0}
    part = "sp"
    pair_loss = staticmethod(sp_pair_loss)

    @classmethod
    def default_pairs(cls, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
        """The last stages' outputs (RepDistiller's feat[-2])."""
        return [(model_builder.feature_stages(teacher)[-1], model_builder.feature_stages(student)[-1])]
