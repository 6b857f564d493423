"""ReviewKD (methods/reviewkd.py): HCL and the fusion by hand, the teacher's maps before their last ReLU, and the
step's trained ABFs and warm-up."""

import pytest
import torch
import torch.nn.functional as F
from conftest import method_setup
from torch import nn

import KD_engine
import model_builder
from methods import reviewkd


def test_hcl_loss_weighs_the_pooled_levels_as_the_reference():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    # 4x4 maps: sizes 2 and 1 are smaller (weights 1/2, 1/4); 4 is not.
    by_hand = (F.mse_loss(student, teacher) + 0.5 * F.mse_loss(F.avg_pool2d(student, 2), F.avg_pool2d(teacher, 2))
               + 0.25 * F.mse_loss(student.mean((2, 3)), teacher.mean((2, 3)))) / 1.75
    pooled_student, pooled_teacher = torch.randn(2, 5, 1, 1), torch.randn(2, 5, 1, 1)
    expected = by_hand + F.mse_loss(pooled_student, pooled_teacher)  # a 1x1 map: the plain MSE alone
    loss = reviewkd.hcl_loss([student, pooled_student], [teacher, pooled_teacher])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def identity_abf(abf: reviewkd.ABF) -> reviewkd.ABF:
    """One-channel ABF whose convolutions and BNs pass values through and whose attention is 1/2 and 1/2."""
    with torch.no_grad():
        abf.reduce[0].weight.fill_(1.0)
        abf.output[0].weight.zero_()
        abf.output[0].weight[0, 0, 1, 1] = 1.0
        if abf.attention is not None:
            abf.attention[0].weight.zero_()
            abf.attention[0].bias.zero_()
    for bn in (abf.reduce[1], abf.output[1]):
        bn.eps = 0.0
    return abf.eval()


def test_review_fusion_fuses_the_deeper_level_by_hand():
    fusion = reviewkd.ReviewFusion([((2, 1, 2, 2), (2, 1, 2, 2)), ((2, 1, 1, 1), (2, 1, 1, 1))])
    assert [abf.attention is None for abf in fusion.abfs] == [False, True], "the deepest level fuses with none"
    for abf in fusion.abfs:
        identity_abf(abf)
    shallow, deep = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.tensor([[[[10.0]]]])
    outputs = fusion([shallow, deep])
    assert outputs[1].tolist() == [[[[10.0]]]]
    assert outputs[0].tolist() == [[[[5.5, 6.0], [6.5, 7.0]]]], "half its map, half the upsampled deeper map"
    wider = reviewkd.ReviewFusion([((2, 8, 16, 16), (2, 12, 8, 8)), ((2, 600, 1, 1), (2, 700, 1, 1))])
    assert wider.abfs[0].reduce[0].out_channels == 512, "mdistiller's width: min(512, the pooled channels)"
    assert [o.shape[1:] for o in wider([torch.randn(2, 8, 16, 16), torch.randn(2, 600, 1, 1)])] == [
        (12, 8, 8), (700, 1, 1)], "each output has the teacher's channels and size"


