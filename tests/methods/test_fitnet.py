"""FitNets (methods/fitnet.py): the hint loss through a known regressor, the regressor's shapes, the reference's
hint layer, and the step's gradients."""

import pytest
import torch
from conftest import method_setup, tiny_convnet
from torch import nn

import KD_engine
from methods import fitnet


def known_regressor(weight: float, bias: float, mean: float, var: float) -> fitnet.HintRegressor:
    """A 1-channel, same-size regressor: 1x1 conv (weight, bias), then BN in eval mode with these statistics."""
    regressor = fitnet.HintRegressor((1, 1, 1, 2), (1, 1, 1, 2))
    with torch.no_grad():
        regressor[0].weight.fill_(weight)
        regressor[0].bias.fill_(bias)
    regressor[1].running_mean.fill_(mean)
    regressor[1].running_var.fill_(var)
    regressor[1].eps = 0.0
    return regressor.eval()


def test_fitnet_hint_loss_through_a_known_regressor():
    # Student map [1, -2]: conv -> [2.5, -3.5]; BN (mean 0.5, var 4) -> [1, -2]; ReLU -> [1, 0].
    student = torch.tensor([[[[1.0, -2.0]]]])
    teacher = torch.tensor([[[[0.5, 1.0]]]])
    regressors = fitnet.HintRegressors([])
    regressors.regressors.append(known_regressor(2.0, 0.5, 0.5, 4.0))
    expected = ((1 - 0.5) ** 2 + (0 - 1.0) ** 2) / 2  # MSE, a mean over the map's elements
    assert fitnet.fitnet_loss([student], [teacher], regressors).item() == pytest.approx(expected, rel=1e-6)
    regressors.regressors.append(known_regressor(2.0, 0.5, 0.5, 4.0))
    loss = fitnet.fitnet_loss([student, student], [teacher, teacher + 1], regressors)
    assert loss.item() == pytest.approx(expected + ((1 - 1.5) ** 2 + (0 - 2.0) ** 2) / 2, rel=1e-6), "summed over pairs"


@pytest.mark.parametrize("student_size, teacher_size, conv, kernel", [
    (8, 8, nn.Conv2d, (1, 1)), (8, 4, nn.Conv2d, (3, 3)), (4, 8, nn.ConvTranspose2d, (4, 4)), (6, 4, nn.Conv2d, (3, 3)),
])
def test_hint_regressor_reaches_the_teacher_shape_as_the_references(student_size, teacher_size, conv, kernel):
    regressor = fitnet.HintRegressor((2, 5, student_size, student_size), (2, 7, teacher_size, teacher_size))
    assert [type(layer) for layer in regressor] == [conv, nn.BatchNorm2d, nn.ReLU]
    assert regressor[0].kernel_size == kernel
    assert regressor(torch.randn(2, 5, student_size, student_size)).shape == (2, 7, teacher_size, teacher_size)


def test_hint_regressor_refuses_a_student_map_it_cannot_grow():
    with pytest.raises(ValueError, match="student map of 3x3 onto a teacher map of 8x8"):
        fitnet.HintRegressor((1, 4, 3, 3), (1, 4, 8, 8))


def test_default_vgg_to_resnet_pair_is_the_references_hint_layer(real_models):
    assert fitnet.FitNet.default_pairs(*real_models) == [("features.22", "layer2")]


def test_fitnet_gradient_reaches_regressor_and_student_never_teacher():
    torch.manual_seed(4)
    teacher, student = tiny_convnet(6), tiny_convnet(4)
    teacher.train()  # the step must switch it to eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    setup = method_setup(image_size=8, layer_pairs=[("2", "2"), ("4", "4")], temperature=4.0, alpha=0.3, beta=40.0)
    criterion = KD_engine.make_criterion("fitnet", teacher, student, setup)
    assert [r[0].weight.shape[:2] for r in criterion.trainable.regressors] == [(6, 4), (12, 8)]
    student_state = {k: v.clone() for k, v in student.state_dict().items()}
    assert torch.equal(student_state["1.running_mean"], torch.zeros(4))  # the dry run moved no statistic
    parameters = list(student.parameters()) + list(criterion.trainable.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    out = criterion(student, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert out["loss"].item() == pytest.approx(
        (0.3 * out["ce"] + 0.7 * out["kd"] + 40.0 * out["feature"]).item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in criterion.trainable.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    assert not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher's {key} changed"
    criterion.close()
