"""Logit standardization (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024), as
sunshangquan/logit-standardization-KD: both models' logits z-scored per sample, then divided by the base
temperature, before the distillation term (the CE term sees the raw logits). kd_ls is KD so, with the
reference's weights: KD 9 beside CE 0.1, i.e. ls_weight / LS_KD_CE_WEIGHT = 90 inside (1 - alpha) * (...).
"""

from __future__ import annotations

import torch

from methods.base import Method, Setting, TeacherOutputs, register
from methods.kd import kd_loss

LS_EPS = 1e-7  # its normalize(): (logit - mean) / (1e-7 + std)
LS_KD_CE_WEIGHT = 0.1  # its KD keeps mdistiller's CE weight 0.1 (CFG.KD.LOSS.CE_WEIGHT) beside KD weight 9
SETTINGS = {
    "ls_temperature": Setting(float, 2.0, "kd_ls/dkd_ls/dist_ls: the base temperature dividing the z-scored "
                              "logits (logit-standardization-KD's --base-temp 2)", check=lambda value: value > 0,
                              rule="must be > 0"),
    "ls_weight": Setting(float, 9.0, "kd_ls/dkd_ls/dist_ls: multiplier of the base method's distillation weights "
                         "(logit-standardization-KD's --kd-weight 9): dkd_ls 9x --dkd-alpha and --dkd-beta, dist_ls "
                         "9x --dist-weight (no published setting), kd_ls 9 / 0.1 = 90 (the reference's KD keeps CE "
                         "weight 0.1)", check=lambda value: value >= 0, rule="must be >= 0"),
}


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Each row's z-score, (logits - mean) / (LS_EPS + std) with the unbiased standard deviation, as the
    reference's `normalize`."""
    if logits.shape[1] < 2:
        raise ValueError("Logit standardization needs at least two classes.")
    logits = logits.float()
    return (logits - logits.mean(dim=1, keepdim=True)) / (LS_EPS + logits.std(dim=1, keepdim=True))


class LogitTerm(Method):
    """`alpha * CE + (1 - alpha) * weight * term(student, teacher, T)`, the term reported as `part`; with
    `standardized`, the term compares z-scored logits at the base temperature (the CE term sees the raw ones)."""

    part: str
    standardized = False

    def term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """The distillation term."""
        raise NotImplementedError

    def term_weight(self) -> float:
        """The term's weight inside (1 - alpha) * (...)."""
        raise NotImplementedError

    def weights(self) -> dict:
        return {"logit_weights": {self.name: {self.part: self.term_weight()}}}

    def loss(self, student_logits: torch.Tensor, teacher: TeacherOutputs, labels: torch.Tensor,
             ) -> dict[str, torch.Tensor]:
        alpha, teacher_logits = self.config.alpha, teacher.logits
        ce = self.hard_loss(student_logits.float(), labels)
        temperature = self.config.temperature
        if self.standardized:
            student_logits, teacher_logits = standardize(student_logits), standardize(teacher_logits)
            temperature = self.config.ls_temperature
        value = self.term(student_logits, teacher_logits, temperature)
        return {"loss": alpha * ce + (1 - alpha) * self.term_weight() * value, "ce": ce, self.part: value}


@register
class KDLS(LogitTerm):
    """KD on standardized logits, at the reference's weights."""

    name = "kd_ls"
    year = 2024
    citation = "Sun et al., CVPR 2024; logit-standardization-KD tools/train.py, mdistiller/distillers/KD.py"
    parts = {"kd": "KD (T²·KL)"}
    settings = SETTINGS
    part = "kd"
    standardized = True
    reference_weights = {"ce": LS_KD_CE_WEIGHT, "kd": 9.0}  # its README's KD command: --kd-weight 9, CE weight 0.1

    def term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, temperature)

    def term_weight(self) -> float:
        return self.config.ls_weight / LS_KD_CE_WEIGHT
