"""Variational information distillation (methods/vid.py) against RepDistiller's VIDLoss, transcribed in
benchmarks/reference_relations.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import maps_of_every_size_order

import KD_engine
import model_builder
from benchmarks import reference_relations
from methods import feature_maps, vid


def test_vid_loss_and_gradients_equal_the_reference_on_every_size_order():
    generator = torch.Generator().manual_seed(6)
    for student, teacher in maps_of_every_size_order(generator):
        regressors = feature_maps.PairLosses([vid.VariationalRegressor(5, 7)])
        with torch.no_grad():
            regressors.pairs[0].log_scale.add_(torch.randn(7, generator=generator))  # variances other than 5
        (reference_loss,) = reference_relations.reference_modules("vid", regressors)
        ours, reference = regressors([student], [teacher]), reference_loss(student, teacher)
        assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
        ours_grads = torch.autograd.grad(ours, [student, *regressors.parameters()])
        reference_grads = torch.autograd.grad(reference, [student, *reference_loss.parameters()])
        for mine, theirs in zip(ours_grads, reference_grads, strict=True):
            assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)


def test_vid_starts_at_variance_5_and_its_likelihood_by_hand():
    regressor = vid.VariationalRegressor(2, 3)
    variance = F.softplus(regressor.log_scale) + vid.VID_EPS
    assert torch.allclose(variance, torch.full((3,), 5.0))
    for conv in (regressor.regressor[0], regressor.regressor[2], regressor.regressor[4]):
        torch.nn.init.zeros_(conv.weight)  # a zero mean: the loss is 0.5 * (t^2 / 5 + log 5), a mean
    teacher = torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1)
    expected = sum(0.5 * (t * t / 5 + torch.log(torch.tensor(5.0)).item()) for t in (1.0, 2.0, 0.0)) / 3
    assert regressor(torch.ones(1, 2, 1, 1), teacher).item() == pytest.approx(expected, rel=1e-5)


def test_vid_regresses_every_stage_pair_and_trains_its_variances():
    torch.manual_seed(0)
    teacher, student = model_builder.build_model("resnet14", 5, 16), model_builder.build_model("resnet8", 5, 16)
    criterion = KD_engine.make_criterion("vid", teacher, student, KD_engine.library_setup(image_size=16))
    try:
        assert [pair.log_scale.numel() for pair in criterion.trainable.pairs] == [16, 32, 64]
        criterion(student, torch.randn(4, 3, 16, 16), torch.arange(4))["loss"].backward()
        assert all(pair.log_scale.grad.abs().sum() > 0 for pair in criterion.trainable.pairs)
    finally:
        criterion.close()
    ours, _, ratio, gradient = reference_relations.pair_rows(("vid",), "resnet14", "resnet8", 16, 6, 5, 0)["vid"]
    assert ratio == pytest.approx(1.0, abs=1e-4) and gradient < 1e-4 and ours > 0
    assert vid.VID.reference_weight == 1.0 and vid.VID.reference_weights == {"ce": 1.0, "kd": 0.0, "vid": 1.0}
