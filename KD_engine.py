"""Knowledge distillation: logit, feature and decoupled losses, and criteria for engine's loop.

Methods (`METHODS`, built by `make_criterion`):

- "kd" (Hinton et al. 2015). As in the design this project follows, ALPHA weights the hard labels:

      loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))

  The KL term takes log-softmax inputs and uses `reduction="batchmean"` (a sum over classes,
  a mean over samples); the T^2 factor keeps its gradients on the scale of the CE term.
- "fitnet" (Romero et al. 2015) and "at" (attention transfer, Zagoruyko & Komodakis 2017):
  `loss = alpha * CE + beta * feature_loss + (1 - alpha - beta) * KD`, the feature loss comparing
  intermediate feature maps of named teacher and student layers.
- "dkd" (decoupled KD, Zhao et al. 2022): `loss = alpha * CE + (1 - alpha) * warmup * (dkd_alpha *
  TCKD + dkd_beta * NCKD)`.

CE is the hard-label loss each criterion is given (`hard_loss`, `engine.hard_label_loss`): plain,
label-smoothed or class-weighted cross-entropy. Smoothing and class weights act on that term only;
the distillation terms compare with the teacher's outputs as they are.

Every criterion has a `trainable` attribute: None, or a module whose parameters the optimizer must
train alongside the student (FitNets' adapters). The teacher is frozen, runs in eval mode under
inference mode, and never reaches an optimizer.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import engine
import model_builder

METHODS = ("kd", "fitnet", "dkd", "at")
FEATURE_METHODS = ("fitnet", "at")
DKD_WARMUP_EPOCHS = 20  # the paper's CIFAR setting (of 240 epochs); shorter runs want fewer

# Layers whose outputs have the same channel count and, in the small-image (<= 64 px) variants,
# the same spatial size: VGG16-BN's ReLUs after conv2_2, conv3_3 and conv4_3 (128x16x16,
# 256x8x8, 512x4x4 at 32 px) and ResNet18's layer2-4 outputs.
DEFAULT_FEATURE_LAYERS: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("vgg16_bn", "resnet18"): [("features.12", "layer2"), ("features.22", "layer3"), ("features.32", "layer4")],
}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    Both sides stay in log space, so a tiny teacher probability cannot underflow to log(0).
    """
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    return kl * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    hard_loss: engine.HardLoss = F.cross_entropy,
) -> dict[str, torch.Tensor]:
    """Hinton distillation loss and its parts; `hard_loss` is the CE term's loss (label smoothing and
    class weights act on it alone, never on the teacher's soft targets).

    Returns:
        {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce, "kd": kd}
    """
    ce = hard_loss(student_logits.float(), labels)
    kd = kd_loss(student_logits, teacher_logits, temperature)
    return {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce, "kd": kd}


def freeze(teacher: nn.Module) -> nn.Module:
    """Put a teacher in eval mode and stop its parameters from receiving gradients."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_forward(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The teacher's logits, computed under inference mode and usable in the student's graph."""
    with torch.inference_mode():
        logits = teacher(images)
    # kl_div's backward saves its target, which an inference tensor cannot be: copy it out.
    return logits.clone()


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


