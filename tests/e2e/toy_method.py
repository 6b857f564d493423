"""A distillation method that lives in no file of the project: the L1 distance between the two models'
softmax(logits / T), beside alpha * CE. Importing this file registers it; nothing else changes."""

import torch
import torch.nn.functional as F

from methods.base import Method, Setting, TeacherOutputs, register


@register
class ProbabilityL1(Method):
    """alpha * CE + (1 - alpha) * toy_weight * mean |softmax(s / T) - softmax(t / T)|."""

    name = "toy_l1"
    year = 2026
    citation = "a test's own toy"
    parts = {"l1": "toy L1"}
    settings = {"toy_weight": Setting(float, 1.0, "toy_l1: weight of the L1 term", check=lambda value: value >= 0,
                                      rule="must be >= 0")}

    def weights(self) -> dict:
        return {"logit_weights": {self.name: {"l1": self.config.toy_weight}}}

    def loss(self, student_logits: torch.Tensor, teacher: TeacherOutputs, labels: torch.Tensor,
             ) -> dict[str, torch.Tensor]:
        temperature, alpha = self.config.temperature, self.config.alpha
        ce = self.hard_loss(student_logits.float(), labels)
        l1 = (F.softmax(student_logits.float() / temperature, dim=1)
              - F.softmax(teacher.logits.float() / temperature, dim=1)).abs().sum(dim=1).mean()
        return {"loss": alpha * ce + (1 - alpha) * self.config.toy_weight * l1, "ce": ce, "l1": l1}
