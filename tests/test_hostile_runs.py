"""Files the program writes, left broken by a crash or a refusal: a ledger cut mid-row, a summary.json cut in
half, a checkpoint's temporary file left by SIGKILL, a study refused after its folder was made; and study names
that are plain names."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import assert_one_sentence_exit_2
from test_sweep import SWEEP_FLAGS

import experiment
import utils
from config import settings
from core.errors import SettingsError
from results import ledger
from sweep import search

SPEC = SWEEP_FLAGS[SWEEP_FLAGS.index("--sweep") + 1]


def test_a_ledger_cut_mid_row_does_not_fuse_with_the_next_row(tmp_path):
    path = tmp_path / "experiments.csv"
    for index in range(2):
        ledger.append_ledger(path, {"finished_at": f"2026-12-07T05:0{index}:00", "run_dir": f"runs/r{index}"})
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.rindex(b"runs/r1") - 5])  # the crash: half of the second row, no newline
    ledger.append_ledger(path, {"finished_at": "2026-12-07T05:08:37", "run_dir": "runs/r2"})
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [row["finished_at"] for row in rows] == ["2026-12-07T05:00:00", "2026-12-07T05:0", "2026-12-07T05:08:37"]
    assert rows[-1]["run_dir"] == "runs/r2" and rows[0]["run_dir"] == "runs/r0"


def shared_study(journal: Path, name: str, **attrs: Any) -> None:
    """A study named `name` in the journal file, with these user attributes (what a worker records)."""
    storage = search.HeartbeatJournalStorage(str(journal), search.retry_callback())
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def sweep_main(tiny_data: Path, run_dir: Path, journal: Path, name: str) -> int:
    return experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *SWEEP_FLAGS, "--trials", "1",
                            "--study-storage", str(journal), "--study-name", name])


@pytest.mark.parametrize("attrs, expected", [
    ({"sweep": {"spec": "alpha=0.1:0.9", "metric": "top1"}}, "belongs to another sweep (spec alpha=0.1:0.9"),
    ({"sweep": {"spec": SPEC, "metric": "top1"}, "run_id": "elsewhere"},
     "keeps its trials in another run directory"),
])
def test_a_refused_study_leaves_no_run_directory(tiny_data, tmp_path, capsys, attrs, expected):
    journal = tmp_path / "study.journal"
    shared_study(journal, "taken", **attrs)
    code = sweep_main(tiny_data, tmp_path / "run", journal, "taken")
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "Study 'taken'", expected)
    assert not (tmp_path / "run").exists(), "a retry with another --study-name starts clean"


def test_a_shared_run_directory_with_other_settings_is_refused(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    utils.write_json(run_dir / "config.json", {"teacher_lr": 123.0, "seed": 0})
    code = sweep_main(tiny_data, run_dir, tmp_path / "study.journal", "shared")
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "holds a run with other settings (teacher_lr)")


@pytest.mark.parametrize("name", ["..", ".", ".hidden"])
def test_a_study_name_is_a_plain_name(tiny_data, tmp_path, capsys, name, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory is runs/<study name>
    code = experiment.main(["--data-dir", str(tiny_data), *SWEEP_FLAGS, "--study-storage", "study.journal",
                            "--study-name", name])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "--study-name must be letters, digits")
    assert list(tmp_path.iterdir()) == []


def test_the_test_split_with_a_sweep_is_refused():
    config = replace(experiment.default_config(), sweep=SPEC, eval_test_every_epoch=True)
    with pytest.raises(SettingsError, match="--eval-test-every-epoch cannot go with --sweep"):
        settings.validate(config)


def test_a_torn_summary_is_rebuilt_by_resume_with_one_ledger_row(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "torn"
    flags = ["--teacher-model", "resnet8", "--student-model", "resnet8", "--teacher-epochs", "1", "--student-epochs",
             "1", "--batch-size", "16", "--image-size", "16", "--precision", "fp32", "--device", "cpu"]
    assert experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *flags]) == 0
    whole = (run_dir / "summary.json").read_bytes()
    (run_dir / "summary.json").write_bytes(whole[: len(whole) // 2])  # a crash while it was written
    assert experiment.main(["--resume", str(run_dir)]) == 0
    assert "damaged summary.json: resuming writes it again" in capsys.readouterr().out
    assert utils.read_json(run_dir / "summary.json").keys() == json.loads(whole).keys()
    rows = list(csv.DictReader(io.StringIO((run_dir.parent / "experiments.csv").read_text())))
    assert [row["run_dir"] for row in rows] == [str(run_dir)]
