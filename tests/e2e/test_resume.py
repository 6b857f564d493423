"""Stopping and resuming whole runs: SIGKILL, Ctrl-C and SIGTERM, torn files, diverging losses."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from conftest import ONE_EPOCH, RESUME_FLAGS, ROOT, SMALL_MODELS

import experiment
import utils
from config import command_line
from results import ledger, report
from training import checkpoints

pytestmark = pytest.mark.e2e


def test_sigterm_stops_like_ctrl_c_with_exit_143(tiny_data, tmp_path):
    process = start_run(tiny_data, tmp_path / "run")
    output = stop_at(process, "[teacher] epoch   1", signal.SIGTERM)
    assert process.returncode == 143, output
    assert "Interrupted (SIGTERM)" in output and f"--resume {tmp_path / 'run'}" in output
    assert "Traceback" not in output
    assert (tmp_path / "run" / "teacher" / checkpoints.TRAIN_STATE).is_file()


def ignore_stop_signals() -> None:
    """What a background job of a non-interactive shell inherits (SIGTERM too, as `nohup`-like launchers do)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Every checkpoint write is signalled in its middle: SIGINT and SIGTERM reach the process while it saves.
SIGNALS_DURING_SAVES = """
import os, signal
from training import checkpoints
write = checkpoints.save_checkpoint
def signalled_write(path, checkpoint):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    write(path, checkpoint)
    print("signalled during a save", flush=True)
checkpoints.save_checkpoint = signalled_write
"""


def test_signals_inherited_as_ignored_stay_ignored_during_saves(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    code = f"import sys\n{SIGNALS_DURING_SAVES}\nimport experiment\nsys.exit(experiment.main(sys.argv[1:]))"
    process = subprocess.run(
        [sys.executable, "-u", "-c", code, "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *ONE_EPOCH,
         *SMALL_MODELS],
        cwd=ROOT, capture_output=True, text=True, preexec_fn=ignore_stop_signals, timeout=600)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-3000:]
    # Each model saved its epoch and its best model under the signals, and none of them stopped it.
    assert output.count("signalled during a save") >= 6 and "Interrupted" not in output
    summary = utils.read_json(run_dir / "summary.json")
    for role in ("teacher", "student_baseline", "student_kd"):
        assert summary[role]["best_epoch"] == 1
        assert [record["epoch"] for record in utils.read_json(run_dir / role / "history.json")["epochs"]] == [1]


