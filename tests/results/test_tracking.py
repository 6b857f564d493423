"""MLflow tracking (results.tracking): the optional package refused in one sentence, what an epoch sends, one
warning for a store that refuses, and a reopened run that keeps its parent and repeats no epoch."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from conftest import assert_one_sentence_exit_2, default_config

import experiment
import utils
from config import settings
from results import tracking

EPOCH = {"epoch": 1, "lr": 0.01, "seconds": 0.5,
         "train": {"loss": 1.5, "top1": 0.25, "precision_macro": None, "undefined": {"precision_macro": "why"}},
         "val": {"loss": 1.25, "top1": 0.5}}


def test_track_mlflow_without_mlflow_is_one_sentence_before_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    code = experiment.main(["--output-dir", str(tmp_path / "run"), "--track", "mlflow"])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "--track mlflow", "pip install -r requirements-dev.txt")
    assert not (tmp_path / "run").exists()


def test_tracking_uri_without_track_mlflow_is_refused(tmp_path, capsys):
    code = experiment.main(["--output-dir", str(tmp_path / "run"), "--tracking-uri", "http://127.0.0.1:5000"])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "--track mlflow")
    assert not (tmp_path / "run").exists()


def test_an_epoch_becomes_metrics_with_undefined_values_left_out():
    assert tracking.epoch_metrics(EPOCH) == {"train_loss": 1.5, "train_top1": 0.25, "val_loss": 1.25,
                                             "val_top1": 0.5, "lr": 0.01, "seconds": 0.5}


def test_the_default_store_is_an_sqlite_file_beside_the_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.store_uri(tmp_path / "runs" / "a", None) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.store_uri(tmp_path / "runs" / "a", None) == "http://127.0.0.1:5000"
    assert tracking.store_uri(tmp_path / "runs" / "a", "http://host:1") == "http://host:1"


def test_a_tracking_password_is_never_saved():
    config = default_config(track="mlflow", tracking_uri="http://ann:hunter2@127.0.0.1:5000")
    assert settings.saved_config(config)["tracking_uri"] == f"http://ann:{settings.HIDDEN}@127.0.0.1:5000"


def run_folder(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    utils.write_json(run_dir / "config.json", {"alpha": 0.5, "resolved": {"device": "cpu"}, "dataset": {"n": 3}})
    return run_dir


def test_a_refusing_store_costs_one_warning_without_its_password(tmp_path, capsys):
    pytest.importorskip("mlflow")
    run_dir = run_folder(tmp_path)
    port = 9  # the discard port: nothing listens on it here, so every request is refused at once
    tracker = tracking.Tracker(run_dir, f"http://ann:hunter2@127.0.0.1:{port}", "refused").open()
    tracker("teacher")(EPOCH)
    assert not tracker.sync()
    out = capsys.readouterr().out
    assert out.count("warning: MLflow tracking") == 1 and f"--track-sync {run_dir}" in out
    assert "hunter2" not in out and not (run_dir / tracking.STATE_FILE).exists()


def test_ctrl_c_during_a_store_call_stops_the_run_instead_of_reading_as_a_failed_store(tmp_path, capsys):
    pytest.importorskip("mlflow")
    tracker = tracking.Tracker(run_folder(tmp_path), f"sqlite:///{tmp_path / 'store.db'}", "interrupted")

    def query_that_sqlite_interrupts() -> str:
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the store works
            time.sleep(0.1)
        except KeyboardInterrupt:
            raise RuntimeError("interrupted") from None  # what sqlite3 makes of it
        return "answered"

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # an xdist worker may ignore it
    try:
        with pytest.raises(KeyboardInterrupt):
            tracker.attempt("logging", query_that_sqlite_interrupts)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not tracker.failed and "warning" not in capsys.readouterr().out


def test_a_reopened_run_keeps_its_parent_and_sends_no_epoch_twice(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    run_dir = run_folder(tmp_path)
    uri = tracking.store_uri(run_dir, f"sqlite:///{tmp_path / 'store.db'}")
    first = tracking.Tracker(run_dir, uri, "reopened").open()
    first("teacher")(EPOCH)
    again = tracking.Tracker(run_dir, uri, "reopened").open()  # --resume, or --track-sync
    again("teacher")(EPOCH)
    again("teacher")({**EPOCH, "epoch": 2})
    assert again.parent == first.parent and again.children == first.children
    client = mlflow.MlflowClient(uri)
    assert [metric.step for metric in client.get_metric_history(first.children["teacher"], "val_top1")] == [1, 2]
    assert client.get_run(first.parent).data.params == {"alpha": "0.5", "resolved.device": "cpu", "dataset.n": "3"}


def test_track_sync_of_an_unfinished_run_is_one_sentence(tmp_path, capsys):
    run_dir = run_folder(tmp_path)
    code = experiment.main(["--track-sync", str(run_dir)])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, f"--track-sync '{run_dir}'", "no summary.json")


def test_a_resumed_run_whose_uri_had_a_password_needs_it_from_the_environment(tmp_path, monkeypatch, capsys):
    run_dir = run_folder(tmp_path)
    saved = default_config(track="mlflow", tracking_uri=f"http://ann:{settings.HIDDEN}@127.0.0.1:9")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.start(run_dir, saved) is None
    assert f"--track-sync {run_dir} --tracking-uri URL" in capsys.readouterr().out
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ann:hunter2@127.0.0.1:9")
    tracker = tracking.start(run_dir, saved)
    assert tracker.uri == "http://ann:hunter2@127.0.0.1:9" and tracker.failed  # nothing listens on port 9
