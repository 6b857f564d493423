"""Building models (model_builder): torchvision's networks set up for short runs, VGG heads, and pretrained
weights from the hub cache, state-dict files and the references' files (nothing here may download)."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGENET_MEAN, IMAGENET_STD, fabricate, hub_file, imagenet_resnet18
from torch import nn
from torchvision import models

import model_builder
from training import checkpoints

# Nothing here may download: torch.hub's download fails and the proxies point at a closed port.
pytestmark = pytest.mark.usefixtures("offline")


def test_torchvision_mobile_networks_are_set_up_for_short_runs():
    # torchvision builds MobileNetV3 with batch-norm momentum 0.01 and its depthwise convolutions 24x too small
    # (576 channels): after a few dozen steps the running variances were still near 1 where the batches' were
    # 1e-7, and in eval mode it answered one class for every photo.
    torch.manual_seed(0)
    model = model_builder.build_model("mobilenet_v3_small", 2, 64)
    momenta = {module.momentum for module in model.modules() if isinstance(module, nn.BatchNorm2d)}
    assert momenta == {model_builder.MIN_BATCH_NORM_MOMENTUM}
    depthwise = model.features[11].block[1][0]  # 576 channels, 5x5, one group each
    assert depthwise.groups == 576 and float(depthwise.weight.std()) == pytest.approx((2 / 25) ** 0.5, rel=0.05)
    dense = model.features[11].block[0][0]  # ungrouped 1x1: torchvision's own initialization, fan-out 576
    assert float(dense.weight.std()) == pytest.approx((2 / 576) ** 0.5, rel=0.05)


# ---------------------------------------------------------------- 23.4: the VGG head


def test_vgg_above_64_px_gets_the_compact_head_unless_torchvisions_weights_load():
    compact = model_builder.build_on_meta("VGG16", 2, 128)
    full = model_builder.build_on_meta("VGG16", 2, 128, model_builder.default_head(object()))
    assert sum(p.numel() for p in compact.parameters()) < 15e6 < 130e6 < sum(p.numel() for p in full.parameters())
    assert (checkpoints.head_of(compact), checkpoints.head_of(full)) == ("compact", "torchvision")
    assert model_builder.default_head(None) == "compact"


def assert_loaded(model: torch.nn.Module, file_tensors: dict[str, torch.Tensor], reinitialized: list[str]) -> None:
    """Every tensor outside the re-initialized layers equals the file's; those layers do not."""
    for name, tensor in model.state_dict().items():
        layer = name.rpartition(".")[0]
        if layer in reinitialized:
            assert name not in file_tensors or file_tensors[name].shape != tensor.shape, name
        else:
            assert torch.equal(tensor, file_tensors[name]), name


@pytest.mark.parametrize("image_size, reinitialized", [(32, ["conv1", "fc"]), (96, ["fc"])])
def test_torchvision_name_loads_the_hub_file_and_lists_what_does_not_fit(image_size, reinitialized, offline):
    file_tensors = fabricate(hub_file(models.ResNet18_Weights.IMAGENET1K_V1), imagenet_resnet18())
    pretrained = model_builder.read_pretrained("ResNet18", "DEFAULT")
    assert pretrained.source == "ResNet18_Weights.IMAGENET1K_V1"
    assert pretrained.file == str(hub_file(models.ResNet18_Weights.IMAGENET1K_V1))
    assert (pretrained.mean, pretrained.std) == (IMAGENET_MEAN, IMAGENET_STD)
    model = model_builder.build_model("ResNet18", 3, image_size)
    record = model_builder.load_pretrained(model, pretrained)
    assert record["reinitialized"] == reinitialized
    left_alone = [name for name in model.state_dict() if name.rpartition(".")[0] in reinitialized]
    assert record["loaded_tensors"] == len(model.state_dict()) - len(left_alone)
    assert_loaded(model, file_tensors, reinitialized)
    assert offline == [], "a file in the cache must not be downloaded again"


def test_vgg16_means_vgg16_bn_and_its_weights_file(offline):
    weights = model_builder.weights_by_name("VGG16", "IMAGENET1K_V1")
    assert weights is models.VGG16_BN_Weights.IMAGENET1K_V1
    assert model_builder.weights_by_name("vgg16", "VGG16_BN_Weights.DEFAULT") is weights
    assert model_builder.hub_weights_file(weights) == hub_file(weights)
    assert model_builder.weights_by_name("VGG16", "IMAGENET9") is None


