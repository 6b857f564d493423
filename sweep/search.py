"""Hyper-parameter sweeps: which settings distil best, searched with Optuna on the validation split.

A sweep trains the teacher once (or takes --teacher-checkpoint), then one distilled student per
trial: the user's own settings first, then those Optuna's sampler draws from the --sweep spec. A
trial's objective is its best epoch's validation --select-metric; it reports every epoch's value, so
that the median pruner stops hopeless trials (from --prune-after on), and keeps which validation
images it got right, so that the best is compared with every other (sweep.noise). A trial's context
has no test loader: no trial can read the test split. experiment.py then tests the best trial's
student once, against a baseline trained with the same settings and seed.

A worker asks for --trials-per-pass trials at once and trains their students in one pass over the data
(training.lockstep: each batch drawn once, the teacher run once on it); a trial the pruner stops leaves
the pass, the others go on. Trials whose searched settings change the training batches train alone.

The trials are kept in an Optuna study: an SQLite file in the run directory (RUN/sweep.db) for one
worker, or a shared storage (an RDB URL, or a journal file on a shared filesystem) that several
workers join. The workers of a study share its run directory (on a filesystem all of them mount) and
take turns through file locks in RUN/trials/: the first to lock the teacher trains it while the
others wait; a trial is counted against the budget under a lock, so together they run exactly
--trials; one writes the report. A trial whose worker's lock is free (the worker was killed) is
marked failed and queued again at once; failing that (a lost machine), a trial whose heartbeat
stopped is, after study_storage.GRACE_SECONDS. The retry continues from the trial's last saved epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.storages._heartbeat import get_heartbeat_thread  # what Study.optimize runs beside its trial
from optuna.trial import FrozenTrial, TrialState
from torch import nn

import engine
import model_builder
import utils
from config import settings
from core import errors, paired_tests, records
from core.errors import SettingsError
from sweep import findings, noise, search_space, study_storage
from training import checkpoints, lockstep, model_run

TRIALS_DIR = "trials"  # RUN/trials/: each trial's student, the workers' locks, the study's run id
SQLITE_FILE = "sweep.db"  # the study of a sweep without --study-storage, in its run directory
POLL_SECONDS = 5  # how often a worker with no trial left to start looks whether the others' have ended
WORKER_ATTR = "worker"  # a running trial's user attribute: its worker's id, whose RUN/trials/worker_<id>.lock it holds
JOINED_KEPT = "trained by another worker of the sweep"  # why a joining worker keeps the teacher it finds


# ---------------------------------------------------------------- the plan and the storage


@dataclass
class Plan:
    """A sweep's plan, checked: the space, the budget, the objective and the study's storage."""

    spec: str
    space: dict[str, BaseDistribution]
    trials: int
    metric: str
    direction: str
    storage: optuna.storages.BaseStorage | None  # a shared study's storage, opened; None: RUN/sweep.db
    storage_shown: str | None  # --study-storage without its password
    study_name: str | None  # None: the run directory's name
    user_params: dict[str, Any]  # the user's own settings of the searched names, tried first
    user_outside: list[str]  # those outside their ranges ('name=value'): then no trial tries them


def prepare(config: settings.Config) -> tuple[settings.Config, Plan]:
    """The sweep's settings (a shared study's run directory defaults to runs/<study name>) and its plan.

    Everything is checked, and a shared storage opened, before any folder is made: a bad spec or an
    unreachable storage stops the run with one sentence (SettingsError).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SettingsError("A sweep runs one process per worker: start several workers (see docs/sweeps.md) "
                            "instead of torchrun.")
    space = search_space.parse_spec(config.sweep)
    search_space.check_ranges(config, space)
    name = config.study_name
    if name is not None and not re.fullmatch(r"\w[\w.-]*", name):  # never '..', '.' or a hidden folder's name
        raise SettingsError(f"--study-name must be letters, digits, '.', '_' or '-', starting with a letter or digit "
                            f"(got {utils.printable(name, 60)!r}).")
    storage = None
    if config.study_storage is not None:
        if name is None:
            raise SettingsError("--study-storage needs --study-name: the workers of a study find it by its name.")
        config = replace(config, output_dir=config.output_dir or str(Path("runs") / name))
        storage = study_storage.connect(config.study_storage)
    direction = "minimize" if config.select_metric == "loss" else "maximize"
    plan = Plan(config.sweep, space, config.trials, config.select_metric, direction, storage,
                settings.without_password(config.study_storage), name, *search_space.user_params(config, space))
    if storage is not None and name is not None:  # a study refused now leaves no run directory behind
        check_study_fits(study_attrs(storage, name), plan, Path(config.output_dir or ""), name)
    return config, plan


