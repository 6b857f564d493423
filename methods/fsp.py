"""Flow of solution procedure (Yim, Joo, Bae and Kim, "A Gift from Knowledge Distillation: Fast Optimization,
Network Minimization and Transfer Learning", CVPR 2017), as RepDistiller trains it: in an initialization stage
the student's feature layers learn the teacher's FSP matrices, then the student trains on CE (RepDistiller
scripts/run_cifar_distill.sh `-a 0 -b 50`; its -b multiplies a second-stage term of 0).

The stage's loss (distiller_zoo/FSP.py) takes the stem's and every stage's output (RepDistiller's feat[:-1]) of
each model; for each two consecutive maps (the larger pooled to the smaller's size) the FSP matrix is
G[j, i] = mean over positions of top[j] * bottom[i]; the loss is the mean squared difference of the student's
and the teacher's matrices, summed over the consecutive pairs. The two models need equal channels at every map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import model_builder
from methods.base import register
from methods.feature_maps import match_spatial
from methods.two_stage import StagedMethod


def fsp_matrices(maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One model's FSP matrices, (N, C_top, C_bottom) each, of every two consecutive maps."""
    matrices = []
    for bottom, top in zip(maps[:-1], maps[1:], strict=True):
        bottom, top = match_spatial(bottom.float(), top.float())
        matrices.append(top.flatten(2) @ bottom.flatten(2).transpose(1, 2) / bottom[0, 0].numel())
    return matrices


def fsp_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean squared difference of the models' FSP matrices, summed over the consecutive map pairs."""
    pairs = zip(fsp_matrices(student_maps), fsp_matrices(teacher_maps), strict=True)
    return torch.stack([(student - teacher).pow(2).mean() for student, teacher in pairs]).sum()


@register
class FSP(StagedMethod):
    """FSP matrices, learnt by the student's feature layers in the initialization stage."""

    name = "fsp"
    year = 2017
    citation = "Yim et al., CVPR 2017; RepDistiller distiller_zoo/FSP.py, helper/pretrain.py"
    reference_weight = 50.0

    @classmethod
    def default_pairs(cls, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
        """The stem's and the stages' outputs (RepDistiller's feat[:-1]); the models need as many."""
        teacher_stages, student_stages = model_builder.feature_stages(teacher), model_builder.feature_stages(student)
        if len(teacher_stages) != len(student_stages):
            raise ValueError(f"FSP pairs every stage: the teacher has {len(teacher_stages)} stage maps and the "
                             f"student {len(student_stages)}.")
        return list(zip(teacher_stages, student_stages, strict=True))

    def make_stage_modules(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
        """Nothing: FSP only checks that each pair's maps have equal channels."""
        if len(shapes) < 2:
            raise ValueError("FSP needs at least two layer pairs: its matrices relate consecutive maps.")
        unequal = [(student[1], teacher[1]) for student, teacher in shapes if student[1] != teacher[1]]
        if unequal:
            raise ValueError(f"FSP needs the teacher's and the student's maps to have equal channels at every "
                             f"pair (student, teacher: {unequal[0][0]}, {unequal[0][1]}); choose a pair such as "
                             "resnet32x4 -> resnet8x4.")
        return None

    def stage_loss(self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        return fsp_loss(student_maps, teacher_maps)
