"""Lockstep training: the students of one seed in one pass over the data.

Students of a seed see the same batches (their loaders share the seed). In one pass each batch is drawn and
augmented once, the teacher runs once on it (`KD_engine.SharedTeacherForward`: its logits, and the maps every
student's method hooks), then each student takes its own step in turn: its own optimizer, schedule, epochs,
patience and files (`model_run.prepare_training` sets each up as for training alone). Activation memory is one
student's at a time; only weights and optimizer states add up, and above the memory budget the students split
into several passes.

Each student keeps its own stream of the global random generator (dropout, ...), swapped in for its steps, its
validation and its save: in fp32 every student's history equals its history trained alone, bit for bit. After
an interruption the students may stand at different epochs (a kill between two students' saves): each epoch's
pass takes the students whose next epoch it is, so one behind catches up alone, then the others rejoin.

A sweep's trials join a pass as students with settings of their own (`Student.context`); one that the pruner
stops (one of its `Student.stops`) leaves the pass at once, and the others go on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import data_setup
import engine
import KD_engine
import model_builder
from core import compute
from training import model_run

MIB = 2**20


@dataclass
class Student:
    """One student of a seed to train: its name in the run, its folder, how to make its criterion (see
    `model_run.train_model`) and the cached teacher logits it uses, if any; its own context, whose settings give
    its epochs and learning rate (a sweep's trial; None: the run's), what sees each of its epochs (a sweep's
    pruner), and the exceptions that end it alone (raised by its epoch's end: it leaves the pass, the others go
    on)."""

    name: str
    folder: Path
    make_criterion: Callable[[nn.Module, int], engine.Criterion]
    teacher_logits: torch.Tensor | None = None
    context: model_run.Context | None = None
    on_epoch: model_run.EpochLog | None = None
    stops: tuple[type[Exception], ...] = ()


Trained = Callable[[Student, nn.Module, engine.FitResult], None]  # told each student once it is trained
Stopped = Callable[[Student, Exception], None]  # told a student that one of its `stops` ended, as it leaves


def raise_stop(student: Student, stop: Exception) -> None:
    """What a student's stop does unless the caller says otherwise: it ends the training of every student."""
    raise stop


class RandomStream:
    """A student's own state of the global random generators (the CPU's and every CUDA device's), put in place
    while it works (`active()`) and kept when it stops, as if it trained alone."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    @contextmanager
    def active(self) -> Iterator[None]:
        """This stream's state in the generators for the duration, taken back afterwards."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            if self.cuda is not None:
                self.cuda = torch.cuda.get_rng_state_all()


@dataclass
class Member:
    """A student in a pass: its training, its random stream, the epoch it trains next (None: it left the pass),
    the epoch in progress and the seconds it has spent in it, and what stopped it, if anything did."""

    student: Student
    training: model_run.ModelTraining
    stream: RandomStream = field(default_factory=RandomStream)
    next_epoch: int | None = None
    steps: engine.EpochSteps | None = None
    seconds: float = 0.0
    closed: bool = False
    stop: Exception | None = None  # one of its student's `stops`, raised by its last epoch's end

    def leave(self) -> None:
        """Leave the pass: its hooks come off the teacher and the student, its log closes."""
        if not self.closed:
            self.closed = True
            self.training.close()


def uses_lockstep(context: model_run.Context, students: list[Student]) -> bool:
    """Whether `students` train in one pass: --lockstep on, or auto with two students or more whose steps
    --compile leaves eager (a pass runs eagerly)."""
    config = context.config
    if config.lockstep != "auto":
        return config.lockstep == "on"
    steps = math.ceil(len(context.data.train) / compute.rank_and_world()[1] / config.batch_size)
    return len(students) > 1 and not compute.resolve_compile(config.compile, context.device,
                                                             config.student_epochs * steps)


def student_bytes(context: model_run.Context, arch: str) -> int:
    """One student's weights, gradients and optimizer states in bytes (a regressor a method adds is left out: it
    is small beside the network)."""
    with torch.random.fork_rng(devices=[]):  # counting must not move the generators students start from
        model = model_builder.build_model(arch, len(context.data.class_names), context.config.image_size,
                                          model_builder.default_head(context.initial_weights("student")))
    weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    states = 2 if context.config.optimizer == "adamw" else int(context.config.momentum > 0)
    return weights * (2 + states)


def memory_budget(context: model_run.Context) -> tuple[int, str]:
    """The bytes a pass's students may hold, and where that figure comes from."""
    if context.device.type == "cuda":
        return torch.cuda.mem_get_info(context.device)[0], "the free CUDA memory"
    return int(context.config.memory_budget_mb * MIB), f"--memory-budget-mb {context.config.memory_budget_mb:g}"


