"""Feature (FitNets, attention transfer) and decoupled distillation, and the library training function."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS, STUDENT, TEACHER, hand_kd, hand_kl, hand_softmax
from torch import nn

import engine
import KD_engine
import model_builder
from methods import feature_methods


def tiny_convnet(width: int, classes: int = 3) -> nn.Sequential:
    """conv (index 0) -> BN -> ReLU (2) -> strided conv (3) -> ReLU (4) -> pooled linear head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    )


def known_regressor(weight: float, bias: float, mean: float, var: float) -> feature_methods.HintRegressor:
    """A 1-channel, same-size regressor: 1x1 conv (weight, bias), then BN in eval mode with these statistics."""
    regressor = feature_methods.HintRegressor((1, 1, 1, 2), (1, 1, 1, 2))
    with torch.no_grad():
        regressor[0].weight.fill_(weight)
        regressor[0].bias.fill_(bias)
    regressor[1].running_mean.fill_(mean)
    regressor[1].running_var.fill_(var)
    regressor[1].eps = 0.0
    return regressor.eval()


# ---------------------------------------------------------------- feature losses


def test_fitnet_hint_loss_through_a_known_regressor():
    # Student map [1, -2]: conv -> [2.5, -3.5]; BN (mean 0.5, var 4) -> [1, -2]; ReLU -> [1, 0].
    student = torch.tensor([[[[1.0, -2.0]]]])
    teacher = torch.tensor([[[[0.5, 1.0]]]])
    regressors = feature_methods.HintRegressors([])
    regressors.regressors.append(known_regressor(2.0, 0.5, 0.5, 4.0))
    expected = ((1 - 0.5) ** 2 + (0 - 1.0) ** 2) / 2  # MSE, a mean over the map's elements
    assert feature_methods.fitnet_loss([student], [teacher], regressors).item() == pytest.approx(expected, rel=1e-6)
    regressors.regressors.append(known_regressor(2.0, 0.5, 0.5, 4.0))
    loss = feature_methods.fitnet_loss([student, student], [teacher, teacher + 1], regressors)
    assert loss.item() == pytest.approx(expected + ((1 - 1.5) ** 2 + (0 - 2.0) ** 2) / 2, rel=1e-6), "summed over pairs"


@pytest.mark.parametrize("student_size, teacher_size, conv, kernel", [
    (8, 8, nn.Conv2d, (1, 1)), (8, 4, nn.Conv2d, (3, 3)), (4, 8, nn.ConvTranspose2d, (4, 4)), (6, 4, nn.Conv2d, (3, 3)),
])
def test_hint_regressor_reaches_the_teacher_shape_as_the_references(student_size, teacher_size, conv, kernel):
    regressor = feature_methods.HintRegressor((2, 5, student_size, student_size), (2, 7, teacher_size, teacher_size))
    assert [type(layer) for layer in regressor] == [conv, nn.BatchNorm2d, nn.ReLU]
    assert regressor[0].kernel_size == kernel
    assert regressor(torch.randn(2, 5, student_size, student_size)).shape == (2, 7, teacher_size, teacher_size)


def test_hint_regressor_refuses_a_student_map_it_cannot_grow():
    with pytest.raises(ValueError, match="student map of 3x3 onto a teacher map of 8x8"):
        feature_methods.HintRegressor((1, 4, 3, 3), (1, 4, 8, 8))


def hand_attention(channels):
    """p=2 attention of one sample's map given as channels of flat positions: channel mean of squares, unit norm."""
    squares = [sum(c[i] ** 2 for c in channels) / len(channels) for i in range(len(channels[0]))]
    norm = math.sqrt(sum(v * v for v in squares))
    return [v / norm for v in squares]


