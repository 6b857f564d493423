"""Sweeps through whole runs: the study's trials, shared studies and workers, retried trials, and passwords that
reach no written file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import PASSWORD, ROOT, SECRET, SPEC, SWEEP_FLAGS, assert_one_sentence_exit_2, journal_study
from e2e.test_lockstep_runs import without_times
from optuna.trial import TrialState

import experiment
import utils
from core import secrets
from sweep import search, study_storage
from training import checkpoints, model_run

pytestmark = pytest.mark.e2e


def shared_study(journal: Path, name: str, **attrs: Any) -> None:
    """A study named `name` in the journal file, with these user attributes (what a worker records)."""
    storage = study_storage.HeartbeatJournalStorage(str(journal), study_storage.requeue_silent)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def sweep_main(tiny_data: Path, run_dir: Path, journal: Path, name: str) -> int:
    return experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *SWEEP_FLAGS, "--trials", "1",
                            "--study-storage", str(journal), "--study-name", name])


@pytest.mark.parametrize("attrs, expected", [
    ({"sweep": {"spec": "alpha=0.1:0.9", "metric": "top1"}}, "belongs to another sweep (spec alpha=0.1:0.9"),
    ({"sweep": {"spec": SPEC, "metric": "top1"}, "run_id": "elsewhere"},
     "keeps its trials in another run directory"),
])
def test_a_refused_study_leaves_no_run_directory(tiny_data, tmp_path, capsys, attrs, expected):
    journal = tmp_path / "study.journal"
    shared_study(journal, "taken", **attrs)
    code = sweep_main(tiny_data, tmp_path / "run", journal, "taken")
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "Study 'taken'", expected)
    assert not (tmp_path / "run").exists(), "a retry with another --study-name starts clean"


def test_a_shared_run_directory_with_other_settings_is_refused(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    utils.write_json(run_dir / "config.json", {"teacher_lr": 123.0, "seed": 0})
    code = sweep_main(tiny_data, run_dir, tmp_path / "study.journal", "shared")
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "holds a run with other settings (teacher_lr)")


def test_a_percent_encoded_password_key_reaches_no_written_file(tiny_data, tmp_path, capsys):
    """A real sweep on an SQLite storage (which ignores the query items): the secret is in no file and not on the
    console."""
    url = f"sqlite:///{tmp_path / 'study.db'}?pass%77ord={SECRET}&SSLPassword={SECRET}2"
    run_dir = tmp_path / "runs" / "secret"
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *SWEEP_FLAGS,
                            "--trials", "1", "--study-storage", url, "--study-name", "secret"])
    console = capsys.readouterr()
    assert code == 0, console.err
    assert SECRET not in console.out + console.err
    written = [path for path in tmp_path.rglob("*") if path.is_file() and path.name != "study.db"]
    assert len(written) > 10 and (run_dir / "student_kd" / "best_model.pth") in written
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert secrets.masked_url(url) in (run_dir / "config.json").read_text()


# ---------------------------------------------------------------- a whole sweep


class SplitGuard:
    """The test split's loader, refusing to be read while trials run."""

    trials_running = False

    def __init__(self, loader):
        self.loader, self.reads_after_trials = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if SplitGuard.trials_running:
            raise AssertionError("a trial read the test split")
        self.reads_after_trials += 1
        return iter(self.loader)


@pytest.fixture(scope="module")
def password_sweep(tiny_data, tmp_path_factory):
    """A finished 2-trial sweep whose study storage URL holds a password (a real SQLite storage, which ignores the
    query item), the test split's loader guarded while its trials run; with its console output and the guard."""
    root = tmp_path_factory.mktemp("sweep")
    run_dir, storage = root / "runs" / "swept", f"sqlite:///{root / 'study.db'}"
    url = f"{storage}?password={PASSWORD}"
    guards = []
    patch = pytest.MonkeyPatch()
    make_context, run_trials = experiment.make_context, search.Worker.run_trials

    def guarded_context(*args, **kwargs):
        context = make_context(*args, **kwargs)
        guards.append(SplitGuard(context.eval_loaders["test"]))
        context.eval_loaders["test"] = guards[-1]
        return context

    def guarded_trials(worker, teacher):
        SplitGuard.trials_running = True
        try:
            return run_trials(worker, teacher)
        finally:
            SplitGuard.trials_running = False

    trained_with, train_model = [], model_run.train_model

    def spied_training(context, name, *args, **kwargs):
        trained_with.append((name, sorted(context.eval_loaders)))  # the splits each model's training could read
        return train_model(context, name, *args, **kwargs)

    patch.setattr(experiment, "make_context", guarded_context)
    patch.setattr(search.Worker, "run_trials", guarded_trials)
    patch.setattr(model_run, "train_model", spied_training)
    capture = root / "console.txt"
    with open(capture, "w") as out, pytest.MonkeyPatch.context() as streams:
        streams.setattr(sys, "stdout", out)
        streams.setattr(sys, "stderr", out)
        code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *SWEEP_FLAGS,
                                "--trials", "2", "--study-storage", url, "--study-name", "swept"])
    patch.undo()
    assert code == 0, capture.read_text()
    return {"root": root, "run_dir": run_dir, "storage": storage, "guards": guards, "console": capture.read_text(),
            "trained_with": trained_with}