def passes(context: model_run.Context, arch: str, students: list[Student], seed: int) -> list[list[Student]]:
    """`students` in passes whose weights and optimizer states fit the memory budget (the console says so
    when they split)."""
    each = student_bytes(context, arch)
    budget, source = memory_budget(context)
    per_pass = max(1, budget // each)
    groups = [students[start:start + per_pass] for start in range(0, len(students), per_pass)]
    if len(groups) > 1 and compute.is_main_process():
        print(f"[lockstep] seed {seed}: {len(students)} students' weights and optimizer states "
              f"({len(students) * each / MIB:.0f} MiB) exceed {source} ({budget / MIB:.0f} MiB): "
              f"{len(groups)} passes of up to {per_pass} students")
    return groups


def own_training(context: model_run.Context, student: Student) -> tuple[model_run.Context, int, float]:
    """The context a student trains in (its own, else the run's), and its epochs and peak learning rate."""
    own = student.context or context
    return own, own.config.student_epochs, own.config.student_lr


def train_students(
    context: model_run.Context, arch: str, seed: int, students: list[Student], trained: Trained,
    stopped: Stopped = raise_stop,
) -> None:
    """Train the students of `seed`: in passes (see `uses_lockstep`, `passes`) or one at a time; `trained` is
    told each one as it finishes (a pass's students when the pass ends), `stopped` each one a stop of its own
    ended (at once: in a pass the others go on)."""
    if not uses_lockstep(context, students):
        for student in students:
            own, epochs, lr = own_training(context, student)
            try:
                model, fit = model_run.train_model(own, student.name, arch, epochs, lr, student.make_criterion,
                                                   student.folder, seed, student.teacher_logits, student.on_epoch)
            except student.stops as stop:
                stopped(student, stop)
                continue
            trained(student, model, fit)
        return
    for group in passes(context, arch, students, seed):
        if compute.is_main_process():
            print(f"[lockstep] seed {seed}: {', '.join(student.name for student in group)} share one pass over the "
                  f"data (each batch drawn once, the teacher run once on it)")
        members = train_pass(context, arch, seed, group, stopped)
        for member in members:
            if member.stop is None:
                trained(member.student, *member.training.finish())


def train_pass(
    context: model_run.Context, arch: str, seed: int, students: list[Student], stopped: Stopped = raise_stop,
) -> list[Member]:
    """Set up every student of the pass (each its own random stream from its start), then train them epoch by
    epoch: each epoch's pass takes the students whose next epoch it is; one whose epochs or patience end leaves,
    and so does one a stop of its own ends (`stopped` is told at once)."""
    shared = KD_engine.SharedTeacherForward()
    members: list[Member] = []
    try:
        for student in students:
            own, epochs, lr = own_training(context, student)
            training = model_run.prepare_training(own, student.name, arch, epochs, lr, student.make_criterion,
                                                  student.folder, seed, student.teacher_logits, student.on_epoch,
                                                  compiled=False)
            if isinstance(training.criterion, KD_engine.DistillationStep):
                training.criterion.shared_forward = shared
            if members:  # one copy of the (padded) training images serves the pass, not one per student
                training.train_loader.source = members[0].training.train_loader.source
            members.append(Member(student, training))  # its stream starts where training alone would start
        for member in members:
            _take_next_epoch(member, stopped)
        while waiting := [member for member in members if member.next_epoch is not None]:
            epoch = min(member.next_epoch for member in waiting)
            group = [member for member in waiting if member.next_epoch == epoch]
            train_epoch(group, epoch, shared)
            for member in group:
                _take_next_epoch(member, stopped)
    finally:
        for member in members:
            member.leave()
    return members


def _take_next_epoch(member: Member, stopped: Stopped) -> None:
    """Ask the member's loop for its next epoch; with none left, or stopped, it leaves the pass (`stopped` told)."""
    if member.stop is None:
        with member.stream.active():
            member.next_epoch = member.training.fitting.next_epoch()
    else:
        member.next_epoch = None
    if member.next_epoch is None:
        member.leave()
    if member.stop is not None:
        stopped(member.student, member.stop)


def member_items(loader: data_setup.BatchLoader) -> tuple[int, bool]:
    """What a member takes of the pass's batches: its leading items (images and labels, then the cached teacher
    logits where its own loader has them) and whether the batch's sample indices, which end it, too (CRD)."""
    return (2 if loader.teacher_logits is None else 3), loader.sample_indices


def train_epoch(group: list[Member], epoch: int, shared: KD_engine.SharedTeacherForward) -> None:
    """One epoch of every member of `group` on one stream of batches, then each one's validation and save.

    The batches come from one member's loader (one carrying cached teacher logits, if any: the others take the
    images and labels); at the end every member's loader takes its generator's state, as if it had drawn them.
    Each member is charged its own steps, an equal share of drawing the batches, and an equal share of each
    teacher forward (`shared`) among the members that asked for it (not all of it to the first one)."""
    leader = next((member for member in group if member.training.train_loader.teacher_logits is not None), group[0])
    loader = leader.training.train_loader
    state = loader.generator.get_state()
    if any(not torch.equal(member.training.train_loader.generator.get_state(), state) for member in group):
        raise RuntimeError("lockstep: the students of a pass are not on one stream of batches")
    for member in group:
        with member.stream.active():
            member.steps, member.seconds = member.training.fitting.begin_epoch(epoch, len(loader)), 0.0
    takes = [member_items(member.training.train_loader) for member in group]
    own_indices, loader.sample_indices = loader.sample_indices, any(indices for _, indices in takes)
    batches = iter(engine.progress(loader, f"lockstep epoch {epoch}/{max(m.training.fitting.epochs for m in group)}"))
    try:
        while True:
            draw_start = time.perf_counter()
            batch = next(batches, None)
            share = (time.perf_counter() - draw_start) / len(group)
            if batch is None:
                break
            asked, forward_seconds = [], shared.seconds
            for member, (width, indices) in zip(group, takes, strict=True):
                step_start, calls, teacher_seconds = time.perf_counter(), shared.calls, shared.seconds
                with member.stream.active():
                    member.steps.step(*batch[:width], *batch[-1:] if indices else ())
                member.seconds += time.perf_counter() - step_start - (shared.seconds - teacher_seconds) + share
                if shared.calls > calls:
                    asked.append(member)
            for member in asked:
                member.seconds += (shared.seconds - forward_seconds) / len(asked)
    finally:
        loader.sample_indices = own_indices
    state = loader.generator.get_state()
    for member in group:
        member.training.train_loader.generator.set_state(state)
        with member.stream.active():
            try:
                member.training.fitting.end_epoch(member.steps, member.seconds)
            except member.student.stops as stop:
                member.stop = stop
        member.steps = None