def test_attention_transfer_matches_hand_computation():
    # One sample, two channels, a 1x2 map.
    student = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    teacher = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])
    a_s = hand_attention([[1.0, 2.0], [3.0, 0.0]])  # [5, 2] / sqrt(29)
    a_t = hand_attention([[0.0, 1.0], [1.0, 1.0]])  # [0.5, 1] / sqrt(1.25)
    expected = sum((s - t) ** 2 for s, t in zip(a_s, a_t, strict=True)) / 2  # a mean over the 2 positions
    assert feature_methods.at_loss([student], [teacher]).item() == pytest.approx(expected, rel=1e-6)
    assert feature_methods.at_loss([student], [student * 3]).item() == pytest.approx(0.0, abs=1e-7)
    # Pairs are summed: a second pair (a 2x1 map of one channel: attention [0.6, 0.8] vs [1, 0]).
    second_student, second_teacher = torch.tensor([[[[3.0], [4.0]]]]).sqrt(), torch.tensor([[[[1.0], [0.0]]]])
    second = ((0.6 - 1.0) ** 2 + (0.8 - 0.0) ** 2) / 2
    both = feature_methods.at_loss([student, second_student], [teacher, second_teacher])
    assert both.item() == pytest.approx(expected + second, rel=1e-6)


def test_attention_transfer_batch_mean_and_spatial_mismatch():
    torch.manual_seed(2)
    student = torch.randn(3, 4, 8, 8)
    teacher = F.avg_pool2d(student, 2)  # 4x4: the student's map is pooled to it
    assert feature_methods.at_loss([student], [teacher]).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(3, 6, 4, 4)  # channel counts may differ
    per_sample = [feature_methods.at_loss([student[i : i + 1]], [other[i : i + 1]]).item() for i in range(3)]
    assert feature_methods.at_loss([student], [other]).item() == pytest.approx(sum(per_sample) / 3, rel=1e-5)


# ---------------------------------------------------------------- the new weights


def test_feature_weights_default_to_the_references_balance():
    assert feature_methods.feature_weight("fitnet", 0.5, None) == 50.0
    assert feature_methods.feature_weight("at", 0.5, None) == 500.0
    assert (feature_methods.feature_weight("fitnet", 1.0, None) == 100.0
            and feature_methods.feature_weight("at", 1.0, None) == 1000.0)
    assert feature_methods.feature_weight("at", 0.5, 3.0) == 3.0
    assert feature_methods.feature_weight("at", 0.0, 3.0) == 3.0
    with pytest.raises(ValueError, match="at alpha 0 needs an explicit --beta"):
        feature_methods.feature_weight("fitnet", 0.0, None)


@pytest.mark.parametrize("method, alpha, weight",
                         [("fitnet", 0.5, 50.0), ("at", 0.3, 300.0), ("fitnet", 1.0, 100.0), ("at", 1.0, 1000.0)])
def test_feature_criterion_combines_its_terms_at_the_default_weights(method, alpha, weight):
    torch.manual_seed(7)
    teacher, student = tiny_convnet(6), tiny_convnet(4)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    criterion = KD_engine.make_criterion(method, teacher, student, temperature=4.0, alpha=alpha,
                                         pairs=[("2", "2"), ("4", "4")], image_size=8)
    assert criterion.beta == weight
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
        feature_methods.FeatureHooks(tiny_convnet(4), ["2", "features.99"])
    vgg_like = nn.Sequential()
    vgg_like.add_module("features", tiny_convnet(4))
    with pytest.raises(ValueError, match=r"'features\.22'.*features\.2"):
        feature_methods.FeatureHooks(vgg_like, ["features.22"])


def test_feature_hooks_look_through_wrappers_and_can_be_removed():
    model = tiny_convnet(4)

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel's `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    hooks = feature_methods.FeatureHooks(torch.compile(Wrapper(model)), ["2", "4"])
    model(torch.zeros(1, 3, 6, 6))
    assert [f.shape[1:] for f in hooks.take()] == [(4, 6, 6), (8, 3, 3)]
    with pytest.raises(RuntimeError, match="'2'"):
        hooks.take()  # taking forgets: a stale forward is never reused
    hooks.remove()
    model(torch.zeros(1, 3, 6, 6))
    assert hooks.outputs == {}


def test_parse_feature_layers():
    assert feature_methods.parse_feature_layers("features.22:layer3, features.32:layer4") == [
        ("features.22", "layer3"), ("features.32", "layer4")]
    for bad in ("features.22", "a:b:c", "a:b,", ":layer3", "a:b,,c:d"):
        with pytest.raises(ValueError, match="teacher_layer:student_layer"):
            feature_methods.parse_feature_layers(bad)


