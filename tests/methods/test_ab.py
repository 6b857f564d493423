"""Activation boundaries (methods/ab.py) against RepDistiller's ABLoss, transcribed in
benchmarks/reference_connectors.py, its connectors, and what its initialization stage trains."""

import pytest
import torch
from conftest import sgd, tiny_distillation

from benchmarks import reference_connectors
from methods import ab, two_stage
from training import init_stage


def test_ab_loss_and_gradient_equal_the_reference_transcription():
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 8, 8, 8), (4, 16, 4, 4), (4, 32, 2, 2)]
    student = [(2 * torch.randn(shape, generator=generator)).requires_grad_() for shape in shapes]
    teacher = [torch.randn(shape, generator=generator) for shape in shapes]
    ours, reference = ab.ab_loss(student, teacher), reference_connectors.ref_ab(student, teacher)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    for mine, theirs in zip(torch.autograd.grad(ours, student), torch.autograd.grad(reference, student), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-9)
    # The deepest pair weighs 1, the shallowest 1/4: the pairs are not interchangeable.
    swapped = ab.ab_loss(student[::-1], teacher[::-1])
    assert swapped.item() != pytest.approx(ours.item(), rel=1e-3)


def test_ab_loss_by_hand():
    # One sample, one pair: s = 0.5 where t <= 0 costs (0.5 + 1)^2; s = -2 where t > 0 costs (-2 - 1)^2;
    # s = -1.5 where t <= 0 and s = 1.5 where t > 0 are beyond the margin and cost nothing.
    student = torch.tensor([0.5, -2.0, -1.5, 1.5]).view(1, 1, 2, 2)
    teacher = torch.tensor([-1.0, 1.0, 0.0, 2.0]).view(1, 1, 2, 2)
    assert ab.ab_loss([student], [teacher]).item() == pytest.approx((1.5**2 + 3.0**2) * 3 / 1000)


def test_connectors_are_identity_or_conv_and_bn_without_relu():
    assert isinstance(ab.connector((2, 16, 8, 8), (2, 16, 8, 8)), torch.nn.Identity)
    widening = ab.connector((2, 16, 8, 8), (2, 64, 8, 8))
    assert [type(layer) for layer in widening] == [torch.nn.Conv2d, torch.nn.BatchNorm2d]
    assert widening[0].kernel_size == (1, 1)
    assert ab.connector((2, 16, 8, 8), (2, 64, 4, 4))[0].stride == (2, 2)


@pytest.fixture
def ab_pair():
    teacher, student, criterion = tiny_distillation("ab", "resnet8x4", "resnet8", init_epochs=2)
    yield teacher, student, criterion
    criterion.close()


def test_the_init_stage_trains_the_connectors_and_the_students_feature_layers_only(ab_pair):
    teacher, student, criterion = ab_pair
    assert not criterion.method.uses_features and not criterion.method.teacher_layers, "no maps in the second stage"
    stage = criterion.method.init_stage(teacher, student)
    features = [p for name, p in student.named_parameters() if not name.startswith("fc.")]
    connectors = list(criterion.method.stage_modules.parameters())
    assert {id(p) for p in stage.trains.parameters()} == {id(p) for p in features + connectors} and connectors
    assert stage.epochs == 2 and stage.lr_factor == 1
    frozen = {**{"teacher." + k: v.clone() for k, v in teacher.state_dict().items()},
              **{"fc." + k: v.clone() for k, v in student.fc.state_dict().items()}}
    trained = [p.detach().clone() for p in features + connectors]
    batches = [(torch.randn(6, 3, 16, 16), torch.zeros(6, dtype=torch.long)) for _ in range(2)]
    losses = init_stage.train_stage(stage, student, batches, torch.device("cpu"), None, sgd(stage))
    stage.close()
    assert len(losses) == 2 and losses[1] < losses[0]
    now = {**{"teacher." + k: v for k, v in teacher.state_dict().items()},
           **{"fc." + k: v for k, v in student.fc.state_dict().items()}}
    assert all(torch.equal(frozen[name], now[name]) for name in frozen), "teacher and classifier untouched"
    assert all(not torch.equal(old, new) for old, new in zip(trained, features + connectors, strict=True))
    assert student.training and all(p.grad is None for p in features + connectors)


def test_the_init_stage_reads_both_models_before_their_last_relu(ab_pair):
    teacher, student, criterion = ab_pair
    method = criterion.method
    assert all(method.stage_teacher_layers.values()) and all(method.stage_student_layers.values())
    taps = two_stage.LayerTaps(teacher, method.stage_teacher_layers, student, method.stage_student_layers)
    maps = taps.student_maps(torch.randn(2, 3, 16, 16))
    taps.close()
    assert all((feature < 0).any() for feature in maps), "pre-activation maps have negative values"


def test_the_second_stage_is_the_hinton_mix_alone(ab_pair):
    teacher, student, criterion = ab_pair
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    out = criterion(student, images, labels)
    assert set(out) == {"loss", "ce", "kd", "logits"}
    alpha = criterion.method.config.alpha
    assert out["loss"].item() == pytest.approx((alpha * out["ce"] + (1 - alpha) * out["kd"]).item(), rel=1e-6)
    assert ab.AB.reference_weights == {"ce": 1.0, "kd": 0.0} and ab.AB.reference_weight == 1.0
