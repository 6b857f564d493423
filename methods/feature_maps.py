"""Feature distillation's shared pieces: hooks on named layers, dry runs that size the hooked maps, the
layer pairs, `FeatureMethod`, the base of the methods that distill feature maps (fitnet, at, reviewkd, ...), and
`PairSumMethod`, that of those whose term is a loss per layer pair summed in float32 (sp, rkd, pkt, nst, cc, vid).

A feature method's loss is its own term beside Hinton's KD mix:

    loss = alpha * CE + (1 - alpha) * KD + beta * warmup * feature_loss

By default beta is the reference's weight (`reference_weight`, beside its CE weight of 1) times alpha, so the
feature : CE balance is the reference's at any alpha, and alpha = 1 gives exactly its loss.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import model_builder
from core import compute
from methods.base import (
    REFERENCE_MIX,
    Method,
    Setting,
    Setup,
    TeacherOutputs,
    unused_weight,
    warmup_factor,
    warmup_steps,
)
from methods.kd import distillation_loss

SETTINGS = {
    "beta": Setting(float | None, None, "feature and relational methods (fitnet, at, reviewkd, sp, rkd, ...): "
                    "weight of their term, beside alpha*CE + (1-alpha)*KD", unset="the reference's weight beside a "
                    "CE weight of 1 (fitnet 100, at 1000, reviewkd 5, sp 3000, rkd 1, pkt 30000, nst 50, cc 0.02, "
                    "vid 1: RepDistiller's scripts, mdistiller's CIFAR-100 configs) times --alpha",
                    check=lambda value: value >= 0, rule="must be >= 0"),
    "feature_layers": Setting(str | None, None, "feature methods: teacher_layer:student_layer pairs, "
                              "comma-separated, shallowest first (reviewkd: its last pair is the deepest level, e.g. "
                              "avgpool:avgpool; see --list-layers)", unset="the references' pairs for the two models"),
}


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
        plain = compute.unwrap(model)
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
    plain = compute.unwrap(model)
    parameter = next(plain.parameters())
    probe = torch.zeros(2, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
    with eval_mode(plain), torch.inference_mode():
        plain(probe)


def feature_shapes(model: nn.Module, hooks: FeatureHooks, image_size: int, embeddings: bool = False,
                   ) -> list[torch.Size]:
    """The shapes of the hooked layers' outputs, from a `dry_run`; each must be an (N, C, H, W) map, or with
    `embeddings` also an (N, D) vector."""
    dry_run(model, image_size)
    shapes = [feature.shape for feature in hooks.take()]
    ranks = (2, 4) if embeddings else (4,)
    for name, shape in zip(hooks.names, shapes, strict=True):
        if len(shape) not in ranks:
            wanted = "(N, C, H, W) maps or (N, D) embeddings" if embeddings else "(N, C, H, W) maps"
            raise ValueError(f"This feature distillation needs {wanted}; layer '{name}' gives shape {tuple(shape)}.")
    return shapes


def embedding_layers(model: nn.Module, layers: Sequence[str]) -> set[str]:
    """Those of `layers` that are the model's classifier (`model_builder.classifier_layer`): an embedding method
    takes their input, the embedding, rather than their output, the logits."""
    return set(layers) & {model_builder.classifier_layer(model)}


def pair_sum_in_float32(pair_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | nn.ModuleList,
                        student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                        ) -> torch.Tensor:
    """`pair_loss(student, teacher)` (or a module list's, one module per pair) summed over the layer pairs, on
    float32 copies with autocast switched off: the relational losses' matrix products and differences of near-equal
    numbers are computed in float32, as the references do, whatever the run's precision."""
    losses = pair_loss if isinstance(pair_loss, nn.ModuleList) else [pair_loss] * len(student_features)
    with torch.autocast(student_features[0].device.type, enabled=False):
        return torch.stack([loss(student.float(), teacher.float()) for loss, student, teacher
                            in zip(losses, student_features, teacher_features, strict=True)]).sum()


class PairLosses(nn.Module):
    """A trained loss module per layer pair (`pairs`, in the pairs' order); called on the student's and the
    teacher's features, their losses summed in float32 (`pair_sum_in_float32`)."""

    def __init__(self, pairs: Iterable[nn.Module]) -> None:
        super().__init__()
        self.pairs = nn.ModuleList(pairs)

    def forward(self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                ) -> torch.Tensor:
        return pair_sum_in_float32(self.pairs, student_features, teacher_features)


def pre_activation_layers(model: nn.Module, names: Sequence[str], image_size: int) -> dict[str, str]:
    """For each named layer, the ReLU module whose input is the layer's map before its activation (mdistiller's
    `preact_feats`), found by one `dry_run`:

    - the last ReLU to run inside the layer when its output is the layer's output (the layer itself, or the end
      of a ResNet block);
    - else, when the layer's output goes into a BN whose output goes into a ReLU, that ReLU: a pre-activation
      network's next block or final BN (Wide ResNet: mdistiller's wrn.py takes `block2.layer[0].bn1` of block1's
      output, dvlab ReviewKD's wide_resnet_cifar.py the same).

    A layer with neither (its output comes from an addition and feeds a convolution) is left out."""
    layer_hooks = FeatureHooks(model, names)  # first: it names a missing layer
    modules = dict(compute.unwrap(model).named_modules())
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # ReLU and BN modules: (input, output) of the dry run
    handles = [module.register_forward_hook(_io_keeper(seen, name)) for name, module in modules.items()
               if isinstance(module, (nn.ReLU, nn.BatchNorm2d, nn.SyncBatchNorm))]
    try:
        dry_run(model, image_size)
        layer_outputs = dict(zip(names, layer_hooks.take(), strict=True))
    finally:
        for handle in handles:
            handle.remove()
        layer_hooks.remove()
    relus = [name for name, module in modules.items() if isinstance(module, nn.ReLU) and name in seen]
    found = {}
    for name in names:
        output = layer_outputs[name]
        inside = [sub for sub in relus if (sub == name or sub.startswith(name + ".")) and seen[sub][1] is output]
        normalized = [seen[bn][1] for bn in seen if bn not in relus and seen[bn][0] is output]
        after = [sub for sub in relus if any(seen[sub][0] is bn_output for bn_output in normalized)]
        if inside:
            found[name] = inside[-1]
        elif after:
            found[name] = after[0]
    return found


def _io_keeper(seen: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str,
               ) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
    """A forward hook keeping the module's (input, output) objects under `name` (compared by identity)."""
    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen[name] = (inputs[0], output)
    return keep


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


def stage_pairs(teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
    """The models' stage outputs paired in order, without the stem (`model_builder.feature_stages`), as many
    pairs as the shallower model has stages."""
    teacher_stages, student_stages = model_builder.feature_stages(teacher), model_builder.feature_stages(student)
    return list(zip(teacher_stages[1:], student_stages[1:], strict=False))


class FeatureMethod(Method):
    """A method that distills feature maps of (teacher layer, student layer) pairs.

    Hooks go on the student's layers at construction (`close()` takes them off); the distillation step hooks
    the teacher's (`teacher_layers`). One dry run of both models on zero images checks that every hooked
    map is (N, C, H, W) and sizes `trainable` (`make_trainable`): None, or the method's trainable part on the
    student's device in float32 and channels_last, which the optimizer trains with the student. Under torchrun
    its gradients are averaged across ranks. `warmup_epochs` names the setting of a warm-up, if the method has one.
    An `embedding` method also takes (N, D) vectors, and the input of a model's classifier (`embedding_layers`).
    """

    uses_features = True
    reference_weight: ClassVar[float]
    part: ClassVar[str]
    warmup_setting: ClassVar[str | None] = None
    pre_activation: ClassVar[bool] = False  # compare with the teacher's maps before their final ReLU
    embedding: ClassVar[bool] = False  # distills embeddings: the classifiers' inputs, (N, D)

    def __init__(self, teacher: nn.Module, student: nn.Module, setup: Setup) -> None:
        super().__init__(teacher, student, setup)
        self.pairs = list(setup.layer_pairs) if setup.layer_pairs is not None else self.default_pairs(teacher, student)
        if not self.pairs:
            raise ValueError("Feature distillation needs at least one (teacher_layer, student_layer) pair.")
        teacher_maps = self.teacher_maps(teacher, setup, self.pairs)
        self.teacher_names = [name for name, _ in teacher_maps]
        self.teacher_layers = teacher_layers = dict(teacher_maps)
        self.beta = (self.term_weight(self.config.alpha, self.config.beta, setup.teacher_arch, setup.student_arch)
                     if self.loss_weights is None else self.loss_weights[self.part])
        self.warmup_steps = 0 if self.warmup_setting is None else warmup_steps(
            setup.epochs, setup.steps_per_epoch, getattr(self.config, self.warmup_setting))
        self.steps_per_epoch, self.step = setup.steps_per_epoch, 0
        student_layers = [s for _, s in self.pairs]
        self.student_hooks = FeatureHooks(student, student_layers,
                                          embedding_layers(student, student_layers) if self.embedding else ())
        try:
            shapes = list(zip(feature_shapes(student, self.student_hooks, setup.image_size, self.embedding),
                              teacher_shapes(teacher, teacher_layers, setup.image_size, self.embedding),
                              strict=True))
            self.trainable = self.make_trainable(shapes)
        except ValueError:
            self.close()
            raise
        self._trainable = self.trainable
        if self.trainable is not None:
            self._trainable = placed_trainable(self.trainable, student)

    @classmethod
    def default_pairs(cls, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
        """The (teacher layer, student layer) pairs the reference distills: the stage pairs, or for an `embedding`
        method the two classifiers (whose inputs are the embeddings)."""
        if cls.embedding:
            return [(model_builder.classifier_layer(teacher), model_builder.classifier_layer(student))]
        return stage_pairs(teacher, student)

    @classmethod
    def teacher_maps(
        cls, teacher: nn.Module, setup: Setup, pairs: Sequence[tuple[str, str]],
    ) -> list[tuple[str, bool]]:
        """Per pair, the teacher layer hooked and whether its input is taken: with `pre_activation`, a layer whose
        output comes from a ReLU is read as that ReLU's input (`pre_activation_layers`); for an `embedding`
        method, the classifier's input is taken."""
        layers = [t for t, _ in pairs]
        before = pre_activation_layers(teacher, layers, setup.image_size) if cls.pre_activation else {}
        inputs = embedding_layers(teacher, layers) if cls.embedding else set()
        return [(before.get(layer, layer), layer in before or layer in inputs) for layer in layers]

    @classmethod
    def reference_weight_for(cls, teacher_arch: str, student_arch: str) -> float:
        """The reference's weight of the term beside a CE weight of 1 for a teacher / student pair (canonical
        architecture names): `reference_weight`, unless the method's reference gives one per pair."""
        return cls.reference_weight

    @classmethod
    def term_weight(cls, alpha: float, beta: float | None, teacher_arch: str = "", student_arch: str = "") -> float:
        """The feature term's weight: `beta` when given, else the reference's weight for the pair times alpha."""
        if beta is not None:
            return beta
        if alpha == 0:
            raise ValueError(f"{cls.name} at alpha 0 needs an explicit --beta: its default weight keeps the "
                             "references' balance of feature and CE terms, which has no meaning without a CE term.")
        return cls.reference_weight_for(teacher_arch, student_arch) * alpha

    @classmethod
    def check(cls, config: Any) -> list[str]:
        problems = super().check(config) + unused_weight(config, "beta")
        if not problems and config.loss_weights != REFERENCE_MIX:
            try:
                cls.term_weight(config.alpha, config.beta)
            except ValueError as error:
                problems.append(str(error))
        return problems

    def make_trainable(self, shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> nn.Module | None:
        """What the method trains with the student, from the pairs' (student shape, teacher shape)."""
        return None

    def weights(self) -> dict:
        return {"feature_weights": {self.name: self.beta}}

    def set_epoch(self, epoch: int) -> None:
        self.step = (epoch - 1) * self.steps_per_epoch

    def feature_loss(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                     ) -> torch.Tensor:
        """The method's loss between the student's hooked maps and the teacher's."""
        raise NotImplementedError

    def loss(self, student_logits: torch.Tensor, teacher: TeacherOutputs, labels: torch.Tensor,
             ) -> dict[str, torch.Tensor]:
        self.step += 1
        feature = self.feature_loss(self.student_hooks.take(), [teacher.features[name] for name in self.teacher_names])
        config = self.config
        parts = distillation_loss(student_logits, teacher.logits, labels, config.temperature, config.alpha,
                                  self.hard_loss)
        warmup = warmup_factor(self.step, self.warmup_steps)
        parts["loss"] = parts["loss"] + self.beta * warmup * feature
        if self.warmup_steps:
            parts["warmup"] = feature.new_full((), warmup)
        return {**parts, self.part: feature}

    def close(self) -> None:
        self.student_hooks.remove()


class PairSumMethod(FeatureMethod):
    """A feature method whose term is a loss per layer pair, summed over the pairs in float32 (the relational and
    embedding methods: sp, rkd, pkt, nst, cc, vid): `pair_loss`, or for a method that trains its loss, its trainable
    part, a `PairLosses` from `make_trainable` (called through its placed copy, which DDP wraps under torchrun)."""

    pair_loss: ClassVar[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

    @classmethod
    def pairs_loss(cls, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                   ) -> torch.Tensor:
        """`pair_loss` summed over the layer pairs, in float32."""
        return pair_sum_in_float32(cls.pair_loss, student_features, teacher_features)

    def feature_loss(self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                     ) -> torch.Tensor:
        if self._trainable is not None:
            return self._trainable(student_features, teacher_features)
        return self.pairs_loss(student_features, teacher_features)


def teacher_shapes(teacher: nn.Module, names: dict[str, bool], image_size: int, embeddings: bool = False,
                   ) -> list[torch.Size]:
    """The shapes of the teacher's maps at `names` (each taken before the layer where its flag says so)."""
    hooks = FeatureHooks(teacher, list(names), {name for name, before in names.items() if before})
    try:
        return feature_shapes(teacher, hooks, image_size, embeddings)
    finally:
        hooks.remove()


def placed_trainable(trainable: nn.Module, student: nn.Module) -> nn.Module:
    """A method's trainable part on the student's device in channels_last (whose gradients then match DDP's
    buckets), wrapped in DDP under torchrun; `trainable` itself stays the plain module, so its state_dict keys do
    not depend on the world size."""
    student_device = next(compute.unwrap(student).parameters()).device
    trainable.to(student_device, memory_format=torch.channels_last)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Ranks see different shards; DDP starts the part equal and averages its gradients.
        return nn.parallel.DistributedDataParallel(trainable)
    return trainable
