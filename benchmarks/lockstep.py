"""Lockstep training against one student at a time: the same students, the same results, less time (not a test).

    python benchmarks/lockstep.py [--rounds 4] [--precision fp32] [--images 1000] [--device cpu]

A resnet56 teacher (untrained: its cost, not its knowledge, is measured) and resnet20 students at 32 px on random
CIFAR-like images (`--images` training images over 10 classes, validation carved from them): a baseline and kd,
dkd, dist, fitnet and at students for 2 epochs at batch 64, through `training.lockstep.train_students` as a run
trains them, once with --lockstep off (one student at a time, the teacher run again for each) and once with
--lockstep on (one pass), alternating in one process (`--rounds` of each, the order swapped every round: the
machine's load drifts, and one sitting's time moves by up to a fifth, hence the medians of four). Each sitting
starts a fresh run directory (so nothing resumes); only the students' training is timed (their per-epoch
validation and checkpoints included, their final evaluation not).
`identical` compares every student's history (wall times left out) and test logits between the two modes.

Before the sittings it times the teacher's forward (T) and a baseline student's step (S) on one batch of the
sittings' size and precision and prints the bound they set: with the students' steps alike, one pass takes at best
(n S + T) / (n S + (n - 1) T) of the time one at a time takes (n students, n - 1 of them distilled); the data
drawing a pass saves lowers the ratio below it, each distillation method's own loss work raises it.

Last line:
    LOCKSTEP students=<n> sequential_s=<median> lockstep_s=<median> ratio=<lockstep/sequential> identical=yes|no
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
import experiment  # noqa: E402
import KD_engine  # noqa: E402
from benchmarks import step_overhead  # noqa: E402
from core import compute, records  # noqa: E402
from training import lockstep, model_run  # noqa: E402

METHODS = "kd,dkd,dist,fitnet,at"
CLASSES = 10


def write_images(root: Path, train: int, test: int) -> Path:
    """Random 32 px RGB images in an ImageFolder tree (train/ and test/, `CLASSES` classes)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for index in range(count):
            folder = root / split / f"class{index % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index:05d}.png")
    return root


def sitting(config: Any, mode: str, run_dir: Path) -> tuple[float, dict[str, Any]]:
    """Train the students once with --lockstep `mode` in `run_dir`: the seconds it took, and each student's
    history (without wall times) and test logits."""
    config = replace(config, lockstep=mode, output_dir=str(run_dir))
    context, _ = experiment.prepare_run(config, None, time.perf_counter(), resume=False)
    teacher, _ = model_run.distillation_teacher(context, model_run.new_model(context, "resnet56", config.seed))
    students = []
    for role in records.student_roles(METHODS.split(",")):
        make_criterion, cached = model_run.student_criterion(context, role, teacher, None)
        students.append(lockstep.Student(role, run_dir / role, make_criterion, cached))
    outcome: dict[str, Any] = {}
    testing_seconds = 0.0  # of the final evaluations, which the sitting's time leaves out

    def trained(student: lockstep.Student, model: nn.Module, fit: engine.FitResult) -> None:
        nonlocal testing_seconds
        test_start = time.perf_counter()
        logits, _ = engine.predict(model, context.eval_loaders["test"], context.device, context.amp_dtype)
        history = [{key: value for key, value in epoch.items() if key != "seconds"} for epoch in fit.history]
        outcome[student.name] = (history, logits)
        testing_seconds += time.perf_counter() - test_start

    with context.saver:
        start = time.perf_counter()
        lockstep.train_students(context, "resnet20", config.seed, students, trained)
        seconds = time.perf_counter() - start - testing_seconds
    return seconds, outcome


def step_bound(config: Any, run_dir: Path, students: int) -> None:
    """Time the teacher's forward and a baseline student's step on one batch and print the ratio they bound."""
    context, _ = experiment.prepare_run(replace(config, output_dir=str(run_dir)), None, time.perf_counter(),
                                        resume=False)
    teacher, _ = model_run.distillation_teacher(context, model_run.new_model(context, "resnet56", config.seed))
    student = model_run.new_model(context, "resnet20", config.seed)
    steps = engine.EpochSteps(student, engine.SupervisedCriterion(), torch.optim.SGD(student.parameters(), lr=0.01),
                              context.data.class_names, context.device, 10**6, amp_dtype=context.amp_dtype)
    images, labels = (tensor[:config.batch_size].to(context.device)
                      for tensor in next(iter(context.eval_loaders["train"]))[:2])

    def teacher_forward() -> None:
        with compute.autocast(context.device, context.amp_dtype):
            KD_engine.teacher_forward(teacher, images)
        compute.synchronize(context.device)

    def student_step() -> None:
        steps.step(images, labels)
        compute.synchronize(context.device)

    teacher_s, student_s = (step_overhead.milliseconds(work, 15) / 1000 for work in (teacher_forward, student_step))
    bound = (students * student_s + teacher_s) / (students * (student_s + teacher_s) - teacher_s)
    print(f"teacher forward T={teacher_s * 1000:.1f} ms, student step S={student_s * 1000:.1f} ms a batch of "
          f"{len(images)} ({compute.precision_name(context.amp_dtype)}): T/S={teacher_s / student_s:.2f}, "
          f"bound (n S + T) / (n S + (n - 1) T) = {bound:.3f}", flush=True)


def same_outcomes(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Whether two sittings gave every student the same history and test logits, bit for bit."""
    return first.keys() == second.keys() and all(
        first[name][0] == second[name][0] and torch.equal(first[name][1], second[name][1]) for name in first)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4,
                        help="sittings of each mode (an even number balances the order)")
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--images", type=int, default=1000, help="training images (validation carved from them)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        data = write_images(Path(scratch) / "data", args.images, args.images // 5)
        config = replace(experiment.default_config(), data_dir=str(data), teacher_model="resnet56",
                         student_model="resnet20", kd_methods=METHODS, student_epochs=2, batch_size=64,
                         image_size=32, precision=args.precision, device=args.device, decode_cache=False,
                         hflip="on")
        config, _ = experiment.checked_settings(config, None)
        step_bound(config, Path(scratch) / "bound", len(records.student_roles(METHODS.split(","))))
        times: dict[str, list[float]] = {"off": [], "on": []}
        outcomes: dict[str, dict[str, Any]] = {}
        for round_index in range(args.rounds):
            for mode in ("off", "on") if round_index % 2 == 0 else ("on", "off"):
                seconds, outcomes[mode] = sitting(config, mode, Path(scratch) / f"{mode}{round_index}")
                times[mode].append(seconds)
                print(f"round {round_index + 1} --lockstep {mode}: {seconds:.1f} s", flush=True)
    sequential, together = statistics.median(times["off"]), statistics.median(times["on"])
    identical = "yes" if same_outcomes(outcomes["off"], outcomes["on"]) else "no"
    print(f"LOCKSTEP students={len(outcomes['on'])} sequential_s={sequential:.1f} lockstep_s={together:.1f} "
          f"ratio={together / sequential:.3f} identical={identical}")


if __name__ == "__main__":
    main()
