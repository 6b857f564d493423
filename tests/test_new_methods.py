"""DIST, logit standardization (kd_ls, dkd_ls, dist_ls), ReviewKD and DKD's per-pair weight, each against a
hand transcription of its reference's formula on tiny tensors, and end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_FLAGS
from test_kd_methods import hand_dkd
from torch import nn

import experiment
import KD_engine
import model_builder
import utils
from config import settings
from methods import feature_methods

STUDENT = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, -1.0, 0.0]])
TEACHER = torch.tensor([[3.0, 0.0, -2.0], [0.0, 1.0, 2.0], [0.5, 0.5, -0.5]])
LABELS = torch.tensor([0, 2, 1])


def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(value / temperature) for value in row]
    return [value / sum(exps) for value in exps]


def pearson(first: list[float], second: list[float]) -> float:
    mean_first, mean_second = sum(first) / len(first), sum(second) / len(second)
    first, second = [v - mean_first for v in first], [v - mean_second for v in second]
    norms = math.sqrt(sum(v * v for v in first)) * math.sqrt(sum(v * v for v in second))
    return sum(a * b for a, b in zip(first, second, strict=True)) / (norms + 1e-8)


def hand_dist(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    """DIST_KD's DIST with beta = gamma = 1: T^2 * (1 - mean row correlation + 1 - mean column correlation)."""
    p_s = [softmax(row, temperature) for row in student]
    p_t = [softmax(row, temperature) for row in teacher]
    inter = 1 - sum(pearson(s, t) for s, t in zip(p_s, p_t, strict=True)) / len(p_s)
    columns = range(len(p_s[0]))
    intra = 1 - sum(pearson([row[c] for row in p_s], [row[c] for row in p_t]) for c in columns) / len(columns)
    return temperature**2 * (inter + intra)


def hand_standardize(rows: list[list[float]]) -> list[list[float]]:
    """The LS reference's normalize(): (x - mean) / (1e-7 + unbiased std), per row."""
    out = []
    for row in rows:
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        out.append([(v - mean) / (1e-7 + std) for v in row])
    return out