def study_attrs(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any]:
    """The user attributes of the study `name` in `storage` (none when it does not exist yet)."""
    try:
        return storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:
        return {}


def check_study_fits(attrs: dict[str, Any], plan: Plan, run_dir: Path, name: str, shown: str | None = None) -> None:
    """Refuse a study (its user attributes `attrs`) kept for another sweep (spec, metric), or whose trials are kept
    in another run directory than `run_dir` (its run id in RUN/trials/study_run_id)."""
    saved, shown = attrs.get("sweep"), shown or plan.storage_shown
    if saved is not None and saved != {"spec": plan.spec, "metric": plan.metric}:
        raise SettingsError(f"Study '{name}' in {shown} belongs to another sweep (spec {saved['spec']}, metric "
                            f"{saved['metric']}): give another --study-name.")
    run_id, id_file = attrs.get("run_id"), run_dir / TRIALS_DIR / "study_run_id"
    if run_id is not None and (not id_file.is_file() or id_file.read_text() != run_id):
        raise SettingsError(f"Study '{name}' keeps its trials in another run directory: every worker of a study is "
                            "given the same --output-dir, on a filesystem all of them mount.")


def joins_run(config: settings.Config, plan: Plan) -> bool:
    """Whether this worker joins a shared study's run directory that another worker made (True), or makes it.

    A run directory holding a run with other settings is refused (SettingsError).
    """
    path = Path(config.output_dir or "") / "config.json"
    if plan.storage is None or not path.is_file():
        return False
    saved, ours = utils.read_json(path), settings.saved_config(config)
    differ = sorted(key for key in settings.FIELDS
                    if key in saved and key != "output_dir" and saved[key] != ours[key])
    if differ:
        raise SettingsError(f"'{config.output_dir}' holds a run with other settings ({', '.join(differ)}): every "
                            "worker of a sweep is given the same settings.")
    return True


def resumed_storage(config: settings.Config, storage: str | None) -> settings.Config:
    """--resume RUN [--study-storage URL]: a password is never saved, so a study whose URL had one needs it again."""
    saved = config.study_storage
    if storage is None:
        if saved is not None and settings.HIDDEN in saved:
            raise SettingsError(f"The study storage {saved} had a password, which is never saved: resume with "
                                f"--resume {config.output_dir} --study-storage URL.")
        return config
    if config.sweep is None or settings.without_password(storage) != saved:
        raise SettingsError(f"--resume {config.output_dir} takes --study-storage only to give its sweep's storage "
                            f"again, with its password ({saved}).")
    return replace(config, study_storage=storage)


# ---------------------------------------------------------------- workers


@dataclass
class Search:
    """The sweep's outcome: its study, the best trial, where that trial's student was trained, and the run's
    context with that trial's settings (what the best student is tested and its baseline trained with)."""

    study: optuna.Study
    best: FrozenTrial
    folder: Path
    context: model_run.Context


def metric_value(metrics: dict[str, Any], metric: str) -> float:
    """A validation metric as the objective (an undefined F1 counts as 0, the worst)."""
    value = metrics[metric]
    return 0.0 if value is None else float(value)


