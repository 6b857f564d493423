"""Relational knowledge distillation (Park et al., "Relational Knowledge Distillation", CVPR 2019), as RepDistiller
computes it (distiller_zoo/RKD.py `RKDLoss`, w_d 25, w_a 50), on the embeddings (the classifier's input, RepDistiller's
feat[-1]), each flattened to (N, D):

- distance: the pairwise Euclidean distances (squared distances clamped at 1e-12 before the root, the diagonal
  zero), each matrix divided by the mean of its positive entries; the smooth L1 loss between the two, a mean;
- angle: for every anchor i, the unit vectors from e_i to every e_j and their pairwise dot products (N^3 cosines);
  the smooth L1 loss between the two models' cosines, a mean.

The term is 25 * distance + 50 * angle, the teacher's side computed without gradient. Weight 1 beside CE 1
(RepDistiller scripts/run_cifar_distill.sh).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import register
from methods.feature_maps import SETTINGS, PairSumMethod

RKD_DISTANCE_WEIGHT, RKD_ANGLE_WEIGHT = 25.0, 50.0  # RepDistiller RKDLoss(w_d=25, w_a=50)
RKD_MIN_SQUARED_DISTANCE = 1e-12  # RKDLoss.pdist's eps: keeps the root's gradient finite


def normalized_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, N) Euclidean distances, zero on the diagonal, divided by the mean of the positive ones."""
    squares = embeddings.pow(2).sum(dim=1)
    squared = (squares.unsqueeze(1) + squares.unsqueeze(0) - 2 * embeddings @ embeddings.T)
    distances = squared.clamp(min=RKD_MIN_SQUARED_DISTANCE).sqrt()
    distances = distances.masked_fill(torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device), 0.0)
    # The mean of the positive entries, as a sum over a count: no boolean indexing, which would wait for the device.
    return distances / (distances.sum() / (distances > 0).sum())


def angles(embeddings: torch.Tensor) -> torch.Tensor:
    """The N^3 cosines, flattened: [i, j, k] is the cosine between e_j - e_i and e_k - e_i."""
    directions = F.normalize(embeddings.unsqueeze(0) - embeddings.unsqueeze(1), p=2, dim=2)
    return torch.bmm(directions, directions.transpose(1, 2)).flatten()


def rkd_pair_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """25 * distance + 50 * angle loss (see the module's docstring) of two batches of embeddings; zero for a batch of
    one sample, which has no relations (the reference's mean of no distances would be NaN)."""
    student, teacher = student.flatten(1), teacher.flatten(1)
    if len(student) < 2:  # e.g. an epoch's last batch; kept in the graph, which DDP and compiled steps expect
        return student.sum() * 0.0
    with torch.no_grad():
        teacher_distances, teacher_angles = normalized_distances(teacher), angles(teacher)
    distance = F.smooth_l1_loss(normalized_distances(student), teacher_distances)
    return RKD_DISTANCE_WEIGHT * distance + RKD_ANGLE_WEIGHT * F.smooth_l1_loss(angles(student), teacher_angles)


@register
class RKD(PairSumMethod):
    """Relational KD (distance and angle) on the embeddings."""

    name = "rkd"
    year = 2019
    citation = "Park et al., CVPR 2019; RepDistiller distiller_zoo/RKD.py"
    parts = {"rkd": "RKD (25 distance + 50 angle)"}
    settings = SETTINGS
    reference_weight = 1.0
    reference_weights = {"ce": 1.0, "kd": 0.0, "rkd": 1.0}
    part = "rkd"
    pair_loss = staticmethod(rkd_pair_loss)
    embedding = True