def test_sweep_finishes_and_its_study_holds_the_trials(password_sweep):
    run_dir = password_sweep["run_dir"]
    study = optuna.load_study(study_name="swept", storage=password_sweep["storage"])
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    record = utils.read_json(run_dir / "summary.json")["sweep"]
    assert record["metric"] == "top1" and record["trials_requested"] == 2
    assert [trial["number"] for trial in record["trials"]] == [0, 1]
    best = max(study.trials, key=lambda trial: (trial.value, -trial.user_attrs["val"]["loss"]))
    assert record["best_trial"] == best.number and record["best_params"] == best.params
    assert record["best_value"] == best.value == best.user_attrs["val"]["top1"]
    for role in ("teacher", "student_baseline", "student_kd"):
        assert (run_dir / role / "results.json").is_file()
    saved = checkpoints.load_checkpoint(run_dir / "student_kd" / "best_model.pth")["config"]
    assert (saved["temperature"], saved["alpha"]) == (best.params["temperature"], best.params["alpha"])
    assert sorted(path.name for path in (run_dir / "trials").iterdir() if path.is_dir()) == ["0", "1"]
    assert "[sweep] trial 0 complete" in password_sweep["console"]
    assert "[sweep] trial 1 complete" in password_sweep["console"]
    # The user's own settings (the defaults here) are the first trial, and the best is judged against them.
    assert study.trials[0].params == {"temperature": 4.0, "alpha": 0.5} and record["user_trial"] == 0
    assert "[sweep] trial 0 tries your own settings (temperature=4, alpha=0.5)" in password_sweep["console"]
    other, = [number for number in (0, 1) if number != record["best_trial"]]
    assert [item["trial"] for item in record["comparisons"]] == [other] and record["best_trial"] in record[
        "tied_with_best"]
    assert record["val_images"] == len(study.trials[0].user_attrs["val_correct"]) > 0
    assert "[sweep] tied with the best" in password_sweep["console"]
    ledger = (run_dir.parent / "experiments.csv").read_text().splitlines()
    assert len(ledger) == 2 and "temperature=1:10:log" in ledger[1]


def test_the_objective_never_reads_the_test_split(password_sweep):
    guard, = password_sweep["guards"]
    assert guard.reads_after_trials >= 1  # the final test of the best student, after the trials
    trials = [splits for name, splits in password_sweep["trained_with"] if name.startswith("trial")]
    assert trials == [["train", "val"]] * 2, password_sweep["trained_with"]


def test_the_report_has_a_sweep_section_rebuilt_from_the_summary(password_sweep):
    run_dir = password_sweep["run_dir"]
    (run_dir / "report.html").unlink()
    assert experiment.main(["--report-only", str(run_dir)]) == 0
    html = (run_dir / "report.html").read_text()
    section = html[html.index("<h2>Sweep</h2>"):html.index("<h2>Learning curves</h2>")]
    assert section.count("<img") >= 2 and "data:image/png;base64," in section
    assert "optimization history" in section and "<td>complete</td>" in section
    lead = html[html.index('<div class="lead">'):html.index("<h2>Models</h2>")]
    assert "The distilled student&#39;s settings came from a sweep: temperature=" in lead


def test_the_storage_password_reaches_no_written_file(password_sweep):
    assert PASSWORD not in password_sweep["console"]
    # Every file the run wrote, checkpoints and the report included (the storage's own database aside).
    files = [path for path in password_sweep["root"].rglob("*") if path.is_file() and path.name != "study.db"]
    assert len(files) > 20 and password_sweep["run_dir"] / "student_kd" / "best_model.pth" in files
    for path in files:
        assert PASSWORD.encode() not in path.read_bytes(), path
    config = utils.read_json(password_sweep["run_dir"] / "config.json")
    assert config["study_storage"] == f"{password_sweep['storage']}?password=***"


# ---------------------------------------------------------------- workers


