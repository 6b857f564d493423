"""Relational KD (methods/rkd.py) against RepDistiller's RKD.py, transcribed in benchmarks/reference_relations.py."""

import pytest
import torch

from benchmarks import reference_relations
from methods import rkd


def test_rkd_loss_and_gradient_equal_the_reference_formula():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(10, 8, generator=generator).requires_grad_(), torch.randn(10, 12)
    ratio, gradient = reference_relations.agreement(rkd.RKD.pairs_loss, reference_relations.ref_rkd, student, teacher)
    assert ratio == pytest.approx(1.0, abs=1e-5) and gradient < 1e-5


def test_rkd_weighs_distance_25_and_angle_50_and_ignores_scale():
    # Three points: the student's triangle is the teacher's scaled and moved, so both losses are zero.
    teacher = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    assert rkd.RKD.pairs_loss([5 * teacher + 1], [teacher]).item() == pytest.approx(0.0, abs=1e-6)
    # A student on a line: distances 1, 1, 2 (mean 4/3) against the teacher's 3, 4, 5 (mean 4).
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    distance = torch.nn.functional.smooth_l1_loss(rkd.normalized_distances(student), rkd.normalized_distances(teacher))
    assert rkd.normalized_distances(student)[0, 2].item() == pytest.approx(2 / (4 / 3))
    angle = torch.nn.functional.smooth_l1_loss(rkd.angles(student), rkd.angles(teacher))
    assert rkd.RKD.pairs_loss([student], [teacher]).item() == pytest.approx(25 * distance.item() + 50 * angle.item())
    assert angle.item() > 0 and distance.item() > 0


def test_rkd_teacher_side_gets_no_gradient():
    teacher = torch.randn(5, 4).requires_grad_()
    rkd.RKD.pairs_loss([torch.randn(5, 4, requires_grad=True)], [teacher]).backward()
    assert teacher.grad is None


def test_rkd_criterion_takes_the_classifiers_inputs_and_the_reference_weight():
    ours, _, ratio, gradient = reference_relations.pair_rows(("rkd",), "resnet14", "resnet8", 16, 6, 5, 0)["rkd"]
    assert ratio == pytest.approx(1.0, abs=1e-4) and gradient < 1e-4 and ours > 0
    assert rkd.RKD.reference_weight == 1.0 and rkd.RKD.reference_weights == {"ce": 1.0, "kd": 0.0, "rkd": 1.0}


def test_rkd_of_a_single_sample_batch_is_zero_not_nan():
    student = torch.randn(1, 4, requires_grad=True)
    loss = rkd.RKD.pairs_loss([student], [torch.randn(1, 4)])
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(student.grad, torch.zeros(1, 4))
