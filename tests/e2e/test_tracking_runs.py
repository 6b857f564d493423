"""--track mlflow on whole runs: a local store, a real `mlflow server` that goes down mid-run, --track-sync, a
resumed run, and a sweep's trials."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import ONE_EPOCH, ROOT, SMALL_MODELS, SWEEP_FLAGS

import experiment
import utils
from results import tracking

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.e2e

MODELS = ("teacher", "student_baseline", "student_kd")
SERVER_START_SECONDS = 300  # `mlflow server` imports a web stack: slow to start on a loaded two-core machine


@pytest.fixture(autouse=True)
def no_tracking_uri_in_the_environment(monkeypatch):
    """The runs follow $MLFLOW_TRACKING_URI, which mlflow.set_tracking_uri also sets: unset in every test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tracked_runs(uri: str, experiment_name: str) -> dict[str, Any]:
    """The experiment's MLflow runs by name, as mlflow.search_runs finds them."""
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.search_runs(experiment_names=[experiment_name], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)  # and so $MLFLOW_TRACKING_URI, which a later run would follow
    runs = {run.info.run_name: run for run in found}
    assert len(runs) == len(found), sorted(run.info.run_name for run in found)  # no run was made twice
    return runs


def history_of(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))


def check_tracked_run(uri: str, experiment_name: str, run_dir: Path) -> dict[str, Any]:
    """The run is the parent of a child per model, each with history.json's val_top1 per epoch; the students'
    children hold best_model.pth, the parent config.json, summary.json and report.html; all finished."""
    runs, client = tracked_runs(uri, experiment_name), mlflow.MlflowClient(uri)
    parent = runs[run_dir.name]
    assert utils.read_json(run_dir / tracking.STATE_FILE)["parent"] == parent.info.run_id
    for name in MODELS:
        child = runs[name]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        expected = [(epoch["epoch"], epoch["val"]["top1"])
                    for epoch in utils.read_json(run_dir / name / "history.json")["epochs"]]
        assert history_of(client, child.info.run_id, "val_top1") == expected
        assert history_of(client, parent.info.run_id, f"{name}/val_top1") == expected
        assert child.data.metrics["test_top1"] == utils.read_json(run_dir / name / "results.json")["test"]["top1"]
        artifacts = {info.path for info in client.list_artifacts(child.info.run_id, "model")}
        files = set() if name == "teacher" else {f"model/{file}" for file in tracking.MODEL_ARTIFACTS
                                                 if (run_dir / name / file).is_file()}
        assert artifacts == files and (name == "teacher" or "model/best_model.pth" in artifacts)
        assert child.info.status == "FINISHED"
    assert {info.path for info in client.list_artifacts(parent.info.run_id)} >= {"config.json", "summary.json",
                                                                                 "report.html"}
    assert parent.info.status == "FINISHED"
    return runs


def test_a_tracked_run_is_in_the_local_store_beside_the_runs(tiny_data, tmp_path):
    run_dir = tmp_path / "runs" / "local"
    assert experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *ONE_EPOCH, *SMALL_MODELS,
                            "--student-epochs", "2", "--export", "onnx", "--track", "mlflow"]) == 0
    uri = f"sqlite:///{tmp_path / 'runs' / tracking.LOCAL_STORE}"
    runs = check_tracked_run(uri, tiny_data.name, run_dir)  # the experiment is named after the data
    saved = utils.read_json(run_dir / "config.json")
    settings = {key: str(value) for key, value in saved.items() if key not in ("resolved", "dataset")}
    settings.update({f"resolved.{key}": str(value) for key, value in tracking.flattened(saved["resolved"]).items()})
    params = runs["local"].data.params
    assert {key: params[key] for key in settings} == settings
    assert params["dataset.class_names"] == str(saved["dataset"]["class_names"])
    summary = utils.read_json(run_dir / "summary.json")
    assert runs["student_kd"].data.tags["verdict"].startswith(("significant", "within noise"))
    assert runs["local"].data.metrics["kd_gain_top1"] == summary["kd_gain_top1"]
    assert runs["local"].data.tags["methods"] == "kd"
    child = runs["student_kd"].info.run_id
    assert {info.path for info in mlflow.MlflowClient(uri).list_artifacts(child, "model")} == {
        "model/best_model.pth", "model/model.onnx"}  # with --export onnx


