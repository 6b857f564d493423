"""Lockstep training: the students of a seed in one pass equal the same students trained one at a time."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL_MODELS
from e2e.test_resume import start_run, stop_at

import experiment
import utils
from training import checkpoints

pytestmark = pytest.mark.e2e

LOCKSTEP_FLAGS = ["--teacher-epochs", "1", "--student-epochs", "2", "--batch-size", "8", "--image-size", "32",
                  "--seed", "0", "--device", "cpu", "--precision", "fp32", "--val-fraction", "0.25",
                  "--kd-methods", "kd,dkd,fitnet", *SMALL_MODELS]
STUDENTS = ("student_baseline", "student_kd", "student_dkd", "student_fitnet")


def without_times(history: list[dict]) -> list[dict]:
    """A history's epochs without their wall times (which no two runs share)."""
    return [{key: value for key, value in epoch.items() if key != "seconds"} for epoch in history]


def assert_same_students(run: Path, reference: Path, roles: tuple[str, ...] = STUDENTS) -> None:
    """Every student's history, test results and best weights are those of `reference`, bit for bit."""
    for role in roles:
        assert (without_times(utils.read_json(run / role / "history.json")["epochs"])
                == without_times(utils.read_json(reference / role / "history.json")["epochs"])), role
        results, expected = (utils.read_json(folder / role / "results.json") for folder in (run, reference))
        assert (results["test"], results["test_correct"]) == (expected["test"], expected["test_correct"]), role
        weights, expected_weights = (checkpoints.load_checkpoint(folder / role / checkpoints.BEST_MODEL)["state_dict"]
                                     for folder in (run, reference))
        assert all(torch.equal(weights[name], expected_weights[name]) for name in expected_weights), role


@pytest.fixture(scope="module")
def one_at_a_time(tiny_data, tmp_path_factory) -> Path:
    """The students trained one at a time (--lockstep off)."""
    run = tmp_path_factory.mktemp("lockstep") / "off"
    assert experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run), "--lockstep", "off",
                            *LOCKSTEP_FLAGS]) == 0
    return run


def test_one_pass_equals_one_student_at_a_time(one_at_a_time, tiny_data, tmp_path, capsys):
    run = tmp_path / "on"
    teacher = one_at_a_time / "teacher" / checkpoints.BEST_MODEL
    assert experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run), "--lockstep", "on",
                            "--teacher-checkpoint", str(teacher), *LOCKSTEP_FLAGS]) == 0
    assert ("[lockstep] seed 0: student_baseline, student_kd, student_dkd, student_fitnet share one pass"
            in capsys.readouterr().out)
    assert_same_students(run, one_at_a_time)


@pytest.mark.long
def test_a_pass_killed_between_two_students_saves_resumes_to_the_same_histories(one_at_a_time, tiny_data, tmp_path):
    run = tmp_path / "killed"
    teacher = one_at_a_time / "teacher" / checkpoints.BEST_MODEL
    killed = start_run(tiny_data, run, ["--lockstep", "on", "--teacher-checkpoint", str(teacher), *LOCKSTEP_FLAGS])
    # The kd student's first epoch is logged once handed to the writer: the baseline's is on disk, fitnet's is not.
    stop_at(killed, "[student_kd] epoch   1", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert len(checkpoints.load_checkpoint(run / "student_baseline" / checkpoints.TRAIN_STATE)["history"]) == 1
    assert not (run / "student_fitnet" / checkpoints.TRAIN_STATE).exists()

    resumed = subprocess.run([sys.executable, "experiment.py", "--resume", str(run)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "[student_baseline] resuming after epoch 1 of 2" in resumed.stdout
    assert_same_students(run, one_at_a_time)


def test_students_with_dropout_keep_their_own_random_streams(tiny_data, tmp_path):
    flags = ["--data-dir", str(tiny_data), *LOCKSTEP_FLAGS, "--teacher-model", "resnet8", "--student-model",
             "mobilenet_v3_small", "--image-size", "64", "--kd-methods", "kd"]  # it drops out before its head
    for mode in ("off", "on"):
        assert experiment.main([*flags, "--output-dir", str(tmp_path / mode), "--lockstep", mode]) == 0
    assert_same_students(tmp_path / "on", tmp_path / "off", ("student_baseline", "student_kd"))
