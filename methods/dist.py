"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022), as hunto/DIST_KD's `DIST`:

    loss = alpha * CE + (1 - alpha) * weight * T^2 * (inter-class + intra-class relation losses)

each relation loss being 1 - the mean Pearson correlation of the two models' softmax(logits / T), over each
sample's classes (inter) and each class's samples (intra).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import Setting, register
from methods.kd_ls import LogitTerm

DIST_RELATION_WEIGHTS = (1.0, 1.0)  # DIST's beta (inter-class) and gamma (intra-class), 1 and 1 in every config
DIST_EPS = 1e-8  # DIST_KD's cosine_similarity eps
SETTINGS = {
    "dist_weight": Setting(float, 2.0, "dist: weight of the DIST term in alpha*CE + (1-alpha)*weight*DIST "
                           "(DIST_KD's CIFAR config dist_cifar.yaml: CE 1, DIST 2, tau 4)",
                           check=lambda value: value >= 0, rule="must be >= 0"),
}


def _relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - the mean Pearson correlation of matching rows (DIST_KD's `inter_class_relation`, with its eps)."""
    student, teacher = student - student.mean(dim=1, keepdim=True), teacher - teacher.mean(dim=1, keepdim=True)
    correlation = (student * teacher).sum(dim=1) / (student.norm(dim=1) * teacher.norm(dim=1) + DIST_EPS)
    return 1 - correlation.mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """DIST: T^2 * (inter-class + intra-class relation loss) of softmax(logits / T).

    The intra-class relation compares each class's probabilities over the batch (so it needs more than one
    sample to say anything).
    """
    student_probs = F.softmax(student_logits.float() / temperature, dim=1)
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=1)
    inter, intra = DIST_RELATION_WEIGHTS
    return temperature**2 * (inter * _relation_loss(student_probs, teacher_probs)
                             + intra * _relation_loss(student_probs.T, teacher_probs.T))


@register
class DIST(LogitTerm):
    """DIST at DIST_KD's CIFAR weights."""

    name = "dist"
    year = 2022
    citation = "Huang et al., NeurIPS 2022; hunto/DIST_KD classification/lib/models/losses/dist_kd.py"
    parts = {"dist": "DIST (inter + intra)"}
    settings = SETTINGS
    min_classes = 3
    few_classes = ("with 2 classes the per-image correlation of two probabilities that sum to 1 is only a sign "
                   "(+1 or -1), so the inter-class relation carries no more than the argmax")
    part = "dist"
    reference_weights = {"ce": 1.0, "dist": 2.0}  # DIST_KD's CIFAR config: CE 1, DIST 2

    def term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return dist_loss(student_logits, teacher_logits, temperature)

    def term_weight(self) -> float:
        return self.config.dist_weight
