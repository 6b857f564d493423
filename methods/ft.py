"""Factor transfer (Kim, Park and Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
NeurIPS 2018), as RepDistiller trains it: in an initialization stage a paraphraser (a convolutional autoencoder)
learns to reconstruct the teacher's last stage map (RepDistiller's feat[-2]; MSE); then a translator of the
student's last stage map is trained with the student so that its factor matches the paraphraser's encoding of
the teacher's map. Weight 200 beside CE 1 (RepDistiller scripts/run_cifar_distill.sh `-a 0 -b 200`).

The factor loss (distiller_zoo/FT.py, p1 = 2, p2 = 1): each factor map is reduced to the L2-normalized channel
mean of its squares (the larger map pooled to the smaller's size first), and the loss is the mean absolute
difference of the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import model_builder
from methods.at import attention_map
from methods.base import InitStage, Setup, register
from methods.feature_maps import SETTINGS, FeatureMethod, match_spatial
from methods.two_stage import INIT_EPOCHS, LayerTaps

RATE = 0.5  # RepDistiller's k: the factor's channels are this share of the teacher map's
SLOPE = 0.1  # the LeakyReLU's negative slope in RepDistiller's paraphraser and translator
# RepDistiller's helper/pretrain.py trains the paraphraser at 0.01 for these students, a fifth of their 0.05 (its
# learning rate for every other stage and student), and at the run's learning rate for the others.
PARAPHRASER_LR_FACTOR = 0.01 / 0.05
PARAPHRASER_LR_STUDENTS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                           "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")


def conv_chain(channels: Sequence[int], batch_norm: bool, transposed: bool = False) -> nn.Sequential:
    """3x3, stride 1, padding 1 convolutions through `channels`, each followed by a BN (where asked) and
    LeakyReLU(0.1): RepDistiller's paraphraser and translator layers."""
    convolution = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for inputs, outputs in zip(channels[:-1], channels[1:], strict=True):
        layers.append(convolution(inputs, outputs, 3, 1, 1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(outputs))
        layers.append(nn.LeakyReLU(SLOPE))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """RepDistiller's Paraphraser (models/util.py, no BN): an encoder of the teacher's map to its factor
    (channels C -> C -> kC -> kC) and a decoder back (kC -> kC -> C -> C)."""

    def __init__(self, channels: int, rate: float = RATE) -> None:
        super().__init__()
        factor = int(channels * rate)
        self.encoder = conv_chain((channels, channels, factor, factor), batch_norm=False)
        self.decoder = conv_chain((factor, factor, channels, channels), batch_norm=False, transposed=True)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """The reconstruction of `feature` (its factor is `encoder(feature)`)."""
        return self.decoder(self.encoder(feature))


def translator(student_channels: int, teacher_channels: int, rate: float = RATE) -> nn.Sequential:
    """RepDistiller's Translator (models/util.py, with BN): the student's map to a factor of the paraphraser's
    channels (C_s -> C_s -> kC_t -> kC_t)."""
    factor = int(teacher_channels * rate)
    return conv_chain((student_channels, student_channels, factor, factor), batch_norm=True)


def factor_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the factors' normalized channel means of squares."""
    student_factor, teacher_factor = match_spatial(student_factor, teacher_factor)
    return (attention_map(student_factor) - attention_map(teacher_factor)).abs().mean()


@register
class FT(FeatureMethod):
    """Factor transfer: the translated student map against the trained paraphraser's factor of the teacher's."""

    name = "ft"
    year = 2018
    citation = ("Kim et al., NeurIPS 2018; RepDistiller distiller_zoo/FT.py, models/util.py, helper/pretrain.py")
    parts = {"ft": "factor transfer"}
    settings = {**SETTINGS, "init_epochs": INIT_EPOCHS}
    reference_weight = 200.0
    reference_weights = {"ce": 1.0, "kd": 0.0, "ft": 200.0}
    part = "ft"

    def __init__(self, teacher: nn.Module, student: nn.Module, setup: Setup) -> None:
        self.paraphraser: Paraphraser | None = None
        super().__init__(teacher, student, setup)
        device = next(student.parameters()).device
        self.paraphraser.to(device, memory_format=torch.channels_last).eval()

    @classmethod
    def default_pairs(cls, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
        """The last stage's outputs (RepDistiller's feat[-2])."""
        return [(model_builder.feature_stages(teacher)[-1], model_builder.feature_stages(student)[-1])]

    def make_trainable(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> nn.Module:
        """The translator, trained with the student; the paraphraser beside it, trained in the stage alone."""
        if len(shapes) != 1:
            raise ValueError(f"Factor transfer distills one layer pair; --feature-layers gives {len(shapes)}.")
        (student_shape, teacher_shape), = shapes
        self.paraphraser = Paraphraser(teacher_shape[1])
        return translator(student_shape[1], teacher_shape[1])

    def init_stage(self, teacher: nn.Module, student: nn.Module) -> InitStage | None:
        """The paraphraser alone, trained to reconstruct the teacher's map (MSE)."""
        if self.config.init_epochs == 0:
            return None
        taps = LayerTaps(teacher, self.teacher_layers)
        paraphraser = self.paraphraser

        def loss(images: torch.Tensor) -> torch.Tensor:
            teacher_map, = taps.teacher_maps(images)
            return F.mse_loss(paraphraser(teacher_map).float(), teacher_map.float())

        def close() -> None:
            taps.close()
            paraphraser.eval()

        factor = PARAPHRASER_LR_FACTOR if self.setup.student_arch in PARAPHRASER_LR_STUDENTS else 1.0
        return InitStage(paraphraser, loss, self.config.init_epochs, lr_factor=factor, close=close)

    def weights(self) -> dict:
        return {**super().weights(), "init_stages": {self.name: {"epochs": self.config.init_epochs}}}

    def feature_loss(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                     ) -> torch.Tensor:
        with torch.no_grad():  # the paraphraser is trained in the stage alone
            teacher_factor = self.paraphraser.encoder(teacher_features[0])
        return factor_loss(self._trainable(student_features[0]), teacher_factor)