def test_resume_continues_the_same_mlflow_run_without_repeating_an_epoch(tiny_data, tmp_path):
    run_dir = tmp_path / "runs" / "resumed"
    # Epochs to spare after the one interrupted: the run goes on while a loaded machine keeps this test from
    # reading its line, and must not have finished before the signal lands.
    flags = [*ONE_EPOCH, *SMALL_MODELS, "--student-epochs", "6", "--track", "mlflow"]
    process = subprocess.Popen([sys.executable, "-u", "experiment.py", "--data-dir", str(tiny_data), "--output-dir",
                                str(run_dir), *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # (the suite may run as a background job of a non-interactive shell, whose SIGINT a child inherits ignored)
    for line in process.stdout:
        if line.startswith("[student_baseline] epoch   2"):
            process.send_signal(signal.SIGINT)
    assert process.wait(timeout=600) == 130
    assert experiment.main(["--resume", str(run_dir)]) == 0
    runs = check_tracked_run(f"sqlite:///{tmp_path / 'runs' / tracking.LOCAL_STORE}", tiny_data.name, run_dir)
    assert sorted(runs) == sorted([*MODELS, "resumed"])  # one parent, one child per model: none made twice


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A real `mlflow server` on 127.0.0.1, its store and artifacts in `folder`; stopped and started again on the
    same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
             "1", "--backend-store-uri", f"sqlite:///{self.folder / 'store.db'}", "--artifacts-destination",
             str(self.folder / "artifacts")],
            stdout=open(self.folder / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"mlflow server did not answer in {SERVER_START_SECONDS} s")

    def stop(self) -> None:
        """The server and the workers it started, by their process group."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# The run waits after its teacher until the test has stopped the server (the file `go` exists).
PAUSED_AFTER_TEACHER = """
import os, sys, time
import experiment
train_students, go = experiment.train_students, sys.argv.pop(1)
def paused(*args, **kwargs):
    print("teacher trained", flush=True)
    while not os.path.exists(go):
        time.sleep(0.1)
    return train_students(*args, **kwargs)
experiment.train_students = paused
sys.exit(experiment.main(sys.argv[1:]))
"""


def snapshot(uri: str, experiment_name: str) -> dict[str, Any]:
    """Everything the store holds of an experiment's runs: params, tags, every metric's values, artifacts, status."""
    client = mlflow.MlflowClient(uri)
    return {name: (run.data.params, run.data.tags, run.info.status,
                   {key: history_of(client, run.info.run_id, key) for key in run.data.metrics},
                   sorted(info.path for info in client.list_artifacts(run.info.run_id)))
            for name, run in tracked_runs(uri, experiment_name).items()}


@pytest.mark.long
def test_a_server_down_mid_run_costs_one_warning_and_track_sync_sends_the_run_once(tiny_data, tmp_path):
    server, run_dir, go = Server(tmp_path / "server"), tmp_path / "runs" / "served", tmp_path / "go"
    try:
        server.start()
        process = subprocess.Popen(
            [sys.executable, "-u", "-c", PAUSED_AFTER_TEACHER, str(go), "--data-dir", str(tiny_data), "--output-dir",
             str(run_dir), *ONE_EPOCH, *SMALL_MODELS, "--track", "mlflow", "--tracking-uri", server.uri,
             "--experiment-name", "served"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in process.stdout:
            seen.append(line)
            if line.startswith("teacher trained"):
                break
        # Logged over HTTP while it trained:
        teacher = tracked_runs(server.uri, "served")["teacher"]
        assert history_of(mlflow.MlflowClient(server.uri), teacher.info.run_id, "val_top1") == [
            (1, utils.read_json(run_dir / "teacher" / "history.json")["epochs"][0]["val"]["top1"])]
        server.stop()
        go.touch()
        output = "".join(seen) + process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-3000:]
        assert output.count("warning: MLflow tracking") == 1, output
        assert f"--track-sync {run_dir}" in output and (run_dir / "summary.json").is_file()

        server.start()
        sync = [sys.executable, "experiment.py", "--track-sync", str(run_dir)]
        first = subprocess.run(sync, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stderr[-3000:]
        check_tracked_run(server.uri, "served", run_dir)
        sent = snapshot(server.uri, "served")
        second = subprocess.run(sync, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stderr[-3000:]
        assert snapshot(server.uri, "served") == sent
    finally:
        server.stop()


def test_a_sweep_is_a_parent_with_a_child_per_trial(tiny_data, tmp_path):
    run_dir = tmp_path / "runs" / "swept"
    assert experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *SWEEP_FLAGS, "--trials", "2",
                            "--track", "mlflow", "--experiment-name", "sweeps"]) == 0
    uri = f"sqlite:///{tmp_path / 'runs' / tracking.LOCAL_STORE}"
    runs, client = tracked_runs(uri, "sweeps"), mlflow.MlflowClient(uri)
    parent = runs["swept"]
    sweep = utils.read_json(run_dir / "summary.json")["sweep"]
    assert parent.data.tags["sweep"] == sweep["spec"]
    for trial in sweep["trials"]:
        child = runs[f"trial {trial['number']}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params == {key: str(value) for key, value in trial["params"].items()}
        assert child.data.tags["state"] == trial["state"]
        assert child.data.tags["pruned"] == str(trial["state"] == "pruned").lower()
        assert [value for _, value in history_of(client, child.info.run_id, "val_top1")] == trial["curve"]
    assert {"teacher", "student_baseline", "student_kd"} <= set(runs)
