"""Knowledge distillation: logit, feature and decoupled losses, and criteria for engine's loop.

Methods (`METHODS`, built by `make_criterion`):

- "kd" (Hinton et al. 2015). As in the design this project follows, ALPHA weights the hard labels:

      loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))

  The KL term takes log-softmax inputs and uses `reduction="batchmean"` (a sum over classes,
  a mean over samples); the T^2 factor keeps its gradients on the scale of the CE term.
- "fitnet" (Romero et al. 2015) and "at" (attention transfer, Zagoruyko & Komodakis 2017): the
  feature term gets its own weight, outside the CE / KD mix,

      loss = alpha * CE + (1 - alpha) * KD + beta * feature_loss

  with the reference implementations' feature losses (RepDistiller, mdistiller): FitNets' hint
  loss is the MSE between a conv + BN + ReLU regressor of the student's map and the teacher's
  map, on one middle layer pair; AT's is the squared difference of L2-normalized p=2 attention
  maps, averaged over samples and positions, summed over the stage pairs. By default beta is
  the references' weight (`FEATURE_WEIGHTS`, beside their CE weight of 1) times alpha, so the
  feature : CE balance is theirs at any alpha, and alpha = 1 gives exactly their loss.
- "dkd" (decoupled KD, Zhao et al. 2022): `loss = alpha * CE + (1 - alpha) * warmup * (dkd_alpha *
  TCKD + dkd_beta * NCKD)`, the warm-up ramping linearly per optimizer step.

CE is the hard-label loss each criterion is given (`hard_loss`, `engine.hard_label_loss`): plain,
label-smoothed or class-weighted cross-entropy. Smoothing and class weights act on that term only;
the distillation terms compare with the teacher's outputs as they are.

Every criterion has a `trainable` attribute: None, or a module whose parameters the optimizer must
train alongside the student (FitNets' regressors). The teacher is frozen, runs in eval mode under
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
# The references' feature weights beside a CE weight of 1 (RepDistiller's run scripts, mdistiller's configs).
FEATURE_WEIGHTS = {"fitnet": 100.0, "at": 1000.0}
HINT_STAGE = 2  # the references' hint_layer: an index into (stem, stage 1, stage 2, ...)
DKD_WARMUP_SHARE = 20 / 240  # the paper's CIFAR warm-up: 20 of 240 epochs
# The loss and the parts the criteria report (besides the logits), with their labels on plots.
LOSS_PARTS = {"loss": "total", "ce": "CE", "kd": "KD (T²·KL)", "feature": "FitNets feature MSE",
              "at": "attention transfer", "tckd": "DKD target-class", "nckd": "DKD non-target"}


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
    student_logits = student_logits.float()  # cast once, for both terms (under autocast they are bf16)
    ce = hard_loss(student_logits, labels)
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


def default_feature_layers(method: str, teacher: nn.Module, student: nn.Module) -> list[tuple[str, str]]:
    """The (teacher layer, student layer) pairs the references distill for `method`.

    From each model's feature stages (stem, stage 1, stage 2, ...; `model_builder.feature_stages`):
    FitNets takes the pair at HINT_STAGE, AT pairs the stage outputs in order (without the stem),
    as many pairs as the shallower model has stages.
    """
    teacher_stages, student_stages = model_builder.feature_stages(teacher), model_builder.feature_stages(student)
    if method == "fitnet":
        if min(len(teacher_stages), len(student_stages)) <= HINT_STAGE:
            raise ValueError(f"FitNets' hint stage {HINT_STAGE} needs models with at least {HINT_STAGE} stages "
                             "after the stem.")
        return [(teacher_stages[HINT_STAGE], student_stages[HINT_STAGE])]
    return list(zip(teacher_stages[1:], student_stages[1:], strict=False))


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


def feature_shapes(model: nn.Module, hooks: FeatureHooks, image_size: int) -> list[torch.Size]:
    """The shapes of the hooked layers' outputs, from one run of the model on two zero images of
    `image_size` pixels (eval mode, inference mode: no running statistic moves; works on the meta device)."""
    plain = model_builder.unwrap(model)
    parameter = next(plain.parameters())
    probe = torch.zeros(2, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
    with eval_mode(plain), torch.inference_mode():
        plain(probe)
    shapes = [feature.shape for feature in hooks.take()]
    for name, shape in zip(hooks.names, shapes, strict=True):
        if len(shape) != 4:
            raise ValueError(f"Feature distillation needs (N, C, H, W) maps; layer '{name}' gives shape "
                             f"{tuple(shape)}.")
    return shapes


def check_feature_pairs(
    method: str, teacher: nn.Module, student: nn.Module, pairs: Sequence[tuple[str, str]], image_size: int,
) -> None:
    """Raise ValueError when `method` cannot distill these layer pairs at `image_size` pixels: a
    missing layer, a map that is not (N, C, H, W), or (fitnet) maps no regressor can match. Give
    it meta-device models to spend no memory or time."""
    hooks = [FeatureHooks(teacher, [t for t, _ in pairs]), FeatureHooks(student, [s for _, s in pairs])]
    try:
        teacher_shapes, student_shapes = (feature_shapes(model, hook, image_size)
                                          for model, hook in zip((teacher, student), hooks, strict=True))
        if method == "fitnet":
            HintRegressors(zip(student_shapes, teacher_shapes, strict=True))
    finally:
        for hook in hooks:
            hook.remove()


class FeatureDistillationCriterion:
    """Engine criterion: hard labels, Hinton KD and a feature loss ("fitnet" or "at") of its own weight.

        loss = alpha * CE + (1 - alpha) * T^2 * KL + beta * feature_loss

    Hooks are put on the named teacher and student layers at construction (`close()` takes them
    off, e.g. before exporting the student), and one dry run of both models on zero images of
    `image_size` pixels checks that every hooked map is (N, C, H, W). The teacher always runs
    (feature methods cannot use cached logits). For "fitnet", `trainable` holds the regressors,
    on the student's device in float32 and channels_last; the caller adds their parameters to
    the optimizer. Under torchrun their gradients are averaged across ranks.

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
        if not 0 <= alpha <= 1 or beta < 0:
            raise ValueError(f"alpha must lie in [0, 1] and beta be >= 0, got alpha {alpha} and beta {beta}.")
        self.teacher = freeze(teacher)
        self.method, self.temperature, self.alpha, self.beta = method, temperature, alpha, beta
        self.hard_loss = hard_loss
        self.part = "feature" if method == "fitnet" else "at"
        self.teacher_hooks = FeatureHooks(teacher, [t for t, _ in pairs])
        self.student_hooks = FeatureHooks(student, [s for _, s in pairs])
        shapes = zip(feature_shapes(student, self.student_hooks, image_size),
                     feature_shapes(teacher, self.teacher_hooks, image_size), strict=True)
        self.trainable: nn.Module | None = None
        self._regressors: nn.Module | None = None
        if method == "fitnet":
            self.trainable = HintRegressors(shapes)
            # channels_last like the project's models: the regressors' gradients then match DDP's buckets.
            student_device = next(model_builder.unwrap(student).parameters()).device
            self.trainable.to(student_device, memory_format=torch.channels_last)
            self._regressors = self.trainable
            if dist.is_initialized() and dist.get_world_size() > 1:
                # Ranks see different shards; DDP starts the regressors equal and averages their gradients.
                # `trainable` stays the plain module, so its state_dict keys do not depend on the world size.
                self._regressors = nn.parallel.DistributedDataParallel(self.trainable)

    def __call__(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_logits = teacher_forward(self.teacher, images)
        teacher_features = [feature.clone() for feature in self.teacher_hooks.take()]
        student_logits = student(images)
        student_features = self.student_hooks.take()
        if self._regressors is not None:
            feature = fitnet_loss(student_features, teacher_features, self._regressors)
        else:
            feature = at_loss(student_features, teacher_features)
        parts = distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha, self.hard_loss)
        parts["loss"] = parts["loss"] + self.beta * feature
        return {**parts, self.part: feature, "logits": student_logits}

    def close(self) -> None:
        """Take the hooks off the teacher and the student."""
        self.teacher_hooks.remove()
        self.student_hooks.remove()


