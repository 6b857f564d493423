"""Correlation congruence (methods/cc.py) against RepDistiller's CC.py and LinearEmbed, transcribed in
benchmarks/reference_relations.py."""

import pytest
import torch

import KD_engine
import model_builder
from benchmarks import reference_relations
from methods import cc, feature_maps


def test_cc_loss_and_gradients_equal_the_reference_formula_through_the_same_connectors():
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(7, 16, generator=generator).requires_grad_()
    teacher = torch.randn(7, 24, 1, 1, generator=generator)  # a pooled map: flattened as LinearEmbed does
    connectors = feature_maps.PairLosses([cc.CorrelationConnectors((7, 16), (7, 24, 1, 1))])
    embeds = reference_relations.reference_modules("cc", connectors)
    ours = connectors([student], [teacher])
    reference = reference_relations.ref_cc(embeds[0](student), embeds[1](teacher))
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5) and ours.item() > 0
    ours_grads = torch.autograd.grad(ours, [student, *connectors.parameters()])
    reference_grads = torch.autograd.grad(reference, [student, *embeds.parameters()])
    for mine, theirs in zip(ours_grads, reference_grads, strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)


def test_correlation_congruence_by_hand_is_a_mean_over_consecutive_samples():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, -2.0]])  # |s - t|: rows 1 2, 3 4, 0 3
    expected = ((1 * 3 + 2 * 4) + (3 * 0 + 4 * 3)) / 2
    assert cc.correlation_congruence(student, teacher).item() == pytest.approx(expected)


def test_cc_trains_both_connectors_and_takes_the_classifiers_inputs():
    torch.manual_seed(0)
    teacher, student = model_builder.build_model("resnet14", 5, 16), model_builder.build_model("resnet8", 5, 16)
    criterion = KD_engine.make_criterion("cc", teacher, student, KD_engine.library_setup(image_size=16))
    try:
        connectors = criterion.trainable.pairs[0]
        assert (connectors.student.in_features, connectors.teacher.in_features) == (64, 64)
        assert connectors.student.out_features == connectors.teacher.out_features == cc.CC_EMBEDDING_DIM
        criterion(student, torch.randn(4, 3, 16, 16), torch.arange(4))["loss"].backward()
        assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0
                   for parameter in criterion.trainable.parameters())
    finally:
        criterion.close()
    ours, _, ratio, gradient = reference_relations.pair_rows(("cc",), "resnet14", "resnet8", 16, 6, 5, 0)["cc"]
    assert ratio == pytest.approx(1.0, abs=1e-4) and gradient < 1e-4 and ours > 0
    assert cc.CC.reference_weight == 0.02 and cc.CC.reference_weights == {"ce": 1.0, "kd": 0.0, "cc": 0.02}


def test_cc_of_a_single_sample_batch_is_zero_not_nan():
    connectors = cc.CorrelationConnectors((1, 4), (1, 6))
    loss = connectors(torch.randn(1, 4), torch.randn(1, 6))
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in connectors.parameters())
