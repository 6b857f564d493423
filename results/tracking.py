"""MLflow tracking (--track mlflow): a run as an MLflow run, with a child run per model and per sweep trial.

The run's own files stay the record; MLflow gets a copy. While the run trains, each epoch goes to its model's
child (and, prefixed by the model's name, to the parent, which is what the UI compares side by side); when the
run ends, `Tracker.sync` sends whatever the files hold that the tracking store has not got yet: the settings
(config.json), every epoch (history.json), the test metrics, gains and verdicts (summary.json), the sweep's
trials and the artifacts. `--track-sync RUN` runs the same sync later, so it is idempotent by construction:
a step, parameter, metric or artifact already in the store is never sent again.

A store that is down or refuses costs one warning: the first failed call stops tracking for the rest of the
process, and the run goes on. The parent's id is kept in RUN/mlflow.json, so --resume and --track-sync continue
the same MLflow run; children are found through their tags, never through ids kept here. A tracking URI's
password is never written (RUN/mlflow.json and config.json hold it masked). MLflow is imported only here, and
only when tracking is on: it is an optional package (requirements-dev.txt).
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import utils
from config import settings
from core import compute, errors, records, secrets
from results import significance
from training import checkpoints, model_run

STATE_FILE = "mlflow.json"  # RUN/mlflow.json: the store's URI (masked), the experiment and the parent run's id
LOCAL_STORE = "mlflow.db"  # the default store, an SQLite file beside the runs (runs/mlflow.db)
LOCAL_ARTIFACTS = "mlartifacts"  # an SQLite store's artifacts, beside it
MODEL_TAG = "kd.model"  # a child's model name ("student_kd", "trial 3"): how a sync finds it again
MARKER = "val_loss"  # logged in every epoch's batch: the steps it has are the epochs the store holds
# A store that does not answer must cost seconds, not MLflow's default of 7 retries with backoff (minutes).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
BATCH = 200  # metrics per request (MLflow takes at most 1000)
ARTIFACTS = ("report.html", "summary.json", "config.json")  # the parent's
MODEL_ARTIFACTS = ("best_model.pth", "model.onnx")  # each student's, when its folder holds them
TRIAL_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "fail": "FAILED"}


def store_uri(run_dir: Path, given: str | None) -> str:
    """Where the run is tracked: `given`, else $MLFLOW_TRACKING_URI, else runs/mlflow.db beside the run."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve().parent / LOCAL_STORE}"


def experiment_name(saved: dict[str, Any]) -> str:
    """--experiment-name, else the data's name: its folder's, or "digits" for the bundled dataset (`saved`: the
    run's settings, as config.json holds them)."""
    if saved.get("experiment_name"):
        return saved["experiment_name"]
    data = saved.get("data_dir") or saved.get("train_dir") or saved.get("test_dir")
    return "digits" if data is None else Path(data).resolve().name


def code_commit() -> str | None:
    """The commit of the code that runs, when it sits in a git checkout (None elsewhere)."""
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                               capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() if found.returncode == 0 else None


