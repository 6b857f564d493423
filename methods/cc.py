"""Correlation congruence (Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019), as RepDistiller
trains it (distiller_zoo/CC.py `Correlation`, the authors' code; train_student.py and helper/loops.py for its
connectors): each model's embedding (the classifier's input, RepDistiller's feat[-1]) goes through its own linear
connector to 128 dimensions (models/util.py `LinearEmbed`; both connectors are trained with the student, the
teacher's included), and with delta_i = |s_i - t_i| per sample, the loss is the mean over consecutive samples of
sum_d delta_i,d * delta_i+1,d. Weight 0.02 beside CE 1 (RepDistiller scripts/run_cifar_distill.sh).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from methods.base import register
from methods.feature_maps import SETTINGS, PairLosses, PairSumMethod

CC_EMBEDDING_DIM = 128  # RepDistiller train_student.py --feat_dim


def correlation_congruence(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The reference's loss on two (N, D) batches of connected embeddings: with delta = |student - teacher|, the mean
    over i < N of delta_i . delta_i+1; zero for a batch of one sample, which has no neighbour (the reference's mean
    of nothing would be NaN)."""
    delta = (student - teacher).abs()
    if len(delta) < 2:  # e.g. an epoch's last batch; kept in the graph, which DDP and compiled steps expect
        return delta.sum() * 0.0
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class CorrelationConnectors(nn.Module):
    """One pair's connectors: `student` and `teacher`, linear layers from each flattened embedding to
    CC_EMBEDDING_DIM; called on the two embeddings, it gives their `correlation_congruence`."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        self.student = nn.Linear(math.prod(student_shape[1:]), CC_EMBEDDING_DIM)
        self.teacher = nn.Linear(math.prod(teacher_shape[1:]), CC_EMBEDDING_DIM)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return correlation_congruence(self.student(student.flatten(1)), self.teacher(teacher.flatten(1)))


@register
class CC(PairSumMethod):
    """Correlation congruence on the embeddings, through trained connectors."""

    name = "cc"
    year = 2019
    citation = "Peng et al., ICCV 2019; RepDistiller distiller_zoo/CC.py"
    parts = {"cc": "CC (correlation congruence)"}
    settings = SETTINGS
    reference_weight = 0.02
    reference_weights = {"ce": 1.0, "kd": 0.0, "cc": 0.02}
    part = "cc"
    embedding = True

    def make_trainable(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> nn.Module:
        """`CorrelationConnectors` per layer pair (the reference has one)."""
        return PairLosses(CorrelationConnectors(student, teacher) for student, teacher in shapes)
