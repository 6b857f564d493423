"""A sweep's study storage and the workers' locks: a study opened with heartbeats (Optuna's RDB storage, or its
journal file with the heartbeat this module adds), a stopped trial queued again and said so, and the file locks
through which the workers sharing a run directory take turns.
"""

from __future__ import annotations

import fcntl
import re
import time
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages._heartbeat import BaseHeartbeat  # Optuna's heartbeat protocol (its journal storage has none)
from optuna.trial import FrozenTrial, TrialState

from config import settings
from core import errors, secrets
from core.errors import SettingsError
from sweep import search_space

HEARTBEAT_SECONDS = 20  # a running trial's worker records that it is alive this often
GRACE_SECONDS = 120  # a running trial not heard from for this long is failed and queued again
MAX_RETRIES = 3  # times one trial is queued again after its worker died or was stopped
HEARTBEAT_ATTR = "heartbeat:"  # + trial id: a journal trial's last heartbeat (a retry copies its parent's attrs)


def retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """What queues a stopped trial again: the same settings, its reported epochs kept, at most MAX_RETRIES times."""
    with search_space.quiet_optuna():
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES, inherit_intermediate_values=True)


def requeue(study: optuna.Study, trial: FrozenTrial, why: str) -> None:
    """Queue a failed trial again (retry_callback) and say so, with why it failed and the retry's number."""
    retry_callback()(study, trial)
    if len(trial.system_attrs.get("retry_history", [])) < MAX_RETRIES:
        queued = (f"queued again as trial {study.get_trials(deepcopy=False)[-1].number}, to continue from its last "
                  "saved epoch")
    else:
        queued = f"not queued again: it was tried {MAX_RETRIES + 1} times"
    print(f"[sweep] trial {trial.number} failed ({why}); {queued}", flush=True)


def requeue_silent(study: optuna.Study, trial: FrozenTrial) -> None:
    """The storages' callback for a trial whose heartbeat stopped (Optuna's fail_stale_trials has failed it)."""
    requeue(study, trial, f"its worker was not heard from for {GRACE_SECONDS} seconds")


class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's journal-file storage with the heartbeat Optuna gives its RDB storage only: while a trial runs,
    its worker records the time in the trial's system attributes every HEARTBEAT_SECONDS, and a running trial
    not heard from for GRACE_SECONDS is stale, so Optuna's fail_stale_trials fails it and the retry callback
    queues it again. The times are the workers' clocks: keep the machines' clocks in step (NTP)."""

    def __init__(self, path: str, stale_callback: Callable[[optuna.Study, FrozenTrial], None]) -> None:
        super().__init__(optuna.storages.journal.JournalFileBackend(path))
        self._stale_callback = stale_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, f"{HEARTBEAT_ATTR}{trial_id}", time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = self.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            last = trial.system_attrs.get(f"{HEARTBEAT_ATTR}{trial_id}", trial.datetime_start.timestamp())
            if now - last > GRACE_SECONDS:
                stale.append(trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        return HEARTBEAT_SECONDS

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        return self._stale_callback


def _scrubbed(text: str, url: str) -> str:
    """An error message about `url` with every form of its password hidden."""
    return re.sub(r"\s*\(Background on this error at: \S+\)", "", secrets.scrubbed(text, url))


def connect(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage at `url`, with heartbeats: an RDB URL (scheme://...), else a journal file's path.

    SettingsError, with the password hidden, when it cannot be opened (no server, no driver, no folder).
    """
    try:
        with search_space.quiet_optuna():
            if "://" in url:
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                                  heartbeat_stale_trial_callback=requeue_silent)
            return HeartbeatJournalStorage(url, requeue_silent)
    except Exception as error:  # whatever the database or its driver raises: the user's storage to fix
        hint = " (install the database's driver: pip install 'psycopg[binary]' for PostgreSQL, as requirements.txt " \
            "does; pymysql for MySQL)" if isinstance(error, ImportError) else ""
        raise SettingsError(f"Cannot open the study storage {settings.without_password(url)}: "
                            f"{_scrubbed(errors.one_line(error, brief=True), url)}{hint}.") from None


class FileLock:
    """An exclusive lock on a file (fcntl.flock) that the processes sharing its filesystem take in turns; the
    kernel releases it when its process ends, however it ends (a killed worker's lock is not left behind)."""

    def __init__(self, path: Path, waiting: str | None = None) -> None:
        self.path, self.waiting = path, waiting  # waiting: printed when another process holds it
        self._handle = None

    def acquire(self, block: bool = True) -> bool:
        """Take the lock (waiting for it with `block`); whether it was taken."""
        handle = open(self.path, "a")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not block:
                    handle.close()
                    return False
                if self.waiting:
                    print(self.waiting, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:  # Ctrl-C or SIGTERM while waiting
            handle.close()
            raise
        self._handle = handle
        return True

    def release(self) -> None:
        """Let the lock go (closing the file does); releasing twice is harmless."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
