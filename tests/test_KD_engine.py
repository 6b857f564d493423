"""The distillation step (KD_engine.DistillationStep): a frozen teacher, cached logits, every registered method on
the real small models; the registry; and the library function knowledge_distillation_train.
No step makes the host wait for the device."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import hand_kd, method_setup, tiny_convnet
from torch import nn

import data_setup
import engine
import KD_engine
import model_builder
from benchmarks import step_profile
from core import compute
from methods import base, feature_maps

DEVICE = torch.device("cpu")


CLASSES, SIZE = 4, 16


def _loader(count: int = 30, batch_size: int = 12) -> data_setup.BatchLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    data = data_setup.ImageTensors(images, torch.arange(count) % CLASSES, [str(i) for i in range(count)], SIZE)
    return data_setup.BatchLoader(data, batch_size, [0.5] * 3, [0.25] * 3, DEVICE, data_setup.Augmentation(2, True))


def _profile(method: str) -> step_profile.StepCounter:
    """One epoch (3 steps, the last one smaller) of `method` with small literature models, counted."""
    torch.manual_seed(0)
    student, teacher = (model_builder.build_model("resnet8", CLASSES, SIZE).to(memory_format=torch.channels_last)
                        for _ in range(2))
    loader = _loader()
    if method == "plain":
        criterion = engine.SupervisedCriterion()
    else:
        setup = KD_engine.library_setup(image_size=SIZE, steps_per_epoch=len(loader), dkd_warmup_epochs=2,
                                        train_labels=loader.data.labels, crd_negatives=5)
        criterion = KD_engine.make_criterion(method, teacher, student, setup)
        loader.sample_indices = criterion.needs_sample_indices  # crd's memory bank
    trainable = criterion.trainable  # FitNets' regressors
    parameters = list(student.parameters()) + ([] if trainable is None else list(trainable.parameters()))
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=len(loader))
    with step_profile.counting([student, teacher], optimizer) as counter:
        engine.train_one_epoch(student, step_profile.CountedSteps(loader, counter), criterion, optimizer,
                               [str(c) for c in range(CLASSES)], DEVICE, scheduler)
    return counter


@pytest.mark.parametrize("method", ["plain", *KD_engine.method_names()])
def test_no_step_makes_the_host_wait_and_the_epoch_is_read_once(method):
    counter = _profile(method)
    steps = range(len(_loader()))
    for region in (step_profile.MODEL, step_profile.OPTIMIZER, step_profile.OTHER):
        waits = {step: counter.sync_names.get((step, region)) for step in steps if counter.syncs[(step, region)]}
        assert not waits, f"{method}: host waits in the {region} region of steps {waits}"
    assert all(counter.ops[(step, step_profile.OTHER)] > 0 for step in steps)  # the counting saw every step
    assert counter.sync_names[("end", step_profile.OTHER)]["cpu"] == 1, "the epoch's results in one copy"


@pytest.mark.parametrize("method", ["kd", "at"])
def test_a_step_neither_copies_the_teachers_outputs_nor_negates_the_kl_gradient(method):
    """The teacher runs under no_grad (an inference tensor would need a copy before a loss saves it), and the
    batch-mean KL's sign sits in its divisor (kl_div's own backward negates the student's gradient in a kernel)."""
    ops = _profile(method).names[(1, step_profile.OTHER)]
    assert ops["clone"] == 0, f"{method}: the teacher's logits or maps were copied"
    if method == "kd":
        assert ops["neg"] == 0, "the KL's gradient was negated in a kernel of its own"


def test_the_counter_sees_host_waits():
    """The test above can fail: a boolean mask, `.item()` and a copy to the host are each seen."""
    values = torch.arange(6.0, device=DEVICE)
    with step_profile.counting() as counter:
        values[values > 2].sum()
        values.sum().item()
        values.to("cpu")
        values.to(DEVICE)  # a move to the run's device is taken for no host copy
    assert set(counter.sync_names[("setup", step_profile.OTHER)]) == {"index", "_local_scalar_dense", "item", "to"}


