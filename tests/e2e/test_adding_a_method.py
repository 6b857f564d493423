"""Adding a distillation method is one file: a method registered from a file outside the project is listed by
--help, checked, searchable by --sweep, trained and reported, with no module of the project changed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_FLAGS

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent


def run_with_toy(args: list[str], code: str = "sys.exit(experiment.main(sys.argv[1:]))",
                 ) -> subprocess.CompletedProcess:
    """`python experiment.py ARGS` (or `code`) in a process that imported the toy method's file first."""
    prelude = f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport toy_method\nimport experiment\n"
    return subprocess.run([sys.executable, "-c", prelude + code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_a_method_from_its_own_file_is_listed_checked_and_searchable():
    shown = run_with_toy(["--help"])
    assert shown.returncode == 0 and "toy_l1" in shown.stdout and "--toy-weight" in shown.stdout
    refused = run_with_toy(["--kd-methods", "toy_l1", "--toy-weight", "-1"])
    assert refused.returncode == 2 and "--toy-weight must be >= 0 (got -1.0)." in refused.stderr
    assert "Traceback" not in refused.stderr
    space = run_with_toy([], "from sweep import search_space\n"
                             "print(sorted(search_space.parse_spec('toy_weight=0.5:2,method=kd|toy_l1')))")
    assert space.returncode == 0 and space.stdout.split() == ["['method',", "'toy_weight']"], space.stderr


def test_a_method_from_its_own_file_trains_a_student(tiny_data, tmp_path):
    run_dir = tmp_path / "toy"
    done = run_with_toy(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--kd-methods", "kd,toy_l1",
                         "--toy-weight", "3", "--teacher-model", "resnet8", "--student-model", "resnet8", *TINY_FLAGS])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["toy_weight"] == 3.0 and config["resolved"]["logit_weights"]["toy_l1"] == {"l1": 3.0}
    history = json.loads((run_dir / "student_toy_l1" / "history.json").read_text())["epochs"]
    assert [record["epoch"] for record in history] == [1, 2]
    assert all(record["train"]["l1"] > 0 for record in history)  # its part was computed and recorded
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "student_toy_l1" in summary and "student_toy_l1" in (run_dir / "report.html").read_text()
