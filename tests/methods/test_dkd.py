"""Decoupled KD (methods/dkd.py): its terms against hand computation, its per-step warm-up (dkd_ls's too) and its
per-pair NCKD weight."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS, STUDENT, TEACHER, hand_dkd, method_setup
from torch import nn

import engine
import experiment
import KD_engine
from config import settings
from methods import dkd, kd


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_terms_match_hand_computation(temperature):
    tckd, nckd = dkd.dkd_terms(STUDENT, TEACHER, LABELS, temperature)
    expected_tckd, expected_nckd = hand_dkd(STUDENT, TEACHER, LABELS, temperature)
    assert tckd.item() == pytest.approx(expected_tckd, rel=1e-5)
    assert nckd.item() == pytest.approx(expected_nckd, rel=1e-5)
    loss = dkd.dkd_loss(STUDENT, TEACHER, LABELS, temperature, dkd_alpha=0.7, dkd_beta=8.0)
    assert loss.item() == pytest.approx(0.7 * expected_tckd + 8.0 * expected_nckd, rel=1e-5)


@pytest.mark.parametrize("index", [0, 1])
def test_kd_is_tckd_plus_weighted_nckd_per_sample(index):
    student, teacher, labels = STUDENT[index : index + 1], TEACHER[index : index + 1], LABELS[index : index + 1]
    temperature = 2.0
    tckd, nckd = dkd.dkd_terms(student, teacher, labels, temperature)
    p_target = F.softmax(teacher / temperature, dim=1)[0, labels[0]]
    whole = kd.kd_loss(student, teacher, temperature)
    assert whole.item() == pytest.approx((tckd + (1 - p_target) * nckd).item(), rel=1e-5)


def test_dkd_with_extreme_logits_stays_finite():
    # Targets far above 1000 * T: the paper's "target - 1000" mask would leave them in NCKD.
    student = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-1e4, -1e4, 0.0], [0.0, 1e4, -1e4]])
    labels = torch.tensor([0, 1])
    tckd, nckd = dkd.dkd_terms(student, teacher, labels, 1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(student.grad).all()
    # Per sample in log space: TCKD 1e4 and 0; NCKD 1e4 and 1e4 (a leaking target would add ~9e3).
    assert tckd.item() == pytest.approx(5e3, rel=1e-4) and nckd.item() == pytest.approx(1e4, rel=1e-4)


@pytest.mark.parametrize("name, scale", [("dkd", 1.0), ("dkd_ls", 9.0)])
def test_dkd_warms_up_per_step_and_continues_after_an_epoch_change(name, scale):
    """DKD and dkd_ls ramp the same way: 1/warmup_steps at the first step (dkd_ls once lagged a step)."""
    torch.manual_seed(3)
    teacher, student = nn.Linear(5, 3), nn.Linear(5, 3)
    images, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 1])
    # 16 epochs of 3 steps: the paper's 20/240 share is 4 warm-up steps.
    setup = method_setup(epochs=16, steps_per_epoch=3, temperature=2.0, alpha=0.25, dkd_alpha=1.0, dkd_beta=8.0)
    criterion = KD_engine.make_criterion(name, teacher, student, setup)
    assert criterion.method.warmup_steps == 4
    assert criterion.method.term_weights == {"tckd": scale, "nckd": 8.0 * scale}
    assert criterion.trainable is None and not teacher.training
    factors = []
    for epoch in (1, 2):
        criterion.set_epoch(epoch)
        for _ in range(3):
            out = criterion(student, images, labels)
            factors.append(out["warmup"].item())
            terms = scale * (out["tckd"] + 8.0 * out["nckd"])
            assert out["loss"].item() == pytest.approx((0.25 * out["ce"] + 0.75 * factors[-1] * terms).item(),
                                                       rel=1e-6)
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # first step 1/warmup_steps, 1 from step warmup_steps on
    resumed = KD_engine.make_criterion(name, teacher, student, setup)
    resumed.set_epoch(2)  # a resumed run starts at epoch 2: its ramp continues at step 4
    assert resumed(student, images, labels)["warmup"].item() == 1.0
    resumed.set_epoch(1)
    with torch.no_grad():
        cached = teacher(images)
    fresh = KD_engine.make_criterion(name, teacher, student, setup)
    assert torch.equal(resumed(student, images, labels, cached)["loss"], fresh(student, images, labels)["loss"])
    with pytest.raises(ValueError, match="Epochs count from 1, got 0"):
        criterion.set_epoch(0)


def test_a_three_epoch_run_warms_up_and_records_the_mean_factor():
    torch.manual_seed(8)
    teacher, student = nn.Linear(5, 3), nn.Linear(5, 3)
    batches = [(torch.randn(4, 5), torch.tensor([0, 1, 2, 1])) for _ in range(12)]
    setup = method_setup(epochs=3, steps_per_epoch=len(batches), temperature=4.0, alpha=0.5)
    criterion = KD_engine.make_criterion("dkd", teacher, student, setup)
    assert criterion.method.warmup_steps == 3
    result = engine.fit(student, batches, batches[:2], criterion, torch.optim.SGD(student.parameters(), lr=0.01), 3,
                        ["a", "b", "c"], torch.device("cpu"), hooks=engine.FitHooks(log=lambda line: None))
    means = [record["train"]["warmup"] for record in result.history]
    assert means[0] == pytest.approx((1 / 3 + 2 / 3 + 10) / 12) and means[1:] == [1.0, 1.0]


def test_dkd_weights_and_the_reference_table():
    method = dkd.DKD(nn.Identity(), nn.Identity(), method_setup(dkd_beta=2.0))
    assert method.weights() == {"dkd_beta": 2.0, "logit_weights": {"dkd": {"tckd": 1.0, "nckd": 2.0}}}
    assert dkd.reference_beta("resnet56", "resnet20") == 2.0
    assert dkd.reference_beta("vgg13", "vgg8") == 6.0
    assert dkd.reference_beta("resnet32x4", "resnet8x4") == 8.0
    assert dkd.reference_beta("vgg16_bn", "resnet18") == 8.0


@pytest.mark.parametrize("teacher, student, given, expected", [
    ("resnet56", "resnet20", None, 2.0), ("WRN_40_2", "wrn_16_2", None, 6.0), ("VGG16", "ResNet18", None, 8.0),
    ("resnet56", "resnet20", 4.0, 4.0),
])
def test_dkd_beta_setting_resolves_per_pair(teacher, student, given, expected):
    config = dataclasses.replace(experiment.default_config(), teacher_model=teacher, student_model=student,
                                 dkd_beta=given, kd_methods="dkd")
    assert settings.method_weights(config)["dkd_beta"] == expected
