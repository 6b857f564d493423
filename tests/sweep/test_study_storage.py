"""The sweep's study storage (sweep.study_storage): heartbeats on a journal file, the driver a URL needs, and
passwords hidden in errors."""

from __future__ import annotations

import time

import optuna
import pytest
from conftest import PASSWORD, SECRET, journal_study
from optuna.distributions import FloatDistribution

from core.errors import SettingsError
from sweep import search_space, study_storage


def test_an_error_quoting_the_url_shows_no_form_of_the_secret(monkeypatch):
    """A driver's message may quote the URL, or the secret as written or decoded: each is hidden."""
    url = f"postgresql://kd:{SECRET}%21@db/kd?sslpassword={SECRET}%2B1"

    def refuse(given, **kwargs):
        raise ValueError(f"cannot use {given}: password {SECRET}! or {SECRET}+1 refused")

    monkeypatch.setattr(optuna.storages, "RDBStorage", refuse)
    with pytest.raises(SettingsError) as refused:
        study_storage.connect(url)
    assert SECRET not in str(refused.value) and "***" in str(refused.value), refused.value


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks for a trial outside optimize
def test_a_silent_journal_trial_is_failed_and_queued_again(tmp_path, monkeypatch):
    storage = study_storage.HeartbeatJournalStorage(str(tmp_path / "study.journal"), study_storage.requeue_silent)
    study = optuna.create_study(storage=storage, study_name="beats")
    trial = study.ask({"alpha": FloatDistribution(0.1, 0.9)})
    trial.report(0.5, 1)
    study_id = storage.get_study_id_from_name("beats")
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))
    with search_space.quiet_optuna():
        optuna.storages.fail_stale_trials(study)
        assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # heard from within the grace period
        later = time.time() + study_storage.GRACE_SECONDS + 1
        monkeypatch.setattr(time, "time", lambda: later)
        optuna.storages.fail_stale_trials(study)
    failed, queued = journal_study(tmp_path / "study.journal", "beats").trials
    assert failed.state == optuna.trial.TrialState.FAIL
    assert queued.state == optuna.trial.TrialState.WAITING
    assert queued.system_attrs["failed_trial"] == 0 and queued.params == failed.params
    assert queued.intermediate_values == {1: 0.5}


def test_a_missing_driver_names_psycopg_3(monkeypatch):
    """SQLAlchemy 2.1 reaches postgresql:// through psycopg 3: the hint must not send the user to psycopg2."""

    def no_driver(given, **kwargs):
        raise ModuleNotFoundError("No module named 'psycopg'")

    monkeypatch.setattr(optuna.storages, "RDBStorage", no_driver)
    with pytest.raises(SettingsError) as refused:
        study_storage.connect(f"postgresql://kd:{PASSWORD}@db/kd")
    assert "pip install 'psycopg[binary]'" in str(refused.value) and "psycopg2" not in str(refused.value)
    assert PASSWORD not in str(refused.value)


def test_the_postgresql_driver_is_installed():
    from sqlalchemy.engine import make_url

    make_url("postgresql://kd@db/kd").get_dialect().import_dbapi()  # ImportError without psycopg 3
