"""Hyper-parameter sweeps (--sweep): the spec, a whole sweep, workers sharing a study, killed and stopped
workers, bad input, and a storage password kept out of everything written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import ROOT
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

import experiment
import utils
from config import command_line, settings
from core.errors import SettingsError
from sweep import search, search_space
from training import checkpoints, model_run

SWEEP_FLAGS = [
    "--teacher-model", "resnet8", "--student-model", "resnet8", "--teacher-epochs", "1", "--student-epochs", "1",
    "--batch-size", "16", "--image-size", "16", "--precision", "fp32", "--val-fraction", "0.25", "--device", "cpu",
    "--seed", "0", "--sweep", "temperature=1:10:log,alpha=0.1:0.9",
]
PASSWORD = "hunter2-sweep"


def journal_study(path: Path, name: str) -> optuna.Study:
    """A study kept in a journal file, opened as a reader would."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


# ---------------------------------------------------------------- the spec


def test_spec_grammar_gives_typed_distributions():
    space = search_space.parse_spec("temperature=1:10:log, alpha=0.1:0.9,batch-size=16:64,student_epochs=1|2,"
                                   "method=kd|dkd")
    assert space["temperature"] == FloatDistribution(1.0, 10.0, log=True)
    assert space["alpha"] == FloatDistribution(0.1, 0.9)
    assert space["batch_size"] == IntDistribution(16, 64)
    assert space["student_epochs"] == CategoricalDistribution((1, 2))
    assert all(type(choice) is int for choice in space["student_epochs"].choices)
    assert space["method"] == CategoricalDistribution(("kd", "dkd"))
    config = search_space.trial_config(experiment.default_config(), {"alpha": 0.3, "method": "dkd", "batch_size": 20})
    assert (config.alpha, config.kd_methods, config.batch_size) == (0.3, "dkd", 20)