def test_a_model_without_known_stages_asks_for_feature_layers():
    with pytest.raises(ValueError, match="--feature-layers"):
        feature_methods.default_feature_layers("at", model_builder.build_model("VGG16", 10, 32), tiny_convnet(4))


@pytest.fixture(scope="module")
def real_models():
    torch.manual_seed(0)
    return model_builder.build_model("VGG16", 10, 32), model_builder.build_model("ResNet18", 10, 32)


def test_default_vgg_to_resnet_pairs_follow_the_references(real_models):
    teacher, student = real_models
    assert feature_methods.default_feature_layers("fitnet", teacher, student) == [("features.22", "layer2")]
    assert feature_methods.default_feature_layers("at", teacher, student) == [
        ("features.12", "layer1"), ("features.22", "layer2"), ("features.32", "layer3"), ("features.42", "layer4")]


# ---------------------------------------------------------------- decoupled KD


def hand_dkd(student, teacher, labels, temperature):
    """TCKD and NCKD by plain Python: T^2 * batch-mean KL(teacher || student) of each split."""
    tckd = nckd = 0.0
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), labels.tolist(), strict=True):
        p_s, p_t = hand_softmax(s_row, temperature), hand_softmax(t_row, temperature)
        tckd += hand_kl([p_t[label], 1 - p_t[label]], [p_s[label], 1 - p_s[label]])
        others = [i for i in range(len(s_row)) if i != label]
        nckd += hand_kl(hand_softmax([t_row[i] for i in others], temperature),
                        hand_softmax([s_row[i] for i in others], temperature))
    scale = temperature**2 / len(labels)
    return tckd * scale, nckd * scale


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_terms_match_hand_computation(temperature):
    tckd, nckd = KD_engine.dkd_terms(STUDENT, TEACHER, LABELS, temperature)
    expected_tckd, expected_nckd = hand_dkd(STUDENT, TEACHER, LABELS, temperature)
    assert tckd.item() == pytest.approx(expected_tckd, rel=1e-5)
    assert nckd.item() == pytest.approx(expected_nckd, rel=1e-5)
    dkd = KD_engine.dkd_loss(STUDENT, TEACHER, LABELS, temperature, dkd_alpha=0.7, dkd_beta=8.0)
    assert dkd.item() == pytest.approx(0.7 * expected_tckd + 8.0 * expected_nckd, rel=1e-5)


@pytest.mark.parametrize("index", [0, 1])
def test_kd_is_tckd_plus_weighted_nckd_per_sample(index):
    student, teacher, labels = STUDENT[index : index + 1], TEACHER[index : index + 1], LABELS[index : index + 1]
    temperature = 2.0
    tckd, nckd = KD_engine.dkd_terms(student, teacher, labels, temperature)
    p_target = F.softmax(teacher / temperature, dim=1)[0, labels[0]]
    kd = KD_engine.kd_loss(student, teacher, temperature)
    assert kd.item() == pytest.approx((tckd + (1 - p_target) * nckd).item(), rel=1e-5)