def worker(tiny_data: Path, run_dir: Path, flags: list[str], prelude: str = "") -> subprocess.Popen:
    """`python experiment.py` as a separate worker process (after `prelude`, Python run in it first)."""
    code = f"import sys\n{prelude}\nimport experiment\nsys.exit(experiment.main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-u", "-c", code, "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *SWEEP_FLAGS,
         *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_workers_share_one_study_and_run_each_trial_once(tiny_data, tmp_path):
    flags = ["--trials", "3", "--study-storage", str(tmp_path / "study.journal"), "--study-name", "pair"]
    workers = [worker(tiny_data, tmp_path / "run", flags) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in workers]
    assert [process.returncode for process in workers] == [0, 0], outputs
    ran = [{int(line.split()[2]) for line in output.splitlines() if line.startswith("[sweep] trial ")}
           for output in outputs]
    assert ran[0] | ran[1] == {0, 1, 2} and not ran[0] & ran[1]
    study = journal_study(tmp_path / "study.journal", "pair")
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert sum("[teacher] epoch" in output for output in outputs) == 1, "the teacher is trained once"
    assert sum("Wall time" in output for output in outputs) == 1, "one worker writes the report"
    # A worker that joins the run directory the other made says so (test_sweep_postgres): nothing was interrupted.
    assert not any("Resuming the run" in output or "interruption" in output for output in outputs), outputs
    assert (tmp_path / "run" / "summary.json").is_file()


SAVE_HOOK = """
import os, signal
from training import checkpoints, model_run
save = checkpoints.BackgroundSaver.save
def hooked(self, files):
    save(self, files)
    if any(path.parent.name == "1" and path.name == "train_state.pth" for path in files):
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.BackgroundSaver.save = hooked
"""


def test_killed_and_stopped_trials_are_retried_and_the_study_finishes(tiny_data, tmp_path, monkeypatch, capsys):
    run_dir, flags = tmp_path / "run", ["--trials", "2", "--student-epochs", "2"]
    killed = worker(tiny_data, run_dir, flags, SAVE_HOOK)  # SIGKILLed once trial 1's first epoch is saved
    output = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, output
    assert "[sweep] trial 0 complete" in output

    save = checkpoints.BackgroundSaver.save

    def stop_after_second_epoch(self, files):  # SIGTERM while the retry saves its second epoch
        save(self, files)
        state = [path for path in files if path.name == "train_state.pth" and path.parent.name == "1"]
        if state and len(files[state[0]]["history"]) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoints.BackgroundSaver, "save", stop_after_second_epoch)
    assert experiment.main(["--resume", str(run_dir)]) == 128 + signal.SIGTERM
    resumed = capsys.readouterr()
    assert "[sweep] trial 1 failed (its worker was killed); queued again as trial 2" in resumed.out
    assert "[sweep] trial 2 failed (its worker was stopped); queued again as trial 3" in resumed.out
    assert "[trial 2] resuming after epoch 1 of 2" in resumed.out
    assert "[trial 0]" not in resumed.out, "a finished trial is kept"
    assert f"--resume {run_dir}" in resumed.err

    monkeypatch.setattr(checkpoints.BackgroundSaver, "save", save)
    assert experiment.main(["--resume", str(run_dir)]) == 0
    finished = capsys.readouterr().out
    assert "[trial 3] resuming after epoch 2 of 2" in finished and "[trial 0]" not in finished
    trials = utils.read_json(run_dir / "summary.json")["sweep"]["trials"]
    assert [(trial["state"], trial.get("retry_of")) for trial in trials] == [
        ("complete", None), ("fail", None), ("fail", 1), ("complete", 1)]
    assert trials[3]["params"] == trials[1]["params"] and trials[3]["epochs"] == 2
    assert not (run_dir / "trials" / "1" / "train_state.pth").exists()


# ---------------------------------------------------------------- trials in one pass


PASS_FLAGS = ["--student-epochs", "2", "--prune-after", "1", "--trials-per-pass", "3"]


def run_sweep(tiny_data: Path, run_dir: Path, flags: list[str]) -> str:
    """A finished sweep in `run_dir` (its study in RUN/sweep.db): its console."""
    capture = run_dir.with_suffix(".txt")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(capture, "w") as out, pytest.MonkeyPatch.context() as streams:
        streams.setattr(sys, "stdout", out)
        code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *SWEEP_FLAGS, *flags])
    assert code == 0, capture.read_text()
    return capture.read_text()


def sqlite_study(run_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=run_dir.name, storage=f"sqlite:///{run_dir / search.SQLITE_FILE}")


@pytest.fixture(scope="module")
def pass_sweep(tiny_data, tmp_path_factory):
    """6 trials of 2 epochs, 3 a pass, the pruner stopping trial 1 after its first epoch: the run directory and
    its console."""
    run_dir = tmp_path_factory.mktemp("passes") / "swept"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optuna.trial.Trial, "should_prune", lambda trial: trial.number == 1)
        console = run_sweep(tiny_data, run_dir, ["--trials", "6", *PASS_FLAGS])
    return run_dir, console


