"""Similarity-preserving KD (methods/sp.py) against RepDistiller's SP.py, transcribed in
benchmarks/reference_relations.py."""

import pytest
import torch
from torch import nn

from benchmarks import reference_relations
from methods import sp


def test_sp_loss_and_gradient_equal_the_reference_formula():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(6, 4, 3, 3, generator=generator).requires_grad_()
    teacher = torch.randn(6, 8, 2, 2, generator=generator)  # other channels and sizes: only the N x N Grams meet
    ratio, gradient = reference_relations.agreement(sp.SP.pairs_loss, reference_relations.ref_sp, student, teacher)
    assert ratio == pytest.approx(1.0, abs=1e-5) and gradient < 1e-5
    channels_last = student.detach().to(memory_format=torch.channels_last)  # how the run's maps are laid out
    assert (sp.SP.pairs_loss([channels_last], [teacher]).item()
            == pytest.approx(sp.SP.pairs_loss([student], [teacher]).item()))


def test_sp_by_hand_rows_normalized_and_divided_by_n_squared():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # Gram I
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # Gram all ones, rows normalized to 1/sqrt(2)
    half = 2**-0.5
    expected = 2 * ((1 - half) ** 2 + half**2) / 4
    assert sp.SP.pairs_loss([student], [teacher]).item() == pytest.approx(expected, rel=1e-6)


def test_sp_default_pair_is_the_last_stages_output():
    teacher, student = (nn.Module(), nn.Module())
    teacher.feature_stages, student.feature_stages = ("relu", "layer1", "layer4"), ("conv1", "block3")
    assert sp.SP.default_pairs(teacher, student) == [("layer4", "block3")]


def test_sp_criterion_takes_the_last_stages_and_the_reference_weight():
    ours, _, ratio, gradient = reference_relations.pair_rows(("sp",), "resnet14", "resnet8", 16, 6, 5, 0)["sp"]
    assert ratio == pytest.approx(1.0, abs=1e-4) and gradient < 1e-4 and ours > 0
    assert sp.SP.reference_weight == 3000.0 and sp.SP.reference_weights == {"ce": 1.0, "kd": 0.0, "sp": 3000.0}
