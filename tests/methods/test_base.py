"""What every method shares (methods/base.py): the linear warm-up's length and factor, the reference weights of
--loss-weights reference."""

import dataclasses

import pytest
import torch
from conftest import logit_method_outputs, method_setup

import experiment
import KD_engine
import model_builder
from methods import base


def test_warmup_steps_keep_the_papers_share_of_all_steps():
    assert base.warmup_steps(240, 10) == 200  # the paper: 20 of 240 epochs
    assert base.warmup_steps(3, 40) == 10  # a 3-epoch run warms up over its first 10 steps
    assert base.warmup_steps(1, 2) == 1
    assert base.warmup_steps(3, 40, warmup_epochs=2) == 80
    assert base.warmup_steps(3, 40, warmup_epochs=0) == 0


def test_every_method_that_needs_three_classes_says_why_and_the_others_take_two():
    for name in KD_engine.method_names():
        method = KD_engine.method_class(name)
        assert not method.check_classes(3)
        refusal = method.check_classes(2)
        assert bool(refusal) == (name in {"dkd", "dkd_ls", "dist", "dist_ls"}), name
        assert all(name in sentence and method.few_classes in sentence for sentence in refusal)


def test_every_method_declares_its_references_weights_per_reported_part():
    for name in KD_engine.method_names():
        method = KD_engine.method_class(name)
        weights = method.reference_weights_for("resnet32x4", "resnet8x4")
        assert weights["ce"] > 0 and all(weight >= 0 for weight in weights.values()), name
        assert set(weights) <= {"ce", "kd", *method.parts}, name


def test_reference_total_warms_up_the_methods_own_parts_alone():
    parts = {"ce": torch.tensor(2.0), "kd": torch.tensor(3.0), "hcl": torch.tensor(5.0), "warmup": torch.tensor(0.5)}
    total = base.reference_total({"ce": 1.0, "kd": 0.5, "hcl": 4.0}, parts, {"hcl"})
    assert total.item() == 2.0 + 1.5 + 4.0 * 0.5 * 5.0
    parts["kd"] = torch.tensor(float("inf"))
    assert base.reference_total({"ce": 1.0, "kd": 0.0, "hcl": 4.0}, parts, {"hcl"}).item() == 12.0
    with pytest.raises(ValueError, match="does not report: sp"):
        base.reference_total({"ce": 1.0, "sp": 3000.0}, parts, {"sp"})


def test_a_method_without_reference_weights_is_refused_under_reference_weights():
    class Unweighed(base.Method):
        name = "unweighed"

    config = dataclasses.replace(experiment.default_config(), loss_weights="reference")
    assert Unweighed.check(config) == ["--kd-methods unweighed declares no reference weights: use --loss-weights "
                                       "alpha."]
    assert Unweighed.check(dataclasses.replace(config, loss_weights="alpha")) == []


@pytest.mark.parametrize(("method", "weights"), [
    ("kd", {"ce": 0.1, "kd": 0.9}), ("dist", {"ce": 1.0, "dist": 2.0}), ("kd_ls", {"ce": 0.1, "kd": 9.0}),
    ("dist_ls", {"ce": 1.0, "dist": 18.0}), ("dkd", {"ce": 1.0, "tckd": 1.0, "nckd": 2.0}),
    ("dkd_ls", {"ce": 1.0, "tckd": 9.0, "nckd": 18.0})])
def test_reference_weights_replace_the_alpha_mix_of_logit_methods(method, weights):
    out = logit_method_outputs(method, alpha=0.7, loss_weights="reference", teacher_arch="resnet56",
                               student_arch="resnet20", dkd_warmup_epochs=0)
    expected = sum(weight * out[part].item() for part, weight in weights.items())
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_reference_weights_of_a_feature_method_ignore_alpha_and_keep_its_warmup():
    torch.manual_seed(5)
    teacher, student = model_builder.build_model("resnet56", 3, 8), model_builder.build_model("resnet20", 3, 8)
    setup = method_setup("resnet56", "resnet20", image_size=8, steps_per_epoch=4, alpha=0.0,
                         loss_weights="reference", reviewkd_warmup_epochs=1)
    criterion = KD_engine.make_criterion("reviewkd", teacher, student, setup)
    assert criterion.method.beta == 0.6, "alpha 0 needs no --beta: the reference's weight is CE 1, HCL 0.6"
    out = criterion(student, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert out["warmup"].item() == 0.25
    assert out["loss"].item() == pytest.approx((out["ce"] + 0.6 * 0.25 * out["hcl"]).item(), rel=1e-6)
    criterion.close()
