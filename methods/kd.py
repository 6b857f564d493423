"""Hinton KD (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015):

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))

ALPHA weighs the hard labels, as in the design this project follows. The KL term takes log-softmax inputs on
both sides (no probability can underflow to log(0)) and is a sum over classes and a mean over samples (kl_div's
"batchmean"); T^2 keeps its gradients on the scale of the CE term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import HardLoss, Method, TeacherOutputs, register


def batchmean_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) from log-probabilities, summed over classes and averaged over samples:
    `F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")` bit for bit, in its
    gradient too."""
    # kl_div sums p_t * (log p_t - log p_s) / N; here -p_t * (log p_s - log p_t), the sign in the divisor (negating is
    # exact), so the student's gradient is not negated in a kernel of its own.
    pointwise = teacher_log_probs.exp() * (student_log_probs - teacher_log_probs)
    return pointwise.sum() / -len(student_log_probs)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return batchmean_kl(student_log_probs, teacher_log_probs) * temperature**2


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
    alpha: float, hard_loss: HardLoss = F.cross_entropy,
) -> dict[str, torch.Tensor]:
    """Hinton distillation loss and its parts; `hard_loss` is the CE term's loss (label smoothing and class
    weights act on it alone, never on the teacher's soft targets).

    Returns:
        {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce, "kd": kd}
    """
    student_logits = student_logits.float()  # cast once, for both terms (under autocast they are bf16)
    ce = hard_loss(student_logits, labels)
    kd = kd_loss(student_logits, teacher_logits, temperature)
    return {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce, "kd": kd}


@register
class KD(Method):
    """Hinton KD: alpha * CE + (1 - alpha) * T^2 * KL."""

    name = "kd"
    year = 2015
    citation = "Hinton et al. 2015, arXiv:1503.02531"
    parts = {"kd": "KD (T²·KL)"}
    min_classes = 2
    reference_weights = {"ce": 0.1, "kd": 0.9}  # RepDistiller scripts/run_cifar_distill.sh -r 0.1 -a 0.9

    def weights(self) -> dict:
        return {"logit_weights": {self.name: {"kd": 1.0}}}

    def loss(self, student_logits: torch.Tensor, teacher: TeacherOutputs, labels: torch.Tensor,
             ) -> dict[str, torch.Tensor]:
        return distillation_loss(student_logits, teacher.logits, labels, self.config.temperature, self.config.alpha,
                                 self.hard_loss)
