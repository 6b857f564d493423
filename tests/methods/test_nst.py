"""Neuron selectivity transfer (methods/nst.py) against RepDistiller's NST.py, transcribed in
benchmarks/reference_relations.py."""

import pytest
import torch
from conftest import maps_of_every_size_order

from benchmarks import reference_relations
from methods import nst


def test_nst_loss_and_gradient_equal_the_reference_formula_on_every_size_order():
    for student, teacher in maps_of_every_size_order(torch.Generator().manual_seed(3)):
        ratio, gradient = reference_relations.agreement(nst.NST.pairs_loss, reference_relations.ref_nst, student,
                                                        teacher)
        assert ratio == pytest.approx(1.0, abs=1e-5) and gradient < 1e-5


def test_nst_is_zero_for_the_same_channels_and_sums_the_pairs():
    torch.manual_seed(4)
    first, second = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 2, 2)
    assert nst.NST.pairs_loss([2 * first], [first]).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 3, 2, 2)
    both = nst.NST.pairs_loss([first, other], [first + 1, second])
    each = nst.NST.pairs_loss([first], [first + 1]) + nst.NST.pairs_loss([other], [second])
    assert both.item() == pytest.approx(each.item(), rel=1e-6)


def test_nst_criterion_takes_the_stage_outputs_and_the_reference_weight():
    ours, _, ratio, gradient = reference_relations.pair_rows(("nst",), "resnet14", "resnet8", 16, 6, 5, 0)["nst"]
    assert ratio == pytest.approx(1.0, abs=1e-4) and gradient < 1e-4 and ours > 0
    assert nst.NST.reference_weight == 50.0 and nst.NST.reference_weights == {"ce": 1.0, "kd": 0.0, "nst": 50.0}