def test_dkd_with_extreme_logits_stays_finite():
    # Targets far above 1000 * T: the paper's "target - 1000" mask would leave them in NCKD.
    student = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-1e4, -1e4, 0.0], [0.0, 1e4, -1e4]])
    labels = torch.tensor([0, 1])
    tckd, nckd = KD_engine.dkd_terms(student, teacher, labels, 1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(student.grad).all()
    # Per sample in log space: TCKD 1e4 and 0; NCKD 1e4 and 1e4 (a leaking target would add ~9e3).
    assert tckd.item() == pytest.approx(5e3, rel=1e-4) and nckd.item() == pytest.approx(1e4, rel=1e-4)


def test_dkd_warmup_steps_keep_the_papers_share_of_all_steps():
    assert KD_engine.dkd_warmup_steps(240, 10) == 200  # the paper: 20 of 240 epochs
    assert KD_engine.dkd_warmup_steps(3, 40) == 10  # a 3-epoch run warms up over its first 10 steps
    assert KD_engine.dkd_warmup_steps(1, 2) == 1
    assert KD_engine.dkd_warmup_steps(3, 40, warmup_epochs=2) == 80
    assert KD_engine.dkd_warmup_steps(3, 40, warmup_epochs=0) == 0


@pytest.mark.parametrize("kind", [KD_engine.DKDCriterion, KD_engine.StandardizedDKDCriterion])
def test_dkd_criterion_warms_up_per_step_and_continues_after_an_epoch_change(kind):
    """DKD and dkd_ls ramp the same way: 1/warmup_steps at the first step (dkd_ls once lagged a step)."""
    torch.manual_seed(3)
    teacher, student = nn.Linear(5, 3), nn.Linear(5, 3)
    images, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 1])
    criterion = kind(teacher, temperature=2.0, alpha=0.25, dkd_alpha=1.0, dkd_beta=8.0, warmup_steps=4,
                     steps_per_epoch=3)
    assert criterion.trainable is None and not teacher.training
    factors = []
    for epoch in (1, 2):
        criterion.set_epoch(epoch)
        for _ in range(3):
            out = criterion(student, images, labels)
            factors.append(out["warmup"].item())
            dkd = out["tckd"] + 8.0 * out["nckd"]
            assert out["loss"].item() == pytest.approx((0.25 * out["ce"] + 0.75 * factors[-1] * dkd).item(), rel=1e-6)
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # first step 1/warmup_steps, 1 from step warmup_steps on
    resumed = kind(teacher, 2.0, 0.25, warmup_steps=4, steps_per_epoch=3)
    resumed.set_epoch(2)  # a resumed run starts at epoch 2: its ramp continues at step 4
    assert resumed(student, images, labels)["warmup"].item() == 1.0
    resumed.set_epoch(1)
    with torch.no_grad():
        cached = teacher(images)
    assert torch.equal(resumed(student, images, labels, cached)["loss"],
                       kind(teacher, 2.0, 0.25, warmup_steps=4, steps_per_epoch=3)(student, images, labels)["loss"])
    with pytest.raises(ValueError, match="Epochs count from 1, got 0"):
        criterion.set_epoch(0)


def test_a_three_epoch_run_warms_up_and_records_the_mean_factor():
    torch.manual_seed(8)
    teacher, student = nn.Linear(5, 3), nn.Linear(5, 3)
    batches = [(torch.randn(4, 5), torch.tensor([0, 1, 2, 1])) for _ in range(12)]
    warmup_steps = KD_engine.dkd_warmup_steps(3, len(batches))
    assert warmup_steps == 3
    criterion = KD_engine.make_criterion("dkd", teacher, student, temperature=4.0, alpha=0.5,
                                         dkd_warmup_steps=warmup_steps, steps_per_epoch=len(batches))
    result = engine.fit(student, batches, batches[:2], criterion, torch.optim.SGD(student.parameters(), lr=0.01), 3,
                        ["a", "b", "c"], torch.device("cpu"), hooks=engine.FitHooks(log=lambda line: None))
    means = [record["train"]["warmup"] for record in result.history]
    assert means[0] == pytest.approx((1 / 3 + 2 / 3 + 10) / 12) and means[1:] == [1.0, 1.0]


# ---------------------------------------------------------------- criteria