class DistillationCriterion:
    """Engine criterion for Hinton distillation from a frozen teacher.

    The teacher sees exactly the batch the student sees (the same augmented view), runs in
    eval mode under inference mode, and is never handed to the optimizer. A batch may carry the
    teacher's logits precomputed (valid only when the training view is deterministic); then
    the teacher is not run at all.
    """

    trainable: nn.Module | None = None

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float,
                 hard_loss: engine.HardLoss = F.cross_entropy) -> None:
        self.teacher = freeze(teacher)
        self.temperature = temperature
        self.alpha = alpha
        self.hard_loss = hard_loss

    def __call__(
        self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if teacher_logits is None:
            teacher_logits = teacher_forward(self.teacher, images)
        student_logits = student(images)
        return {**self.loss_parts(student_logits, teacher_logits, labels), "logits": student_logits}

    def loss_parts(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The loss and its parts from both models' logits (subclasses change only this)."""
        return distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha, self.hard_loss)


# ---------------------------------------------------------------- feature distillation


class FeatureHooks:
    """Forward hooks keeping the latest output of named submodules of a model.

    Names are those of `named_modules()` of the plain model ("layer3", "features.22"); a
    DistributedDataParallel or torch.compile wrapper is looked through. A module called more
    than once per forward keeps its last output, and a hooked output must not be modified in
    place later in the forward (hook a block's output, not a layer an in-place add follows).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
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
        self._handles = [modules[name].register_forward_hook(self._keeper(name)) for name in dict.fromkeys(names)]

    def _keeper(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = output
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


def default_feature_layers(teacher_arch: str, student_arch: str) -> list[tuple[str, str]]:
    """The (teacher layer, student layer) pairs to distill for a known pair of architectures."""
    key = (model_builder.torchvision_name(teacher_arch), model_builder.torchvision_name(student_arch))
    if key not in DEFAULT_FEATURE_LAYERS:
        known = ", ".join(f"{t} -> {s}" for t, s in DEFAULT_FEATURE_LAYERS)
        raise ValueError(f"No default feature layers for teacher {key[0]} and student {key[1]} (known: {known}); "
                         "pass --feature-layers teacher_layer:student_layer,...")
    return list(DEFAULT_FEATURE_LAYERS[key])


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


class FeatureAdapters(nn.Module):
    """FitNets' regressors: one 1x1 convolution per layer pair, student channels -> teacher channels."""

    def __init__(self, channels: Iterable[tuple[int, int]]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(student, teacher, kernel_size=1) for student, teacher in channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(feature) for conv, feature in zip(self.convs, features)]


def fitnet_loss(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor], adapters: nn.Module,
) -> torch.Tensor:
    """Mean over layer pairs of MSE(adapter(student feature), teacher feature).

    The larger map of a pair is pooled to the smaller one's size first; pooling commutes with
    a 1x1 convolution, so pooling before the adapter costs less and gives the same result.
    """
    pooled = [match_spatial(s, t) for s, t in zip(student_features, teacher_features)]
    adapted = adapters([s for s, _ in pooled])
    return torch.stack([F.mse_loss(a.float(), t.float()) for a, (_, t) in zip(adapted, pooled)]).mean()


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a (N, C, H, W) map: the channel mean of squares, flattened, unit L2 norm."""
    return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), dim=1)


def at_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention transfer: mean over layer pairs of the batch-mean squared L2 distance of attention maps.

    Each term lies in [0, 2] (unit vectors with non-negative entries). The reference code takes a
    mean over positions instead of a sum, so its beta (1e3) corresponds to about 1e3 / (H * W) here.
    """
    losses = []
    for student, teacher in zip(student_features, teacher_features):
        student, teacher = match_spatial(student, teacher)
        losses.append((attention_map(student) - attention_map(teacher)).pow(2).sum(dim=1).mean())
    return torch.stack(losses).mean()


def _check_weights(alpha: float, beta: float) -> None:
    if alpha < 0 or beta < 0 or alpha + beta > 1:
        raise ValueError(f"alpha ({alpha}) and beta ({beta}) must be non-negative with alpha + beta <= 1, "
                         "since 1 - alpha - beta weighs the KD term.")


