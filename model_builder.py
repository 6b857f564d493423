"""Building classifiers by name: the KD literature's small-image networks, and torchvision's
definitions adapted to small images.

Two families of names:

- the small-image networks the KD literature benchmarks with (RepDistiller / mdistiller CIFAR
  models, `cifar_networks.ZOO`): resnet8 ... resnet110, resnet8x4, resnet32x4, wrn_16_1 ... wrn_40_2, vgg8,
  vgg13, mobilenetv2, shufflenetv2. Their names win over torchvision's: `vgg13` is the CIFAR
  VGG13 with batch norm (torchvision's ImageNet VGG13 stays reachable as `vgg13_bn`);
- every other torchvision classifier; `VGG16` is torchvision's vgg16_bn. ResNet and VGG families
  get small-image variants up to SMALL_IMAGE_MAX pixels.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models

from core import compute, errors
from nets import foreign_formats
from nets.cifar_networks import ZOO

SMALL_IMAGE_MAX = 64  # pixels; up to this size torchvision's ResNets and VGGs get small-image variants
HEADS = ("compact", "torchvision")  # a VGG's classifier: global pooling + one linear layer, or torchvision's 4096-wide
MIN_BATCH_NORM_MOMENTUM = 0.1  # PyTorch's default; see _for_short_runs
GROUPED_FAN_OUT_FAMILIES = (models.MobileNetV2, models.MobileNetV3, models.MNASNet, models.EfficientNet, models.RegNet)
ALIASES = {"vgg16": "vgg16_bn", "resnet18": "resnet18"}  # the project's names -> torchvision's
DOWNLOAD_TIMEOUT = 30  # seconds without an answer before a weights download counts as impossible
POOLED_FEATURE = "avgpool"  # the layer whose output is the pooled feature map, in the zoo and torchvision's models
WEIGHTS_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")  # a setting ending so is meant as a file


class UnknownModelError(ValueError):
    """The requested architecture is neither a network of the zoo nor a torchvision classifier."""


class WeightsError(ValueError):
    """Pretrained weights that cannot be found, read or fitted; the message is one sentence."""


# ---------------------------------------------------------------- building by name


def architecture_name(name: str) -> str:
    """The canonical name of a model: a name of `ZOO` or torchvision's (e.g. 'VGG16' -> 'vgg16_bn')."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in ZOO:
        return key
    available = models.list_models(module=models)
    if key not in available:
        raise UnknownModelError(
            f"Unknown model '{name}': use VGG16, ResNet18, a small-image network of the KD literature "
            f"({', '.join(ZOO)}) or a torchvision classifier such as "
            f"{', '.join(sorted(a for a in available if a.startswith(('resnet', 'mobilenet')))[:6])}."
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


def _for_short_runs(model: nn.Module) -> None:
    """torchvision's mobile networks are made for ImageNet's 100,000s of steps: batch norms moving 0.01 or less a
    step, depthwise convolutions initialized as if ungrouped (sqrt(groups) too small). In a short run their running
    statistics stay far from the batches', and in eval mode the model answers one class. Set as timm sets them:
    momentum at least MIN_BATCH_NORM_MOMENTUM, grouped convolutions' He normal with their true fan-out."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None:
            module.momentum = max(module.momentum, MIN_BATCH_NORM_MOMENTUM)
        elif isinstance(module, nn.Conv2d) and module.groups > 1 and isinstance(model, GROUPED_FAN_OUT_FAMILIES):
            fan_out = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)


def default_head(pretrained: Any = None) -> str:
    """A VGG's head: torchvision's where pretrained weights load (they hold it), else the compact one (see HEADS)."""
    return "compact" if pretrained is None else "torchvision"


def build_model(name: str, num_classes: int, image_size: int, head: str = "compact") -> nn.Module:
    """Build an untrained classifier by name for a class count and image size.

    No weights are downloaded. Networks of `ZOO` are the same at every size; torchvision's ResNet and VGG families
    get small-image variants when `image_size` is at most SMALL_IMAGE_MAX; a larger VGG gets the `head` asked for.
    """
    key = architecture_name(name)
    if key in ZOO:
        return ZOO[key](num_classes=num_classes)
    model = models.get_model(key, weights=None, num_classes=num_classes)
    _for_short_runs(model)
    if isinstance(model, models.ResNet) and image_size <= SMALL_IMAGE_MAX:
        _adapt_resnet(model)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(model, models.VGG) and (image_size <= SMALL_IMAGE_MAX or head == "compact"):
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
    """Where torch.hub keeps (and looks for) a torchvision weights file:
    $TORCH_HOME/hub/checkpoints/<url's file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def weights_names(arch: str) -> list[str]:
    """The torchvision weights names of `arch` (none for the networks of `ZOO`, which torchvision does not define)."""
    key = architecture_name(arch)
    return [] if key in ZOO else list(models.get_model_weights(key).__members__)


def weights_by_name(arch: str, name: str) -> models.WeightsEnum | None:
    """The torchvision weights of `arch` called `name` ("DEFAULT", "IMAGENET1K_V1" or
    "VGG16_BN_Weights.IMAGENET1K_V1"), or None."""
    if not weights_names(arch):
        return None
    enum = models.get_model_weights(architecture_name(arch))
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
    """The torch hub cache's file of `weights`, downloaded (hash-checked) only when it is missing and the
    network allows."""
    path = hub_weights_file(weights)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            torch.hub.download_url_to_file(weights.url, str(path), match.group(1) if match else None)
    except Exception as error:  # offline, refused, timed out, or a damaged download: all the user's to fix
        raise WeightsError(f"{weights} is not in the torch hub cache and could not be downloaded "
                           f"({errors.one_line(error, brief=True)}): "
                           f"put {path.name} (from {weights.url}) into {path.parent}.") from None
    return path


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a state-dict file (read without running code from it), and the file's other entries.

    A plain state dict, or a checkpoint holding one under "state_dict" (as this project's best_model.pth),
    "model" (mdistiller's and RepDistiller's published teachers, torchdistill's), "net" or "model_state_dict";
    DataParallel's "module." prefix is taken off (see `foreign_formats`).
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file is the user's to replace
        raise WeightsError(f"Cannot read weights file '{path}': {errors.one_line(error, brief=True)}") from None
    content, extra = foreign_formats.unpack(content)
    tensors_only = isinstance(content, dict) and all(isinstance(value, torch.Tensor) for value in content.values())
    if not (content and tensors_only):
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
        names = ", ".join(weights_names(arch)) or "it has none: torchvision does not define it"
        if path.exists():
            raise WeightsError(f"'{setting}' is a folder, not a state-dict file.")
        if os.sep in setting or "/" in setting or path.suffix.lower() in WEIGHTS_FILE_SUFFIXES:
            raise WeightsError(f"There is no weights file '{setting}'.")
        raise WeightsError(f"'{setting}' is neither a weights name of {architecture_name(arch)} ({names}) "
                           "nor a state-dict file.")
    state_dict, extra = read_state_dict(path)
    mean, std = extra.get("mean"), extra.get("std")
    usable = isinstance(mean, list) and isinstance(std, list)
    return Pretrained(str(path), str(path), state_dict, mean if usable else None, std if usable else None)


def pretrained_fit(model: nn.Module, pretrained: Pretrained) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of `pretrained` that fit `model` (same name, or place when the file names the layers otherwise:
    `foreign_formats.align`; and the same shape), and a record for the console and
    summary.json naming the model's layers none fits (e.g. a classifier for another class count, the
    small-image stem), in model order. Works on a model built on the meta device."""
    own = compute.unwrap(model).state_dict()
    fitting = {name: tensor for name, tensor in foreign_formats.align(own, pretrained.state_dict).items()
               if name in own and own[name].shape == tensor.shape}
    if not {name for name, _ in compute.unwrap(model).named_parameters()} & fitting.keys():
        raise WeightsError(f"No tensor of {pretrained.source} fits {type(compute.unwrap(model)).__name__}: "
                           "the weights are for another architecture.")
    reinitialized = dict.fromkeys(name.rpartition(".")[0] or name for name in own
                                  if name not in fitting and not foreign_formats.is_counter(name))
    return fitting, {"weights": pretrained.source, "file": pretrained.file, "loaded_tensors": len(fitting),
                     "model_tensors": len(own), "reinitialized": list(reinitialized)}


def load_pretrained(model: nn.Module, pretrained: Pretrained) -> dict[str, Any]:
    """Copy the fitting tensors of `pretrained` into `model`; the layers they do not fit keep their fresh
    initialization. Returns `pretrained_fit`'s record."""
    fitting, record = pretrained_fit(model, pretrained)
    compute.unwrap(model).load_state_dict(fitting, strict=False)
    return record


# ---------------------------------------------------------------- a run's initial weights, by role


def read_initial_weights(requested: dict[str, tuple[str, str]]) -> dict[str, Pretrained]:
    """The initial weights of each role ("teacher" / "student") given them (`requested`: role -> (architecture,
    weights name or file)), read before any work; when several fail (offline, files missing), one WeightsError
    names them all."""
    weights, problems = {}, []
    for role, (arch, setting) in requested.items():
        try:
            weights[role] = read_pretrained(arch, setting)
        except WeightsError as error:
            problems.append(f"--{role}-weights {setting}: {error}")
    if problems:
        raise WeightsError(" And ".join(problems))
    return weights


def check_initial_weights(
    weights: dict[str, Pretrained], archs: dict[str, str], num_classes: int, image_size: int,
    used_as_loaded: tuple[str, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Each role's `pretrained_fit` record on its model (`archs`: role -> architecture); WeightsError when the
    weights fit no layer of it, or leave any layer of a role `used_as_loaded` (a teacher not trained further)."""
    fits = {}
    for role, pretrained in weights.items():
        model = build_on_meta(archs[role], num_classes, image_size, default_head(pretrained))
        if role in used_as_loaded:
            check_exact_fit(model, pretrained, archs[role], num_classes)
        try:
            fits[role] = pretrained_fit(model, pretrained)[1]
        except WeightsError as error:
            raise WeightsError(f"--{role}-weights: {error}") from None
    return fits


def fit_sentence(role: str, record: dict[str, Any]) -> str:
    """What a role's initial weights loaded and left re-initialized (`pretrained_fit`'s record), for the console."""
    return (f"The {role} starts from {record['weights']}: {record['loaded_tensors']} of {record['model_tensors']} "
            "tensors loaded; re-initialized (no tensor of that shape in the file): "
            f"{', '.join(record['reinitialized']) or 'none'}")


def check_exact_fit(model: nn.Module, pretrained: Pretrained, arch: str, num_classes: int) -> None:
    """A teacher used as loaded (--teacher-epochs 0) needs every layer from its file: WeightsError naming every
    one that does not fit (the classifier of another class count, layers of another architecture)."""
    own = model.state_dict()
    found = foreign_formats.mismatches(own, foreign_formats.align(own, pretrained.state_dict))
    if found:
        shown = "; ".join(found[:8]) + (f"; and {len(found) - 8} more" if len(found) > 8 else "")
        raise WeightsError(f"--teacher-epochs 0 uses the teacher as --teacher-weights {pretrained.source} gives it, "
                           f"but {len(found)} of its tensors do not fit a {arch} for {num_classes} classes: {shown}.")


def input_normalization(
    teacher_checkpoint: dict[str, Any] | None, weights: dict[str, Pretrained], own: tuple[list[float], list[float]],
) -> tuple[list[float], list[float], str]:
    """The inputs' mean and std every model of a run shares, and where they come from: a reused teacher's own (it
    expects its training's inputs), else what initial weights expect (the teacher's before the students'), else
    `own` (the training split's)."""
    if teacher_checkpoint is not None:
        return teacher_checkpoint["mean"], teacher_checkpoint["std"], "the teacher checkpoint's"
    for role in ("teacher", "student"):
        pretrained = weights.get(role)
        if pretrained is not None and pretrained.mean is not None:
            return pretrained.mean, pretrained.std, f"{role} weights {pretrained.source}"
    return *own, "the training split's own"


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


def build_on_meta(name: str, num_classes: int, image_size: int, head: str = "compact") -> nn.Module:
    """`build_model` with every parameter and buffer on the meta device: layer names and shapes
    at no memory or time cost, for checks made before any work."""
    with _parameters_on_meta():
        return build_model(name, num_classes, image_size, head)


MIN_FEATURE_MAP = 2  # the last feature map's side, at least: at 1x1 no spatial structure is left to learn from


def last_feature_map(model: nn.Module, image_size: int) -> tuple[int, int] | None:
    """Height and width of the map the model's last convolution gives at this size (the map its classifier
    pools; squeeze-and-excitation's convolutions on pooled maps come earlier), found on the meta device. None
    for a model without convolutions."""
    sides: list[tuple[int, int]] = []

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(module, nn.Conv2d):
            sides.append(tuple(output.shape[-2:]))

    hook = nn.modules.module.register_module_forward_hook(record)
    try:
        with torch.device("meta"):
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        hook.remove()
    return sides[-1] if sides else None


def check_input_size(name: str, image_size: int) -> None:
    """Raise ValueError when a model cannot take images of this size (checked on the meta device): its trial
    forward pass fails (shape errors, a model's own assertion on the input size, ...), or its last feature map is
    smaller than MIN_FEATURE_MAP on a side, so an unsuitable size is refused in one sentence before any work.
    """
    model = build_on_meta(name, 2, image_size).eval()
    try:
        side = last_feature_map(model, image_size)
    except Exception as error:  # any failure means the model cannot run at this size
        raise ValueError(f"{name} cannot take {image_size}x{image_size} images ({errors.one_line(error)}); "
                         "choose another --image-size or model.") from None
    if side is not None and min(side) < MIN_FEATURE_MAP:
        raise ValueError(f"{name} shrinks {image_size}x{image_size} images to a {side[0]}x{side[1]} last feature "
                         f"map (at least {MIN_FEATURE_MAP}x{MIN_FEATURE_MAP} is needed to learn anything spatial); "
                         "choose a larger --image-size, or a network of the KD literature such as resnet8x4, which "
                         "keeps small images.")


def feature_stages(model: nn.Module) -> list[str]:
    """Names of the layers the KD references distill from, in order: the stem's output, then every
    stage's output (RepDistiller's / mdistiller's feature lists, without the pooled vector).

    Networks of `ZOO` name their own; torchvision's ResNets give the stem's ReLU and layer1-4, its
    VGGs the ReLU before each max-pool. Raises ValueError for any other model.
    """
    plain = compute.unwrap(model)
    if hasattr(plain, "feature_stages"):
        return list(plain.feature_stages)
    if isinstance(plain, models.ResNet):
        return ["relu", "layer1", "layer2", "layer3", "layer4"]
    if isinstance(plain, models.VGG):
        return [f"features.{index - 1}" for index, layer in enumerate(plain.features)
                if isinstance(layer, nn.MaxPool2d)]
    raise ValueError(f"No feature stages are known for {type(plain).__name__}; name its layers with "
                     "--feature-layers (python experiment.py --list-layers MODEL lists them).")


def pooled_feature(model: nn.Module) -> str:
    """Name of the layer giving the pooled feature map before the classifier (mdistiller's `pooled_feat`,
    ReviewKD's deepest level): "avgpool" in the zoo and torchvision's ResNets and VGGs. Raises ValueError
    for a model without one."""
    plain = compute.unwrap(model)
    if POOLED_FEATURE in dict(plain.named_modules()):
        return POOLED_FEATURE
    raise ValueError(f"{type(plain).__name__} has no '{POOLED_FEATURE}' layer for ReviewKD's pooled feature; name "
                     "its layers with --feature-layers (python experiment.py --list-layers MODEL lists them).")


def classifier_layer(model: nn.Module) -> str:
    """Name of the model's classifier: the top-level layer holding its last linear layer ("fc" in the zoo's and
    torchvision's ResNets, "classifier" in VGGs). Its input is the embedding (RepDistiller's feat[-1]), flattened
    or (N, C, 1, 1). Raises ValueError for a model without a linear layer."""
    plain = compute.unwrap(model)
    holders = [name for name, child in plain.named_children()
               if any(isinstance(module, nn.Linear) for module in child.modules())]
    if not holders:
        raise ValueError(f"{type(plain).__name__} has no linear classifier whose input is its embedding; name its "
                         "layers with --feature-layers (python experiment.py --list-layers MODEL lists them).")
    return holders[-1]


def layer_shapes(model: nn.Module, image_size: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, type, output shape for one image) of every named layer, in the order the layers first
    run in one forward pass (a layer run twice shows its last output). Run it on the meta device to
    spend no memory or time."""
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}

    def keeper(name: str):
        def keep(module: nn.Module, inputs: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor):
                shapes[name] = (type(module).__name__, tuple(output.shape[1:]))
        return keep

    plain = compute.unwrap(model)
    parameter = next(plain.parameters())
    handles = [module.register_forward_hook(keeper(name)) for name, module in plain.named_modules() if name]
    try:
        with torch.no_grad():
            plain.eval()(torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return [(name, kind, shape) for name, (kind, shape) in shapes.items()]


def layer_table(name: str, image_size: int, num_classes: int = 10) -> str:
    """Every layer of a model by name with its output shape at `image_size` pixels; the feature
    stages (see `feature_stages`) are marked, numbered as in the references' feature lists, and the pooled feature
    and classifier (`classifier_layer`)."""
    check_input_size(name, image_size)
    model = build_on_meta(name, num_classes, image_size)
    with torch.device("meta"):
        rows = layer_shapes(model, image_size)
    try:
        stages = {layer: f"stage {index}" for index, layer in enumerate(feature_stages(model))}
    except ValueError:
        stages = {}
    if POOLED_FEATURE in dict(model.named_modules()):
        stages[POOLED_FEATURE] = "pooled feature"
    with suppress(ValueError):  # a model without a linear classifier (SqueezeNet's is a convolution)
        stages[classifier_layer(model)] = "classifier (its input: the embedding)"
    width = max(len(row[0]) for row in rows) + 2
    lines = [f"{architecture_name(name)} at {image_size}x{image_size} px ({num_classes} classes): layer, type, "
             "output shape (channels x height x width); 'stage k' marks the k-th feature stage, 'pooled feature' "
             "ReviewKD's deepest level, 'classifier' the layer whose input cc, rkd and pkt distill"]
    for layer, kind, shape in rows:
        stage = f"  {stages[layer]}" if layer in stages else ""
        lines.append(f"{layer:<{width}}{kind:<24}{' x '.join(map(str, shape))}{stage}")
    return "\n".join(lines) + "\n"
