"""ReviewKD (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021), as mdistiller's `ReviewKD`
(mdistiller/distillers/ReviewKD.py):

The student's stage maps and its pooled feature go, deepest first, through attention-based fusion (ABF) modules.
Each reduces its map to a common width (1x1 conv + BN), fuses it with the deeper level's fused map (upsampled,
weighed by a learned two-channel attention), and brings the result to the teacher's channels and size (3x3 conv +
BN). The hierarchical context loss (HCL) compares each output with the teacher's map before its activation
(mdistiller's `preact_feats`: a ResNet block's output before its last ReLU; a Wide ResNet block's output through
the next block's BN, as mdistiller's models/cifar/wrn.py:141-147 and dvlab's wide_resnet_cifar.py:120-123): the
MSE at full size and the MSEs of the maps average-pooled to 4x4, 2x2 and 1x1 (sizes below the map's) with weights
1/2, 1/4, 1/8, divided by the weights' sum; summed over the levels. Its weight beside CE 1 is the reference's for
the teacher / student pair (dvlab ReviewKD's CIFAR-100/script/reviewKD.sh, `--kd-loss-weight`: 0.6 for resnet56 ->
resnet20, 1 for resnet110 -> resnet32, 8 for resnet32x4 -> shufflenetv2, 5 for the others and mdistiller's
configs/cifar100/reviewkd.yaml), warmed up over 20 of 240 epochs per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import model_builder
from methods.base import Setting, non_negative, register
from methods.feature_maps import SETTINGS, FeatureMethod, stage_pairs

ABF_MAX_WIDTH = 512  # mdistiller REVIEWKD.MAX_MID_CHANNEL: the ABFs' width is min(512, the pooled feature's)
HCL_SIZES = (4, 2, 1)  # mdistiller's hcl_loss: the pooled sizes of the hierarchical context loss
DEFAULT_WEIGHT = 5.0  # the weight of most pairs in dvlab's reviewKD.sh and of mdistiller's reviewkd.yaml
# dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh (--kd-loss-weight; the pairs of this project's zoo) and
# mdistiller configs/cifar100/reviewkd.yaml (REVIEWKD_WEIGHT 5.0 for resnet32x4 -> resnet8x4).
REFERENCE_WEIGHTS = {
    ("resnet56", "resnet20"): 0.6, ("resnet110", "resnet32"): 1.0, ("resnet32x4", "resnet8x4"): 5.0,
    ("resnet32x4", "shufflenetv2"): 8.0, ("wrn_40_2", "wrn_16_2"): 5.0, ("wrn_40_2", "wrn_40_1"): 5.0,
}


class ABF(nn.Module):
    """Attention-based fusion of one level (see the module's docstring): `reduce` (1x1 conv + BN) to the
    common width, with `attention` (1x1 conv to two channels + sigmoid) the fusion with the deeper level,
    and `output` (3x3 conv + BN) to the teacher's channels. Convolutions start as mdistiller's
    (Kaiming-uniform with a = 1; the attention's PyTorch's default)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width))
        self.output = nn.Sequential(nn.Conv2d(width, out_channels, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * width, 2, 1), nn.Sigmoid()) if fuse else None
        for conv in (self.reduce[0], self.output[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)

    def forward(
        self, feature: torch.Tensor, deeper: torch.Tensor | None, out_size: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this level's output at `out_size`, its fused map, which the next shallower level fuses with)."""
        fused = self.reduce(feature)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=fused.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([fused, deeper], dim=1))
            fused = fused * weights[:, :1] + deeper * weights[:, 1:]
        if tuple(fused.shape[-2:]) != tuple(out_size):
            fused = F.interpolate(fused, size=tuple(out_size), mode="nearest")
        return self.output(fused), fused


class ReviewFusion(nn.Module):
    """ReviewKD's ABFs over the layer pairs, given shallowest first as (student shape, teacher shape): the
    last pair (the pooled features) is the deepest level and fuses with none. The width is
    min(ABF_MAX_WIDTH, the deepest student map's channels), as mdistiller's."""

    def __init__(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
        super().__init__()
        width = min(ABF_MAX_WIDTH, shapes[-1][0][-3])
        self.abfs = nn.ModuleList(ABF(student[-3], width, teacher[-3], fuse=index < len(shapes) - 1)
                                  for index, (student, teacher) in enumerate(shapes))
        self.out_sizes = [tuple(teacher[-2:]) for _, teacher in shapes]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The student's maps (shallowest first) fused from the deepest up: one output per pair, shallowest first."""
        outputs, deeper = [], None
        for abf, feature, size in reversed(list(zip(self.abfs, features, self.out_sizes, strict=True))):
            output, deeper = abf(feature, deeper, size)
            outputs.append(output)
        return outputs[::-1]


def hcl_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (see the module's docstring), summed over the pairs."""
    total = []
    for student, teacher in zip(student_maps, teacher_maps, strict=True):
        student, teacher = student.float(), teacher.float()
        loss, weight, weights = F.mse_loss(student, teacher), 1.0, 1.0
        for size in HCL_SIZES:
            if size >= student.shape[-2]:
                continue
            weight /= 2
            pooled = (F.adaptive_avg_pool2d(x, (size, size)) for x in (student, teacher))
            loss = loss + weight * F.mse_loss(*pooled)
            weights += weight
        total.append(loss / weights)
    return torch.stack(total).sum()


@register
class ReviewKD(FeatureMethod):
    """ReviewKD's fusion and hierarchical context loss, warmed up per step."""

    name = "reviewkd"
    year = 2021
    citation = "Chen et al., CVPR 2021; mdistiller distillers/ReviewKD.py, dvlab-research/ReviewKD"
    parts = {"hcl": "ReviewKD HCL"}
    settings = {**SETTINGS, "reviewkd_warmup_epochs": Setting(
        "int | None", None, "reviewkd: epochs of linear warm-up of the ReviewKD term, ramped per optimizer step",
        unset="mdistiller's 20 of 240 epochs, as a share of all steps", check=non_negative, rule="must be >= 0")}
    reference_weight = DEFAULT_WEIGHT
    reference_weights = {"ce": 1.0, "kd": 0.0, "hcl": DEFAULT_WEIGHT}  # per pair: `reference_weights_for`
    part = "hcl"
    warmup_setting = "reviewkd_warmup_epochs"
    pre_activation = True

    @classmethod
    def reference_weight_for(cls, teacher_arch: str, student_arch: str) -> float:
        """dvlab's reviewKD.sh weight for the pair (REFERENCE_WEIGHTS), DEFAULT_WEIGHT for a pair it does not run."""
        return REFERENCE_WEIGHTS.get((teacher_arch, student_arch), DEFAULT_WEIGHT)

    @classmethod
    def reference_weights_for(cls, teacher_arch: str, student_arch: str) -> dict[str, float]:
        """CE 1 and the pair's HCL weight (`reference_weight_for`), no KD term."""
        return {**cls.reference_weights, "hcl": cls.reference_weight_for(teacher_arch, student_arch)}

    @classmethod
    def default_pairs(cls, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
        """The stage pairs, then the two pooled features (`model_builder.pooled_feature`), its deepest level."""
        return [*stage_pairs(teacher, student),
                (model_builder.pooled_feature(teacher), model_builder.pooled_feature(student))]

    def make_trainable(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> nn.Module:
        return ReviewFusion(shapes)

    def feature_loss(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                     ) -> torch.Tensor:
        return hcl_loss(self._trainable(student_features), teacher_features)
