"""Probabilistic knowledge transfer (Passalis and Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018), as RepDistiller computes it (distiller_zoo/PKT.py, the authors' code): each model's embeddings
(the classifier's input, RepDistiller's feat[-1]) are scaled to unit length, their cosine similarities mapped to
[0, 1] and each row divided by its sum (a sample's conditional probabilities over the batch); the loss is the KL
divergence of the student's from the teacher's, a mean over all N x N entries (not a batch mean of row sums), with
1e-7 beside every norm and probability. Weight 30000 beside CE 1 (RepDistiller scripts/run_cifar_distill.sh).
"""

from __future__ import annotations

import torch

from methods.base import register
from methods.feature_maps import SETTINGS, PairSumMethod

PKT_EPS = 1e-7  # RepDistiller's cosine_similarity_loss eps


def conditional_probabilities(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, N): row i is sample i's probabilities of the batch's samples, from their cosine similarities in [0, 1]."""
    unit = embeddings / (embeddings.pow(2).sum(dim=1, keepdim=True).sqrt() + PKT_EPS)
    unit = unit.masked_fill(unit.isnan(), 0.0)  # as the reference: a NaN embedding counts as the zero vector
    similarity = (unit @ unit.T + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_pair_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """PKT's KL divergence (see the module's docstring) of two batches of embeddings, each flattened to (N, D)."""
    p_student, p_teacher = conditional_probabilities(student.flatten(1)), conditional_probabilities(teacher.flatten(1))
    return (p_teacher * torch.log((p_teacher + PKT_EPS) / (p_student + PKT_EPS))).mean()


@register
class PKT(PairSumMethod):
    """Probabilistic knowledge transfer on the embeddings."""

    name = "pkt"
    year = 2018
    citation = "Passalis & Tefas, ECCV 2018; RepDistiller distiller_zoo/PKT.py"
    parts = {"pkt": "PKT (KL of similarity probabilities)"}
    settings = SETTINGS
    reference_weight = 30000.0
    reference_weights = {"ce": 1.0, "kd": 0.0, "pkt": 30000.0}
    part = "pkt"
    pair_loss = staticmethod(pkt_pair_loss)
    embedding = True