def flattened(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys ({"resolved": {"device": "cpu"}} -> {"resolved.device": "cpu"})."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what MLflow can plot."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    """One epoch's numbers as metric keys: train_loss, val_top1, lr, seconds, ... (undefined ones left out)."""
    metrics = {f"{split}_{name}": value for split in ("train", "val") for name, value in record.get(split, {}).items()
               if is_number(value)}
    # --eval-test-every-epoch's figure, named apart from the final test metrics (which have no step).
    metrics.update({f"test_each_epoch_{name}": value for name, value in record.get("test", {}).items()
                    if is_number(value)})
    metrics.update({key: record[key] for key in ("lr", "seconds") if is_number(record.get(key))})
    return metrics


def run_params(run_dir: Path, commit: str | None) -> dict[str, str]:
    """The parent's parameters: every setting and resolved value of config.json, the data's description, the commit."""
    saved = utils.read_json(run_dir / "config.json")
    params = {key: value for key, value in saved.items() if key not in ("resolved", "dataset")}
    params.update(flattened(saved.get("resolved", {}), "resolved."))
    params.update(flattened(saved.get("dataset", {}), "dataset."))
    if commit:
        params["code_commit"] = commit
    return {key: str(value)[:6000] for key, value in params.items()}  # MLflow's longest parameter value


class Tracker:
    """One run's MLflow runs. Live (`strict` False): the first failure warns once and stops tracking; a sync
    (`strict`): a failure is a SettingsError."""

    def __init__(self, run_dir: Path, uri: str, experiment: str, strict: bool = False) -> None:
        for key, value in HTTP_LIMITS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        self.run_dir, self.uri, self.experiment, self.strict = run_dir, uri, experiment, strict
        self.client = MlflowClient(tracking_uri=uri)
        self.failed = False
        self.children: dict[str, str] = {}  # model name -> its child run's id
        self.parent: str | None = None

    # ---------------------------------------------------------------- calls that may fail

    def attempt(self, what: str, action: Callable[[], Any]) -> Any:
        """`action()`, or (store down or refusing) one warning and no tracking from then on; None when it failed."""
        if self.failed:
            return None
        try:
            # Ctrl-C held back during the call: sqlite turns one that lands in a query into an error of its own,
            # which would read as a failed store and lose the interrupt.
            return checkpoints.finish_before_interrupt(action)()
        except Exception as error:  # noqa: BLE001 -- any failure of the store (HTTP, SQL, refusal) is the same to us
            self.failed = True
            shown = secrets.scrubbed(errors.one_line(error, limit=300), self.uri)
            where = secrets.masked_url(self.uri)
            if self.strict:
                raise errors.SettingsError(f"MLflow at {where} failed while {what}: {shown}") from None
            print(f"warning: MLflow tracking at {where} failed while {what} ({shown}); the run goes on without it: "
                  f"send it once finished with python experiment.py --track-sync {self.run_dir}", flush=True)
            return None

    # ---------------------------------------------------------------- the parent and its children

    def open(self, commit: str | None = None) -> Tracker:
        """Find the run's parent in the store (RUN/mlflow.json) or create it, with the run's settings."""
        self.attempt("opening the run", lambda: self._open(commit))
        return self

    def _open(self, commit: str | None) -> None:
        path = self.run_dir / STATE_FILE
        state = utils.read_json(path) if utils.holds_json(path) else {}
        shown = secrets.masked_url(self.uri)
        if state.get("uri") == shown and state.get("parent") and self._exists(state["parent"]):
            self.parent = state["parent"]
        else:
            self.parent = self.client.create_run(self._experiment_id(), run_name=self.run_dir.name,
                                                 tags={"run_dir": str(self.run_dir.resolve())}).info.run_id
        commit = commit or state.get("commit")
        utils.write_json(path, {"uri": shown, "experiment": self.experiment, "parent": self.parent, "commit": commit})
        self.children = {run.data.tags[MODEL_TAG]: run.info.run_id for run in self.client.search_runs(
            [self._experiment_id()], f"tags.`mlflow.parentRunId` = '{self.parent}'") if MODEL_TAG in run.data.tags}
        self._log_new(self.parent, params=run_params(self.run_dir, commit))

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        # An SQLite store keeps its artifacts beside it (MLflow's default would be ./mlruns, wherever the run starts).
        local = self.uri.startswith("sqlite:///")
        location = (Path(self.uri.removeprefix("sqlite:///")).parent / LOCAL_ARTIFACTS).as_uri() if local else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def child(self, name: str) -> str:
        """The id of model `name`'s child run, created (nested under the parent) the first time."""
        if name not in self.children:
            run = self.client.create_run(self.client.get_run(self.parent).info.experiment_id, run_name=name,
                                         tags={"mlflow.parentRunId": self.parent, MODEL_TAG: name})
            self.children[name] = run.info.run_id
        return self.children[name]

    # ---------------------------------------------------------------- logging only what is missing

    def _log_new(self, run_id: str, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
                 tags: dict[str, str] | None = None) -> None:
        """Parameters and step-less metrics the run has not got yet, and tags (setting one again changes nothing)."""
        from mlflow.entities import Metric, Param, RunTag

        data = self.client.get_run(run_id).data
        now = int(time.time() * 1000)
        new_params = [Param(key, value) for key, value in (params or {}).items() if key not in data.params]
        new_metrics = [Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()
                       if key not in data.metrics]
        new_tags = [RunTag(key, value) for key, value in (tags or {}).items() if data.tags.get(key) != value]
        for start in range(0, max(len(new_params), len(new_metrics), len(new_tags)), 100):
            self.client.log_batch(run_id, metrics=new_metrics[start:start + 100], params=new_params[start:start + 100],
                                  tags=new_tags[start:start + 100])

    def _log_epochs(
        self, run_id: str, epochs: Iterable[dict[str, Any]], prefix: str = "", marker: str = MARKER,
    ) -> None:
        """Each epoch's metrics (step: the epoch) that the run lacks; one epoch is one request, so the steps of
        `marker` are the epochs already there."""
        from mlflow.entities import Metric

        logged = {metric.step for metric in self.client.get_metric_history(run_id, prefix + marker)}
        now = int(time.time() * 1000)
        for record in epochs:
            if record["epoch"] in logged:
                continue
            batch = [Metric(prefix + key, float(value), now, record["epoch"])
                     for key, value in epoch_metrics(record).items()]
            for start in range(0, len(batch), BATCH):
                self.client.log_batch(run_id, metrics=batch[start:start + BATCH])

    def __call__(self, name: str) -> model_run.EpochLog:
        """A callback sending each epoch of model `name` to its child, and prefixed (`student_kd/val_top1`) to the
        parent."""

        def log(record: dict[str, Any]) -> None:
            if self.parent is None:
                return
            self.attempt(f"logging {name}'s epoch {record['epoch']}", lambda: (
                self._log_epochs(self.child(name), [record]), self._log_epochs(self.parent, [record], f"{name}/")))

        return log

    # ---------------------------------------------------------------- the whole run, from its files

    def sync(self) -> bool:
        """Send what the run's files hold and the store lacks, then mark the runs finished; whether it all went."""
        if self.parent is None:
            return False
        self.attempt("sending the finished run", self._sync)
        return not self.failed

    def _sync(self) -> None:
        summary = utils.read_json(self.run_dir / "summary.json")
        for name, folder, first_seed in model_folders(self.run_dir, summary):
            row = utils.read_json(folder / "results.json") if (folder / "results.json").is_file() else {}
            # summary.json's row of a role is its first seed's, with the gain over the seeds and the speeds.
            self._sync_model(name, folder, {**row, **summary[records.role_of(name)]} if first_seed else row)
        for trial in (summary.get("sweep") or {}).get("trials", []):
            self._sync_trial(trial, summary["sweep"]["metric"])
        run_metrics = {key: value for key, value in summary.items() if is_number(value)}
        methods = [records.method_of(role) for role in summary if records.is_distilled(role)]
        tags = {"methods": ",".join(methods), "run_dir": str(self.run_dir.resolve())}
        tags.update({f"{role}.verdict": text for role in summary if (text := verdict_text(summary[role]))})
        if summary.get("sweep"):
            tags["sweep"] = summary["sweep"]["spec"]
        self._log_new(self.parent, metrics=run_metrics, tags=tags)
        self._log_artifacts(self.parent, [self.run_dir / name for name in ARTIFACTS], "")
        for run_id in [*self.children.values(), self.parent]:
            self._finish(run_id, "FINISHED")

    def _sync_model(self, name: str, folder: Path, row: dict[str, Any]) -> None:
        """A model's epochs, test metrics (and gain, verdict, speed: `row`), settings and files."""
        history = utils.read_json(folder / "history.json")
        role = records.role_of(name)
        child = self.child(name)
        self._log_epochs(child, history["epochs"])
        self._log_epochs(self.parent, history["epochs"], f"{name}/")
        final = {key: value for key, value in row.items() if is_number(value)}
        final.update({f"test_{key}": value for key, value in row.get("test", {}).items() if is_number(value)})
        tags = {"role": role, "best_epoch": str(history.get("best_epoch"))}
        if verdict := verdict_text(row):
            tags["verdict"] = verdict
        self._log_new(child, params={"arch": str(row.get("arch", "")), "role": role}, metrics=final, tags=tags)
        self._log_new(self.parent, metrics={f"{name}/{key}": value for key, value in final.items()})
        if role.startswith(records.STUDENT_PREFIX):
            self._log_artifacts(child, [folder / artifact for artifact in MODEL_ARTIFACTS], "model")

    def _sync_trial(self, trial: dict[str, Any], metric: str) -> None:
        child = self.child(f"trial {trial['number']}")
        curve = [{"epoch": epoch, "val": {metric: value}} for epoch, value in enumerate(trial["curve"], start=1)]
        self._log_epochs(child, curve, marker=f"val_{metric}")
        tags = {"state": trial["state"], "pruned": str(trial["state"] == "pruned").lower()}
        if trial.get("note"):
            tags["note"] = str(trial["note"])
        final = {"value": trial["value"]} if is_number(trial.get("value")) else {}
        self._log_new(child, params={key: str(value) for key, value in trial["params"].items()}, metrics=final,
                      tags=tags)
        self._finish(child, TRIAL_STATUS.get(trial["state"], "FAILED"))

    def _log_artifacts(self, run_id: str, paths: list[Path], under: str) -> None:
        """The files that exist and that the run's artifacts (in `under`) lack."""
        present = {Path(info.path).name for info in self.client.list_artifacts(run_id, under or None)}
        for path in paths:
            if path.is_file() and path.name not in present:
                self.client.log_artifact(run_id, str(path), under or None)

    def _finish(self, run_id: str, status: str) -> None:
        if self.client.get_run(run_id).info.status != status:
            self.client.set_terminated(run_id, status)


def verdict_text(row: Any) -> str | None:
    """A distilled student's verdict on its gain over the baseline ('significant (p = 0.01)'); None for others."""
    if not isinstance(row, dict):
        return None
    p = row.get("gain_top1_p", row.get("mcnemar_p"))
    return None if p is None else significance.verdict(p, row.get("gain_significant"))


def model_folders(run_dir: Path, summary: dict[str, Any]) -> list[tuple[str, Path, bool]]:
    """Every trained model of a finished run: (its name, its folder, whether of the first seed), the teacher first."""
    seeds = summary.get("seeds") or [0]
    found = [(records.TEACHER, run_dir / records.TEACHER, True)]
    for role in summary:
        if role.startswith(records.STUDENT_PREFIX):
            found += [(records.model_name(role, seed, seeds), records.model_folder(run_dir, role, seed, seeds),
                       seed == seeds[0]) for seed in seeds]
    return [(name, folder, first) for name, folder, first in found if (folder / "history.json").is_file()]


# ---------------------------------------------------------------- what experiment.py calls


def start(run_dir: Path, config: settings.Config) -> Tracker | None:
    """The tracker of a run with --track mlflow (None without it), its parent run found or created. A saved URI
    whose password was masked is taken from $MLFLOW_TRACKING_URI when that is the same URI."""
    if config.track != "mlflow":
        return None
    given = config.tracking_uri
    if given is not None and secrets.HIDDEN in given:
        from_env = os.environ.get("MLFLOW_TRACKING_URI")
        if from_env is None or secrets.masked_url(from_env) != given:
            print(f"warning: the tracking URI {given} had a password, which is never saved: this sitting is not "
                  f"tracked; send the run once finished with python experiment.py --track-sync {run_dir} "
                  "--tracking-uri URL", flush=True)
            return None
        given = from_env
    tracker = Tracker(run_dir, store_uri(run_dir, given), experiment_name(vars(config))).open(code_commit())
    if tracker.parent is not None:
        print(f"Tracked in MLflow at {secrets.masked_url(tracker.uri)}: experiment {tracker.experiment!r}, run "
              f"{tracker.parent}")
    return tracker


def attach(context: model_run.Context) -> model_run.Context:
    """The run's context, with --track mlflow (on rank 0) its tracker watching every model's epochs."""
    tracker = start(context.run_dir, context.config) if compute.is_main_process() else None
    return context if tracker is None else replace(context, epoch_observer=tracker)


def finish(context: model_run.Context) -> None:
    """With --track mlflow, send the finished run's files (what the store lacks) and close its MLflow runs."""
    if isinstance(context.epoch_observer, Tracker):
        context.epoch_observer.sync()


def sync_finished_run(run_dir: Path, uri: str | None, experiment: str | None) -> str:
    """--track-sync RUN: send a finished run to MLflow (to `uri`, else where it was tracked); one sentence on it."""
    if not utils.holds_json(run_dir / "summary.json"):
        raise errors.SettingsError(f"--track-sync '{run_dir}' is not a finished run directory (no summary.json).")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise errors.SettingsError(f"--track-sync needs MLflow: {settings.MLFLOW_INSTALL}") from None
    state = utils.read_json(run_dir / STATE_FILE) if utils.holds_json(run_dir / STATE_FILE) else {}
    saved = state.get("uri")
    if uri is None and saved is not None and secrets.HIDDEN not in saved:
        uri = saved
    elif uri is None and saved is not None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None or secrets.masked_url(uri) != saved:
            raise errors.SettingsError(f"The run was tracked at {saved}, whose password is never saved: give "
                                       f"--tracking-uri URL (or $MLFLOW_TRACKING_URI) again.")
    name = experiment or state.get("experiment") or experiment_name(utils.read_json(run_dir / "config.json"))
    tracker = Tracker(run_dir, store_uri(run_dir, uri), name, strict=True).open()
    tracker.sync()
    return (f"Run {run_dir} is in MLflow at {secrets.masked_url(tracker.uri)}: experiment {name!r}, run "
            f"{tracker.parent}.")
