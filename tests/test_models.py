"""The KD literature's small-image networks: sizes, feature stages, default layer pairs, --list-layers."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_one_sentence_exit_2

import experiment
import KD_engine
import model_builder
from methods import feature_maps
from nets import cifar_networks
from results import deploy
from training import checkpoints

# Parameters at 100 classes of RepDistiller's CIFAR definitions (models/__init__.py model_dict), counted by
# building them; the CRD paper's tables round them (resnet8x4 1.2M, wrn_40_2 2.2M, vgg13 9.4M, ...).
PUBLISHED_PARAMETERS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg13": 9_462_180, "mobilenetv2": 812_836, "shufflenetv2": 1_355_528,
}

# (teacher, student): (fitnet pair, at pairs), the references' choice for the literature's pairs and ours.
LITERATURE_PAIRS = {
    ("resnet32x4", "resnet8x4"): ([("layer2", "layer2")],
                                  [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]),
    ("wrn_40_2", "wrn_16_2"): ([("block2", "block2")],
                               [("block1", "block1"), ("block2", "block2"), ("block3", "block3")]),
    ("resnet56", "resnet20"): ([("layer2", "layer2")],
                               [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]),
    ("vgg13", "vgg8"): ([("features.19", "features.10")],
                        [("features.12", "features.6"), ("features.19", "features.10"), ("features.26", "features.14"),
                         ("features.32", "features.17")]),
    ("VGG16", "resnet8x4"): ([("features.22", "layer2")],
                             [("features.12", "layer1"), ("features.22", "layer2"), ("features.32", "layer3")]),
    ("VGG16", "ResNet18"): ([("features.22", "layer2")],
                            [("features.12", "layer1"), ("features.22", "layer2"), ("features.32", "layer3"),
                             ("features.42", "layer4")]),
}


def test_the_zoo_has_the_literatures_networks():
    assert set(PUBLISHED_PARAMETERS) == set(model_builder.ZOO)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_parameter_counts_match_the_published_ones(name):
    with torch.device("meta"):
        model = model_builder.build_model(name, 100, 32)
    assert deploy.count_parameters(model) == PUBLISHED_PARAMETERS[name]  # exact: a dropped bias or BN shows


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_zoo_models_classify_and_name_their_stages(name):
    model_builder.check_input_size(name, 32)
    torch.manual_seed(0)
    model = model_builder.build_model(name, 10, 32).eval()
    stages = model_builder.feature_stages(model)
    hooks = feature_maps.FeatureHooks(model, stages)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    maps = hooks.take()
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert all(m.dim() == 4 for m in maps)
    sizes = [m.shape[-1] for m in maps]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 32, "stages run from the stem to the deepest"


def test_the_name_clash_with_torchvision_goes_to_the_zoo():
    assert model_builder.architecture_name("VGG13") == "vgg13"
    assert isinstance(model_builder.build_model("vgg13", 10, 32), cifar_networks.SmallVGG)
    assert model_builder.architecture_name("vgg13_bn") == "vgg13_bn"  # torchvision's, still reachable
    assert model_builder.architecture_name("VGG16") == "vgg16_bn"
    with pytest.raises(model_builder.UnknownModelError, match="resnet8x4"):
        model_builder.architecture_name("resnet9x4")


def conv_macs(side: int, out_channels: int, in_channels: int, kernel: int = 3) -> int:
    """Multiply-adds of a convolution with a `side` x `side` output."""
    return side * side * out_channels * in_channels * kernel * kernel


def test_flops_per_image_match_hand_counts():
    # FLOPs count 2 per multiply-add of the convolutions and linear layers (batch norm, ReLU, pooling: none).
    # resnet8 at 32 px: a 16-channel stem, then one BasicBlock a stage (16, 32, 64 channels at 32, 16, 8 px),
    # the second and third with a strided 1x1 shortcut; a 64 -> 10 linear layer.
    resnet8 = (conv_macs(32, 16, 3) + 2 * conv_macs(32, 16, 16)
               + conv_macs(16, 32, 16) + conv_macs(16, 32, 32) + conv_macs(16, 32, 16, kernel=1)
               + conv_macs(8, 64, 32) + conv_macs(8, 64, 64) + conv_macs(8, 64, 32, kernel=1) + 64 * 10)
    assert resnet8 == 12_501_632
    assert deploy.flops_per_image(model_builder.build_model("resnet8", 10, 32), 32) == 2 * resnet8
    # The small-image VGG16: configuration D's 13 convolutions, max-pooled from 32 px down to 2 px, then
    # global pooling and a 512 -> 10 linear layer: 0.626 GFLOPs, the figure docs/models.md gives.
    vgg16 = (conv_macs(32, 64, 3) + conv_macs(32, 64, 64) + conv_macs(16, 128, 64) + conv_macs(16, 128, 128)
             + conv_macs(8, 256, 128) + 2 * conv_macs(8, 256, 256) + conv_macs(4, 512, 256) + 2 * conv_macs(4, 512, 512)
             + 3 * conv_macs(2, 512, 512) + 512 * 10)
    assert vgg16 == 313_201_664
    assert deploy.flops_per_image(model_builder.build_model("VGG16", 10, 32), 32) == 2 * vgg16


def test_the_student_of_a_literature_pair_is_cheaper():
    teacher, student = (model_builder.build_model(name, 10, 32) for name in ("resnet32x4", "resnet8x4"))
    assert deploy.flops_per_image(student, 32) < deploy.flops_per_image(teacher, 32) / 5


@pytest.mark.parametrize("teacher_name, student_name", sorted(LITERATURE_PAIRS))
def test_default_pairs_of_the_literature_pairs_exist_and_fit(teacher_name, student_name):
    with torch.device("meta"):
        teacher = model_builder.build_model(teacher_name, 100, 32)
        student = model_builder.build_model(student_name, 100, 32)
    fitnet, at = LITERATURE_PAIRS[teacher_name, student_name]
    for method, expected in (("fitnet", fitnet), ("at", at), ("reviewkd", at + [("avgpool", "avgpool")])):
        method_class = KD_engine.method_class(method)
        assert method_class.default_pairs(teacher, student) == expected
        with torch.device("meta"):  # the method builds on these models (hooks, trainable part) without a complaint
            method_class(teacher, student, KD_engine.library_setup(teacher_name, student_name)).close()


def test_a_zoo_checkpoint_is_rebuilt_by_its_arch_and_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    model = model_builder.build_model("shufflenetv2", 3, 32).eval()
    checkpoint = {"arch": "shufflenetv2", "num_classes": 3, "class_names": ["a", "b", "c"], "image_size": 32,
                  "mean": [0.5] * 3, "std": [0.25] * 3, "epoch": 1, "state_dict": model.state_dict()}
    checkpoints.save_checkpoint(tmp_path / "best_model.pth", checkpoint)
    rebuilt = checkpoints.load_model(checkpoints.load_checkpoint(tmp_path / "best_model.pth"))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))
    deploy.export_onnx(model, tmp_path / "model.onnx", 32, {"class_names": ["a", "b", "c"]})
    assert deploy.onnx_parity(model, tmp_path / "model.onnx", images) <= 1e-4


def test_list_layers_prints_names_shapes_and_stages(capsys):
    assert experiment.main(["--list-layers", "resnet8x4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet8x4 at 32x32 px")
    assert any(line.split() == ["layer2", "Sequential", "128", "x", "16", "x", "16", "stage", "2"] for line in lines)
    assert experiment.main(["--list-layers", "resnet8x4", "--image-size", "64"]) == 0
    listed = capsys.readouterr().out
    assert "128 x 32 x 32  stage 2" in listed and "256 x 1 x 1  pooled feature" in listed


def test_list_layers_of_an_unknown_model_is_one_sentence(capsys):
    code = experiment.main(["--list-layers", "NoSuchNet"])
    captured = capsys.readouterr()
    assert assert_one_sentence_exit_2(code, captured.err).startswith("error: Unknown model 'NoSuchNet'")
    assert captured.out == ""