def hand_kd(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p_s, p_t = softmax(s_row, temperature), softmax(t_row, temperature)
        total += sum(t * math.log(t / s) for s, t in zip(p_s, p_t, strict=True))
    return temperature**2 * total / len(student)


def criterion_out(method: str, alpha: float = 0.5, **settings_):
    """A logit method's criterion on the fixed logits (the teacher's given as cached logits)."""
    criterion = KD_engine.make_criterion(method, nn.Identity(), nn.Identity(), temperature=4.0, alpha=alpha,
                                         **settings_)
    return criterion(nn.Identity(), STUDENT, LABELS, TEACHER)


CE = F.cross_entropy(STUDENT, LABELS).item()


def test_dist_matches_the_hand_transcription():
    expected = hand_dist(STUDENT.tolist(), TEACHER.tolist(), 4.0)
    assert KD_engine.dist_loss(STUDENT, TEACHER, 4.0).item() == pytest.approx(expected, rel=1e-5)
    out = criterion_out("dist", alpha=0.3)
    assert out["dist"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.3 * CE + 0.7 * 2.0 * expected, rel=1e-5), "DIST_KD's weight 2"
    assert KD_engine.dist_loss(TEACHER * 2 + 1, TEACHER * 2 + 1, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_standardize_is_the_references_z_score():
    expected = [value for row in hand_standardize(STUDENT.tolist()) for value in row]
    assert KD_engine.standardize(STUDENT).flatten().tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="two classes"):
        KD_engine.standardize(torch.ones(2, 1))


def test_kd_ls_is_ce_plus_the_references_ninety_times_standardized_kd():
    z_s, z_t = hand_standardize(STUDENT.tolist()), hand_standardize(TEACHER.tolist())
    kd = hand_kd(z_s, z_t, 2.0)
    out = criterion_out("kd_ls")
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(CE, rel=1e-6), "CE sees the raw logits"
    # At alpha 0.5: 0.5 CE + 45 KD, the reference's 0.1 CE + 9 KD times 5.
    assert out["loss"].item() == pytest.approx(0.5 * CE + 0.5 * 90 * kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(5 * (0.1 * CE + 9 * kd), rel=1e-5)


def test_dkd_ls_multiplies_dkd_weights_by_nine_after_the_z_score():
    z_s, z_t = (torch.tensor(hand_standardize(x.tolist())) for x in (STUDENT, TEACHER))
    tckd, nckd = hand_dkd(z_s, z_t, LABELS, 2.0)
    out = criterion_out("dkd_ls", dkd_beta=2.0, dkd_warmup_steps=0)
    assert (out["tckd"].item(), out["nckd"].item()) == pytest.approx((tckd, nckd), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * CE + 0.5 * (9 * tckd + 18 * nckd), rel=1e-5)


def test_dist_ls_is_dist_of_the_z_scores_at_the_base_temperature():
    expected = hand_dist(hand_standardize(STUDENT.tolist()), hand_standardize(TEACHER.tolist()), 2.0)
    out = criterion_out("dist_ls", ls_temperature=2.0)
    assert out["dist"].item() == pytest.approx(expected, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * CE + 0.5 * 18 * expected, rel=1e-5)


def test_logit_weights_and_the_dkd_table():
    assert KD_engine.logit_weights("kd") == {"kd": 1.0}
    assert KD_engine.logit_weights("kd_ls") == {"kd": pytest.approx(90.0)}
    assert KD_engine.logit_weights("dkd", dkd_beta=2.0) == {"tckd": 1.0, "nckd": 2.0}
    assert KD_engine.logit_weights("dkd_ls", dkd_beta=8.0) == {"tckd": 9.0, "nckd": 72.0}
    assert KD_engine.logit_weights("dist") == {"dist": 2.0} and KD_engine.logit_weights("dist_ls") == {"dist": 18.0}
    assert KD_engine.reference_dkd_beta("resnet56", "resnet20") == 2.0
    assert KD_engine.reference_dkd_beta("vgg13", "vgg8") == 6.0
    assert KD_engine.reference_dkd_beta("resnet32x4", "resnet8x4") == 8.0
    assert KD_engine.reference_dkd_beta("vgg16_bn", "resnet18") == 8.0


@pytest.mark.parametrize("teacher, student, given, expected", [
    ("resnet56", "resnet20", None, 2.0), ("WRN_40_2", "wrn_16_2", None, 6.0), ("VGG16", "ResNet18", None, 8.0),
    ("resnet56", "resnet20", 4.0, 4.0),
])
def test_dkd_beta_setting_resolves_per_pair(teacher, student, given, expected):
    config = experiment.default_config()
    config.teacher_model, config.student_model, config.dkd_beta = teacher, student, given
    assert settings.dkd_beta(config) == expected


# ---------------------------------------------------------------- ReviewKD


def test_hcl_loss_weighs_the_pooled_levels_as_the_reference():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    # 4x4 maps: sizes 2 and 1 are smaller (weights 1/2, 1/4); 4 is not.
    by_hand = (F.mse_loss(student, teacher) + 0.5 * F.mse_loss(F.avg_pool2d(student, 2), F.avg_pool2d(teacher, 2))
               + 0.25 * F.mse_loss(student.mean((2, 3)), teacher.mean((2, 3)))) / 1.75
    pooled_student, pooled_teacher = torch.randn(2, 5, 1, 1), torch.randn(2, 5, 1, 1)
    expected = by_hand + F.mse_loss(pooled_student, pooled_teacher)  # a 1x1 map: the plain MSE alone
    loss = feature_methods.hcl_loss([student, pooled_student], [teacher, pooled_teacher])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def identity_abf(abf: feature_methods.ABF) -> feature_methods.ABF:
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
    fusion = feature_methods.ReviewFusion([((2, 1, 2, 2), (2, 1, 2, 2)), ((2, 1, 1, 1), (2, 1, 1, 1))])
    assert [abf.attention is None for abf in fusion.abfs] == [False, True], "the deepest level fuses with none"
    for abf in fusion.abfs:
        identity_abf(abf)
    shallow, deep = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.tensor([[[[10.0]]]])
    outputs = fusion([shallow, deep])
    assert outputs[1].tolist() == [[[[10.0]]]]
    assert outputs[0].tolist() == [[[[5.5, 6.0], [6.5, 7.0]]]], "half its map, half the upsampled deeper map"
    wider = feature_methods.ReviewFusion([((2, 8, 16, 16), (2, 12, 8, 8)), ((2, 600, 1, 1), (2, 700, 1, 1))])
    assert wider.abfs[0].reduce[0].out_channels == 512, "mdistiller's width: min(512, the pooled channels)"
    assert [o.shape[1:] for o in wider([torch.randn(2, 8, 16, 16), torch.randn(2, 600, 1, 1)])] == [
        (12, 8, 8), (700, 1, 1)], "each output has the teacher's channels and size"


def manual_preact(block: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock's sum before its last ReLU, written out (mdistiller's `preact`)."""
    out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(inputs)))))
    return out + (inputs if block.downsample is None else block.downsample(inputs))


def test_reviewkd_takes_the_teachers_maps_before_their_last_relu():
    torch.manual_seed(1)
    teacher = model_builder.build_model("resnet14", 3, 16).eval()
    vgg, wrn = model_builder.build_model("vgg8", 3, 32), model_builder.build_model("wrn_16_1", 3, 32)
    assert feature_methods.pre_activation_layers(teacher, ["layer1", "layer2", "avgpool"], 16) == {
        "layer1": "layer1.1.relu", "layer2": "layer2.1.relu"}
    assert feature_methods.pre_activation_layers(vgg, ["features.2", "avgpool"], 32) == {"features.2": "features.2"}
    assert feature_methods.pre_activation_layers(wrn, ["block1", "block2"], 32) == {}, "WRN's blocks end in an addition"
    term = feature_methods.FeatureTerm(teacher, model_builder.build_model("resnet8", 3, 16), "reviewkd",
                                   [("layer1", "layer1"), ("layer2", "layer2"), ("avgpool", "avgpool")], 16)
    images = torch.randn(2, 3, 16, 16)
    stage_input = {}
    teacher.layer2[1].register_forward_pre_hook(lambda module, inputs: stage_input.update(x=inputs[0].clone()))
    with torch.inference_mode():
        logits = teacher(images)
    features = term.teacher_features()
    with torch.no_grad():
        expected = manual_preact(teacher.layer2[1], stage_input["x"])
    assert torch.allclose(features[1], expected, atol=1e-6) and (features[1] < 0).any()
    assert features[2].shape == (2, 64, 1, 1) and torch.allclose(teacher.fc(features[2].flatten(1)), logits)
    term.close()


def test_reviewkd_criterion_trains_its_abfs_and_warms_up():
    torch.manual_seed(2)
    teacher, student = model_builder.build_model("resnet14", 3, 16), model_builder.build_model("resnet8", 3, 16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    criterion = KD_engine.make_criterion("reviewkd", teacher, student, temperature=4.0, alpha=0.5, image_size=16,
                                         reviewkd_warmup_steps=4, steps_per_epoch=2)
    assert criterion.beta == 2.5 and len(criterion.trainable.abfs) == 4, "5 x alpha; stages 1-3 and the pooled"
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


# ---------------------------------------------------------------- end to end


def test_new_methods_run_end_to_end(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    flags = [*TINY_FLAGS, "--teacher-epochs", "1", "--student-epochs", "1", "--teacher-model", "resnet14",
             "--student-model", "resnet8", "--kd-methods", "dist,dkd_ls,reviewkd"]
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            *flags])
    assert code == 0
    summary = utils.read_json(run_dir / "summary.json")
    assert {"student_dist", "student_dkd_ls", "student_reviewkd"} <= summary.keys()
    resolved = utils.read_json(run_dir / "config.json")["resolved"]
    assert resolved["dkd_beta"] == 8.0 and resolved["feature_weights"] == {"reviewkd": 2.5}
    assert resolved["logit_weights"] == {"dist": {"dist": 2.0}, "dkd_ls": {"tckd": 9.0, "nckd": 72.0}}
    parts = {method: utils.read_json(run_dir / f"student_{method}" / "history.json")["epochs"][0]["train"]
             for method in ("dist", "reviewkd")}
    assert {"ce", "dist"} <= parts["dist"].keys() and {"ce", "kd", "hcl", "warmup"} <= parts["reviewkd"].keys()
