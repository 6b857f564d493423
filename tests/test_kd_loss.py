"""The Hinton distillation loss against hand-computed values, and the frozen teacher."""

import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS, STUDENT, TEACHER, hand_kd
from torch import nn

import engine
import KD_engine


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_term_is_t_squared_batchmean_kl(temperature):
    kd = KD_engine.kd_loss(STUDENT, TEACHER, temperature).item()
    assert kd == pytest.approx(hand_kd(STUDENT, TEACHER, temperature), rel=1e-5)
    # reduction="mean" would also divide by the class count: that must not be what we compute.
    assert kd != pytest.approx(hand_kd(STUDENT, TEACHER, temperature) / 3, rel=1e-3)


def test_alpha_one_is_plain_cross_entropy():
    parts = KD_engine.distillation_loss(STUDENT, TEACHER, LABELS, temperature=4.0, alpha=1.0)
    assert parts["loss"].item() == pytest.approx(F.cross_entropy(STUDENT, LABELS).item(), abs=1e-7)


def test_identical_logits_give_zero_kd_term():
    parts = KD_engine.distillation_loss(STUDENT, STUDENT.clone(), LABELS, temperature=3.0, alpha=0.3)
    assert parts["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["loss"].item() == pytest.approx(0.3 * parts["ce"].item(), rel=1e-6)


def test_total_is_weighted_sum_of_parts():
    parts = KD_engine.distillation_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=0.25)
    ce = F.cross_entropy(STUDENT, LABELS).item()
    kd = hand_kd(STUDENT, TEACHER, 2.0)  # T^2 = 4
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(0.25 * ce + 0.75 * kd, rel=1e-5)


def test_extreme_teacher_confidence_stays_finite():
    # softmax(1000, -1000) underflows to an exact 0; log() of it would make the loss NaN.
    teacher = torch.tensor([[1000.0, -1000.0, 0.0]])
    student = torch.tensor([[0.0, 5.0, 0.0]], requires_grad=True)
    loss = KD_engine.kd_loss(student, teacher, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


class TinyNet(nn.Module):
    """A convolution, batch norm and a linear head: enough to see running statistics move."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5))
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(self.body(x))


def test_distillation_step_leaves_teacher_untouched():
    torch.manual_seed(0)
    teacher, student = TinyNet(), TinyNet()
    teacher.train()  # the criterion must switch it to eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    criterion = KD_engine.DistillationCriterion(teacher, temperature=4.0, alpha=0.5)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))) for _ in range(3)]
    student_before = [p.clone() for p in student.parameters()]
    metrics = engine.train_one_epoch(student, batches, criterion, optimizer, ["a", "b", "c"], torch.device("cpu"))
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher's {key} changed"
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters(), strict=True))
    assert {"loss", "ce", "kd", "top1"} <= metrics.keys()
    assert metrics["loss"] == pytest.approx(0.5 * metrics["ce"] + 0.5 * metrics["kd"], rel=1e-5)


def test_cached_teacher_logits_give_the_same_loss_without_running_the_teacher():
    torch.manual_seed(1)
    teacher, student = TinyNet(), TinyNet()
    criterion = KD_engine.DistillationCriterion(teacher, temperature=2.0, alpha=0.4)
    student.eval()  # no dropout: both calls must see the same student
    images, labels = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))
    with torch.no_grad():
        cached = teacher(images)
    live = criterion(student, images, labels)
    teacher.forward = lambda x: (_ for _ in ()).throw(AssertionError("teacher ran"))
    replayed = criterion(student, images, labels, cached)
    for key in ("loss", "ce", "kd"):
        assert torch.equal(live[key], replayed[key])
