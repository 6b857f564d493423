"""Probabilistic knowledge transfer (methods/pkt.py) against RepDistiller's PKT.py, transcribed in
benchmarks/reference_relations.py."""

import pytest
import torch

from benchmarks import reference_relations
from methods import pkt


def test_pkt_loss_and_gradient_equal_the_reference_formula():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(12, 16, generator=generator).requires_grad_(), torch.randn(12, 24)
    ratio, gradient = reference_relations.agreement(pkt.PKT.pairs_loss, reference_relations.ref_pkt, student, teacher)
    assert ratio == pytest.approx(1.0, abs=1e-5) and gradient < 1e-5


def test_pkt_is_zero_for_embeddings_of_the_same_directions_and_a_mean_over_all_entries():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert pkt.PKT.pairs_loss([3 * teacher], [teacher]).item() == pytest.approx(0.0, abs=1e-6)
    # Orthogonal teacher rows: probabilities [[2/3, 1/3], [1/3, 2/3]]; a student with both rows equal: all 1/2.
    student = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    per_entry = [2 / 3 * torch.log(torch.tensor(4 / 3)), 1 / 3 * torch.log(torch.tensor(2 / 3))]
    assert pkt.PKT.pairs_loss([student], [teacher]).item() == pytest.approx(float(sum(per_entry)) / 2, rel=1e-5)


def test_pkt_criterion_takes_the_classifiers_inputs_and_the_reference_weight():
    ours, _, ratio, gradient = reference_relations.pair_rows(("pkt",), "resnet14", "resnet8", 16, 6, 5, 0)["pkt"]
    assert ratio == pytest.approx(1.0, abs=1e-4) and gradient < 1e-4 and ours > 0
    assert pkt.PKT.reference_weight == 30000.0 and pkt.PKT.reference_weights == {"ce": 1.0, "kd": 0.0, "pkt": 30000.0}
