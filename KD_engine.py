"""Knowledge distillation: the logit and decoupled losses, the criteria for engine's loop, and the
registry of methods (`METHODS`, built by `make_criterion`). Feature methods' pieces are in KD_features.

ALPHA weights the hard-label CE term in every method, as in the design this project follows. Each
weight below is the reference's own for CIFAR, beside its CE weight (cited where it is defined):

- "kd" (Hinton et al. 2015):

      loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))

  The KL term takes log-softmax inputs and uses `reduction="batchmean"` (a sum over classes,
  a mean over samples); the T^2 factor keeps its gradients on the scale of the CE term.
- "dkd" (decoupled KD, Zhao et al. 2022): `loss = alpha * CE + (1 - alpha) * warmup * (dkd_alpha *
  TCKD + dkd_beta * NCKD)`, the warm-up ramping linearly per optimizer step; dkd_beta defaults to
  mdistiller's value for the teacher / student pair (`reference_dkd_beta`).
- "dist" (Huang et al., NeurIPS 2022): `loss = alpha * CE + (1 - alpha) * weight * DIST`, DIST being
  T^2 * (inter-class + intra-class relation losses), each 1 - the mean Pearson correlation of the
  two models' softmax(logits / T), over each sample's classes (inter) and each class's samples (intra).
- "kd_ls", "dkd_ls", "dist_ls" (logit standardization, Sun et al., CVPR 2024): kd, dkd and dist with
  both models' logits z-scored per sample, then divided by the base temperature, before the
  distillation term (the CE term sees the raw logits), and the reference's larger weights
  (`logit_weights`).
- "fitnet", "at", "reviewkd" (KD_features): a feature term of its own weight, outside the CE / KD mix,

      loss = alpha * CE + (1 - alpha) * KD + beta * warmup * feature_loss

  By default beta is the references' weight (`feature_methods.FEATURE_WEIGHTS`, beside their CE weight
  of 1) times alpha, so the feature : CE balance is theirs at any alpha, and alpha = 1 gives exactly
  their loss. Only ReviewKD warms up (mdistiller's 20 of 240 epochs, ramped per step as DKD's).

At alpha 0.5 each logit method's term stands to CE as in its reference (whose CE weight is 1, or 0.1
for the logit-standardized KD, whose weight is therefore 9 / 0.1).

CE is the hard-label loss each criterion is given (`hard_loss`, `engine.hard_label_loss`): plain,
label-smoothed or class-weighted cross-entropy. Smoothing and class weights act on that term only;
the distillation terms compare with the teacher's outputs as they are.

Every criterion has a `trainable` attribute: None, or a module whose parameters the optimizer must
train alongside the student (FitNets' regressors, ReviewKD's ABFs). The teacher is frozen, runs in
eval mode under inference mode, and never reaches an optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import engine
from methods import feature_methods

METHODS = ("kd", "fitnet", "dkd", "at", "dist", "kd_ls", "dkd_ls", "dist_ls", "reviewkd")
STANDARDIZED_METHODS = ("kd_ls", "dkd_ls", "dist_ls")  # logit standardization of kd, dkd, dist
DKD_WARMUP_SHARE = 20 / 240  # the paper's CIFAR warm-up: 20 of 240 epochs (also mdistiller's ReviewKD's)
DKD_DEFAULT_BETA = 8.0  # DKD's NCKD weight where mdistiller publishes none for the pair (its CFG.DKD.BETA)
# mdistiller's configs/cifar100/dkd/<teacher>_<student>.yaml (DKD.BETA; the pairs of this project's zoo).
DKD_REFERENCE_BETAS = {
    ("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("resnet32x4", "resnet8x4"): 8.0,
    ("resnet32x4", "shufflenetv2"): 8.0, ("vgg13", "vgg8"): 6.0, ("vgg13", "mobilenetv2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0,
}
DIST_WEIGHT = 2.0  # DIST_KD configs/strategies/distill/dist_cifar.yaml: ori_loss_weight 1, kd_loss_weight 2
DIST_RELATION_WEIGHTS = (1.0, 1.0)  # DIST's beta (inter-class) and gamma (intra-class), 1 and 1 in every config
DIST_EPS = 1e-8  # DIST_KD's cosine_similarity eps
LS_TEMPERATURE = 2.0  # logit-standardization-KD tools/train.py --base-temp 2
LS_WEIGHT = 9.0  # its --kd-weight 9: KD's weight, and the multiplier of DKD's alpha and beta
LS_KD_CE_WEIGHT = 0.1  # its KD keeps mdistiller's CE weight 0.1 (CFG.KD.LOSS.CE_WEIGHT) beside KD weight 9
LS_EPS = 1e-7  # its normalize(): (logit - mean) / (1e-7 + std)
# The loss and the parts the criteria report (besides the logits), with their labels on plots.
LOSS_PARTS = {"loss": "total", "ce": "CE", "kd": "KD (T²·KL)", "feature": "FitNets feature MSE",
              "at": "attention transfer", "tckd": "DKD target-class", "nckd": "DKD non-target",
              "dist": "DIST (inter + intra)", "hcl": "ReviewKD HCL"}
FEATURE_PARTS = {"fitnet": "feature", "at": "at", "reviewkd": "hcl"}  # each feature method's part of LOSS_PARTS


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


class FeatureDistillationCriterion:
    """Engine criterion: hard labels, Hinton KD and a feature loss (feature_methods.FEATURE_METHODS) of its own weight.

        loss = alpha * CE + (1 - alpha) * T^2 * KL + beta * min(step / warmup_steps, 1) * feature_loss

    A `feature_methods.FeatureTerm` holds the hooks (`close()` takes them off, e.g. before exporting the
    student) and `trainable`, the method's part the caller adds to the optimizer. The teacher always
    runs (feature methods cannot use cached logits). The warm-up counts optimizer steps as
    `DKDCriterion` does (`set_epoch`); 0 `warmup_steps` (FitNets, AT) means none.

    Returns (from a call) "loss", "ce", "kd", the method's part (FEATURE_PARTS), "logits", and with a
    warm-up "warmup" (the step's factor).
    """

    def __init__(
        self, teacher: nn.Module, student: nn.Module, method: str, pairs: Sequence[tuple[str, str]],
        temperature: float, alpha: float, beta: float, *, image_size: int = 32,
        hard_loss: engine.HardLoss = F.cross_entropy, warmup_steps: int = 0, steps_per_epoch: int = 1,
    ) -> None:
        if not 0 <= alpha <= 1 or beta < 0:
            raise ValueError(f"alpha must lie in [0, 1] and beta be >= 0, got alpha {alpha} and beta {beta}.")
        self.teacher = freeze(teacher)
        self.term = feature_methods.FeatureTerm(teacher, student, method, pairs, image_size)
        self.trainable = self.term.trainable
        self.part = FEATURE_PARTS[method]
        self.temperature, self.alpha, self.beta, self.hard_loss = temperature, alpha, beta, hard_loss
        self.warmup_steps, self.steps_per_epoch, self.step = warmup_steps, steps_per_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        """Tell the criterion which epoch (from 1) is about to run: the steps before it are done."""
        self.step = (epoch - 1) * self.steps_per_epoch

    def __call__(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.step += 1
        teacher_logits = teacher_forward(self.teacher, images)
        teacher_features = self.term.teacher_features()
        student_logits = student(images)
        feature = self.term(teacher_features)
        parts = distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha, self.hard_loss)
        warmup = dkd_warmup_factor(self.step, self.warmup_steps)
        parts["loss"] = parts["loss"] + self.beta * warmup * feature
        if self.warmup_steps:
            parts["warmup"] = feature.new_full((), warmup)
        return {**parts, self.part: feature, "logits": student_logits}

    def close(self) -> None:
        """Take the hooks off the teacher and the student."""
        self.term.close()


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

    def compared_logits(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits the DKD terms compare: the models' own (dkd_ls z-scores them)."""
        return student_logits, teacher_logits

    def loss_parts(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        student_logits = student_logits.float()  # cast once, for both terms
        ce = self.hard_loss(student_logits, labels)
        tckd, nckd = dkd_terms(*self.compared_logits(student_logits, teacher_logits), labels, self.temperature)
        weight, warmup = self._weights
        loss = self.alpha * ce + weight * (self.dkd_alpha * tckd + self.dkd_beta * nckd)
        return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd, "warmup": warmup}


def reference_dkd_beta(teacher: str, student: str) -> float:
    """DKD's NCKD weight in mdistiller's CIFAR-100 config for a teacher / student pair (canonical names of
    model_builder.architecture_name), DKD_DEFAULT_BETA for a pair it has no config for."""
    return DKD_REFERENCE_BETAS.get((teacher, student), DKD_DEFAULT_BETA)


class StandardizedDKDCriterion(DKDCriterion):
    """dkd_ls: `DKDCriterion` with both models' logits z-scored (`standardize`) before the DKD terms; the CE
    term sees the raw logits. Give it the base temperature and the weights of `logit_weights`."""

    def compared_logits(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return standardize(student_logits), standardize(teacher_logits)


# ---------------------------------------------------------------- DIST and logit standardization


def _relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - the mean Pearson correlation of matching rows (DIST_KD's `inter_class_relation`, with its eps)."""
    student, teacher = student - student.mean(dim=1, keepdim=True), teacher - teacher.mean(dim=1, keepdim=True)
    correlation = (student * teacher).sum(dim=1) / (student.norm(dim=1) * teacher.norm(dim=1) + DIST_EPS)
    return 1 - correlation.mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """DIST: T^2 * (inter-class + intra-class relation loss) of softmax(logits / T), as DIST_KD's `DIST`.

    The inter-class relation compares each sample's class probabilities; the intra-class relation each
    class's probabilities over the batch (so it needs more than one sample to say anything).
    """
    student_probs = F.softmax(student_logits.float() / temperature, dim=1)
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=1)
    inter, intra = DIST_RELATION_WEIGHTS
    return temperature**2 * (inter * _relation_loss(student_probs, teacher_probs)
                             + intra * _relation_loss(student_probs.T, teacher_probs.T))


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardization (Sun et al. 2024): each row's z-score, (logits - mean) / (LS_EPS + std) with the
    unbiased standard deviation, as the reference's `normalize`."""
    if logits.shape[1] < 2:
        raise ValueError("Logit standardization needs at least two classes.")
    logits = logits.float()
    return (logits - logits.mean(dim=1, keepdim=True)) / (LS_EPS + logits.std(dim=1, keepdim=True))


def logit_weights(
    method: str, dkd_alpha: float = 1.0, dkd_beta: float = DKD_DEFAULT_BETA, dist_weight: float = DIST_WEIGHT,
    ls_weight: float = LS_WEIGHT,
) -> dict[str, float]:
    """The weights of a logit method's terms inside (1 - alpha) * (...), by the loss part they weigh.

    Logit standardization multiplies the base method's weights by `ls_weight`, as its reference does
    for DKD (dist_ls: no published setting, the same rule); kd_ls's KD weight is ls_weight /
    LS_KD_CE_WEIGHT (90 by default), the reference's KD : CE balance of 9 : 0.1.
    """
    scale = ls_weight if method in STANDARDIZED_METHODS else 1.0
    base = method.removesuffix("_ls")
    if base == "dkd":
        return {"tckd": scale * dkd_alpha, "nckd": scale * dkd_beta}
    if base == "dist":
        return {"dist": scale * dist_weight}
    return {"kd": scale / LS_KD_CE_WEIGHT if method == "kd_ls" else 1.0}


class LogitTermCriterion(DistillationCriterion):
    """Engine criterion for dist, dist_ls and kd_ls: `alpha * CE + (1 - alpha) * weight * term`, where
    `term(student_logits, teacher_logits, temperature)` is reported as `part`. With `standardized`, the
    term sees both models' z-scored logits (`standardize`) and the CE term the raw ones. As with
    `DistillationCriterion`, a batch may carry precomputed teacher logits."""

    def __init__(
        self, teacher: nn.Module, temperature: float, alpha: float, weight: float,
        term: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], part: str, standardized: bool,
        hard_loss: engine.HardLoss = F.cross_entropy,
    ) -> None:
        if not 0 <= alpha <= 1 or weight < 0:
            raise ValueError(f"alpha must lie in [0, 1] and the weight be >= 0, got alpha {alpha} and weight {weight}.")
        super().__init__(teacher, temperature, alpha, hard_loss)
        self.weight, self.term, self.part, self.standardized = weight, term, part, standardized

    def loss_parts(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        ce = self.hard_loss(student_logits.float(), labels)
        if self.standardized:
            student_logits, teacher_logits = standardize(student_logits), standardize(teacher_logits)
        value = self.term(student_logits, teacher_logits, self.temperature)
        return {"loss": self.alpha * ce + (1 - self.alpha) * self.weight * value, "ce": ce, self.part: value}


# ---------------------------------------------------------------- the registry


Criterion = DistillationCriterion | FeatureDistillationCriterion | DKDCriterion | LogitTermCriterion


def make_criterion(
    method: str, teacher: nn.Module, student: nn.Module, *, temperature: float, alpha: float,
    beta: float | None = None, pairs: Sequence[tuple[str, str]] | None = None,
    dkd_alpha: float = 1.0, dkd_beta: float = DKD_DEFAULT_BETA, dkd_warmup_steps: int = 0, steps_per_epoch: int = 1,
    dist_weight: float = DIST_WEIGHT, ls_temperature: float = LS_TEMPERATURE, ls_weight: float = LS_WEIGHT,
    reviewkd_warmup_steps: int = 0, image_size: int = 32, hard_loss: engine.HardLoss = F.cross_entropy,
) -> Criterion:
    """The distillation criterion for a method of `METHODS`.

    The feature methods put hooks on `student`; their `pairs` default to
    `feature_methods.default_feature_layers`, their `beta` to `feature_methods.feature_weight`'s default, and
    `image_size` sizes their dry run. "dkd" and "dkd_ls" ramp their term over `dkd_warmup_steps`
    optimizer steps, "reviewkd" over `reviewkd_warmup_steps` (see `dkd_warmup_steps`), of
    `steps_per_epoch` an epoch. The logit-standardized methods use `ls_temperature` instead of
    `temperature`, and the weights of `logit_weights`. `hard_loss` is every method's CE term (see
    `engine.hard_label_loss`). Settings a method does not use are ignored.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown distillation method '{method}'; known methods: {', '.join(METHODS)}.")
    if method == "kd":
        return DistillationCriterion(teacher, temperature, alpha, hard_loss)
    if method in feature_methods.FEATURE_METHODS:
        pairs = feature_methods.default_feature_layers(method, teacher, student) if pairs is None else pairs
        return FeatureDistillationCriterion(
            teacher, student, method, pairs, temperature, alpha, feature_methods.feature_weight(method, alpha, beta),
            image_size=image_size, hard_loss=hard_loss, steps_per_epoch=steps_per_epoch,
            warmup_steps=reviewkd_warmup_steps if method == "reviewkd" else 0)
    weights = logit_weights(method, dkd_alpha, dkd_beta, dist_weight, ls_weight)
    standardized = method in STANDARDIZED_METHODS
    if standardized:
        temperature = ls_temperature
    if method in ("dkd", "dkd_ls"):
        kind = StandardizedDKDCriterion if standardized else DKDCriterion
        return kind(teacher, temperature, alpha, weights["tckd"], weights["nckd"], warmup_steps=dkd_warmup_steps,
                    steps_per_epoch=steps_per_epoch, hard_loss=hard_loss)
    term = kd_loss if method == "kd_ls" else dist_loss
    [(part, weight)] = weights.items()
    return LogitTermCriterion(teacher, temperature, alpha, weight, term, part, standardized, hard_loss)


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
    with feature_methods.eval_mode(teacher_model):
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
