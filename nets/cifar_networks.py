"""The small-image networks the KD literature benchmarks with (RepDistiller's and mdistiller's CIFAR
models), by name in `ZOO`: resnet8 ... resnet110, resnet8x4, resnet32x4, wrn_16_1 ... wrn_40_2, vgg8,
vgg13, mobilenetv2, shufflenetv2, with their layer names and shapes (`model_builder` builds them by name)."""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock
from torchvision.models.shufflenetv2 import InvertedResidual as ShuffleUnit
from torchvision.ops import Conv2dNormActivation


def _init_weights(model: nn.Module) -> None:
    """He initialization of convolutions (fan-out), unit batch-norm scales, as the references do."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _pooled_logits(features: torch.Tensor, pool: nn.Module, linear: nn.Module) -> torch.Tensor:
    """The zoo's common head: global pooling of the last feature map, then one linear layer."""
    return linear(torch.flatten(pool(features), 1))


class SmallResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2): a 3x3 stem, three stages of depth // 6 torchvision
    BasicBlocks at strides 1, 2, 2, global average pooling and one linear layer (depth = 6n + 2).

    `widths` are the stem's and the three stages' channels: (16, 16, 32, 64) for resnet20 and
    its kin, (32, 64, 128, 256) for the 4x-wide resnet8x4 / resnet32x4.
    """

    feature_stages = ("relu", "layer1", "layer2", "layer3")

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int) -> None:
        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2), strict=True):
            downsample = None
            if stride != 1 or channels != width:
                downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(width))
            stages.append(nn.Sequential(BasicBlock(channels, width, stride, downsample),
                                        *(BasicBlock(width, width) for _ in range(blocks - 1))))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pooled_logits(self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))),
                              self.avgpool, self.fc)


class PreActBlock(nn.Module):
    """Wide ResNet's block: (BN, ReLU, 3x3 conv) twice; when the width changes, the shortcut is a
    1x1 convolution of the activated input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (None if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """Wide ResNet-depth-widen (Zagoruyko & Komodakis 2016) for small images, without dropout:
    a 3x3 stem, three stages of (depth - 4) // 6 pre-activation blocks of 16k, 32k, 64k channels
    at strides 1, 2, 2, a final BN + ReLU, global average pooling and one linear layer."""

    feature_stages = ("conv1", "block1", "block2", "block3")

    def __init__(self, depth: int, widen: int, num_classes: int) -> None:
        super().__init__()
        blocks = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        stages, channels = [], 16
        for width, stride in zip((16 * widen, 32 * widen, 64 * widen), (1, 2, 2), strict=True):
            stages.append(nn.Sequential(PreActBlock(channels, width, stride),
                                        *(PreActBlock(width, width, 1) for _ in range(blocks - 1))))
            channels = width
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return _pooled_logits(features, self.avgpool, self.fc)


class SmallVGG(nn.Module):
    """CIFAR VGG with batch norm (the references' vgg8 / vgg13): five blocks of 3x3 conv + BN + ReLU
    (torchvision's `make_layers`), 2x2 max-pooling after the first three (the references' 32 px
    form, kept at every size), global average pooling and one linear layer."""

    def __init__(self, blocks: Sequence[Sequence[int]], num_classes: int) -> None:
        super().__init__()
        config: list[int | str] = []
        self.feature_stages: list[str] = []
        layers = 0
        for index, block in enumerate(blocks):
            config += block
            layers += 3 * len(block)
            self.feature_stages.append(f"features.{layers - 1}")  # the block's last ReLU
            if index < 3:
                config.append("M")
                layers += 1
        self.features = models.vgg.make_layers(config, batch_norm=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(blocks[-1][-1], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pooled_logits(self.features(x), self.avgpool, self.classifier)


class MobileBlock(nn.Module):
    """MobileNetV2's inverted residual as the KD references build it: 1x1 expansion (kept at
    expansion 1), 3x3 depthwise, 1x1 linear projection, ReLU activations; residual when the
    shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.conv = nn.Sequential(
            Conv2dNormActivation(in_channels, hidden, 1),
            Conv2dNormActivation(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class SmallMobileNetV2(nn.Module):
    """MobileNetV2 for small images as in the KD references (their "mobile_half"): width 0.5,
    expansion 6, a stride-2 stem, the 24-channel stage at stride 1, 1280 final channels."""

    # (expansion, channels at width 1, blocks, first stride) per stage, as in the paper
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
    WIDTH = 0.5
    LAST_CHANNELS = 1280
    feature_stages = ("conv1", "blocks.1", "blocks.2", "blocks.4", "blocks.6")

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        channels = int(32 * self.WIDTH)
        self.conv1 = Conv2dNormActivation(3, channels, 3, stride=2)
        stages = []
        for expansion, width, blocks, stride in self.STAGES:
            width = int(width * self.WIDTH)
            stages.append(nn.Sequential(*(MobileBlock(channels if i == 0 else width, width, stride if i == 0 else 1,
                                                      expansion)
                                          for i in range(blocks))))
            channels = width
        self.blocks = nn.ModuleList(stages)
        self.conv2 = Conv2dNormActivation(channels, self.LAST_CHANNELS, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.LAST_CHANNELS, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return _pooled_logits(self.conv2(x), self.avgpool, self.classifier)


class SmallShuffleNetV2(nn.Module):
    """ShuffleNetV2 1x for small images as in the KD references: a 1x1 stem (no stride, no
    max-pool), three stages of torchvision's shuffle units (one stride-2 unit, then 3, 7, 3 more),
    a 1x1 convolution to 1024 channels, global average pooling and one linear layer."""

    STAGES = ((116, 3), (232, 7), (464, 3))  # (channels, stride-1 units after the stride-2 one)
    STEM_CHANNELS, LAST_CHANNELS = 24, 1024
    feature_stages = ("conv1", "layer1", "layer2", "layer3")

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = Conv2dNormActivation(3, self.STEM_CHANNELS, 1)
        stages, channels = [], self.STEM_CHANNELS
        for width, repeats in self.STAGES:
            stages.append(nn.Sequential(ShuffleUnit(channels, width, 2),
                                        *(ShuffleUnit(width, width, 1) for _ in range(repeats))))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = Conv2dNormActivation(channels, self.LAST_CHANNELS, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.LAST_CHANNELS, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pooled_logits(self.conv2(self.layer3(self.layer2(self.layer1(self.conv1(x))))), self.avgpool, self.fc)


# name -> constructor taking num_classes; the names and shapes of RepDistiller's / mdistiller's CIFAR models
ZOO: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{depth}": partial(SmallResNet, depth, (16, 16, 32, 64)) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(SmallResNet, 8, (32, 64, 128, 256)),
    "resnet32x4": partial(SmallResNet, 32, (32, 64, 128, 256)),
    **{f"wrn_{depth}_{widen}": partial(WideResNet, depth, widen) for depth in (16, 40) for widen in (1, 2)},
    "vgg8": partial(SmallVGG, ((64,), (128,), (256,), (512,), (512,))),
    "vgg13": partial(SmallVGG, ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))),
    "mobilenetv2": SmallMobileNetV2,
    "shufflenetv2": SmallShuffleNetV2,
}
