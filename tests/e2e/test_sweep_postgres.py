"""A sweep's shared study on a real PostgreSQL server: a private one started for the test (the machine's initdb and
pg_ctl, as an unprivileged user when the tests run as root, on a free port of 127.0.0.1, its own data directory,
stopped at the end), two workers on one study, one SIGKILLed in the middle of a trial."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import optuna
import pytest
from conftest import PASSWORD
from test_sweep import worker

from sweep import search_space

pytestmark = pytest.mark.e2e

SERVER_USER = "kd_sweep"  # the database role the workers log in as, with PASSWORD


def server_binaries() -> tuple[str, str]:
    """initdb and pg_ctl: on PATH or in Debian's versioned folder; a missing one fails under CI=true, else skips."""
    found = [shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
             for name in ("initdb", "pg_ctl")]
    if all(found):
        return str(found[0]), str(found[1])
    why = "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: CI must run the PostgreSQL test (install postgresql)")
    pytest.skip(f"{why}: install postgresql to run this test")


def unprivileged() -> list[str]:
    """The prefix that runs a command as an unprivileged user when the tests run as root (PostgreSQL refuses
    root); nothing otherwise."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
    pytest.skip("running as root with neither a postgres nor a nobody account to run PostgreSQL as")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """postgresql://kd_sweep:PASSWORD@127.0.0.1:PORT/postgres on a private server, stopped and removed after."""
    initdb, pg_ctl = server_binaries()
    as_user = unprivileged()
    home = Path(tempfile.mkdtemp(prefix="kd-postgres-"))  # outside pytest's root-only folder: the server reads it
    data, password_file = home / "data", home / "password"
    password_file.write_text(PASSWORD)
    if as_user:
        uid, gid = (int(part.split("=")[1]) for part in as_user[1:3])
        os.chown(home, uid, gid)
        os.chown(password_file, uid, gid)
    port = free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", SERVER_USER, "--auth=scram-sha-256",
                        f"--pwfile={password_file}"], check=True, capture_output=True)
        password_file.unlink()  # the password is in no file while the workers run
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(home / "server.log"), "-w", "-t", "30", "-o",
                        f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"], check=True,
                       capture_output=True)
        yield f"postgresql://{SERVER_USER}:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


KILL_IN_FIRST_TRIAL = """
import os, signal
from training import checkpoints
save = checkpoints.BackgroundSaver.save
def hooked(self, files):
    save(self, files)
    if any(path.name == "train_state.pth" and path.parent.parent.name == "trials" for path in files):
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.BackgroundSaver.save = hooked
"""
NO_HEARTBEAT_GRACE = "from sweep import study_storage\nstudy_storage.GRACE_SECONDS = 3600"


def test_two_workers_on_postgresql_one_killed_mid_trial(postgres_url, tiny_data, tmp_path):
    """The killed worker's trial is failed and retried at once (the survivor may not wait for a heartbeat grace of
    an hour): exactly --trials finish, and the password is in no file and no console line."""
    run_dir = tmp_path / "run"
    flags = ["--trials", "2", "--student-epochs", "2", "--study-storage", postgres_url, "--study-name", "pg"]
    killed = worker(tiny_data, run_dir, flags, KILL_IN_FIRST_TRIAL)
    deadline = time.monotonic() + 120
    while not (run_dir / "config.json").is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    survivor = worker(tiny_data, run_dir, flags, NO_HEARTBEAT_GRACE)
    started = time.monotonic()
    outputs = [killed.communicate(timeout=300)[0], survivor.communicate(timeout=300)[0]]
    print(f"two workers on PostgreSQL: the survivor took {time.monotonic() - started:.1f} s")
    assert killed.returncode == -signal.SIGKILL and survivor.returncode == 0, outputs
    assert "Joining the sweep's run directory" in outputs[1] and "Resuming the run" not in outputs[1]
    assert "failed (its worker was killed); queued again as trial" in outputs[1], outputs[1]

    with search_space.quiet_optuna():
        trials = optuna.load_study(study_name="pg", storage=postgres_url).get_trials()
    states = [trial.state for trial in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 2
    failed, = [trial for trial in trials if trial.state == optuna.trial.TrialState.FAIL]
    retry, = [trial for trial in trials if trial.system_attrs.get("failed_trial") == failed.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == failed.params
    assert (run_dir / "summary.json").is_file()

    for output in outputs:
        assert PASSWORD not in output
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(files) > 20
    for path in files:
        assert PASSWORD.encode() not in path.read_bytes(), path


def test_missing_server_binaries_fail_under_ci_and_skip_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter(()))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the PostgreSQL test"):
        server_binaries()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no PostgreSQL server binaries .* install postgresql"):
        server_binaries()
