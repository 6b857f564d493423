"""Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022), as mdistiller's `DKD`:

    loss = alpha * CE + (1 - alpha) * min(step / warmup_steps, 1) * (dkd_alpha * TCKD + dkd_beta * NCKD)

TCKD compares the binary target / non-target distributions, NCKD the distributions over the non-target classes,
each T^2 * a batch-mean KL(teacher || student). The warm-up ramps linearly per optimizer step (the paper: 20 of
240 epochs). dkd_beta defaults to mdistiller's value for the teacher / student pair.
"""

from __future__ import annotations

from typing import Any

import torch

from methods import kd
from methods.base import (
    Method,
    Setting,
    Setup,
    TeacherOutputs,
    non_negative,
    register,
    unused_weight,
    warmup_factor,
    warmup_steps,
)

DEFAULT_BETA = 8.0  # DKD's NCKD weight where mdistiller publishes none for the pair (its CFG.DKD.BETA)
# mdistiller's configs/cifar100/dkd/<teacher>_<student>.yaml (DKD.BETA; the pairs of this project's zoo).
REFERENCE_BETAS = {
    ("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("resnet32x4", "resnet8x4"): 8.0,
    ("resnet32x4", "shufflenetv2"): 8.0, ("vgg13", "vgg8"): 6.0, ("vgg13", "mobilenetv2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0,
}
BETAS_TEXT = ", ".join(f"{teacher}->{student} {beta:g}" for (teacher, student), beta in REFERENCE_BETAS.items())
SETTINGS = {
    "dkd_alpha": Setting(float, 1.0, "dkd/dkd_ls: weight of the target-class term (the paper's 1)",
                         check=non_negative, rule="must be >= 0"),
    "dkd_beta": Setting(float | None, None, "dkd/dkd_ls: weight of the non-target-class term",
                        unset=f"the value of mdistiller's CIFAR-100 config for the teacher/student pair "
                        f"({BETAS_TEXT}), {DEFAULT_BETA:g} for any other pair",
                        check=non_negative, rule="must be >= 0"),
    "dkd_warmup_epochs": Setting(int | None, None, "dkd/dkd_ls: epochs of linear warm-up of the DKD term, ramped "
                                 "per optimizer step", unset="the paper's 20 of 240 epochs, as a share of all steps",
                                 check=non_negative, rule="must be >= 0"),
}


def reference_beta(teacher: str, student: str) -> float:
    """DKD's NCKD weight in mdistiller's CIFAR-100 config for a teacher / student pair (canonical architecture
    names), DEFAULT_BETA for a pair it has no config for."""
    return REFERENCE_BETAS.get((teacher, student), DEFAULT_BETA)


def _non_target_columns(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Each row's column indices but its label's, in order: computed indices, as a boolean mask would make the host
    wait for the device."""
    columns = torch.arange(classes - 1, device=labels.device).expand(len(labels), classes - 1)
    return columns + (columns >= labels[:, None])  # skip the target column


def _target_split(scaled_logits: torch.Tensor, labels: torch.Tensor, non_target: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of (target, any non-target), and of each non-target class among them (`non_target`: the
    columns `_non_target_columns` gives).

    Removing the target column is the exact form of the paper's "subtract 1000 from the target
    logit", which stops masking once logits/T exceed 1000; log-sum-exps keep every term finite.
    """
    others = scaled_logits.gather(1, non_target)
    log_norm = scaled_logits.logsumexp(dim=1, keepdim=True)
    others_norm = others.logsumexp(dim=1, keepdim=True)
    binary = torch.cat([scaled_logits.gather(1, labels[:, None]), others_norm], dim=1) - log_norm
    return binary, others - others_norm


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's (TCKD, NCKD), each T^2 * a batch-mean KL(teacher || student).

    Per sample, T^2 * KL of the full distributions = TCKD + (1 - p_t) * NCKD, p_t being the teacher's
    target probability at temperature T.
    """
    if student_logits.shape[1] < 2:
        raise ValueError("Decoupled KD needs at least two classes.")
    non_target = _non_target_columns(labels, student_logits.shape[1])  # the student's and the teacher's
    student_binary, student_others = _target_split(student_logits.float() / temperature, labels, non_target)
    teacher_binary, teacher_others = _target_split(teacher_logits.float() / temperature, labels, non_target)
    tckd = kd.batchmean_kl(student_binary, teacher_binary)
    nckd = kd.batchmean_kl(student_others, teacher_others)
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
    dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
) -> torch.Tensor:
    """dkd_alpha * TCKD + dkd_beta * NCKD (the paper's defaults: 1 and 8)."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return dkd_alpha * tckd + dkd_beta * nckd


@register
class DKD(Method):
    """Decoupled KD with its per-step warm-up.

    `step` counts the optimizer steps from 1: every loss is one step, and `set_epoch(epoch)` (from 1) puts the
    count at (epoch - 1) * steps_per_epoch, so a resumed run continues the ramp where it stopped. Reports "tckd"
    and "nckd" unweighted (before dkd_alpha, dkd_beta and the warm-up) and "warmup" (the step's factor).
    """

    name = "dkd"
    year = 2022
    citation = "Zhao et al., CVPR 2022; mdistiller mdistiller/distillers/DKD.py"
    parts = {"tckd": "DKD target-class", "nckd": "DKD non-target"}
    settings = SETTINGS
    min_classes = 3
    few_classes = "with 2 classes there is one non-target class, so the non-target term NCKD is always zero"
    scale = 1.0  # the multiplier of dkd_alpha and dkd_beta (logit standardization's weight)
    reference_scale = 1.0  # the reference's multiplier of its TCKD weight 1 and NCKD weight (dkd_ls: 9)
    # mdistiller's cfg.DKD: CE 1, ALPHA 1, BETA 8 (per pair in its configs: `reference_weights_for`)
    reference_weights = {"ce": 1.0, "tckd": 1.0, "nckd": DEFAULT_BETA}

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, setup: Setup) -> None:
        super().__init__(teacher, student, setup)
        config = self.config
        self.beta = config.dkd_beta if config.dkd_beta is not None else reference_beta(setup.teacher_arch,
                                                                                        setup.student_arch)
        self.term_weights = {"tckd": self.scale * config.dkd_alpha, "nckd": self.scale * self.beta}
        self.temperature = self.term_temperature()
        self.steps_per_epoch = setup.steps_per_epoch
        self.warmup_steps = warmup_steps(setup.epochs, setup.steps_per_epoch, config.dkd_warmup_epochs)
        self.step = 0

    @classmethod
    def check(cls, config: Any) -> list[str]:
        return super().check(config) + unused_weight(config, "dkd_beta")

    @classmethod
    def reference_weights_for(cls, teacher_arch: str, student_arch: str) -> dict[str, float]:
        """mdistiller's CE 1 and TCKD 1 with the pair's NCKD weight (`reference_beta`), both times `reference_scale`."""
        return {"ce": 1.0, "tckd": cls.reference_scale, "nckd": cls.reference_scale * reference_beta(teacher_arch,
                                                                                                     student_arch)}

    def term_temperature(self) -> float:
        """The temperature of the DKD terms."""
        return self.config.temperature

    def weights(self) -> dict:
        return {"dkd_beta": self.beta, "logit_weights": {self.name: self.term_weights}}

    def set_epoch(self, epoch: int) -> None:
        if epoch < 1:
            raise ValueError(f"Epochs count from 1, got {epoch}.")
        self.step = (epoch - 1) * self.steps_per_epoch

    @torch.compiler.disable
    def begin_step(self, device: torch.device) -> None:
        """(1 - alpha) * the step's warm-up factor, and the factor: tensors a compiled step takes as inputs."""
        warmup = warmup_factor(self.step + 1, self.warmup_steps)
        alpha = self.config.alpha
        self._weights = torch.full((), (1 - alpha) * warmup, device=device), torch.full((), warmup, device=device)

    @torch.compiler.disable
    def end_step(self) -> None:
        """Counted once the loss is computed: a step retried after a failed compile counts once."""
        self.step += 1

    def compared_logits(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits the DKD terms compare: the models' own (dkd_ls z-scores them)."""
        return student_logits, teacher_logits

    def loss(self, student_logits: torch.Tensor, teacher: TeacherOutputs, labels: torch.Tensor,
             ) -> dict[str, torch.Tensor]:
        weight, warmup = self._weights
        student_logits = student_logits.float()  # cast once, for both terms
        ce = self.hard_loss(student_logits, labels)
        tckd, nckd = dkd_terms(*self.compared_logits(student_logits, teacher.logits), labels, self.temperature)
        loss = self.config.alpha * ce + weight * (self.term_weights["tckd"] * tckd + self.term_weights["nckd"] * nckd)
        return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd, "warmup": warmup}
