"""A run killed in the middle of writing a file: the temporary file it leaves is removed on --resume, and a model
that had saved no epoch is said to start again from epoch 1."""

import subprocess
import sys

import pytest
from conftest import ROOT, TINY_FLAGS

pytestmark = pytest.mark.e2e

# SIGKILL while the teacher's first train_state.pth is half written: its temporary file stays behind.
KILL_IN_FIRST_STATE_WRITE = """
import os, signal, torch
import utils
from training import checkpoints
def killed_mid_write(path, checkpoint):
    with utils.atomic_path(path) as temporary:
        if path.name == checkpoints.TRAIN_STATE:
            temporary.write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save(checkpoint, temporary)
checkpoints.save_checkpoint = killed_mid_write
"""


def experiment_process(args: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """`python experiment.py ARGS`, after `prelude` (Python run first in the same process)."""
    code = f"import sys\n{prelude}\nimport experiment\nsys.exit(experiment.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_kill_mid_write_leaves_no_orphan_after_resume_and_the_restart_is_said(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--teacher-model", "resnet8",
             "--student-model", "resnet8", *TINY_FLAGS]
    killed = experiment_process(flags, KILL_IN_FIRST_STATE_WRITE)
    assert killed.returncode == -9
    orphans = sorted(path.name for path in run_dir.rglob(".*.tmp"))
    assert orphans and all(name.startswith(".train_state.pth.") for name in orphans)
    resumed = experiment_process(["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Removed 1 unfinished temporary file that the interruption left (teacher/{orphans[0]})." in resumed.stdout
    assert "[teacher] no epoch of it was saved before the interruption: training it from epoch 1" in resumed.stdout
    assert not list(run_dir.rglob(".*.tmp")) and (run_dir / "summary.json").is_file()
