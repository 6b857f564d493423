"""FSP (methods/fsp.py) against a transcription of RepDistiller's FSP loss, its refusals, and what its
initialization stage trains: the student's feature layers."""

import pytest
import torch
import torch.nn.functional as F
from conftest import method_setup, sgd, tiny_distillation

import KD_engine
import model_builder
from benchmarks import reference_connectors
from methods import fsp
from training import init_stage


def test_fsp_loss_and_gradient_equal_the_reference_transcription():
    generator = torch.Generator().manual_seed(2)
    shapes = [(3, 4, 8, 8), (3, 6, 8, 8), (3, 5, 4, 4)]  # equal sizes, then a pooled bottom map
    student = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
    teacher = [torch.randn(shape, generator=generator) for shape in shapes]
    ours, reference = fsp.fsp_loss(student, teacher), reference_connectors.ref_fsp(student, teacher)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    for mine, theirs in zip(torch.autograd.grad(ours, student), torch.autograd.grad(reference, student), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)
    # G is (top channels, bottom channels), a mean over positions: a transposed or summed G would differ.
    assert fsp.fsp_matrices(student)[0].shape == (3, 6, 4)


def test_fsp_refuses_models_whose_maps_have_unequal_channels():
    teacher, student = model_builder.build_model("resnet8x4", 3, 16), model_builder.build_model("resnet8", 3, 16)
    with pytest.raises(ValueError, match="equal channels"):
        KD_engine.make_criterion("fsp", teacher, student, method_setup("resnet8x4", "resnet8", image_size=16))


def test_the_init_stage_trains_the_students_feature_layers_only_on_the_stem_and_stage_maps():
    teacher, student, criterion = tiny_distillation("fsp", "resnet14", "resnet8", init_epochs=1)
    method = criterion.method
    assert list(method.stage_student_layers) == ["relu", "layer1", "layer2", "layer3"], "RepDistiller's feat[:-1]"
    assert not any(method.stage_teacher_layers.values()), "after the ReLU"
    stage = method.init_stage(teacher, student)
    features = [p for name, p in student.named_parameters() if not name.startswith("fc.")]
    assert {id(p) for p in stage.trains.parameters()} == {id(p) for p in features} and stage.lr_factor == 1
    images = torch.randn(4, 3, 16, 16)

    def maps(model):
        stem = F.relu(model.bn1(model.conv1(images)))
        first = model.layer1(stem)
        second = model.layer2(first)
        return [stem, first, second, model.layer3(second)]

    student.train()
    with torch.no_grad():
        expected = reference_connectors.ref_fsp(maps(student), maps(teacher))
    assert stage.loss(images).item() == pytest.approx(expected.item(), rel=1e-5)
    frozen = {**{"t." + k: v.clone() for k, v in teacher.state_dict().items()},
              **{"fc." + k: v.clone() for k, v in student.fc.state_dict().items()}}
    conv = student.conv1.weight.detach().clone()
    init_stage.train_stage(stage, student, [(images, torch.zeros(4, dtype=torch.long))], torch.device("cpu"), None,
                           sgd(stage))
    stage.close()
    now = {**{"t." + k: v for k, v in teacher.state_dict().items()},
           **{"fc." + k: v for k, v in student.fc.state_dict().items()}}
    assert all(torch.equal(frozen[name], now[name]) for name in frozen) and not torch.equal(conv, student.conv1.weight)
    out = criterion(student, images, torch.tensor([0, 1, 2, 0]))
    assert set(out) == {"loss", "ce", "kd", "logits"}, "the second stage has no FSP term (RepDistiller's is 0)"
    criterion.close()
