"""Factor transfer (methods/ft.py) against transcriptions of RepDistiller's FactorTransfer, Paraphraser and
Translator, and what its initialization stage trains: the paraphraser alone."""

import pytest
import torch
import torch.nn.functional as F
from conftest import sgd, tiny_distillation
from torch import nn

from methods import ft
from training import init_stage


def reference_factor_loss(f_s, f_t, p1=2, p2=1):
    """RepDistiller distiller_zoo/FT.py FactorTransfer.factor_loss."""
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))

    def factor(f):
        return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))

    if p2 == 1:
        return (factor(f_s) - factor(f_t)).abs().mean()
    return (factor(f_s) - factor(f_t)).pow(p2).mean()


def test_factor_loss_and_gradient_equal_the_reference_transcription():
    generator = torch.Generator().manual_seed(1)
    for student_size, teacher_size in ((4, 4), (8, 4), (4, 8)):
        student = torch.randn(3, 6, student_size, student_size, generator=generator).requires_grad_()
        teacher = torch.randn(3, 5, teacher_size, teacher_size, generator=generator)
        ours, reference = ft.factor_loss(student, teacher), reference_factor_loss(student, teacher)
        assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
        torch.testing.assert_close(torch.autograd.grad(ours, student)[0], torch.autograd.grad(reference, student)[0])
    # p2 = 1, not 2: the mean absolute difference.
    squared = reference_factor_loss(student, teacher, p2=2)
    assert ft.factor_loss(student, teacher).item() != pytest.approx(squared.item(), rel=1e-3)


def reference_paraphraser(channels, k=0.5):
    """RepDistiller models/util.py Paraphraser(use_bn=False) layers: encoder, decoder (BN slots left empty)."""
    out = int(channels * k)
    encoder = [nn.Conv2d(channels, channels, 3, 1, 1), nn.LeakyReLU(0.1), nn.Conv2d(channels, out, 3, 1, 1),
               nn.LeakyReLU(0.1), nn.Conv2d(out, out, 3, 1, 1), nn.LeakyReLU(0.1)]
    decoder = [nn.ConvTranspose2d(out, out, 3, 1, 1), nn.LeakyReLU(0.1), nn.ConvTranspose2d(out, channels, 3, 1, 1),
               nn.LeakyReLU(0.1), nn.ConvTranspose2d(channels, channels, 3, 1, 1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*encoder), nn.Sequential(*decoder)


def test_paraphraser_and_translator_are_the_references():
    torch.manual_seed(0)
    ours = ft.Paraphraser(8)
    encoder, decoder = reference_paraphraser(8)
    encoder.load_state_dict(ours.encoder.state_dict())
    decoder.load_state_dict(ours.decoder.state_dict())
    feature = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(ours(feature), decoder(encoder(feature)))
    translator = ft.translator(6, 8)
    assert [type(layer) for layer in translator] == [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU] * 3
    assert [layer.out_channels for layer in translator if isinstance(layer, nn.Conv2d)] == [6, 4, 4]
    assert all(layer.negative_slope == 0.1 for layer in translator if isinstance(layer, nn.LeakyReLU))


@pytest.fixture
def ft_pair():
    teacher, student, criterion = tiny_distillation("ft", "resnet8x4", "resnet8", init_epochs=3, alpha=1.0)
    yield teacher, student, criterion
    criterion.close()


def test_the_init_stage_trains_the_paraphraser_alone_to_reconstruct_the_teachers_last_map(ft_pair):
    teacher, student, criterion = ft_pair
    method = criterion.method
    stage = method.init_stage(teacher, student)
    assert stage.trains is method.paraphraser and stage.epochs == 3
    assert stage.lr_factor == pytest.approx(0.2), "RepDistiller's 0.01 of 0.05 for its CIFAR ResNet students"
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        last = teacher.layer1(teacher.relu(teacher.bn1(teacher.conv1(images))))
        last = teacher.layer3(teacher.layer2(last))
        expected = F.mse_loss(method.paraphraser(last), last)
    assert stage.loss(images).item() == pytest.approx(expected.item(), rel=1e-5)
    untouched = {**{"s." + k: v.clone() for k, v in student.state_dict().items()},
                 **{"t." + k: v.clone() for k, v in teacher.state_dict().items()},
                 **{"tr." + k: v.clone() for k, v in method.trainable.state_dict().items()}}
    paraphraser = [p.detach().clone() for p in method.paraphraser.parameters()]
    batches = [(torch.randn(6, 3, 16, 16), torch.zeros(6, dtype=torch.long)) for _ in range(2)]
    init_stage.train_stage(stage, student, batches, torch.device("cpu"), None, sgd(stage, 0.01))
    stage.close()
    now = {**{"s." + k: v for k, v in student.state_dict().items()},
           **{"t." + k: v for k, v in teacher.state_dict().items()},
           **{"tr." + k: v for k, v in method.trainable.state_dict().items()}}
    assert all(torch.equal(untouched[name], now[name]) for name in untouched), "student, teacher, translator"
    assert all(not torch.equal(old, p) for old, p in zip(paraphraser, method.paraphraser.parameters(), strict=True))
    assert not method.paraphraser.training


def test_the_second_stage_trains_the_translator_against_the_paraphrasers_factor(ft_pair):
    teacher, student, criterion = ft_pair
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    out = criterion(student, images, labels)
    with torch.no_grad():
        teacher_map = teacher.layer3(teacher.layer2(teacher.layer1(teacher.relu(teacher.bn1(teacher.conv1(images))))))
        student_map = student.layer3(student.layer2(student.layer1(student.relu(student.bn1(student.conv1(images))))))
        factor = criterion.method.paraphraser.encoder(teacher_map)
        expected = reference_factor_loss(criterion.method.trainable(student_map), factor)
    assert out["ft"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert criterion.method.beta == 200.0, "RepDistiller's -b 200 beside CE 1 (alpha 1)"
    assert out["loss"].item() == pytest.approx((out["ce"] + 200 * out["ft"]).item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in criterion.method.paraphraser.parameters())
    assert all(p.grad is not None for p in criterion.method.trainable.parameters())
    assert {id(p) for p in criterion.trainable.parameters()}.isdisjoint(
        id(p) for p in criterion.method.paraphraser.parameters())