RELATIONAL = ("sp", "cc", "vid", "rkd", "pkt", "nst")  # feature methods without a warm-up
METHOD_NAMES = {"kd", "fitnet", "dkd", "at", "dist", "kd_ls", "dkd_ls", "dist_ls", "reviewkd", "crd", "crd_kd",
                "ab", "ft", "fsp", *RELATIONAL}


class TinyNet(nn.Module):
    """A convolution, batch norm and a linear head: enough to see running statistics move."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5))
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(self.body(x))


def test_distillation_step_leaves_teacher_untouched():
    torch.manual_seed(0)
    teacher, student = TinyNet(), TinyNet()
    teacher.train()  # the step must switch it to eval mode itself
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    criterion = KD_engine.make_criterion("kd", teacher, student, method_setup(temperature=4.0, alpha=0.5))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))) for _ in range(3)]
    student_before = [p.clone() for p in student.parameters()]
    metrics = engine.train_one_epoch(student, batches, criterion, optimizer, ["a", "b", "c"], torch.device("cpu"))
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher's {key} changed"
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters(), strict=True))
    assert {"loss", "ce", "kd", "top1"} <= metrics.keys()
    assert metrics["loss"] == pytest.approx(0.5 * metrics["ce"] + 0.5 * metrics["kd"], rel=1e-5)


def test_cached_teacher_logits_give_the_same_loss_without_running_the_teacher():
    torch.manual_seed(1)
    teacher, student = TinyNet(), TinyNet()
    criterion = KD_engine.make_criterion("kd", teacher, student, method_setup(temperature=2.0, alpha=0.4))
    student.eval()  # no dropout: both calls must see the same student
    images, labels = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))
    with torch.no_grad():
        cached = teacher(images)
    live = criterion(student, images, labels)
    teacher.forward = lambda x: (_ for _ in ()).throw(AssertionError("teacher ran"))
    replayed = criterion(student, images, labels, cached)
    for key in ("loss", "ce", "kd"):
        assert torch.equal(live[key], replayed[key])


def test_a_shared_forward_runs_the_teacher_once_a_batch_for_every_step_and_gives_each_its_maps():
    torch.manual_seed(0)
    teacher, students = model_builder.build_model("resnet8", CLASSES, SIZE), []
    setup = method_setup("resnet8", "resnet8", image_size=SIZE, temperature=4.0, alpha=0.5)
    steps, alone = {}, {}
    for method in ("fitnet", "at", "kd"):
        students.append(model_builder.build_model("resnet8", CLASSES, SIZE).eval())
        steps[method] = KD_engine.make_criterion(method, teacher, students[-1], setup)
    images, labels = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, CLASSES, (4,))
    for (method, step), student in zip(steps.items(), students, strict=True):
        alone[method] = step(student, images, labels)
    shared, forwards = KD_engine.SharedTeacherForward(), []
    teacher.register_forward_hook(lambda *_: forwards.append(1))
    for (method, step), student in zip(steps.items(), students, strict=True):
        step.shared_forward = shared
        together = step(student, images, labels)
        assert all(torch.equal(together[key], alone[method][key]) for key in alone[method]), method
    assert len(forwards) == 1, "one teacher forward serves every step of the batch"
    steps["kd"](students[2], images.clone(), labels)
    assert len(forwards) == 2, "a new batch runs the teacher again"
    for step in steps.values():
        step.close()


def test_every_method_is_registered_by_name():
    assert set(KD_engine.method_names()) == METHOD_NAMES
    assert all(KD_engine.method_class(name).name == name for name in METHOD_NAMES)


@pytest.mark.parametrize("method", sorted(METHOD_NAMES - {"fsp"}))  # fsp: equal channels (tests/methods/test_fsp.py)
def test_make_criterion_trains_the_real_small_models(method, real_models):
    teacher, student = real_models
    student.train()
    student.zero_grad(set_to_none=True)
    setup = method_setup(*(model_builder.architecture_name(name) for name in ("VGG16", "ResNet18")), epochs=3,
                         steps_per_epoch=2, temperature=4.0, alpha=0.5, crd_negatives=4)
    setup = dataclasses.replace(setup, train_labels=torch.arange(20) % 10)
    criterion = KD_engine.make_criterion(method, teacher, student, setup)
    indices = (torch.tensor([11, 17]),) if criterion.needs_sample_indices else ()
    out = criterion(student, torch.randn(2, 3, 32, 32), torch.tensor([1, 7]), *indices)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["logits"].shape == (2, 10)
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    expected = {"kd": {"ce", "kd"}, "fitnet": {"ce", "kd", "feature"}, "at": {"ce", "kd", "at"},
                "dkd": {"ce", "tckd", "nckd", "warmup"}, "dist": {"ce", "dist"}, "kd_ls": {"ce", "kd"},
                "dkd_ls": {"ce", "tckd", "nckd", "warmup"}, "dist_ls": {"ce", "dist"},
                "reviewkd": {"ce", "kd", "hcl", "warmup"}, "crd": {"ce", "kd", "crd"}, "crd_kd": {"ce", "kd", "crd"},
                "ab": {"ce", "kd"}, "ft": {"ce", "kd", "ft"}, **{name: {"ce", "kd", name} for name in RELATIONAL}}
    assert out.keys() == {"loss", "logits"} | expected[method]
    assert expected[method] - {"warmup"} <= KD_engine.loss_parts().keys(), "the loss plot labels every part"
    assert (criterion.trainable is not None) == (method in ("fitnet", "reviewkd", "crd", "crd_kd", "cc", "vid", "ft"))
    assert criterion.needs_sample_indices == (method in ("crd", "crd_kd"))
    counts_steps = type(criterion.method).set_epoch is not base.Method.set_epoch
    assert counts_steps == (method in ("dkd", "dkd_ls", "fitnet", "at", "reviewkd", "crd", "crd_kd", "ft",
                                       *RELATIONAL))
    criterion.close()


def test_make_criterion_names_the_known_methods():
    with pytest.raises(ValueError, match="Unknown distillation method 'nonesuch'; known methods: ") as raised:
        KD_engine.make_criterion("nonesuch", nn.Linear(2, 2), nn.Linear(2, 2), method_setup())
    assert set(str(raised.value).split(": ", 1)[1].rstrip(".").split(", ")) == METHOD_NAMES


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
        with feature_maps.eval_mode(teacher):
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


def test_knowledge_distillation_train_picks_a_device_when_given_none():
    torch.manual_seed(9)
    teacher, student = tiny_convnet(6), tiny_convnet(4)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)  # the student stays as it was: both calls agree
    picked = KD_engine.knowledge_distillation_train(teacher, student, tiny_loader(), nn.CrossEntropyLoss(), optimizer,
                                                    device=None)
    auto = compute.resolve_device("auto")
    assert all(p.device.type == auto.type for p in [*teacher.parameters(), *student.parameters()])
    named = KD_engine.knowledge_distillation_train(teacher, student, tiny_loader(), nn.CrossEntropyLoss(), optimizer,
                                                   device=auto)
    assert picked == pytest.approx(named, rel=1e-6) and picked > 0


def test_knowledge_distillation_train_rejects_bad_settings():
    teacher, student = tiny_convnet(4), tiny_convnet(4)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    for settings, message in (({"teacher_percentage": 1.5}, r"teacher_percentage must lie in \[0, 1\], got 1.5"),
                              ({"teacher_percentage": -0.1}, r"teacher_percentage must lie in \[0, 1\], got -0.1"),
                              ({"temperature": 0.0}, "temperature must be > 0, got 0.0")):
        with pytest.raises(ValueError, match=message):
            KD_engine.knowledge_distillation_train(teacher, student, tiny_loader(), nn.CrossEntropyLoss(), optimizer,
                                                   device="cpu", **settings)
