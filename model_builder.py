"""Building classifiers by name from torchvision's definitions, adapted to small images."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torchvision import models

SMALL_IMAGE_MAX = 64  # pixels; up to this size the small-image variants are used
ALIASES = {"vgg16": "vgg16_bn", "resnet18": "resnet18"}  # the project's names -> torchvision's


class UnknownModelError(ValueError):
    """The requested architecture is not a torchvision classification model."""


def torchvision_name(name: str) -> str:
    """Map a user-facing model name (e.g. 'VGG16', 'ResNet18', 'mobilenet_v3_small') to torchvision's."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    available = models.list_models(module=models)
    if key not in available:
        raise UnknownModelError(
            f"Unknown model '{name}': use VGG16, ResNet18 or a torchvision classifier such as "
            f"{', '.join(sorted(a for a in available if a.startswith(('resnet', 'vgg', 'mobilenet')))[:8])}."
        )
    return key


def _adapt_resnet(model: models.ResNet) -> None:
    """Small-image ResNet stem: a 3x3 stride-1 convolution and no max-pool (as for CIFAR)."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _adapt_vgg(model: models.VGG, num_classes: int) -> None:
    """Small-image VGG: the full convolutional stack, global pooling and one linear layer."""
    channels = [m for m in model.features if isinstance(m, nn.Conv2d)][-1].out_channels
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(channels, num_classes))


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """Build an untrained torchvision classifier by name for a class count and image size.

    No weights are downloaded; ResNet and VGG families get their small-image variants
    when `image_size` is at most SMALL_IMAGE_MAX.
    """
    key = torchvision_name(name)
    model = models.get_model(key, weights=None, num_classes=num_classes)
    if image_size <= SMALL_IMAGE_MAX:
        if isinstance(model, models.ResNet):
            _adapt_resnet(model)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(model, models.VGG):
            _adapt_vgg(model, num_classes)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of a model."""
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    """Size of the model's parameters and buffers in megabytes (2**20 bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a DistributedDataParallel or torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def describe(model: nn.Module) -> dict[str, float]:
    """Parameter count and size of a model, for summaries."""
    plain = unwrap(model)
    return {"params": count_parameters(plain), "size_mb": round(model_size_mb(plain), 3)}


def flops_per_image(model: nn.Module, image_size: int) -> int:
    """Floating-point operations of one forward pass on one image (torch.utils.flop_counter).

    Counted on a CPU copy in eval mode, so it works for any device and leaves the model untouched.
    """
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    plain = copy.deepcopy(unwrap(model)).cpu().float().eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        plain(torch.zeros(1, 3, image_size, image_size))
    return int(counter.get_total_flops())


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter and buffer on the meta device: nothing is allocated or initialized.

    A meta default device (`with torch.device("meta")`) would also put the plain tensors some
    builders compute with on the meta device (RegNet's block widths), which cannot be read back.
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer_on_meta(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def build_on_meta(name: str, num_classes: int, image_size: int) -> nn.Module:
    """`build_model` with every parameter and buffer on the meta device: layer names and shapes
    at no memory or time cost, for checks made before any work."""
    with _parameters_on_meta():
        return build_model(name, num_classes, image_size)


def check_input_size(name: str, image_size: int) -> None:
    """Raise ValueError when a model cannot take images of this size (checked on the meta device).

    Any failure of the trial forward pass counts (shape errors, a model's own assertion on the
    input size, ...), so an unsuitable size is refused in one sentence before any work.
    """
    model = build_on_meta(name, 2, image_size).eval()
    try:
        with torch.device("meta"):
            model(torch.zeros(1, 3, image_size, image_size))
    except Exception as error:  # any failure means the model cannot run at this size
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{name} cannot take {image_size}x{image_size} images ({reason}); "
                         "choose another --image-size or model.") from None