class FeatureDistillationCriterion:
    """Engine criterion: hard labels, a feature loss ("fitnet" or "at") and Hinton KD.

        loss = alpha * CE + beta * feature_loss + (1 - alpha - beta) * T^2 * KL

    Hooks are put on the named teacher and student layers at construction (`close()` takes them
    off, e.g. before exporting the student). The teacher always runs (feature methods cannot use
    cached logits). For "fitnet", `trainable` holds the adapters, on the student's device in
    float32, their channel counts found by one dry run of both models on zero images of
    `image_size` pixels (eval mode, no gradient: no running statistic moves); the caller adds
    their parameters to the optimizer. Under torchrun their gradients are averaged across ranks.

    Returns (from a call) "loss", "ce", "kd", "feature" (fitnet) or "at", and "logits".
    """

    def __init__(
        self, teacher: nn.Module, student: nn.Module, method: str, pairs: Sequence[tuple[str, str]],
        temperature: float, alpha: float, beta: float, *, image_size: int = 32,
        hard_loss: engine.HardLoss = F.cross_entropy,
    ) -> None:
        if method not in FEATURE_METHODS:
            raise ValueError(f"Unknown feature method '{method}'; use one of {', '.join(FEATURE_METHODS)}.")
        if not pairs:
            raise ValueError("Feature distillation needs at least one (teacher_layer, student_layer) pair.")
        _check_weights(alpha, beta)
        self.teacher = freeze(teacher)
        self.method, self.temperature, self.alpha, self.beta = method, temperature, alpha, beta
        self.hard_loss = hard_loss
        self.part = "feature" if method == "fitnet" else "at"
        self.teacher_hooks = FeatureHooks(teacher, [t for t, _ in pairs])
        self.student_hooks = FeatureHooks(student, [s for _, s in pairs])
        self.trainable: nn.Module | None = None
        self._adapters: nn.Module | None = None
        if method == "fitnet":
            self.trainable = FeatureAdapters(self._dry_run_channels(student, image_size))
            self.trainable.to(next(model_builder.unwrap(student).parameters()).device)
            self._adapters = self.trainable
            if dist.is_initialized() and dist.get_world_size() > 1:
                # Ranks see different shards; DDP starts the adapters equal and averages their gradients.
                # `trainable` stays the plain module, so its state_dict keys do not depend on the world size.
                self._adapters = nn.parallel.DistributedDataParallel(self.trainable)

    def _dry_run_channels(self, student: nn.Module, image_size: int) -> list[tuple[int, int]]:
        shapes = []
        for model, hooks in ((student, self.student_hooks), (self.teacher, self.teacher_hooks)):
            plain = model_builder.unwrap(model)
            parameter = next(plain.parameters())
            probe = torch.zeros(2, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
            with eval_mode(plain), torch.inference_mode():
                plain(probe)
            shapes.append([feature.shape for feature in hooks.take()])
        for name, shape in zip(self.student_hooks.names + self.teacher_hooks.names, shapes[0] + shapes[1]):
            if len(shape) != 4:
                raise ValueError(f"FitNets needs (N, C, H, W) feature maps; layer '{name}' gives shape {tuple(shape)}.")
        return [(s[1], t[1]) for s, t in zip(*shapes)]

    def __call__(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_logits = teacher_forward(self.teacher, images)
        teacher_features = [feature.clone() for feature in self.teacher_hooks.take()]
        student_logits = student(images)
        student_features = self.student_hooks.take()
        if self._adapters is not None:
            feature = fitnet_loss(student_features, teacher_features, self._adapters)
        else:
            feature = at_loss(student_features, teacher_features)
        ce = self.hard_loss(student_logits.float(), labels)
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        loss = self.alpha * ce + self.beta * feature + (1 - self.alpha - self.beta) * kd
        return {"loss": loss, "ce": ce, "kd": kd, self.part: feature, "logits": student_logits}

    def close(self) -> None:
        """Take the hooks off the teacher and the student."""
        self.teacher_hooks.remove()
        self.student_hooks.remove()


# ---------------------------------------------------------------- decoupled KD


def _target_split(scaled_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of (target, any non-target), and of each non-target class among them.

    Removing the target column is the exact form of the paper's "subtract 1000 from the target
    logit", which stops masking once logits/T exceed 1000; log-sum-exps keep every term finite.
    """
    rows, classes = scaled_logits.shape
    is_target = F.one_hot(labels, classes).bool()
    log_norm = scaled_logits.logsumexp(dim=1, keepdim=True)
    others = scaled_logits[~is_target].view(rows, classes - 1)
    others_norm = others.logsumexp(dim=1, keepdim=True)
    binary = torch.cat([scaled_logits[is_target].view(rows, 1), others_norm], dim=1) - log_norm
    return binary, others - others_norm


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's (TCKD, NCKD), each T^2 * a batch-mean KL(teacher || student).

    TCKD compares the binary target / non-target distributions, NCKD the distributions over the
    non-target classes. Per sample, T^2 * KL of the full distributions = TCKD + (1 - p_t) * NCKD,
    p_t being the teacher's target probability at temperature T.
    """
    if student_logits.shape[1] < 2:
        raise ValueError("Decoupled KD needs at least two classes.")
    student_binary, student_others = _target_split(student_logits.float() / temperature, labels)
    teacher_binary, teacher_others = _target_split(teacher_logits.float() / temperature, labels)
    tckd = F.kl_div(student_binary, teacher_binary, log_target=True, reduction="batchmean")
    nckd = F.kl_div(student_others, teacher_others, log_target=True, reduction="batchmean")
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
    dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
) -> torch.Tensor:
    """dkd_alpha * TCKD + dkd_beta * NCKD (the paper's defaults: 1 and 8)."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return dkd_alpha * tckd + dkd_beta * nckd


def dkd_warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """min(epoch / warmup_epochs, 1), epochs counted from 1; 1 when warmup_epochs is 0."""
    return 1.0 if warmup_epochs == 0 else min(epoch / warmup_epochs, 1.0)


class DKDCriterion(DistillationCriterion):
    """Engine criterion for decoupled KD from a frozen teacher.

        loss = alpha * CE + (1 - alpha) * min(epoch / warmup_epochs, 1) * (dkd_alpha * TCKD + dkd_beta * NCKD)

    The training loop calls `set_epoch(epoch)` (from 1) before each epoch; until then epoch 1
    is assumed. As with `DistillationCriterion`, a batch may carry precomputed teacher logits.

    Returns (from a call) "loss", "ce", and "tckd" and "nckd" unweighted (as `dkd_terms` gives
    them: before dkd_alpha, dkd_beta and the warm-up), and "logits".
    """

    def __init__(
        self, teacher: nn.Module, temperature: float, alpha: float, dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
        warmup_epochs: int = DKD_WARMUP_EPOCHS, hard_loss: engine.HardLoss = F.cross_entropy,
    ) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
        self.teacher = freeze(teacher)
        self.temperature, self.alpha = temperature, alpha
        self.dkd_alpha, self.dkd_beta, self.warmup_epochs = dkd_alpha, dkd_beta, warmup_epochs
        self.hard_loss = hard_loss
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        """Tell the criterion which epoch (from 1) is about to run; it sets the warm-up factor."""
        if epoch < 1:
            raise ValueError(f"Epochs count from 1, got {epoch}.")
        self.epoch = epoch

    def loss_parts(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        ce = self.hard_loss(student_logits.float(), labels)
        tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, self.temperature)
        dkd = (self.dkd_alpha * tckd + self.dkd_beta * nckd) * dkd_warmup_factor(self.epoch, self.warmup_epochs)
        loss = self.alpha * ce + (1 - self.alpha) * dkd
        return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd}


Criterion = DistillationCriterion | FeatureDistillationCriterion | DKDCriterion


def make_criterion(
    method: str, teacher: nn.Module, student: nn.Module, *, temperature: float, alpha: float,
    beta: float | None = None, pairs: Sequence[tuple[str, str]] | None = None,
    dkd_alpha: float = 1.0, dkd_beta: float = 8.0, dkd_warmup_epochs: int = DKD_WARMUP_EPOCHS,
    image_size: int = 32, hard_loss: engine.HardLoss = F.cross_entropy,
) -> Criterion:
    """The distillation criterion for a method of `METHODS`.

    "fitnet" and "at" need `beta` and `pairs` (see `default_feature_layers`) and put hooks on
    `student`; `image_size` sizes FitNets' dry run. The other settings are ignored by methods
    that do not use them. `hard_loss` is every method's CE term (see `engine.hard_label_loss`).
    """
    if method == "kd":
        return DistillationCriterion(teacher, temperature, alpha, hard_loss)
    if method == "dkd":
        return DKDCriterion(teacher, temperature, alpha, dkd_alpha, dkd_beta, dkd_warmup_epochs, hard_loss)
    if method in FEATURE_METHODS:
        if beta is None or pairs is None:
            raise ValueError(f"Method '{method}' needs beta and feature-layer pairs.")
        return FeatureDistillationCriterion(teacher, student, method, pairs, temperature, alpha, beta,
                                            image_size=image_size, hard_loss=hard_loss)
    raise ValueError(f"Unknown distillation method '{method}'; known methods: {', '.join(METHODS)}.")


# ---------------------------------------------------------------- a library function


def knowledge_distillation_train(
    teacher_model: nn.Module,
    student_model: nn.Module,
    trainloader: Iterable[tuple[torch.Tensor, ...]],
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    teacher_percentage: float = 0.5,
    temperature: float = 2.0,
    device: torch.device | str | None = None,
) -> float:
    """Train a student for one epoch by Hinton distillation, for your own models and loop.

        loss = (1 - teacher_percentage) * criterion(student_logits, labels)
               + teacher_percentage * kd_loss(student_logits, teacher_logits, temperature)

    Args:
        teacher_model: any trained classifier; run in eval mode under inference mode. Its weights
            and requires_grad flags are left alone and its (per-module) training flags restored.
        student_model: the classifier to train, put in train mode.
        trainloader: yields (images, labels) batches.
        criterion: the hard-label loss as a batch mean, e.g. nn.CrossEntropyLoss().
        optimizer: over the student's parameters.
        teacher_percentage: weight of the soft (teacher) term, in [0, 1].
        temperature: softening temperature, > 0.
        device: where to train; None picks CUDA when available, else the CPU. Both models move there.

    Returns:
        The epoch's loss per sample: the sum of batch_loss * batch_size over the number of samples.
    """
    if not 0 <= teacher_percentage <= 1:
        raise ValueError(f"teacher_percentage must lie in [0, 1], got {teacher_percentage}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    device = engine.resolve_device("auto") if device is None else torch.device(device)
    teacher_model.to(device)
    student_model.to(device).train()
    total, samples = torch.zeros((), device=device), 0
    with eval_mode(teacher_model):
        for images, labels, *_ in trainloader:
            images, labels = images.to(device), labels.to(device)
            teacher_logits = teacher_forward(teacher_model, images)
            student_logits = student_model(images)
            loss = ((1 - teacher_percentage) * criterion(student_logits, labels)
                    + teacher_percentage * kd_loss(student_logits, teacher_logits, temperature))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * labels.shape[0]
            samples += labels.shape[0]
    if samples == 0:
        raise ValueError("trainloader yielded no samples.")
    return (total / samples).item()