def manual_preact(block: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock's sum before its last ReLU, written out (mdistiller's `preact`)."""
    out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(inputs)))))
    return out + (inputs if block.downsample is None else block.downsample(inputs))


def test_reviewkd_takes_the_teachers_maps_before_their_last_relu():
    torch.manual_seed(1)
    teacher, student = model_builder.build_model("resnet14", 3, 16), model_builder.build_model("resnet8", 3, 16)
    setup = method_setup(image_size=16, layer_pairs=[("layer1", "layer1"), ("layer2", "layer2"),
                                                     ("avgpool", "avgpool")])
    criterion = KD_engine.make_criterion("reviewkd", teacher, student, setup)
    assert criterion.method.teacher_layers == {"layer1.1.relu": True, "layer2.1.relu": True, "avgpool": False}
    images = torch.randn(2, 3, 16, 16)
    stage_input = {}
    teacher.layer2[1].register_forward_pre_hook(lambda module, inputs: stage_input.update(x=inputs[0].clone()))
    outputs = criterion.teacher_outputs(images)
    with torch.no_grad():
        expected = manual_preact(teacher.layer2[1], stage_input["x"])
    preact = outputs.features["layer2.1.relu"]
    assert torch.allclose(preact, expected, atol=1e-6) and (preact < 0).any()
    pooled = outputs.features["avgpool"]
    assert pooled.shape == (2, 64, 1, 1) and torch.allclose(teacher.fc(pooled.flatten(1)), outputs.logits)
    criterion.close()


def test_reviewkd_takes_a_wide_resnets_block_outputs_through_the_next_bn():
    torch.manual_seed(3)
    teacher, student = model_builder.build_model("wrn_40_2", 3, 8), model_builder.build_model("wrn_40_1", 3, 8)
    for bn in (teacher.block2[0].bn1, teacher.block3[0].bn1, teacher.bn1):  # statistics that make BN no identity
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    criterion = KD_engine.make_criterion("reviewkd", teacher, student, method_setup("wrn_40_2", "wrn_40_1",
                                                                                     image_size=8))
    assert criterion.method.teacher_layers == {"block2.0.relu1": True, "block3.0.relu1": True, "relu": True,
                                               "avgpool": False}
    blocks = {}
    for name in ("block1", "block2", "block3"):
        getattr(teacher, name).register_forward_hook(lambda module, inputs, output, name=name: blocks.update(
            {name: output.clone()}))
    features = criterion.teacher_outputs(torch.randn(2, 3, 8, 8)).features
    with torch.no_grad():  # mdistiller wrn.py: f1_pre = block2.layer[0].bn1(f1), ..., f3_pre = bn1(f3)
        expected = [teacher.block2[0].bn1(blocks["block1"]), teacher.block3[0].bn1(blocks["block2"]),
                    teacher.bn1(blocks["block3"])]
    for name, preact in zip(("block2.0.relu1", "block3.0.relu1", "relu"), expected, strict=True):
        assert torch.allclose(features[name], preact, atol=1e-6) and (features[name] < 0).any()
    criterion.close()


def test_reviewkd_step_trains_its_abfs_and_warms_up():
    torch.manual_seed(2)
    teacher, student = model_builder.build_model("resnet14", 3, 16), model_builder.build_model("resnet8", 3, 16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    setup = method_setup(image_size=16, steps_per_epoch=2, temperature=4.0, alpha=0.5, reviewkd_warmup_epochs=2)
    criterion = KD_engine.make_criterion("reviewkd", teacher, student, setup)
    assert criterion.method.beta == 2.5 and len(criterion.trainable.abfs) == 4, "5 x alpha; stages 1-3 and the pooled"
    assert criterion.method.warmup_steps == 4
    criterion.set_epoch(2)  # steps 3 and 4 of a 4-step ramp
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    out = criterion(student, images, labels)
    assert out["warmup"].item() == 0.75
    assert out["loss"].item() == pytest.approx((0.5 * out["ce"] + 0.5 * out["kd"] + 2.5 * 0.75 * out["hcl"]).item(),
                                               rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in criterion.trainable.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert criterion(student, images, labels)["warmup"].item() == 1.0
    criterion.close()


@pytest.mark.parametrize("pair, weight", [(("resnet56", "resnet20"), 0.6), (("resnet110", "resnet32"), 1.0),
                                          (("resnet32x4", "shufflenetv2"), 8.0), (("resnet32x4", "resnet8x4"), 5.0),
                                          (("wrn_40_2", "wrn_40_1"), 5.0), (("resnet56", "resnet8"), 5.0)])
def test_reviewkd_weighs_each_pair_as_dvlabs_script(pair, weight):
    assert reviewkd.ReviewKD.reference_weight_for(*pair) == weight
    assert reviewkd.ReviewKD.term_weight(0.5, None, *pair) == 0.5 * weight
    assert reviewkd.ReviewKD.term_weight(0.5, 2.0, *pair) == 2.0, "--beta overrides the pair's weight"


def test_reviewkd_step_uses_the_pairs_weight():
    teacher, student = model_builder.build_model("resnet56", 3, 8), model_builder.build_model("resnet20", 3, 8)
    setup = method_setup("resnet56", "resnet20", image_size=8, alpha=1.0)
    criterion = KD_engine.make_criterion("reviewkd", teacher, student, setup)
    assert criterion.method.beta == 0.6 and criterion.method.weights() == {"feature_weights": {"reviewkd": 0.6}}
    criterion.close()