# ---------------------------------------------------------------- decoupled KD


def _target_split(scaled_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of (target, any non-target), and of each non-target class among them.

    Removing the target column is the exact form of the paper's "subtract 1000 from the target
    logit", which stops masking once logits/T exceed 1000; log-sum-exps keep every term finite.
    Columns are gathered at computed indices: a boolean mask would make the host wait for the device.
    """
    rows, classes = scaled_logits.shape
    others_index = torch.arange(classes - 1, device=labels.device).expand(rows, classes - 1)
    others = scaled_logits.gather(1, others_index + (others_index >= labels[:, None]))  # skip the target column
    log_norm = scaled_logits.logsumexp(dim=1, keepdim=True)
    others_norm = others.logsumexp(dim=1, keepdim=True)
    binary = torch.cat([scaled_logits.gather(1, labels[:, None]), others_norm], dim=1) - log_norm
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


def dkd_warmup_steps(epochs: int, steps_per_epoch: int, warmup_epochs: int | None = None) -> int:
    """Optimizer steps of DKD's warm-up: `warmup_epochs` epochs when given (0: none), else the paper's
    share (DKD_WARMUP_SHARE) of all the run's steps, at least one."""
    if warmup_epochs is not None:
        return warmup_epochs * steps_per_epoch
    return max(1, round(epochs * steps_per_epoch * DKD_WARMUP_SHARE))


def dkd_warmup_factor(step: int, warmup_steps: int) -> float:
    """min(step / warmup_steps, 1), optimizer steps counted from 1; 1 when warmup_steps is 0."""
    return 1.0 if warmup_steps == 0 else min(step / warmup_steps, 1.0)


class DKDCriterion(DistillationCriterion):
    """Engine criterion for decoupled KD from a frozen teacher.

        loss = alpha * CE + (1 - alpha) * min(step / warmup_steps, 1) * (dkd_alpha * TCKD + dkd_beta * NCKD)

    `step` counts the optimizer steps from 1: every call is one step, and the training loop's
    `set_epoch(epoch)` (from 1) puts the count at (epoch - 1) * steps_per_epoch, so a resumed run
    continues the ramp where it stopped. As with `DistillationCriterion`, a batch may carry
    precomputed teacher logits.

    Returns (from a call) "loss", "ce", "tckd" and "nckd" unweighted (as `dkd_terms` gives them:
    before dkd_alpha, dkd_beta and the warm-up), "warmup" (the step's factor) and "logits".
    """

    def __init__(
        self, teacher: nn.Module, temperature: float, alpha: float, dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
        *, warmup_steps: int, steps_per_epoch: int, hard_loss: engine.HardLoss = F.cross_entropy,
    ) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
        if warmup_steps < 0 or steps_per_epoch < 1:
            raise ValueError(f"warmup_steps must be >= 0 and steps_per_epoch >= 1, got {warmup_steps} and "
                             f"{steps_per_epoch}.")
        super().__init__(teacher, temperature, alpha, hard_loss)
        self.dkd_alpha, self.dkd_beta = dkd_alpha, dkd_beta
        self.warmup_steps, self.steps_per_epoch = warmup_steps, steps_per_epoch
        self.step = 0

    def set_epoch(self, epoch: int) -> None:
        """Tell the criterion which epoch (from 1) is about to run: the steps before it are done."""
        if epoch < 1:
            raise ValueError(f"Epochs count from 1, got {epoch}.")
        self.step = (epoch - 1) * self.steps_per_epoch

    def __call__(
        self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        self._weights = self._step_weights(images.device)
        outputs = super().__call__(student, images, labels, teacher_logits)
        self._count_step()  # once the loss is computed: a step retried after a failed compile counts once
        return outputs

    @torch.compiler.disable
    def _step_weights(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - alpha) * the step's warm-up factor, and the factor: tensors a compiled step takes as inputs."""
        warmup = dkd_warmup_factor(self.step + 1, self.warmup_steps)
        return torch.full((), (1 - self.alpha) * warmup, device=device), torch.full((), warmup, device=device)

    @torch.compiler.disable
    def _count_step(self) -> None:
        self.step += 1

    def loss_parts(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        student_logits = student_logits.float()  # cast once, for both terms
        ce = self.hard_loss(student_logits, labels)
        tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, self.temperature)
        weight, warmup = self._weights
        loss = self.alpha * ce + weight * (self.dkd_alpha * tckd + self.dkd_beta * nckd)
        return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd, "warmup": warmup}


Criterion = DistillationCriterion | FeatureDistillationCriterion | DKDCriterion


def make_criterion(
    method: str, teacher: nn.Module, student: nn.Module, *, temperature: float, alpha: float,
    beta: float | None = None, pairs: Sequence[tuple[str, str]] | None = None,
    dkd_alpha: float = 1.0, dkd_beta: float = 8.0, dkd_warmup_steps: int = 0, steps_per_epoch: int = 1,
    image_size: int = 32, hard_loss: engine.HardLoss = F.cross_entropy,
) -> Criterion:
    """The distillation criterion for a method of `METHODS`.

    "fitnet" and "at" put hooks on `student`; their `pairs` default to `default_feature_layers`,
    their `beta` to `feature_weight`'s default, and `image_size` sizes their dry run. "dkd" ramps
    its term over `dkd_warmup_steps` optimizer steps (see `dkd_warmup_steps`) of `steps_per_epoch`
    an epoch. `hard_loss` is every method's CE term (see `engine.hard_label_loss`). Settings a
    method does not use are ignored.
    """
    if method == "kd":
        return DistillationCriterion(teacher, temperature, alpha, hard_loss)
    if method == "dkd":
        return DKDCriterion(teacher, temperature, alpha, dkd_alpha, dkd_beta,
                            warmup_steps=dkd_warmup_steps, steps_per_epoch=steps_per_epoch, hard_loss=hard_loss)
    if method in FEATURE_METHODS:
        pairs = default_feature_layers(method, teacher, student) if pairs is None else pairs
        return FeatureDistillationCriterion(teacher, student, method, pairs, temperature, alpha,
                                            feature_weight(method, alpha, beta), image_size=image_size,
                                            hard_loss=hard_loss)
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
