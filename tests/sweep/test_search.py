"""The sweep's search (sweep.search): passwords on resume, the pruner's first judged epoch, killed workers' trials."""

from __future__ import annotations

import time

import optuna
import pytest
from conftest import PASSWORD
from optuna.trial import TrialState

import experiment
from config import settings
from core.errors import SettingsError
from sweep import search


def test_a_resume_needs_a_hidden_password_again():
    saved = settings.Config(**{**vars(experiment.default_config()), "sweep": "alpha=0.1:0.9", "output_dir": "run",
                               "study_storage": "postgresql://kd:***@db/kd", "study_name": "s"})
    with pytest.raises(SettingsError, match="had a password"):
        search.resumed_storage(saved, None)
    given = search.resumed_storage(saved, f"postgresql://kd:{PASSWORD}@db/kd")
    assert given.study_storage == f"postgresql://kd:{PASSWORD}@db/kd"
    with pytest.raises(SettingsError, match="only to give its sweep's storage again"):
        search.resumed_storage(saved, "postgresql://other:x@db/kd")


def test_the_pruner_judges_no_trial_before_its_first_judged_epoch():
    """Early epochs' scores jump by points: a trial far below the median is kept until --prune-after."""
    from types import SimpleNamespace

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=settings.PRUNER_STARTUP_TRIALS, n_min_trials=settings.PRUNER_STARTUP_TRIALS))
    for _ in range(settings.PRUNER_STARTUP_TRIALS):
        good = study.ask()
        for epoch in range(1, 5):
            good.report(0.9, epoch)
        study.tell(good, 0.9)
    owner = SimpleNamespace(sweep=SimpleNamespace(plan=SimpleNamespace(metric="top1")))
    trial = study.ask()
    report = search.Objective._reporter(owner, trial, 4, 3)
    for epoch in (1, 2):
        report({"epoch": epoch, "val": {"top1": 0.1}, "seconds": 1.0})
    with pytest.raises(optuna.TrialPruned):
        report({"epoch": 3, "val": {"top1": 0.1}, "seconds": 1.0})
    assert trial.user_attrs["seconds"] == 3.0


def test_by_default_half_of_a_trials_epochs_go_unjudged():
    config = experiment.default_config()
    assert search.first_judged(settings.Config(**{**vars(config), "student_epochs": 10})) == 5
    assert search.first_judged(settings.Config(**{**vars(config), "student_epochs": 7, "prune_after": 2})) == 2


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks for trials outside optimize
def test_a_killed_workers_trial_is_failed_and_queued_again_at_once(tmp_path, capsys):
    """No heartbeat grace: a trial whose worker's lock is free (its process ended) is retried now; one whose
    worker holds its lock is left running."""
    from sweep import search_space, study_storage

    space = search_space.parse_spec("alpha=0.1:0.9")
    plan = search.Plan("alpha=0.1:0.9", space, 4, "top1", "maximize",
                       study_storage.connect(str(tmp_path / "study.journal")), "journal", "lone", {"alpha": 0.5}, [])
    (tmp_path / "run").mkdir()
    with search.SweepStudy(tmp_path / "run", plan, seed=0) as sweep:
        dead, alive = sweep.optuna.ask(), sweep.optuna.ask()
        dead.report(0.4, 1)
        dead.set_user_attr(search.WORKER_ATTR, "killed")
        (sweep.folder / "worker_killed.lock").touch()  # its worker ended: nobody holds it
        alive.set_user_attr(search.WORKER_ATTR, "busy")
        with study_storage.FileLock(sweep.folder / "worker_busy.lock"):
            started = time.monotonic()
            sweep.queue_dead_workers_trials()
            assert time.monotonic() - started < 5
        states = [trial.state for trial in sweep.optuna.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert "[sweep] trial 0 failed (its worker was killed); queued again as trial 2" in capsys.readouterr().out