def test_a_settings_file_can_hold_the_sweep(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep: temperature=1:10:log,alpha=0.1:0.9\ntrials: 12\nstudy_name: kd-sweep\n")
    _, args, given = command_line.parse_command_line(["--config", str(path)], experiment.default_config())
    assert (args["sweep"], args["trials"], args["study_name"]) == ("temperature=1:10:log,alpha=0.1:0.9", 12, "kd-sweep")
    assert {"sweep", "trials", "study_name"} <= given


def test_searchable_settings_come_from_the_config_types(monkeypatch):
    names = search_space.searchable_settings()
    for name in ("temperature", "alpha", "beta", "dkd_alpha", "dkd_beta", "student_lr", "weight_decay",
                 "label_smoothing", "dkd_warmup_epochs"):
        assert name in names
    for name in ("teacher_lr", "teacher_epochs", "seed", "image_size", "val_fraction", "workers", "kd_methods"):
        assert name not in names
    # A setting a new method adds is searchable without touching the sweep.
    monkeypatch.setitem(settings.FIELDS, "new_method_weight", settings.Flag("distillation methods", "a new weight"))
    monkeypatch.setitem(settings.TYPES, "new_method_weight", float)
    assert "new_method_weight" in search_space.searchable_settings()
    assert search_space.parse_spec("new_method_weight=1:2")["new_method_weight"] == FloatDistribution(1.0, 2.0)


@pytest.mark.parametrize(("url", "shown"), [
    (f"postgresql://kd:{PASSWORD}@db.example:5432/kd", "postgresql://kd:***@db.example:5432/kd"),
    (f"mysql+pymysql://kd:{PASSWORD}@db/kd?charset=utf8&password={PASSWORD}",
     "mysql+pymysql://kd:***@db/kd?charset=utf8&password=***"),
    ("postgresql://kd@db/kd", "postgresql://kd@db/kd"),
    ("sqlite:////abs/sweep.db", "sqlite:////abs/sweep.db"),
    ("/shared/sweeps/kd.journal", "/shared/sweeps/kd.journal"),
])
def test_a_storage_password_is_hidden(url, shown):
    assert settings.without_password(url) == shown


def sweep_record(trials: list[tuple[dict, float]], spec: str = "temperature=1:10:log,alpha=0.1:0.9"):
    """A summary.json sweep record of complete trials ((params, value) each), the first best."""
    import json

    from optuna.distributions import distribution_to_json

    from core import records

    space = {name: json.loads(distribution_to_json(dist)) for name, dist in search_space.parse_spec(spec).items()}
    done = [records.SweepTrial(number=n, state="complete", params=params, epochs=1, value=value, curve=[value])
            for n, (params, value) in enumerate(trials)]
    best = max(done, key=lambda trial: trial.value)
    return records.SweepRecord(spec=spec, metric="top1", direction="maximize", storage="s", study_name="s",
                               trials_requested=len(done), distributions=space,
                               best_trial=best.number, best_params=best.params, best_value=best.value, trials=done)


def test_sweep_warnings_name_flat_validation_and_a_best_value_at_the_edge():
    from sweep import findings

    flat = sweep_record([({"temperature": 4.0, "alpha": 0.5}, 0.9), ({"temperature": 2.0, "alpha": 0.3}, 0.9)])
    warnings = findings.sanity_warnings(flat)
    assert len(warnings) == 1 and "Every finished trial of the sweep scored the same validation top1" in warnings[0]
    edge = sweep_record([({"temperature": 9.9, "alpha": 0.5}, 0.95), ({"temperature": 2.0, "alpha": 0.3}, 0.9)])
    warnings = findings.sanity_warnings(edge)
    assert len(warnings) == 1 and "temperature (9.9) lies at the high end of its range (1 to 10)" in warnings[0]


BAD_INPUTS = [
    (["--sweep", "temperature=1:10:cubic"], "is not a range"),
    (["--sweep", "temperature"], "is not name=range"),
    (["--sweep", "temperature=1:10,temperature=2:3"], "names temperature twice"),
    (["--sweep", "temprature=1:10"], "the closest searchable one is 'temperature'"),
    (["--sweep", "optimizer=adamw|sgd"], "optimizer is not a numeric setting"),
    (["--sweep", "teacher_lr=0.01:0.1"], "the teacher is trained once"),
    (["--sweep", "seed=0:5"], "draws the data splits"),
    (["--sweep", "alpha=0.9:0.1"], "the range is empty"),
    (["--sweep", "batch_size=8.5:16"], "is not an integer"),
    (["--sweep", "temperature=0:10:log"], "a log range must start above 0"),
    (["--sweep", "alpha=0.5:2"], "--alpha must be between 0 and 1 (got 2.0)"),
    (["--sweep", "method=kd|nope"], "'nope' is not a method"),
    (["--sweep", "alpha=0.1:0.9", "--kd-methods", "kd,dkd"], "give one method in --kd-methods"),
    (["--sweep", "alpha=0.1:0.9", "--trials", "0"], "--trials must be at least 1"),
    (["--study-storage", "x.journal", "--study-name", "s"], "give --sweep too"),
    (["--sweep", "alpha=0.1:0.9", "--study-storage", "x.journal"], "--study-storage needs --study-name"),
    (["--sweep", "alpha=0.1:0.9", "--study-storage", "sqlite:////no/such/folder/s.db", "--study-name", "s"],
     "Cannot open the study storage sqlite:////no/such/folder/s.db"),
    (["--sweep", "alpha=0.1:0.9", "--study-storage", "/no/such/folder/s.journal", "--study-name", "s"],
     "Cannot open the study storage /no/such/folder/s.journal"),
    (["--sweep", "alpha=0.1:0.9", "--study-storage", f"postgresql://kd:{PASSWORD}@127.0.0.1:1/kd",
      "--study-name", "s"], "Cannot open the study storage postgresql://kd:***@127.0.0.1:1/kd"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_INPUTS)
def test_bad_input_is_one_sentence_exit_2_and_no_run_directory(flags, message, capsys, tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and PASSWORD not in err
    assert not run_dir.exists()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks for a trial outside optimize
def test_a_silent_journal_trial_is_failed_and_queued_again(tmp_path, monkeypatch):
    storage = search.HeartbeatJournalStorage(str(tmp_path / "study.journal"), search.retry_callback())
    study = optuna.create_study(storage=storage, study_name="beats")
    trial = study.ask({"alpha": FloatDistribution(0.1, 0.9)})
    trial.report(0.5, 1)
    study_id = storage.get_study_id_from_name("beats")
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))
    with search_space.quiet_optuna():
        optuna.storages.fail_stale_trials(study)
        assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # heard from within the grace period
        later = time.time() + search.GRACE_SECONDS + 1
        monkeypatch.setattr(time, "time", lambda: later)
        optuna.storages.fail_stale_trials(study)
    failed, queued = journal_study(tmp_path / "study.journal", "beats").trials
    assert failed.state == optuna.trial.TrialState.FAIL
    assert queued.state == optuna.trial.TrialState.WAITING
    assert queued.system_attrs["failed_trial"] == 0 and queued.params == failed.params
    assert queued.intermediate_values == {1: 0.5}


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
    """A finished 2-trial sweep whose study storage URL holds a password (the study itself in a journal file),
    the test split's loader guarded while its trials run; with its console output and the guard."""
    root = tmp_path_factory.mktemp("sweep")
    run_dir, journal = root / "runs" / "swept", root / "study.journal"
    url = f"postgresql://kd:{PASSWORD}@db.example/kd"
    guards = []
    patch = pytest.MonkeyPatch()
    patch.setattr(search, "connect",
                  lambda given: search.HeartbeatJournalStorage(str(journal), search.retry_callback()))
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
    return {"root": root, "run_dir": run_dir, "journal": journal, "guards": guards, "console": capture.read_text(),
            "trained_with": trained_with}


def test_sweep_finishes_and_its_study_holds_the_trials(password_sweep):
    run_dir = password_sweep["run_dir"]
    study = journal_study(password_sweep["journal"], "swept")
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


def test_the_storage_password_reaches_no_written_file(password_sweep):
    assert PASSWORD not in password_sweep["console"]
    files = [path for path in password_sweep["root"].rglob("*") if path.is_file()]
    assert len(files) > 20
    for path in files:
        assert PASSWORD.encode() not in path.read_bytes(), path
    config = utils.read_json(password_sweep["run_dir"] / "config.json")
    assert config["study_storage"] == "postgresql://kd:***@db.example/kd"


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
    assert "trial 1 was interrupted: queued again" in resumed.out
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


def test_a_resume_needs_a_hidden_password_again():
    saved = settings.Config(**{**vars(experiment.default_config()), "sweep": "alpha=0.1:0.9", "output_dir": "run",
                               "study_storage": "postgresql://kd:***@db/kd", "study_name": "s"})
    with pytest.raises(SettingsError, match="had a password"):
        search.resumed_storage(saved, None)
    given = search.resumed_storage(saved, f"postgresql://kd:{PASSWORD}@db/kd")
    assert given.study_storage == f"postgresql://kd:{PASSWORD}@db/kd"
    with pytest.raises(SettingsError, match="only to give its sweep's storage again"):
        search.resumed_storage(saved, "postgresql://other:x@db/kd")
