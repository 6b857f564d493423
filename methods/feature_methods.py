"""Feature distillation's pieces: hooks on named layers, the layer pairs, and the feature losses of
FitNets, attention transfer and ReviewKD with their trainable parts. `FeatureTerm` puts one method's
pieces together between a teacher and a student; `KD_engine.FeatureDistillationCriterion` adds its
loss to the logit losses.

- FitNets (Romero et al. 2015): the MSE between a conv + BN + ReLU regressor of the student's map
  and the teacher's map, on one middle layer pair (RepDistiller, mdistiller).
- Attention transfer (Zagoruyko & Komodakis 2017): the squared difference of L2-normalized p=2
  attention maps, averaged over samples and positions, summed over the stage pairs.
- ReviewKD (Chen et al., CVPR 2021), as mdistiller's `ReviewKD` (mdistiller/distillers/ReviewKD.py):
  the student's stage maps and its pooled feature go, deepest first, through attention-based fusion
  (ABF) modules. Each reduces its map to a common width (1x1 conv + BN), fuses it with the deeper
  level's fused map (upsampled, weighed by a learned two-channel attention), and brings the result
  to the teacher's channels and size (3x3 conv + BN). The hierarchical context loss (HCL) compares
  each output with the teacher's map before its final ReLU (mdistiller's `preact_feats`): the MSE at
  full size and the MSEs of the maps average-pooled to 4x4, 2x2 and 1x1 (sizes below the map's) with
  weights 1/2, 1/4, 1/8, divided by the weights' sum; summed over the levels.

The trainable parts (FitNets' regressors, ReviewKD's ABFs) are trained with the student.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import model_builder

FEATURE_METHODS = ("fitnet", "at", "reviewkd")
# The references' feature weights beside a CE weight of 1: FitNets 100 and AT 1000 (RepDistiller's run scripts,
# mdistiller's FITNET/AT.LOSS.FEAT_WEIGHT), ReviewKD 5 (mdistiller configs/cifar100/reviewkd.yaml REVIEWKD_WEIGHT).
FEATURE_WEIGHTS = {"fitnet": 100.0, "at": 1000.0, "reviewkd": 5.0}
HINT_STAGE = 2  # the references' hint_layer: an index into (stem, stage 1, stage 2, ...)
ABF_MAX_WIDTH = 512  # mdistiller REVIEWKD.MAX_MID_CHANNEL: the ABFs' width is min(512, the pooled feature's)
HCL_SIZES = (4, 2, 1)  # mdistiller's hcl_loss: the pooled sizes of the hierarchical context loss


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then every submodule's own training flag back (modes may be mixed)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class FeatureHooks:
    """Forward hooks keeping the latest output of named submodules of a model.

    Names are those of `named_modules()` of the plain model ("layer3", "features.22"); a
    DistributedDataParallel or torch.compile wrapper is looked through. A module called more
    than once per forward keeps its last output, and a hooked output must not be modified in
    place later in the forward (hook a block's output, not a layer an in-place add follows).
    For the names in `before`, the module's input is kept instead, as a copy (so an in-place
    ReLU cannot change it).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], before: Collection[str] = ()) -> None:
        plain = model_builder.unwrap(model)
        modules = dict(plain.named_modules())
        for name in names:
            if name not in modules:
                available = [n for n in modules if n]
                near = difflib.get_close_matches(name, available, n=6, cutoff=0.5) or available[:8]
                raise ValueError(f"{type(plain).__name__} has no layer '{name}'; "
                                 f"layers include: {', '.join(near)} (see model.named_modules()).")
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_pre_hook(self._input_keeper(name)) if name in before
                         else modules[name].register_forward_hook(self._keeper(name))
                         for name in dict.fromkeys(names)]

    def _keeper(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = output
        return keep

    def _input_keeper(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def keep(module: nn.Module, inputs: tuple) -> None:
            self.outputs[name] = inputs[0].clone()
        return keep

    def take(self) -> list[torch.Tensor]:
        """The hooked outputs of the last forward, in the order of `names`, then forgets them
        (so a later call can never be handed an earlier forward's features)."""
        for name in self.names:
            if name not in self.outputs:
                raise RuntimeError(f"Layer '{name}' gave no output: run the hooked model before taking its features.")
        features = [self.outputs[name] for name in self.names]
        self.outputs.clear()
        return features

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()


def dry_run(model: nn.Module, image_size: int) -> None:
    """One run of the model on two zero images of `image_size` pixels, in eval and inference mode (no
    running statistic moves; works on the meta device), for hooks to see every layer's output."""
    plain = model_builder.unwrap(model)
    parameter = next(plain.parameters())
    probe = torch.zeros(2, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
    with eval_mode(plain), torch.inference_mode():
        plain(probe)


def feature_shapes(model: nn.Module, hooks: FeatureHooks, image_size: int) -> list[torch.Size]:
    """The shapes of the hooked layers' outputs, from a `dry_run`; each must be an (N, C, H, W) map."""
    dry_run(model, image_size)
    shapes = [feature.shape for feature in hooks.take()]
    for name, shape in zip(hooks.names, shapes, strict=True):
        if len(shape) != 4:
            raise ValueError(f"Feature distillation needs (N, C, H, W) maps; layer '{name}' gives shape "
                             f"{tuple(shape)}.")
    return shapes


def pre_activation_layers(model: nn.Module, names: Sequence[str], image_size: int) -> dict[str, str]:
    """For each named layer whose output is the output of a ReLU module (the layer itself, or the last
    ReLU to run inside it, as at the end of a ResNet block), the name of that ReLU: its input is the
    layer's map before the activation (mdistiller's `preact_feats`). Found by one `dry_run`; a layer
    whose output comes from anything else (an addition, a BN) is left out."""
    layer_hooks = FeatureHooks(model, names)  # first: it names a missing layer
    modules = dict(model_builder.unwrap(model).named_modules())
    inside = {name: [sub for sub, module in modules.items() if isinstance(module, nn.ReLU)
                     and (sub == name or sub.startswith(name + "."))] for name in names}
    relus = sorted({sub for subs in inside.values() for sub in subs})
    relu_hooks = FeatureHooks(model, relus)
    try:
        dry_run(model, image_size)
        relu_outputs = dict(zip(relus, relu_hooks.take(), strict=True))
        layer_outputs = dict(zip(names, layer_hooks.take(), strict=True))
    finally:
        relu_hooks.remove()
        layer_hooks.remove()
    return {name: sub for name, subs in inside.items() for sub in subs if relu_outputs[sub] is layer_outputs[name]}


def default_feature_layers(method: str, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
    """The (teacher layer, student layer) pairs the references distill for `method`.

    From each model's feature stages (stem, stage 1, stage 2, ...; `model_builder.feature_stages`):
    FitNets takes the pair at HINT_STAGE; AT pairs the stage outputs in order (without the stem),
    as many pairs as the shallower model has stages; ReviewKD takes AT's pairs and then the two
    pooled features (`model_builder.pooled_feature`), its deepest level.
    """
    teacher_stages, student_stages = model_builder.feature_stages(teacher), model_builder.feature_stages(student)
    if method == "fitnet":
        if min(len(teacher_stages), len(student_stages)) <= HINT_STAGE:
            raise ValueError(f"FitNets' hint stage {HINT_STAGE} needs models with at least {HINT_STAGE} stages "
                             "after the stem.")
        return [(teacher_stages[HINT_STAGE], student_stages[HINT_STAGE])]
    pairs = list(zip(teacher_stages[1:], student_stages[1:], strict=False))
    if method == "reviewkd":
        pairs.append((model_builder.pooled_feature(teacher), model_builder.pooled_feature(student)))
    return pairs


def feature_weight(method: str, alpha: float, beta: float | None) -> float:
    """The weight of a feature method's term: `beta` when given, else FEATURE_WEIGHTS[method] * alpha."""
    if beta is not None:
        return beta
    if alpha == 0:
        raise ValueError(f"{method} at alpha 0 needs an explicit --beta: its default weight keeps the references' "
                         f"{FEATURE_WEIGHTS[method]:g} : 1 balance of feature and CE terms, which has no meaning "
                         "without a CE term.")
    return FEATURE_WEIGHTS[method] * alpha


def parse_feature_layers(text: str) -> list[tuple[str, str]]:
    """Parse "teacher_layer:student_layer,teacher_layer:student_layer" into pairs."""
    pairs = []
    for item in text.split(","):
        parts = [part.strip() for part in item.split(":")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"Bad feature-layer pair '{item.strip()}' in '{text}': expected "
                             "teacher_layer:student_layer, pairs separated by commas (e.g. features.22:layer3).")
        pairs.append((parts[0], parts[1]))
    return pairs


def match_spatial(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (N, C, H, W) maps brought to the smaller height and width by adaptive average pooling."""
    size = (min(first.shape[-2], second.shape[-2]), min(first.shape[-1], second.shape[-1]))
    return tuple(x if x.shape[-2:] == size else F.adaptive_avg_pool2d(x, size) for x in (first, second))


# ---------------------------------------------------------------- FitNets and attention transfer


class HintRegressor(nn.Sequential):
    """FitNets' regressor as the references build it: a convolution, BN and ReLU from the student's
    (C, H, W) map to the teacher's shape.

    The convolution halves a map twice the teacher's size (3x3, stride 2), doubles one half its
    size (4x4 transposed, stride 2), and otherwise shrinks a map at least as large by a valid
    convolution of kernel 1 + the size difference (1x1 for equal sizes).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        (s_channels, s_height, s_width), (t_channels, t_height, t_width) = student_shape[-3:], teacher_shape[-3:]
        if (s_height, s_width) == (2 * t_height, 2 * t_width):
            conv: nn.Module = nn.Conv2d(s_channels, t_channels, 3, stride=2, padding=1)
        elif (2 * s_height, 2 * s_width) == (t_height, t_width):
            conv = nn.ConvTranspose2d(s_channels, t_channels, 4, stride=2, padding=1)
        elif s_height >= t_height and s_width >= t_width:
            conv = nn.Conv2d(s_channels, t_channels, (1 + s_height - t_height, 1 + s_width - t_width))
        else:
            raise ValueError(f"FitNets cannot regress a student map of {s_height}x{s_width} onto a teacher map of "
                             f"{t_height}x{t_width} (the student's must be at least as large, or half as large).")
        super().__init__(conv, nn.BatchNorm2d(t_channels), nn.ReLU(inplace=True))


class HintRegressors(nn.Module):
    """One `HintRegressor` per layer pair, from the pairs' (student shape, teacher shape)."""

    def __init__(self, shapes: Iterable[tuple[Sequence[int], Sequence[int]]]) -> None:
        super().__init__()
        self.regressors = nn.ModuleList(HintRegressor(student, teacher) for student, teacher in shapes)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [regressor(feature) for regressor, feature in zip(self.regressors, features, strict=True)]


def fitnet_loss(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor], regressors: nn.Module,
) -> torch.Tensor:
    """FitNets' hint loss: MSE(regressor(student map), teacher map), a mean over every element,
    summed over layer pairs (the references use one pair)."""
    regressed = regressors(student_features)
    pairs = zip(regressed, teacher_features, strict=True)
    return torch.stack([F.mse_loss(student.float(), teacher.float()) for student, teacher in pairs]).sum()


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a (N, C, H, W) map (p = 2): the channel mean of squares, flattened, unit L2 norm."""
    return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), dim=1)


def at_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention transfer as the references compute it: per layer pair, the squared difference of
    the attention maps averaged over samples and positions (the larger map pooled to the smaller
    one's size first); summed over pairs."""
    losses = []
    for student, teacher in zip(student_features, teacher_features, strict=True):
        student, teacher = match_spatial(student, teacher)
        losses.append((attention_map(student) - attention_map(teacher)).pow(2).mean())
    return torch.stack(losses).sum()


# ---------------------------------------------------------------- ReviewKD


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


# ---------------------------------------------------------------- one method between two models


def trainable_part(method: str, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> nn.Module | None:
    """What `method` trains with the student, from the pairs' (student shape, teacher shape): FitNets'
    regressors, ReviewKD's ABFs, or nothing (AT)."""
    if method == "fitnet":
        return HintRegressors(shapes)
    if method == "reviewkd":
        return ReviewFusion(shapes)
    return None


class FeatureTerm:
    """The feature loss of one method of FEATURE_METHODS between a teacher and a student.

    Hooks go on the named teacher and student layers at construction (`close()` takes them off);
    ReviewKD hooks the teacher's maps before their final ReLU (`pre_activation_layers`). One dry run
    of both models on zero images of `image_size` pixels checks that every hooked map is
    (N, C, H, W) and sizes `trainable`: None, or the method's trainable part on the student's device
    in float32 and channels_last, which the caller adds to the optimizer. Under torchrun its gradients
    are averaged across ranks.

    Per batch: run the teacher (under inference mode), take `teacher_features()`, run the student,
    then call the term with those teacher features.
    """

    def __init__(
        self, teacher: nn.Module, student: nn.Module, method: str, pairs: Sequence[tuple[str, str]],
        image_size: int = 32,
    ) -> None:
        if method not in FEATURE_METHODS:
            raise ValueError(f"Unknown feature method '{method}'; use one of {', '.join(FEATURE_METHODS)}.")
        if not pairs:
            raise ValueError("Feature distillation needs at least one (teacher_layer, student_layer) pair.")
        self.method, self.pairs = method, list(pairs)
        teacher_layers = [t for t, _ in pairs]
        before = pre_activation_layers(teacher, teacher_layers, image_size) if method == "reviewkd" else {}
        self.student_hooks = FeatureHooks(student, [s for _, s in pairs])
        try:
            self.teacher_hooks = FeatureHooks(teacher, [before.get(t, t) for t in teacher_layers],
                                              set(before.values()))
        except ValueError:
            self.student_hooks.remove()
            raise
        try:
            shapes = list(zip(feature_shapes(student, self.student_hooks, image_size),
                              feature_shapes(teacher, self.teacher_hooks, image_size), strict=True))
            self.trainable = trainable_part(method, shapes)
        except ValueError:
            self.close()
            raise
        self._trainable = self.trainable
        if self.trainable is not None:
            # channels_last like the project's models: the part's gradients then match DDP's buckets.
            student_device = next(model_builder.unwrap(student).parameters()).device
            self.trainable.to(student_device, memory_format=torch.channels_last)
            if dist.is_initialized() and dist.get_world_size() > 1:
                # Ranks see different shards; DDP starts the part equal and averages its gradients.
                # `trainable` stays the plain module, so its state_dict keys do not depend on the world size.
                self._trainable = nn.parallel.DistributedDataParallel(self.trainable)

    def teacher_features(self) -> list[torch.Tensor]:
        """The teacher's hooked maps of its last forward, copied out of inference mode (the loss keeps them
        for its backward pass, which an inference tensor cannot be)."""
        return [feature.clone() for feature in self.teacher_hooks.take()]

    def __call__(self, teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The method's loss between the student's hooked maps of its last forward and `teacher_features`."""
        student_features = self.student_hooks.take()
        if self.method == "fitnet":
            return fitnet_loss(student_features, teacher_features, self._trainable)
        if self.method == "reviewkd":
            return hcl_loss(self._trainable(student_features), teacher_features)
        return at_loss(student_features, teacher_features)

    def close(self) -> None:
        """Take the hooks off the teacher and the student."""
        self.teacher_hooks.remove()
        self.student_hooks.remove()


def check_feature_pairs(
    method: str, teacher: nn.Module, student: nn.Module, pairs: Sequence[tuple[str, str]], image_size: int,
) -> None:
    """Raise ValueError when `method` cannot distill these layer pairs at `image_size` pixels: a missing
    layer, a map that is not (N, C, H, W), or (fitnet) maps no regressor can match. Give it meta-device
    models, under `torch.device("meta")`, to spend no memory or time."""
    FeatureTerm(teacher, student, method, pairs, image_size).close()
