"""Lockstep training's pieces: which students share a pass, how many fit the memory budget, the random streams.
(One pass against one student at a time, and a killed pass resumed: tests/e2e/test_lockstep_runs.py.)"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import default_config
from torch import nn

import KD_engine
import model_builder
from training import lockstep

CLASSES = ["a", "b", "c"]


def fake_context(**settings) -> SimpleNamespace:
    """What lockstep reads of a run's context: settings, 100 training images of 3 classes, the CPU."""
    config = replace(default_config(), student_model="resnet8", batch_size=10, student_epochs=2, **settings)
    data = SimpleNamespace(class_names=CLASSES, train=range(100))
    return SimpleNamespace(config=config, data=data, device=torch.device("cpu"), initial_weights=lambda role: None)


def students(count: int) -> list[lockstep.Student]:
    return [lockstep.Student(f"s{index}", Path(f"s{index}"), lambda model, steps: None) for index in range(count)]


@pytest.mark.parametrize(("setting", "compile_setting", "count", "expected"), [
    ("auto", "auto", 3, True), ("auto", "auto", 1, False), ("auto", "on", 3, False), ("on", "on", 1, True),
    ("off", "off", 3, False),
])
def test_which_students_share_a_pass(setting, compile_setting, count, expected):
    context = fake_context(lockstep=setting, compile=compile_setting)
    assert lockstep.uses_lockstep(context, students(count)) is expected


def test_student_bytes_count_weights_gradients_and_the_optimizer_state_without_moving_the_generator():
    params = sum(p.numel() for p in model_builder.build_model("resnet8", len(CLASSES), 32).parameters())
    before = torch.get_rng_state()
    assert lockstep.student_bytes(fake_context(optimizer="adamw"), "resnet8") == params * 4 * 4
    assert lockstep.student_bytes(fake_context(optimizer="sgd", momentum=0.9), "resnet8") == params * 4 * 3
    assert lockstep.student_bytes(fake_context(optimizer="sgd", momentum=0.0), "resnet8") == params * 4 * 2
    assert torch.equal(torch.get_rng_state(), before)


def test_students_above_the_memory_budget_split_into_passes_and_the_console_says_so(capsys):
    each = lockstep.student_bytes(fake_context(), "resnet8")
    context = fake_context(memory_budget_mb=2.5 * each / lockstep.MIB)
    groups = lockstep.passes(context, "resnet8", students(5), seed=3)
    assert [[student.name for student in group] for group in groups] == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    assert "[lockstep] seed 3: 5 students' weights and optimizer states" in capsys.readouterr().out
    roomy = fake_context(memory_budget_mb=5 * each / lockstep.MIB)
    assert len(lockstep.passes(roomy, "resnet8", students(5), seed=3)) == 1
    assert capsys.readouterr().out == ""
    tight = fake_context(memory_budget_mb=0.5 * each / lockstep.MIB)
    assert len(lockstep.passes(tight, "resnet8", students(2), seed=3)) == 2, "a student alone always trains"


def test_each_random_stream_goes_on_where_it_stopped_as_if_alone():
    torch.manual_seed(7)
    alone = torch.rand(4)
    torch.manual_seed(7)
    first = lockstep.RandomStream()
    torch.manual_seed(99)
    second = lockstep.RandomStream()
    drawn = []
    for _ in range(2):
        with first.active():
            drawn.append(torch.rand(2))
        with second.active():
            torch.rand(3)
    assert torch.equal(torch.cat(drawn), alone)


class Clock:
    """A stand-in for time.perf_counter that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_pass_charges_each_teacher_forward_in_equal_shares_to_the_students_that_asked_for_it(monkeypatch):
    clock, shared = Clock(), KD_engine.SharedTeacherForward()
    monkeypatch.setattr(time, "perf_counter", clock)

    class Teacher(nn.Module):
        def forward(self, images):
            clock.now += 6.0
            return images

    teacher, charged = Teacher(), {}

    def member(name: str, distilled: bool) -> lockstep.Member:
        def step(images, labels):
            if distilled:
                shared.logits(teacher, images)
            clock.now += 1.0

        fitting = SimpleNamespace(epochs=1, begin_epoch=lambda epoch, steps: SimpleNamespace(step=step),
                                  end_epoch=lambda steps, seconds: charged.__setitem__(name, seconds))
        loader = Batches([(torch.zeros(2, 3), torch.zeros(2)) for _ in range(2)], torch.Generator())
        return lockstep.Member(lockstep.Student(name, Path(name), lambda model, steps: None),
                               SimpleNamespace(train_loader=loader, fitting=fitting))

    lockstep.train_epoch([member("baseline", False), member("kd", True), member("at", True)], 1, shared)
    assert charged == {"baseline": 2.0, "kd": 2.0 + 2 * 3.0, "at": 2.0 + 2 * 3.0}, "not all of it to the first"


class Batches(list):
    """A training loader as a pass reads it: batches, their generator, no cached logits or sample indices."""

    def __init__(self, batches, generator) -> None:
        super().__init__(batches)
        self.generator, self.sample_indices, self.teacher_logits = generator, False, None