def test_state_dict_file_and_a_run_checkpoint_as_weights(tmp_path):
    torch.manual_seed(2)
    trained = model_builder.build_model("ResNet18", 3, 32)
    plain = fabricate(tmp_path / "plain.pt", trained.state_dict())
    pretrained = model_builder.read_pretrained("ResNet18", str(tmp_path / "plain.pt"))
    assert pretrained.mean is None and pretrained.source == str(tmp_path / "plain.pt")
    model = model_builder.build_model("ResNet18", 3, 32)
    assert model_builder.load_pretrained(model, pretrained)["reinitialized"] == []
    assert_loaded(model, plain, [])

    checkpoints.save_checkpoint(tmp_path / "best_model.pth",
                                {"state_dict": plain, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]})
    from_run = model_builder.read_pretrained("ResNet18", str(tmp_path / "best_model.pth"))
    assert (from_run.mean, from_run.std) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    five_classes = model_builder.build_model("ResNet18", 5, 32)
    assert model_builder.load_pretrained(five_classes, from_run)["reinitialized"] == ["fc"]


def test_the_references_files_are_read_whatever_their_key_prefix_or_layer_names(tmp_path):
    torch.manual_seed(0)
    wide = model_builder.build_model("wrn_16_1", 5, 32).eval()
    # RepDistiller's WRN names its blocks' layers block1.layer.0...; pytorch-cifar's files keep weights under "net".
    renamed = {name.replace("block1.", "block1.layer.").replace("block2.", "block2.layer.")
               .replace("block3.", "block3.layer."): value for name, value in wide.state_dict().items()}
    torch.save({"net": renamed, "acc": 90.0}, tmp_path / "wrn.pth")
    loaded = model_builder.build_model("wrn_16_1", 5, 32)
    record = model_builder.load_pretrained(loaded, model_builder.read_pretrained("wrn_16_1", str(tmp_path / "wrn.pth")))
    assert record["reinitialized"] == []
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), wide(images))
    plain = model_builder.build_model("resnet8", 3, 32).state_dict()
    torch.save({"model_state_dict": {f"module.{name}": value for name, value in plain.items()}}, tmp_path / "r.pth")
    state_dict, extra = model_builder.read_state_dict(tmp_path / "r.pth")
    assert list(state_dict) == list(plain) and "model_state_dict" in extra


@pytest.mark.parametrize(("name", "refused", "kept"), [("mobilenet_v3_small", [20, 32], [64]),
                                                      ("efficientnet_b0", [32], [64]),
                                                      ("vgg16_bn", [], [32]), ("resnet8x4", [], [20])])
def test_a_size_that_leaves_a_1x1_last_feature_map_is_refused(name, refused, kept):
    for size in refused:
        with pytest.raises(ValueError, match=rf"shrinks {size}x{size} images to a 1x1 last feature map.*resnet8x4"):
            model_builder.check_input_size(name, size)
    for size in kept:
        model_builder.check_input_size(name, size)


@pytest.mark.parametrize(("name", "head", "classifier"), [
    ("resnet8", "compact", "fc"), ("vgg8", "compact", "classifier"), ("ResNet18", "compact", "fc"),
    ("VGG16", "compact", "classifier"), ("VGG16", "torchvision", "classifier")])
def test_classifier_layer_is_the_one_whose_input_is_the_pooled_embedding(name, head, classifier):
    model = model_builder.build_on_meta(name, 10, 32, head)
    assert model_builder.classifier_layer(model) == classifier
    kept = {}
    model.get_submodule(classifier).register_forward_pre_hook(lambda module, inputs: kept.update(input=inputs[0]))
    model.get_submodule("avgpool").register_forward_hook(lambda module, inputs, output: kept.update(pooled=output))
    with torch.device("meta"):
        model.eval()(torch.zeros(2, 3, 32, 32))
    assert kept["input"].flatten(1).shape == kept["pooled"].flatten(1).shape


def test_a_model_without_a_linear_layer_has_no_classifier_layer():
    with pytest.raises(ValueError, match="no linear classifier"):
        model_builder.classifier_layer(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))
