"""Feature distillation's shared pieces (methods/feature_maps.py): hooks on named layers, layer pairs and
pre-activation maps, and `FeatureMethod`'s weights and loss."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import hand_kd, method_setup, tiny_convnet
from torch import nn

import experiment
import KD_engine
import model_builder
from methods import at, feature_maps, fitnet, nst, pkt, rkd, sp

# ---------------------------------------------------------------- weights and the combined loss


def test_feature_weights_default_to_the_references_balance():
    assert fitnet.FitNet.term_weight(0.5, None) == 50.0
    assert at.AT.term_weight(0.5, None) == 500.0
    assert fitnet.FitNet.term_weight(1.0, None) == 100.0 and at.AT.term_weight(1.0, None) == 1000.0
    assert at.AT.term_weight(0.5, 3.0) == 3.0
    assert at.AT.term_weight(0.0, 3.0) == 3.0
    with pytest.raises(ValueError, match="at alpha 0 needs an explicit --beta"):
        fitnet.FitNet.term_weight(0.0, None)


def test_feature_weights_must_be_valid():
    config = experiment.default_config()
    assert at.AT.check(dataclasses.replace(config, alpha=0.6, beta=-1.0)) == ["--beta must be >= 0 (got -1.0)."]
    assert at.AT.check(dataclasses.replace(config, alpha=0.6, beta=3.0)) == []
    problems = at.AT.check(dataclasses.replace(config, alpha=0.0, beta=None))
    assert len(problems) == 1 and "at alpha 0 needs an explicit --beta" in problems[0]


@pytest.mark.parametrize("method, alpha, weight",
                         [("fitnet", 0.5, 50.0), ("at", 0.3, 300.0), ("fitnet", 1.0, 100.0), ("at", 1.0, 1000.0)])
def test_feature_step_combines_its_terms_at_the_default_weights(method, alpha, weight):
    torch.manual_seed(7)
    teacher, student = tiny_convnet(6), tiny_convnet(4)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    setup = method_setup(image_size=8, layer_pairs=[("2", "2"), ("4", "4")], temperature=4.0, alpha=alpha)
    criterion = KD_engine.make_criterion(method, teacher, student, setup)
    assert criterion.method.beta == weight
    assert criterion.method.weights() == {"feature_weights": {method: weight}}
    out = criterion(student, images, labels)
    part = out["feature" if method == "fitnet" else "at"]
    assert out["loss"].item() == pytest.approx((alpha * out["ce"] + (1 - alpha) * out["kd"] + weight * part).item(),
                                               rel=1e-6)
    with torch.no_grad():
        teacher_logits = teacher(images)
        student_logits = student(images)
    ce = F.cross_entropy(student_logits, labels)
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert out["kd"].item() == pytest.approx(hand_kd(student_logits, teacher_logits, 4.0), rel=1e-5)
    if alpha == 1.0:  # the references' loss: CE + weight * feature, no KD
        assert out["loss"].item() == pytest.approx((ce + weight * part).item(), rel=1e-6)
    criterion.close()


# ---------------------------------------------------------------- layer names


def test_feature_hooks_name_a_missing_layer():
    with pytest.raises(ValueError, match=r"'features\.99'.*include: 0, 1, 2"):
        feature_maps.FeatureHooks(tiny_convnet(4), ["2", "features.99"])
    vgg_like = nn.Sequential()
    vgg_like.add_module("features", tiny_convnet(4))
    with pytest.raises(ValueError, match=r"'features\.22'.*features\.2"):
        feature_maps.FeatureHooks(vgg_like, ["features.22"])


def test_feature_hooks_look_through_wrappers_and_can_be_removed():
    model = tiny_convnet(4)

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel's `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    hooks = feature_maps.FeatureHooks(torch.compile(Wrapper(model)), ["2", "4"])
    model(torch.zeros(1, 3, 6, 6))
    assert [f.shape[1:] for f in hooks.take()] == [(4, 6, 6), (8, 3, 3)]
    with pytest.raises(RuntimeError, match="'2'"):
        hooks.take()  # taking forgets: a stale forward is never reused
    hooks.remove()
    model(torch.zeros(1, 3, 6, 6))
    assert hooks.outputs == {}


def test_parse_feature_layers():
    assert feature_maps.parse_feature_layers("features.22:layer3, features.32:layer4") == [
        ("features.22", "layer3"), ("features.32", "layer4")]
    for bad in ("features.22", "a:b:c", "a:b,", ":layer3", "a:b,,c:d"):
        with pytest.raises(ValueError, match="teacher_layer:student_layer"):
            feature_maps.parse_feature_layers(bad)


def test_a_model_without_known_stages_asks_for_feature_layers(real_models):
    teacher, _ = real_models
    with pytest.raises(ValueError, match="--feature-layers"):
        at.AT.default_pairs(teacher, tiny_convnet(4))


def test_pre_activation_layers_are_the_last_relus_inputs():
    resnet = model_builder.build_model("resnet14", 3, 16)
    vgg, wrn = model_builder.build_model("vgg8", 3, 32), model_builder.build_model("wrn_16_1", 3, 32)
    assert feature_maps.pre_activation_layers(resnet, ["layer1", "layer2", "avgpool"], 16) == {
        "layer1": "layer1.1.relu", "layer2": "layer2.1.relu"}
    assert feature_maps.pre_activation_layers(vgg, ["features.2", "avgpool"], 32) == {"features.2": "features.2"}
    # WRN's blocks end in an addition: the next block's BN, then its ReLU (mdistiller wrn.py's preact_feats)
    assert feature_maps.pre_activation_layers(wrn, ["block1", "block3", "avgpool"], 32) == {
        "block1": "block2.0.relu1", "block3": "relu"}
    mobilenet = model_builder.build_model("mobilenetv2", 3, 32)
    assert feature_maps.pre_activation_layers(mobilenet, ["blocks.1"], 32) == {}, "a linear bottleneck feeds a conv"


def test_relational_losses_are_computed_in_float32_under_a_bf16_autocast():
    generator = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(8, 6, 4, 4, generator=generator), torch.randn(8, 5, 4, 4, generator=generator)
    for method in (sp.SP, rkd.RKD, pkt.PKT, nst.NST):
        exact = method.pairs_loss([student], [teacher])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matrix products would be off by ~1e-2
            under = method.pairs_loss([student], [teacher])
        assert under.dtype == torch.float32 and under.item() == pytest.approx(exact.item(), rel=1e-6), method.name