def test_six_trials_three_a_pass_finish_and_a_pruned_trial_leaves_its_pass(pass_sweep):
    run_dir, console = pass_sweep
    assert "[lockstep] seed 0: trial 0, trial 1, trial 2 share one pass" in console
    assert "[lockstep] seed 0: trial 3, trial 4, trial 5 share one pass" in console
    trials = sqlite_study(run_dir).trials
    assert [trial.state for trial in trials] == [TrialState.COMPLETE, TrialState.PRUNED] + [TrialState.COMPLETE] * 4
    assert [sorted(trial.intermediate_values) for trial in trials] == [[1, 2], [1]] + [[1, 2]] * 4
    # Told as it left, while its pass-mates went on to their second epoch.
    assert console.index("[sweep] trial 1 pruned") < console.index("[trial 0] epoch   2")
    assert not (run_dir / "trials" / "1").exists()
    for number in (0, 2):
        history = checkpoints.load_checkpoint(run_dir / "trials" / str(number) / checkpoints.BEST_MODEL)["history"]
        assert len(history) == 2
    assert len({tuple(sorted(trial.params.items())) for trial in trials}) == 6, "the trials of a pass differ"
    assert utils.read_json(run_dir / "summary.json")["sweep"]["trials_requested"] == 6


def test_a_trial_in_a_pass_equals_the_same_trial_alone(pass_sweep, tiny_data):
    """fp32 on the CPU: trial 0 (your settings) trained beside two others is bit for bit trial 0 trained alone."""
    run_dir, _ = pass_sweep
    alone = run_dir.parent / "alone"
    console = run_sweep(tiny_data, alone, ["--trials", "1", *PASS_FLAGS, "--trials-per-pass", "1"])
    assert "[lockstep]" not in console
    in_pass, by_itself = sqlite_study(run_dir).trials[0], sqlite_study(alone).trials[0]
    assert in_pass.intermediate_values == by_itself.intermediate_values
    for key in ("val", "val_correct"):
        assert in_pass.user_attrs[key] == by_itself.user_attrs[key]
    checkpoint, expected = (checkpoints.load_checkpoint(folder / "trials" / "0" / checkpoints.BEST_MODEL)
                            for folder in (run_dir, alone))
    assert without_times(checkpoint["history"]) == without_times(expected["history"])
    assert all(torch.equal(checkpoint["state_dict"][name], tensor) for name, tensor in expected["state_dict"].items())


def test_trials_searching_the_batch_size_train_alone(tiny_data, tmp_path):
    console = run_sweep(tiny_data, tmp_path / "batches", ["--sweep", "alpha=0.1:0.9,batch_size=8|16", "--trials", "2",
                                                          *PASS_FLAGS])
    assert ("[sweep] each trial trains alone: the searched batch_size changes the training batches, which the "
            "trials of a pass share (--trials-per-pass 3 unused)") in console
    assert "[lockstep]" not in console
    assert [trial.state for trial in sqlite_study(tmp_path / "batches").trials] == [TrialState.COMPLETE] * 2


def test_a_pass_killed_mid_epoch_resumes_every_trial_from_its_last_saved_epoch(pass_sweep, tiny_data, tmp_path,
                                                                              capsys):
    """SIGKILL once trial 1 saved its first epoch (trial 0 had, trial 2 had not): each is queued again and goes on
    from its own last epoch, in one pass again; trial 0's retry ends as trial 0 of an uninterrupted pass."""
    run_dir = tmp_path / "run"
    killed = worker(tiny_data, run_dir, ["--trials", "3", *PASS_FLAGS], SAVE_HOOK)
    output = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, output
    assert experiment.main(["--resume", str(run_dir)]) == 0
    resumed = capsys.readouterr().out
    for number, retry in ((0, 3), (1, 4), (2, 5)):
        assert f"[sweep] trial {number} failed (its worker was killed); queued again as trial {retry}" in resumed
    assert "[trial 3] resuming after epoch 1 of 2" in resumed and "[trial 4] resuming after epoch 1 of 2" in resumed
    assert "[lockstep] seed 0: trial 3, trial 4, trial 5 share one pass" in resumed
    states = [trial.state for trial in sqlite_study(run_dir).trials]
    assert states == [TrialState.FAIL] * 3 + [TrialState.COMPLETE] * 3
    checkpoint, expected = (checkpoints.load_checkpoint(folder / "trials" / "0" / checkpoints.BEST_MODEL)
                            for folder in (run_dir, pass_sweep[0]))
    assert without_times(checkpoint["history"]) == without_times(expected["history"])
