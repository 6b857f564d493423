"""Neuron selectivity transfer (Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", arXiv 2017), as RepDistiller computes it (distiller_zoo/NST.py `NSTLoss`, full_loss) on the stage outputs
(RepDistiller's feat[1:-1]): per stage pair, the larger map average-pooled to the smaller's size, each channel's
flattened map scaled to unit L2 norm, and the squared maximum mean discrepancy with the polynomial kernel
k(a, b) = (a . b)^2 between the two sets of channels: mean k(t, t) + mean k(s, s) - 2 mean k(s, t), the means over
samples and channel pairs; summed over the pairs. Weight 50 beside CE 1 (RepDistiller scripts/run_cifar_distill.sh).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import register
from methods.feature_maps import SETTINGS, PairSumMethod, match_spatial


def channel_directions(feature: torch.Tensor) -> torch.Tensor:
    """(N, C, H*W): each channel's flattened map at unit L2 norm."""
    return F.normalize(feature.flatten(2), p=2, dim=2)


def mean_polynomial_kernel(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The mean over samples and channel pairs of (a . b)^2, a channel of `first` and one of `second` (as matrix
    products: the reference's broadcast product would hold N x C x C x H*W numbers)."""
    return torch.bmm(first, second.transpose(1, 2)).pow(2).mean()


def nst_pair_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The squared MMD of the channels' maps of one stage pair (see the module's docstring)."""
    student, teacher = (channel_directions(x) for x in match_spatial(student, teacher))
    return (mean_polynomial_kernel(teacher, teacher) + mean_polynomial_kernel(student, student)
            - 2 * mean_polynomial_kernel(student, teacher))


@register
class NST(PairSumMethod):
    """Neuron selectivity transfer over the stage pairs."""

    name = "nst"
    year = 2017
    citation = "Huang & Wang, arXiv:1707.01219; RepDistiller distiller_zoo/NST.py"
    parts = {"nst": "NST (polynomial MMD)"}
    settings = SETTINGS
    reference_weight = 50.0
    reference_weights = {"ce": 1.0, "kd": 0.0, "nst": 50.0}
    part = "nst"
    pair_loss = staticmethod(nst_pair_loss)