class SweepStudy:
    """The study a worker shares with the others: its storage (RUN/sweep.db, which one worker holds alone, or the
    shared one), its checks (this sweep's, kept with this run directory), the trials a killed worker left, queued
    again, and the file locks in RUN/trials/ through which the workers take turns."""

    def __init__(self, run_dir: Path, plan: Plan, seed: int) -> None:
        self.run_dir, self.plan, self.seed = run_dir, plan, seed
        self.folder = run_dir / TRIALS_DIR
        self.name = plan.study_name or run_dir.name
        self.storage: optuna.storages.BaseStorage | None = plan.storage
        self._alone = study_storage.FileLock(self.folder / "sqlite.lock")
        self.worker_id = uuid.uuid4().hex
        self._worker = study_storage.FileLock(self._worker_lock_path(self.worker_id))  # held while this worker lives

    def _worker_lock_path(self, worker_id: str) -> Path:
        return self.folder / f"worker_{worker_id}.lock"

    def __enter__(self) -> SweepStudy:
        self.folder.mkdir(exist_ok=True)
        self._worker.acquire()
        if self.storage is None:
            # RUN/sweep.db serves one worker (docs/sweeps.md): any trial it lists as running was left by a killed one.
            if not self._alone.acquire(block=False):
                raise SettingsError(f"Another process is running the sweep in '{self.run_dir}'.")
            self.storage = study_storage.connect(f"sqlite:///{(self.run_dir / SQLITE_FILE).resolve()}")
        self.storage_shown = self.plan.storage_shown or f"sqlite:///{self.run_dir / SQLITE_FILE}"
        # Epochs are the pruner's steps; a trial's own first judged epoch (--prune-after) is kept by Objective.
        startup = settings.PRUNER_STARTUP_TRIALS
        with search_space.quiet_optuna():
            self.optuna = optuna.create_study(
                storage=self.storage, study_name=self.name, direction=self.plan.direction, load_if_exists=True,
                pruner=optuna.pruners.MedianPruner(n_startup_trials=startup, n_min_trials=startup))
        print(f"Sweep: {search_space.describe(self.plan.space)}; {self.plan.trials} trials judged by validation "
              f"{self.plan.metric} ({self.plan.direction}); study '{self.name}' in {self.storage_shown}")
        with self.budget_lock():
            self._check()
            self.queue_dead_workers_trials()
            if not self.optuna.get_trials(deepcopy=False):
                self._enqueue_user_settings()
        self.optuna.sampler = self._sampler()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._alone.release()
        self._worker.release()
        self._worker_lock_path(self.worker_id).unlink(missing_ok=True)

    def budget_lock(self) -> study_storage.FileLock:
        """RUN/trials/budget.lock, under which a trial is counted against --trials (held for moments: nothing said)."""
        return study_storage.FileLock(self.folder / "budget.lock")

    def exclusive(self, name: str) -> study_storage.FileLock:
        """RUN/trials/<name>.lock, held by one worker of the sweep at a time."""
        return study_storage.FileLock(self.folder / f"{name}.lock", f"[sweep] waiting for another worker ({name})")

    def once(self, name: str, step: Callable[[], Any]) -> Any:
        """`step()` done by one worker at a time: the first to lock `name` does the work, and the others, who
        wait for it, find it done (a worker killed meanwhile lets the next one continue it)."""
        with self.exclusive(name):
            return step()

    def _check(self) -> None:
        """The study must be this sweep's (its spec and metric), kept with this run directory (its run id)."""
        check_study_fits(self.optuna.user_attrs, self.plan, self.run_dir, self.name, self.storage_shown)
        if self.optuna.user_attrs.get("run_id") is None:
            id_file = self.folder / "study_run_id"
            run_id = id_file.read_text() if id_file.is_file() else uuid.uuid4().hex
            utils.write_text(id_file, run_id)
            self.optuna.set_user_attr("sweep", {"spec": self.plan.spec, "metric": self.plan.metric})
            self.optuna.set_user_attr("run_id", run_id)

    def _enqueue_user_settings(self) -> None:
        """A new study's first trial tries the user's own settings, so that the sweep answers whether the search
        beat them (unless one lies outside its range)."""
        shown = findings.params_text(self.plan.user_params)
        if self.plan.user_outside:
            print(f"[sweep] your settings ({shown}) are not tried: {', '.join(self.plan.user_outside)} lies outside "
                  "the searched range, so no trial says whether the search beat them")
            return
        self.optuna.enqueue_trial(self.plan.user_params, user_attrs={noise.USER_ATTR: True})
        print(f"[sweep] trial 0 tries your own settings ({shown}): the best trial is compared with it")

    def _sampler(self) -> optuna.samplers.BaseSampler:
        """TPE, drawing jointly (temperature and alpha interact), its first third of the trials (3 to 10) at random.

        With RUN/sweep.db it is seeded by --seed and the trials so far, so a resumed sweep draws new settings;
        a shared study's workers each draw their own.
        """
        seed = None
        if self.plan.storage is None:
            seed = int(np.random.SeedSequence([self.seed, len(self.optuna.trials)]).generate_state(1)[0])
        with search_space.quiet_optuna():
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, self.plan.trials // 3)),
                                              multivariate=True, constant_liar=True)

    def ask(self) -> optuna.Trial:
        """A trial this worker starts (a queued one first), marked as its own: called under the budget lock, before
        any other worker looks. Its heartbeat is kept by `heartbeats`, not by Study.optimize (hence no warning)."""
        with search_space.quiet_optuna(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Heartbeat of storage")
            trial = self.optuna.ask()
        trial.set_user_attr(WORKER_ATTR, self.worker_id)
        return trial

    @contextlib.contextmanager
    def heartbeats(self, trials: list[optuna.Trial]) -> Iterator[None]:
        """The trials' heartbeats recorded in the storage while they run (where it keeps them), as Study.optimize
        does for its one trial: a trial not heard from is failed and retried by the other workers."""
        study_id = self.storage.get_study_id_from_name(self.name)
        with contextlib.ExitStack() as beating:
            for trial in trials:
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                beating.enter_context(get_heartbeat_thread(trial_id, self.storage))
            yield

    def _worker_gone(self, trial: FrozenTrial) -> bool:
        """Whether a running trial's worker has ended: the kernel let its lock go (RUN/sweep.db: any running trial
        is a dead worker's, the study being this worker's alone)."""
        owner = trial.user_attrs.get(WORKER_ATTR)
        if owner == self.worker_id:
            return False
        if self.plan.storage is None:
            return True
        if owner is None:  # a trial started by an older version: its heartbeat decides
            return False
        lock = study_storage.FileLock(self._worker_lock_path(owner))
        if not lock.acquire(block=False):
            return False
        lock.release()
        self._worker_lock_path(owner).unlink(missing_ok=True)
        return True

    def queue_dead_workers_trials(self) -> None:
        """Fail, at once, the running trials whose worker was killed (no heartbeat grace to wait for: its lock is
        free), and queue each again, to go on from its last saved epoch. Called under the budget lock."""
        study_id = self.storage.get_study_id_from_name(self.name)
        for trial in self.optuna.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not self._worker_gone(trial):
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            if self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                study_storage.requeue(self.optuna, trial, "its worker was killed")

    def counts(self) -> tuple[int, int]:
        """The study's finished (complete or pruned) and running trials."""
        states = [trial.state for trial in self.optuna.get_trials(deepcopy=False)]
        return (sum(state in (TrialState.COMPLETE, TrialState.PRUNED) for state in states),
                states.count(TrialState.RUNNING))

    def best(self) -> FrozenTrial | None:
        """The complete trial with the best validation metric; ties go to the lower validation loss, then the
        earlier trial (as a model's best epoch is chosen)."""
        complete = [trial for trial in self.optuna.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if "val" in trial.user_attrs]
        if not complete:
            return None
        return max(complete, key=lambda trial: engine.selection_key(trial.user_attrs["val"], self.plan.metric))

    def frozen(self, trial: optuna.Trial) -> FrozenTrial:
        """A running trial's record in the study (with its system attributes)."""
        return self.optuna.get_trials(deepcopy=False)[trial.number]

    def trial_folder(self, trial: FrozenTrial) -> Path:
        """Where a trial trains its student: RUN/trials/<n>, n its first try's number (a retry continues there)."""
        return self.folder / str(trial.system_attrs.get("failed_trial", trial.number))


def trial_context(
    context: model_run.Context, dataset: records.DatasetRecord, config: settings.Config, test: bool,
) -> model_run.Context:
    """The run's context with a trial's settings; without a test loader unless `test` (trials never get one)."""
    weights = dataset.class_weights
    hard_loss = engine.hard_label_loss(config.label_smoothing, None if weights is None else list(weights.values()),
                                       context.device)
    loaders = {split: loader for split, loader in context.eval_loaders.items() if test or split != "test"}
    return replace(context, config=config, hard_loss=hard_loss, eval_loaders=loaders)


def first_judged(config: settings.Config) -> int:
    """The first epoch at which the pruner may stop a trial: --prune-after, by default half of its epochs (early
    epochs' scores still jump by several points)."""
    return config.prune_after if config.prune_after is not None else max(1, math.ceil(config.student_epochs / 2))


class Objective:
    """A pass of trials' work: for each trial a distilled student trained with the settings it draws, never seeing
    the test split, each epoch reported to the pruner; a trial's value is its best epoch's validation metric. The
    students of a pass train together (`lockstep.train_students`); each trial is told to the study as it ends."""

    def __init__(
        self, sweep: SweepStudy, context: model_run.Context, dataset: records.DatasetRecord, teacher: nn.Module,
        told: Callable[[optuna.Study, FrozenTrial], None],
    ) -> None:
        self.sweep, self.context, self.dataset, self.told = sweep, context, dataset, told
        self.teacher, self.teacher_logits = model_run.distillation_teacher(context, teacher)

    def ask(self, count: int) -> tuple[list[optuna.Trial], list[lockstep.Student]]:
        """`count` trials to train in one pass, and their students, each trial's settings drawn before the next is
        asked (the sampler's constant liar then keeps the next one away from them)."""
        trials, students = [], []
        for _ in range(count):
            trials.append(self.sweep.ask())
            students.append(self.student(trials[-1]))
        return trials, students

    def student(self, trial: optuna.Trial) -> lockstep.Student:
        """The student a trial trains, with the settings it draws; a pruned or diverged trial stops alone."""
        config = search_space.trial_config(self.context.config, search_space.suggest(trial, self.sweep.plan.space))
        context = trial_context(self.context, self.dataset, config, test=False)
        role = records.distilled_role(settings.kd_methods(config)[0])
        criterion, cached = model_run.student_criterion(context, role, self.teacher, self.teacher_logits)
        return lockstep.Student(
            f"trial {trial.number}", self.sweep.trial_folder(self.sweep.frozen(trial)), criterion, cached, context,
            self._reporter(trial, config.student_epochs, first_judged(config)),
            (optuna.TrialPruned, engine.NonFiniteLossError))

    def __call__(self, trials: list[optuna.Trial], students: list[lockstep.Student]) -> None:
        """Train the trials' students (`students`, in the trials' order); each trial is told as it ends. Stopped by
        Ctrl-C or SIGTERM, the trials not yet told are queued again, to go on from their last saved epoch."""
        by_name = dict(zip((student.name for student in students), trials, strict=True))
        config = self.context.config
        try:
            with self.sweep.heartbeats(trials):
                lockstep.train_students(
                    self.context, model_builder.architecture_name(config.student_model), config.seed, students,
                    lambda student, model, fit: self._complete(by_name[student.name], student, model, fit),
                    lambda student, stop: self._stopped(by_name[student.name], student, stop))
        except BaseException as error:
            self.context.saver.wait()  # the epoch saved last is on disk before another worker may continue from it
            for trial in trials:
                frozen = self.sweep.frozen(trial)
                if frozen.state != TrialState.RUNNING:
                    continue
                if isinstance(error, KeyboardInterrupt):
                    study_storage.requeue(self.sweep.optuna, frozen, "its worker was stopped")
                self.sweep.optuna.tell(trial, state=TrialState.FAIL)
            raise

    def _complete(self, trial: optuna.Trial, student: lockstep.Student, model: nn.Module,
                  fit: engine.FitResult) -> None:
        """A trained trial's value and what the sweep keeps of it (its validation metrics, time, right images)."""
        context = student.context
        context.saver.wait()
        (student.folder / checkpoints.TRAIN_STATE).unlink(missing_ok=True)
        best = fit.history[fit.best_epoch - 1]["val"]
        trial.set_user_attr("val", {key: best[key] for key in engine.SELECT_METRICS})
        trial.set_user_attr("seconds", round(sum(epoch["seconds"] for epoch in fit.history), 2))
        # A resumed trial whose best epoch came before the interruption has no outputs kept: predicted again.
        outputs = fit.best_val_outputs or engine.predict(model, context.eval_loaders["val"], context.device,
                                                         context.amp_dtype, f"{student.name} val")
        trial.set_user_attr(noise.CORRECT_ATTR, paired_tests.correct_flags(*outputs))
        self._tell(trial, metric_value(best, self.sweep.plan.metric))

    def _stopped(self, trial: optuna.Trial, student: lockstep.Student, stop: Exception) -> None:
        """A trial the pruner stopped, or whose loss diverged (a note says so): pruned, its student deleted."""
        student.context.saver.wait()
        shutil.rmtree(student.folder, ignore_errors=True)  # a stopped trial's student is never used
        if isinstance(stop, engine.NonFiniteLossError):
            trial.set_user_attr("note", errors.one_line(stop))
        self._tell(trial, state=TrialState.PRUNED)

    def _tell(self, trial: optuna.Trial, value: float | None = None, state: TrialState | None = None) -> None:
        """Tell the study how a trial ended, and the console."""
        self.sweep.optuna.tell(trial, value, state)
        self.told(self.sweep.optuna, self.sweep.frozen(trial))

    def _reporter(self, trial: optuna.Trial, epochs: int, judged_from: int) -> model_run.EpochLog:
        """Each epoch's validation value, reported to the pruner, which may stop the trial (optuna.TrialPruned) from
        epoch `judged_from` on, before its last epoch (stopping it then would save nothing)."""

        @checkpoints.finish_before_interrupt  # a stop signal waits for the storage's write to finish
        def report(record: dict[str, Any]) -> None:
            trial.report(metric_value(record["val"], self.sweep.plan.metric), record["epoch"])
            # The time trained so far (a retry starts from its parent's): what a killed trial is said to have taken.
            trial.set_user_attr("seconds", round(trial.user_attrs.get("seconds", 0.0) + record["seconds"], 2))
            if judged_from <= record["epoch"] < epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']}")

        return report


class Outcome:
    """What the sweep tells: a console line per ended trial, the best trial as the search's outcome, and the
    sweep's record in the run's summary."""

    def __init__(self, sweep: SweepStudy, context: model_run.Context, dataset: records.DatasetRecord) -> None:
        self.sweep, self.context, self.dataset = sweep, context, dataset

    def progress(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """The console's line for a trial that ended."""
        plan, record, best = self.sweep.plan, findings.trial_record(trial), self.sweep.best()
        if trial.state == TrialState.COMPLETE:
            outcome = f"validation {plan.metric} {record.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            outcome = record.note or (f"stopped after epoch {record.epochs}, validation {plan.metric} "
                                      f"{record.curve[-1]:.4f} worse than the median")
        else:
            outcome = "failed"
        took = "" if record.seconds is None else f", {utils.format_seconds(record.seconds)}"
        best_text = "" if best is None else f"; best so far: trial {best.number} ({best.value:.4f})"
        print(f"[sweep] trial {trial.number} {record.state}: {outcome} | {findings.params_text(record.params)} | "
              f"{record.epochs} epoch{'s' if record.epochs != 1 else ''}{took} | {self.sweep.counts()[0]} of "
              f"{plan.trials} trials finished{best_text}", flush=True)

    def search(self) -> Search:
        """The best trial, its student's folder and the run's context with its settings."""
        best = self.sweep.best()
        if best is None:
            raise SettingsError(f"No trial of the sweep finished training ({self.sweep.counts()[0]} were stopped): "
                                "lower --student-lr or narrow the ranges.")
        config = search_space.trial_config(self.context.config, best.params)
        context = trial_context(self.context, self.dataset, config, test=True)
        print(f"[sweep] best: trial {best.number}, validation {self.sweep.plan.metric} {best.value:.4f}: "
              f"{findings.params_text(best.params)}")
        return Search(self.sweep.optuna, best, self.sweep.trial_folder(best), context)

    def reported(self) -> bool:
        """Whether another worker has written the sweep's report already (then said so)."""
        if not utils.holds_json(self.context.run_dir / "summary.json"):  # a torn one is written again
            return False
        print(f"The sweep is finished: another worker wrote its report, {self.context.run_dir / 'report.html'}")
        return True

    def complete(self, summary: records.RunSummary, search: Search) -> None:
        """The summary of the best trial's run gains the sweep's record and its sanity warnings."""
        plan = self.sweep.plan
        summary.sweep = replace(
            findings.record(search.study, search.best, plan.space, plan.trials, plan.metric, self.sweep.storage_shown,
                            self.sweep.name, plan.spec),
            **noise.comparisons(search.study.get_trials(deepcopy=False), search.best))
        for line in findings.verdict(summary.sweep):
            print(f"[sweep] {line}")
        summary.warnings += findings.sanity_warnings(summary.sweep)


class Worker:
    """This process's part in a sweep: the study it opens (`study`), the trials it runs with the other workers
    until the study holds --trials finished ones, and what it tells of them (`outcome`)."""

    def __init__(self, context: model_run.Context, plan: Plan, dataset: records.DatasetRecord) -> None:
        self.context, self.dataset = context, dataset
        self.study = SweepStudy(context.run_dir, plan, context.config.seed)
        self.outcome = Outcome(self.study, context, dataset)

    def __enter__(self) -> Worker:
        self.study.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.study.__exit__(*exc_info)

    def run_trials(self, teacher: nn.Module) -> Search:
        """Run trials, up to `trials_per_pass` at once, until the study holds --trials finished ones (complete or
        pruned), with the other workers; then wait for the others' last trials, and return the search's outcome."""
        objective = Objective(self.study, self.context, self.dataset, teacher, self.outcome.progress)
        per_pass, trials = trials_per_pass(self.context.config, self.study.plan.space), self.study.plan.trials
        budget, waiting = self.study.budget_lock(), False
        while True:
            budget.acquire()
            try:
                self.study.queue_dead_workers_trials()  # at once when their workers' locks say so
                with search_space.quiet_optuna():
                    optuna.storages.fail_stale_trials(self.study.optuna)  # else after the heartbeat's grace
                finished, running = self.study.counts()
                if finished >= trials:
                    break
                if finished + running < trials:
                    # Each trial exists, this worker's, before the lock goes: no two workers take the last place.
                    asked, students = objective.ask(min(per_pass, trials - finished - running))
                    budget.release()
                    objective(asked, students)
                    waiting = False
                    continue
            finally:
                budget.release()
            if not waiting:
                print(f"[sweep] the last trials run on other workers: waiting for them ({finished} of {trials} "
                      "finished)", flush=True)
                waiting = True
            time.sleep(POLL_SECONDS)
        return self.outcome.search()


def trials_per_pass(config: settings.Config, space: dict[str, BaseDistribution]) -> int:
    """The trials a pass trains: --trials-per-pass, or 1 (said so) when a searched setting changes the training
    batches (`search_space.stream_changing`), since trials that draw different batches cannot share a pass."""
    changing = search_space.stream_changing(config, space)
    if config.trials_per_pass > 1 and changing:
        print(f"[sweep] each trial trains alone: the searched {', '.join(changing)} change"
              f"{'s' if len(changing) == 1 else ''} the training batches, which the trials of a pass share "
              f"(--trials-per-pass {config.trials_per_pass} unused)")
        return 1
    return config.trials_per_pass
