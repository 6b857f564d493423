"""Building classifiers by name from torchvision's definitions, adapted to small images."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models

SMALL_IMAGE_MAX = 64  # pixels; up to this size the small-image variants are used
ALIASES = {"vgg16": "vgg16_bn", "resnet18": "resnet18"}  # the project's names -> torchvision's
DOWNLOAD_TIMEOUT = 30  # seconds without an answer before a weights download counts as impossible
WEIGHTS_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")  # a setting ending so is meant as a file


class UnknownModelError(ValueError):
    """The requested architecture is not a torchvision classification model."""


class WeightsError(ValueError):
    """Pretrained weights that cannot be found, read or fitted; the message is one sentence."""


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


# ---------------------------------------------------------------- pretrained weights


@dataclass
class Pretrained:
    """Initial weights for a model: their name, the file read, its tensors, and the input normalization
    they were trained with (None when the file does not say)."""

    source: str
    file: str
    state_dict: dict[str, torch.Tensor]
    mean: list[float] | None = None
    std: list[float] | None = None


def hub_weights_file(weights: models.WeightsEnum) -> Path:
    """Where torch.hub keeps (and looks for) a torchvision weights file: $TORCH_HOME/hub/checkpoints/<url's file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def weights_by_name(arch: str, name: str) -> models.WeightsEnum | None:
    """The torchvision weights of `arch` called `name` ("DEFAULT", "IMAGENET1K_V1" or "VGG16_BN_Weights.IMAGENET1K_V1"), or None."""
    enum = models.get_model_weights(torchvision_name(arch))
    key = name.strip().upper().removeprefix(enum.__name__.upper() + ".")
    return enum.__members__.get(key)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub's download has no timeout of its own: without one, a network that drops packets would hang the run.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch_hub_weights(weights: models.WeightsEnum) -> Path:
    """The torch hub cache's file of `weights`, downloaded (hash-checked) only when it is missing and the network allows."""
    path = hub_weights_file(weights)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            torch.hub.download_url_to_file(weights.url, str(path), match.group(1) if match else None)
    except Exception as error:  # offline, refused, timed out, or a damaged download: all the user's to fix
        detail = f"{type(error).__name__}: {str(error).splitlines()[0]}" if str(error) else type(error).__name__
        raise WeightsError(f"{weights} is not in the torch hub cache and could not be downloaded ({detail}): "
                           f"put {path.name} (from {weights.url}) into {path.parent}.") from None
    return path


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a state-dict file (read without running code from it), and the file's other entries.

    A plain state dict, or a checkpoint holding one under "state_dict" (as this project's best_model.pth).
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file is the user's to replace
        raise WeightsError(f"Cannot read weights file '{path}': {type(error).__name__}: {str(error).splitlines()[0]}") from None
    extra: dict[str, Any] = {}
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content, extra = content["state_dict"], content
    if not (isinstance(content, dict) and content and all(isinstance(value, torch.Tensor) for value in content.values())):
        raise WeightsError(f"'{path}' does not hold a state dict (a mapping of layer names to tensors).")
    return content, extra


def read_pretrained(arch: str, setting: str) -> Pretrained:
    """Initial weights for `arch` from a torchvision weights name or a state-dict file's path.

    A name is read from the torch hub cache (downloaded there first when missing and possible); its
    normalization is that of the weights' own transforms (ImageNet's for torchvision's classifiers).
    A file gives the normalization only when it holds "mean" and "std" beside its "state_dict".
    """
    weights = weights_by_name(arch, setting)
    if weights is not None:
        path = fetch_hub_weights(weights)
        state_dict, _ = read_state_dict(path)
        transform = weights.transforms()
        mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
        return Pretrained(str(weights), str(path), state_dict,
                          None if mean is None else list(mean), None if std is None else list(std))
    path = Path(setting).expanduser()
    if not path.is_file():
        names = ", ".join(models.get_model_weights(torchvision_name(arch)).__members__)
        if path.exists():
            raise WeightsError(f"'{setting}' is a folder, not a state-dict file.")
        if os.sep in setting or "/" in setting or path.suffix.lower() in WEIGHTS_FILE_SUFFIXES:
            raise WeightsError(f"There is no weights file '{setting}'.")
        raise WeightsError(f"'{setting}' is neither a weights name of {torchvision_name(arch)} ({names}) nor a state-dict file.")
    state_dict, extra = read_state_dict(path)
    mean, std = extra.get("mean"), extra.get("std")
    usable = isinstance(mean, list) and isinstance(std, list)
    return Pretrained(str(path), str(path), state_dict, mean if usable else None, std if usable else None)


def pretrained_fit(model: nn.Module, pretrained: Pretrained) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of `pretrained` that fit `model` (same name and shape), and a record for the console and
    summary.json naming the model's layers none fits (e.g. a classifier for another class count, the
    small-image stem), in model order. Works on a model built on the meta device."""
    own = unwrap(model).state_dict()
    fitting = {name: tensor for name, tensor in pretrained.state_dict.items()
               if name in own and own[name].shape == tensor.shape}
    if not {name for name, _ in unwrap(model).named_parameters()} & fitting.keys():
        raise WeightsError(f"No tensor of {pretrained.source} fits {type(unwrap(model)).__name__}: "
                           "the weights are for another architecture.")
    reinitialized = dict.fromkeys(name.rpartition(".")[0] or name for name in own if name not in fitting)
    return fitting, {"weights": pretrained.source, "file": pretrained.file, "loaded_tensors": len(fitting),
                     "model_tensors": len(own), "reinitialized": list(reinitialized)}


def load_pretrained(model: nn.Module, pretrained: Pretrained) -> dict[str, Any]:
    """Copy the fitting tensors of `pretrained` into `model`; the layers they do not fit keep their fresh
    initialization. Returns `pretrained_fit`'s record."""
    fitting, record = pretrained_fit(model, pretrained)
    unwrap(model).load_state_dict(fitting, strict=False)
    return record


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
