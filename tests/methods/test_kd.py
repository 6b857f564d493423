"""Hinton KD (methods/kd.py): the loss against hand-computed values and the weights it reports."""

import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS, STUDENT, TEACHER, hand_kd, method_setup
from torch import nn

from methods import kd


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_term_is_t_squared_batchmean_kl(temperature):
    value = kd.kd_loss(STUDENT, TEACHER, temperature).item()
    assert value == pytest.approx(hand_kd(STUDENT, TEACHER, temperature), rel=1e-5)
    # reduction="mean" would also divide by the class count: that must not be what we compute.
    assert value != pytest.approx(hand_kd(STUDENT, TEACHER, temperature) / 3, rel=1e-3)


def test_alpha_one_is_plain_cross_entropy():
    parts = kd.distillation_loss(STUDENT, TEACHER, LABELS, temperature=4.0, alpha=1.0)
    assert parts["loss"].item() == pytest.approx(F.cross_entropy(STUDENT, LABELS).item(), abs=1e-7)


def test_identical_logits_give_zero_kd_term():
    parts = kd.distillation_loss(STUDENT, STUDENT.clone(), LABELS, temperature=3.0, alpha=0.3)
    assert parts["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["loss"].item() == pytest.approx(0.3 * parts["ce"].item(), rel=1e-6)


def test_total_is_weighted_sum_of_parts():
    parts = kd.distillation_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=0.25)
    ce = F.cross_entropy(STUDENT, LABELS).item()
    expected_kd = hand_kd(STUDENT, TEACHER, 2.0)  # T^2 = 4
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(0.25 * ce + 0.75 * expected_kd, rel=1e-5)


def test_extreme_teacher_confidence_stays_finite():
    # softmax(1000, -1000) underflows to an exact 0; log() of it would make the loss NaN.
    teacher = torch.tensor([[1000.0, -1000.0, 0.0]])
    student = torch.tensor([[0.0, 5.0, 0.0]], requires_grad=True)
    loss = kd.kd_loss(student, teacher, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_kd_weights():
    method = kd.KD(nn.Identity(), nn.Identity(), method_setup())
    assert method.weights() == {"logit_weights": {"kd": {"kd": 1.0}}}


@pytest.mark.parametrize("rows", [1, 12, 64])
def test_batchmean_kl_is_kl_div_bit_for_bit_in_value_and_gradient(rows):
    generator = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 10, generator=generator) * 5
    teacher = F.log_softmax(torch.randn(rows, 10, generator=generator) * 5, dim=1)
    values, gradients = [], []
    for kl in (kd.batchmean_kl, lambda s, t: F.kl_div(s, t, log_target=True, reduction="batchmean")):
        student = logits.clone().requires_grad_()
        value = kl(F.log_softmax(student / 3.0, dim=1), teacher) * 7.0
        value.backward()
        values.append(value)
        gradients.append(student.grad)
    assert torch.equal(values[0], values[1]) and torch.equal(gradients[0], gradients[1])
