"""The literature's CIFAR networks (nets.cifar_networks): published parameter counts, stages, the default
layer pairs of the literature's teacher-student pairs."""

from __future__ import annotations

import pytest
import torch

import KD_engine
import model_builder
from methods import feature_maps
from nets import cifar_networks
from results import deploy

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


def test_the_student_of_a_literature_pair_is_cheaper():
    teacher, student = (model_builder.build_model(name, 10, 32) for name in ("resnet32x4", "resnet8x4"))
    assert deploy.flops_per_image(student, 32) < deploy.flops_per_image(teacher, 32) / 5


@pytest.mark.parametrize("teacher_name, student_name", sorted(LITERATURE_PAIRS))
def test_default_pairs_of_the_literature_pairs_exist_and_fit(teacher_name, student_name):
    with torch.device("meta"):
        teacher = model_builder.build_model(teacher_name, 100, 32)
        student = model_builder.build_model(student_name, 100, 32)
    fitnet, at = LITERATURE_PAIRS[teacher_name, student_name]
    classifiers = [(model_builder.classifier_layer(teacher), model_builder.classifier_layer(student))]
    # SP: each model's own last stage (RepDistiller's feat[-2]), even where the stage pairs stop earlier (VGG16).
    last_stages = [(model_builder.feature_stages(teacher)[-1], model_builder.feature_stages(student)[-1])]
    pairs = {"fitnet": fitnet, "at": at, "reviewkd": at + [("avgpool", "avgpool")], "sp": last_stages, "nst": at,
             "vid": at, "cc": classifiers, "rkd": classifiers, "pkt": classifiers}
    for method, expected in pairs.items():
        method_class = KD_engine.method_class(method)
        assert method_class.default_pairs(teacher, student) == expected, method
        with torch.device("meta"):  # the method builds on these models (hooks, trainable part) without a complaint
            method_class(teacher, student, KD_engine.library_setup(teacher_name, student_name)).close()