def test_a_torn_summary_is_rebuilt_by_resume_with_one_ledger_row(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "torn"
    flags = ["--teacher-model", "resnet8", "--student-model", "resnet8", "--teacher-epochs", "1", "--student-epochs",
             "1", "--batch-size", "16", "--image-size", "16", "--precision", "fp32", "--device", "cpu"]
    assert experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *flags]) == 0
    whole = (run_dir / "summary.json").read_bytes()
    (run_dir / "summary.json").write_bytes(whole[: len(whole) // 2])  # a crash while it was written
    assert experiment.main(["--resume", str(run_dir)]) == 0
    assert "damaged summary.json: resuming writes it again" in capsys.readouterr().out
    assert utils.read_json(run_dir / "summary.json").keys() == json.loads(whole).keys()
    rows = list(csv.DictReader(io.StringIO((run_dir.parent / "experiments.csv").read_text())))
    assert [row["run_dir"] for row in rows] == [str(run_dir)]


def default_stop_signals() -> None:
    """SIGINT and SIGTERM at their defaults, as in a terminal, even when pytest itself was started
    with them ignored (a background job of a non-interactive shell), which a child would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_run(
    tiny_data: Path, run_dir: Path, flags: list[str] = RESUME_FLAGS,
    set_signals: Callable[[], None] = default_stop_signals,
) -> subprocess.Popen:
    """The experiment as a separate process, its output unbuffered so it can be read line by line;
    `set_signals` runs in the child before it starts (its signal dispositions are what it inherits)."""
    return subprocess.Popen(
        [sys.executable, "-u", "experiment.py", "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=set_signals,
    )


def stop_at(process: subprocess.Popen, prefix: str, sig: int) -> str:
    """Send `sig` as soon as the run prints a line starting with `prefix`; return what it printed."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(prefix):
            process.send_signal(sig)
            break
    seen.append(process.stdout.read())
    process.wait(timeout=120)
    return "".join(seen)


def complete_then_killed(tiny_data: Path, tmp_path: Path, flags: list[str], line: str) -> Path:
    """Run `flags` to the end in tmp_path/complete, then again in tmp_path/killed, SIGKILLed as soon as it prints a
    line starting with `line`; the killed run's folder."""
    complete = start_run(tiny_data, tmp_path / "complete", flags)
    assert complete.wait(timeout=300) == 0, complete.stdout.read()
    killed = start_run(tiny_data, tmp_path / "killed", flags)
    stop_at(killed, line, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    return tmp_path / "killed"


def resume(run: Path) -> subprocess.CompletedProcess:
    """`experiment.py --resume run`, which must succeed."""
    resumed = subprocess.run([sys.executable, "experiment.py", "--resume", str(run)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    return resumed


@pytest.mark.long
def test_resume_after_sigkill_equals_an_uninterrupted_run(tiny_data, tmp_path):
    # Epoch 2's line is printed before epoch 2 is saved: the kill lands mid-model, after epoch 1's state.
    run = complete_then_killed(tiny_data, tmp_path, [*RESUME_FLAGS, *SMALL_MODELS], "[student_baseline] epoch   2")
    assert (run / "teacher" / "results.json").is_file()
    assert not (run / "student_baseline" / "results.json").is_file()
    saved_epochs = len(checkpoints.load_checkpoint(run / "student_baseline" / checkpoints.TRAIN_STATE)["history"])
    assert 1 <= saved_epochs < 4

    resumed = resume(run)
    assert "[teacher] finished before the interruption" in resumed.stdout
    assert f"[student_baseline] resuming after epoch {saved_epochs} of 4" in resumed.stdout
    expected = utils.read_json(tmp_path / "complete" / "summary.json")
    actual = utils.read_json(run / "summary.json")
    for role in ledger.LEDGER_ROLES:
        assert actual[role]["test"] == expected[role]["test"], role
        assert actual[role]["best_epoch"] == expected[role]["best_epoch"], role
        assert actual[role]["latency_ms"] > 0, "finished models are reloaded and measured with the others"
    assert actual["student_kd"]["mcnemar_p"] == expected["student_kd"]["mcnemar_p"]
    assert actual["warnings"] == expected["warnings"]
    # Wall time: every sitting counts, the last one on its own beside it (summary, ledger).
    assert (actual["sittings"], expected["sittings"]) == (2, 1)
    assert actual["wall_seconds"] > actual["wall_seconds_last_sitting"] > 0
    with open(tmp_path / "experiments.csv", encoding="utf-8", newline="") as ledger_file:
        row = next(r for r in csv.DictReader(ledger_file) if r["run_dir"] == str(run))
    assert float(row["wall_seconds"]) > float(row["wall_seconds_last_sitting"])

    def history(path):
        return [(e["train"]["loss"], e["val"]["loss"]) for e in utils.read_json(path)["epochs"]]

    assert (history(run / "student_baseline" / "history.json")
            == history(tmp_path / "complete" / "student_baseline" / "history.json"))
    assert not list(run.glob("*/" + checkpoints.TRAIN_STATE)), "finished models keep no training state"


@pytest.mark.long
@pytest.mark.parametrize("method", ["dkd", "reviewkd"])
def test_warm_up_and_trainable_parts_continue_after_a_resume(method, tiny_data, tmp_path):
    """DKD's and ReviewKD's ramps continue where they stopped, and ReviewKD's ABFs (trained with the student)
    come back from the training state: the resumed run's every epoch equals the uninterrupted run's."""
    # Small models; 3 steps an epoch, warm-up over 5 of 6 epochs (15 steps): the kill lands inside the ramp.
    flags = ["--teacher-model", "resnet8", "--student-model", "resnet8", "--teacher-epochs", "1",
             "--student-epochs", "6", "--batch-size", "9", "--kd-methods", method, f"--{method}-warmup-epochs", "5"]
    role = f"student_{method}"
    run = complete_then_killed(tiny_data, tmp_path, [*RESUME_FLAGS, *flags], f"[{role}] epoch   2")
    state = checkpoints.load_checkpoint(run / role / checkpoints.TRAIN_STATE)
    assert 1 <= len(state["history"]) < 6
    assert (state["criterion"] is not None) == (method == "reviewkd"), "the ABFs are in the training state"
    resumed = resume(run)
    assert f"[{role}] resuming after epoch" in resumed.stdout
    expected = utils.read_json(tmp_path / "complete" / role / "history.json")["epochs"]
    actual = utils.read_json(run / role / "history.json")["epochs"]
    # Epoch k's steps are 3k-2, 3k-1, 3k of 15: a mean factor of (3k - 1) / 15, then 1.
    assert [e["train"]["warmup"] for e in expected] == pytest.approx([2 / 15, 5 / 15, 8 / 15, 11 / 15, 14 / 15, 1.0])
    assert [(e["train"], e["val"]) for e in actual] == [(e["train"], e["val"]) for e in expected]
    summary = lambda path: utils.read_json(path / "summary.json")[role]["test"]  # noqa: E731
    assert summary(run) == summary(tmp_path / "complete")


@pytest.mark.long
def test_crd_resumed_after_sigkill_has_the_uninterrupted_history(tiny_data, tmp_path):
    """CRD's memory bank and its constants come back from the training state, and the resumed epoch draws the
    negatives the uninterrupted run drew: every epoch's train and validation figures are equal."""
    flags = [*RESUME_FLAGS, "--teacher-model", "resnet8", "--student-model", "resnet8", "--teacher-epochs", "1",
             "--kd-methods", "crd", "--image-size", "16", "--crd-negatives", "5"]  # a draw from 18 other-class images
    run = complete_then_killed(tiny_data, tmp_path, flags, "[student_crd] epoch   2")
    state = checkpoints.load_checkpoint(run / "student_crd" / checkpoints.TRAIN_STATE)
    assert 1 <= len(state["history"]) < 4 and state["criterion"]["memory.normalizers"].min() > 0
    resumed = resume(run)
    assert "[student_crd] resuming after epoch" in resumed.stdout
    expected = utils.read_json(tmp_path / "complete" / "student_crd" / "history.json")["epochs"]
    actual = utils.read_json(run / "student_crd" / "history.json")["epochs"]
    assert [(e["train"], e["val"]) for e in actual] == [(e["train"], e["val"]) for e in expected]


@pytest.mark.long
def test_an_initialization_stage_is_not_trained_again_after_sigkill(tiny_data, tmp_path):
    """FT's paraphraser, trained in its initialization stage and not by the optimizer, comes back from
    init_stage.pth: the resumed run's every epoch equals the uninterrupted run's."""
    flags = [*RESUME_FLAGS, "--teacher-model", "resnet8", "--student-model", "resnet8", "--teacher-epochs", "1",
             "--student-epochs", "3", "--batch-size", "9", "--kd-methods", "ft", "--init-epochs", "2"]
    run = complete_then_killed(tiny_data, tmp_path, flags, "[student_ft] epoch   2")
    resumed = resume(run)
    assert "[student_ft] initialization stage of 2 epochs restored" in resumed.stdout
    assert "[student_ft] initialization stage epoch" not in resumed.stdout
    expected = utils.read_json(tmp_path / "complete" / "student_ft" / "history.json")["epochs"]
    actual = utils.read_json(run / "student_ft" / "history.json")["epochs"]
    assert [(e["train"], e["val"]) for e in actual] == [(e["train"], e["val"]) for e in expected]


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tiny_data, tmp_path):
    process = start_run(tiny_data, tmp_path / "run")
    output = stop_at(process, "[teacher] epoch   1", signal.SIGINT)
    assert process.returncode == 130, output
    assert f"--resume {tmp_path / 'run'}" in output
    assert "Traceback" not in output
    assert (tmp_path / "run" / "teacher" / checkpoints.TRAIN_STATE).is_file()


def test_diverging_run_exits_1_with_one_sentence(tiny_data, tmp_path, capsys):
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "run"), *RESUME_FLAGS,
                            "--teacher-epochs", "3", "--teacher-lr", "1e30"])
    error = capsys.readouterr().err
    assert code == 1, error
    assert error.startswith("error: teacher: the training loss became NaN or infinite at epoch ")
    assert "Traceback" not in error


def test_resume_trains_again_a_model_whose_results_a_power_cut_left_unreadable(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    flags = [*RESUME_FLAGS, "--teacher-model", "resnet8", "--student-model", "resnet8", "--teacher-epochs", "1",
             "--student-epochs", "1"]
    assert experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run), *flags]) == 0
    expected = {role: utils.read_json(run / role / report.RESULTS) for role in ("teacher", "student_kd")}
    (run / "summary.json").unlink()  # the power cut came before the run's end
    (run / "student_kd" / report.RESULTS).write_bytes(b"")  # renamed into place before its data reached the disk
    (run / "teacher" / report.RESULTS).write_text('{"model": "teacher", "arch": ')  # cut short
    capsys.readouterr()
    assert experiment.main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    for role in ("teacher", "student_kd"):
        assert f"[{role}] not finished: cannot read '{run / role / report.RESULTS}' (Expecting value" in out
        assert f"[{role}] epoch   1" in out, "trained again"
        assert utils.read_json(run / role / report.RESULTS)["test"] == expected[role]["test"]
    assert "[student_baseline] finished before the interruption: kept as it was" in out
    assert "[student_baseline] epoch" not in out


def test_resume_of_a_run_saved_before_a_setting_existed_uses_its_default(tiny_run, tmp_path):
    saved = utils.read_json(tiny_run / "config.json")
    older = {key: value for key, value in saved.items() if key not in ("patience", "label_smoothing")}
    older["compile"] = False  # before --compile auto it was a switch
    utils.write_json(tmp_path / "config.json", older)
    parser, args, _ = command_line.parse_command_line([], experiment.default_config())
    for key in ("report_only", "resume", "config"):
        args.pop(key)
    config = command_line.resumed_config(str(tmp_path), args, parser)
    assert config.patience is None and config.label_smoothing == 0.0 and config.compile == "off"
    assert config.output_dir == str(tmp_path) and config.teacher_epochs == saved["teacher_epochs"]