def test_fitnet_gradient_reaches_regressor_and_student_never_teacher():
    torch.manual_seed(4)
    teacher, student = tiny_convnet(6), tiny_convnet(4)
    teacher.train()  # the criterion must switch it to eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    criterion = KD_engine.FeatureDistillationCriterion(
        teacher, student, "fitnet", [("2", "2"), ("4", "4")], temperature=4.0, alpha=0.3, beta=40.0, image_size=8)
    assert [r[0].weight.shape[:2] for r in criterion.trainable.regressors] == [(6, 4), (12, 8)]
    student_state = {k: v.clone() for k, v in student.state_dict().items()}
    assert torch.equal(student_state["1.running_mean"], torch.zeros(4))  # the dry run moved no statistic
    parameters = list(student.parameters()) + list(criterion.trainable.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    out = criterion(student, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert out["loss"].item() == pytest.approx(
        (0.3 * out["ce"] + 0.7 * out["kd"] + 40.0 * out["feature"]).item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in criterion.trainable.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    assert not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher's {key} changed"
    criterion.close()


def test_feature_weights_must_be_valid():
    with pytest.raises(ValueError, match="beta be >= 0"):
        KD_engine.FeatureDistillationCriterion(tiny_convnet(4), tiny_convnet(4), "at", [("2", "2")], 4.0, 0.6, -1.0)


@pytest.mark.parametrize("method", KD_engine.METHODS)
def test_make_criterion_trains_the_real_small_models(method, real_models):
    teacher, student = real_models
    student.train()
    student.zero_grad(set_to_none=True)
    criterion = KD_engine.make_criterion(method, teacher, student, temperature=4.0, alpha=0.5,
                                         dkd_warmup_steps=5, reviewkd_warmup_steps=5, steps_per_epoch=2)
    out = criterion(student, torch.randn(2, 3, 32, 32), torch.tensor([1, 7]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["logits"].shape == (2, 10)
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    expected = {"kd": {"ce", "kd"}, "fitnet": {"ce", "kd", "feature"}, "at": {"ce", "kd", "at"},
                "dkd": {"ce", "tckd", "nckd", "warmup"}, "dist": {"ce", "dist"}, "kd_ls": {"ce", "kd"},
                "dkd_ls": {"ce", "tckd", "nckd", "warmup"}, "dist_ls": {"ce", "dist"},
                "reviewkd": {"ce", "kd", "hcl", "warmup"}}
    assert out.keys() == {"loss", "logits"} | expected[method]
    assert (criterion.trainable is not None) == (method in ("fitnet", "reviewkd"))
    assert hasattr(criterion, "set_epoch") == (method in ("dkd", "dkd_ls", *feature_methods.FEATURE_METHODS))
    if method in feature_methods.FEATURE_METHODS:
        criterion.close()


def test_make_criterion_names_the_known_methods():
    with pytest.raises(ValueError, match="kd, fitnet, dkd, at"):
        KD_engine.make_criterion("crd", nn.Linear(2, 2), nn.Linear(2, 2), temperature=4.0, alpha=0.5)


# ---------------------------------------------------------------- knowledge_distillation_train


def tiny_loader(batch_size: int = 3):
    generator = torch.Generator().manual_seed(5)
    images, labels = torch.randn(7, 3, 4, 4, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, 7, batch_size)]


@pytest.mark.parametrize("teacher_percentage", [0.0, 0.7])
def test_knowledge_distillation_train_returns_the_epoch_mean(teacher_percentage):
    torch.manual_seed(6)
    teacher, student = tiny_convnet(6), tiny_convnet(4)
    teacher.train()
    teacher[1].eval()  # a mixed mode that must come back as it was
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loader = tiny_loader()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)

    student.train()
    with torch.no_grad():
        with feature_methods.eval_mode(teacher):
            teacher_logits = [teacher(images) for images, _ in loader]
        batch_losses = []
        for (images, labels), t_logits in zip(loader, teacher_logits, strict=True):
            logits = student(images)
            batch_losses.append((1 - teacher_percentage) * F.cross_entropy(logits, labels)
                                + teacher_percentage * hand_kd(logits, t_logits, 2.0))
    sizes = [len(labels) for _, labels in loader]
    expected = sum(loss.item() * n for loss, n in zip(batch_losses, sizes, strict=True)) / 7
    assert expected != pytest.approx(sum(loss.item() for loss in batch_losses) / 3, rel=1e-4)

    value = KD_engine.knowledge_distillation_train(teacher, student, loader, nn.CrossEntropyLoss(), optimizer,
                                                   teacher_percentage=teacher_percentage, temperature=2.0, device="cpu")
    assert value == pytest.approx(expected, rel=1e-5)
    assert teacher.training and not teacher[1].training and teacher[2].training
    assert all(p.requires_grad and p.grad is None for p in teacher.parameters())
    for key, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, teacher_before[key]), f"teacher's {key} changed"


def test_knowledge_distillation_train_rejects_bad_settings():
    teacher, student = tiny_convnet(4), tiny_convnet(4)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    for settings, message in (({"teacher_percentage": 1.5}, r"teacher_percentage must lie in \[0, 1\], got 1.5"),
                              ({"teacher_percentage": -0.1}, r"teacher_percentage must lie in \[0, 1\], got -0.1"),
                              ({"temperature": 0.0}, "temperature must be > 0, got 0.0")):
        with pytest.raises(ValueError, match=message):
            KD_engine.knowledge_distillation_train(teacher, student, tiny_loader(), nn.CrossEntropyLoss(), optimizer,
                                                   device="cpu", **settings)
