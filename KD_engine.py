"""Knowledge distillation: the Hinton loss and the distillation criterion for engine's loop.

Convention (as in the design this project follows, where ALPHA weights the hard labels):

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))

The KL term takes log-softmax inputs and uses `reduction="batchmean"` (a sum over classes,
a mean over samples); the T^2 factor keeps its gradients on the scale of the CE term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
) -> dict[str, torch.Tensor]:
    """Hinton distillation loss and its parts.

    Returns:
        {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce, "kd": kd}
    """
    ce = F.cross_entropy(student_logits.float(), labels)
    kd = kd_loss(student_logits, teacher_logits, temperature)
    return {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce, "kd": kd}


def freeze(teacher: nn.Module) -> nn.Module:
    """Put a teacher in eval mode and stop its parameters from receiving gradients."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class DistillationCriterion:
    """Engine criterion for Hinton distillation from a frozen teacher.

    The teacher sees exactly the batch the student sees (the same augmented view), runs in
    eval mode under inference mode, and is never handed to the optimizer. A batch may carry the
    teacher's logits precomputed (valid only when the training view is deterministic); then
    the teacher is not run at all.
    """

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float) -> None:
        self.teacher = freeze(teacher)
        self.temperature = temperature
        self.alpha = alpha

    def __call__(
        self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if teacher_logits is None:
            with torch.inference_mode():
                teacher_logits = self.teacher(images)
            # kl_div's backward saves its target, which an inference tensor cannot be: copy it out.
            teacher_logits = teacher_logits.clone()
        student_logits = student(images)
        parts = distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha)
        return {**parts, "logits": student_logits}
