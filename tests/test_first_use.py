"""Defects a new user met (issue 14), each pinned by a test, and a teacher reused by one flag."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT, assert_one_sentence_exit_2, make_image_folder
from test_resume import start_run, stop_at
from torchvision import models

import data_setup
import experiment
import model_builder
import prediction_for_one
import utils
from config import command_line, settings
from core import errors, records
from results import ledger
from training import checkpoints

ONE_EPOCH = ["--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "8", "--seed", "0", "--device", "cpu",
             "--val-fraction", "0.25"]


@pytest.mark.parametrize("size", [32, 224])
def test_every_torchvision_classifier_is_checked_without_a_traceback(size):
    refused = []
    for name in models.list_models(module=models):
        try:
            model_builder.check_input_size(name, size)
        except ValueError as error:  # the one kind of refusal the pipeline turns into a sentence
            assert "\n" not in str(error)
            refused.append(name)
    assert ("vit_b_16" in refused) == (size != 224)
    assert "resnet18" not in refused and "regnet_y_400mf" not in refused


def test_a_model_that_cannot_take_the_size_is_one_sentence(capsys, tmp_path):
    code = experiment.main(["--teacher-model", "vit_b_16", "--image-size", "64", "--output-dir", str(tmp_path / "run")])
    line = assert_one_sentence_exit_2(code, capsys.readouterr().err)
    assert line.startswith("error: vit_b_16 cannot take 64x64 images (Wrong image height!")
    assert not (tmp_path / "run").exists()


def renamed_classes(tmp_path: Path) -> Path:
    """Tiny data whose class names differ from those the tiny run's teacher was trained on."""
    root = make_image_folder(tmp_path / "data", {"train": 4, "test": 2})
    for split in ("train", "test"):
        (root / split / "stripes").rename(root / split / "zebra")
    return root


@pytest.mark.parametrize("extra, message", [
    ([], "was trained on classes"),
    (["--teacher-model", "ResNet18"], "--teacher-model ResNet18 contradicts the teacher checkpoint"),
    (["--image-size", "48"], "--image-size 48 contradicts the teacher checkpoint"),
])
def test_a_teacher_checkpoint_that_does_not_fit_leaves_no_run_directory(tiny_run, tmp_path, monkeypatch, capsys,
                                                                         extra, message):
    monkeypatch.chdir(tmp_path)  # the default run directory would be runs/<timestamp> here
    data = renamed_classes(tmp_path)
    code = experiment.main(["--data-dir", str(data), "--teacher-checkpoint",
                            str(tiny_run / "teacher" / "best_model.pth"), *ONE_EPOCH, *extra])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, message)
    assert not (tmp_path / "runs").exists()


def test_a_teacher_checkpoint_alone_decides_architecture_size_and_normalization(tiny_run, tiny_data, tmp_path, capsys):
    # A ResNet18 checkpoint as teacher, without --teacher-model: the checkpoint says what it is.
    teacher = tiny_run / "student_baseline" / "best_model.pth"
    run = tmp_path / "run"
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run), "--teacher-checkpoint",
                            str(teacher), *ONE_EPOCH])
    assert code == 0, capsys.readouterr().err
    config = utils.read_json(run / "config.json")
    checkpoint = checkpoints.load_checkpoint(teacher)
    assert config["teacher_model"] == "resnet18" and config["image_size"] == checkpoint["image_size"]
    assert config["dataset"]["mean"] == checkpoint["mean"] and config["dataset"]["std"] == checkpoint["std"]
    assert utils.read_json(run / "summary.json")["teacher"]["arch"] == "resnet18"


def default_config(**changes) -> settings.Config:
    """The settings of a plain `python experiment.py`, with `changes`."""
    parser = command_line.build_parser(experiment.default_config())
    return replace(settings.Config(**{name: parser.get_default(name) for name in settings.Config.__dataclass_fields__}),
                   **changes)


def test_checkpoint_settings_yield_to_defaults_but_not_to_given_flags():
    checkpoint = {"arch": "resnet34", "image_size": 48}
    config = default_config(teacher_checkpoint="t.pth")
    adopted = settings.adopt_teacher_checkpoint(config, checkpoint, given=set())
    assert (adopted.teacher_model, adopted.image_size) == ("resnet34", 48)
    with pytest.raises(errors.SettingsError, match=r"--image-size 32 contradicts .* trained at 48 px"):
        settings.adopt_teacher_checkpoint(config, checkpoint, given={"image_size"})
    with pytest.raises(errors.SettingsError, match=r"--teacher-model VGG16 contradicts .* holds a resnet34"):
        settings.adopt_teacher_checkpoint(config, checkpoint, given=None)
    cropped = {**checkpoint, "resize": "center-crop"}
    assert settings.adopt_teacher_checkpoint(config, cropped, given=set()).resize == "center-crop"
    with pytest.raises(errors.SettingsError, match=r"--resize squash contradicts .* resized by center-crop"):
        settings.adopt_teacher_checkpoint(config, cropped, given={"resize"})


def test_written_files_get_the_mode_open_would_give(tiny_run):
    expected = 0o666 & ~utils.UMASK
    written = [path for path in tiny_run.rglob("*") if path.is_file() and "tensorboard" not in path.parts]
    assert {"report.html", "summary.json", "best_model.pth", "config.json"} <= {path.name for path in written}
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_atomic_writes_follow_the_umask(tmp_path):
    script = "import sys, utils; utils.write_text(sys.argv[1], 'x')"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.txt")], cwd=ROOT, check=True,
                   preexec_fn=lambda: os.umask(0o027))
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o640


def test_tilde_means_the_home_folder_in_every_path_setting(tiny_run, tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_data, tmp_path / "photos")
    shutil.copy(tiny_run / "teacher" / "best_model.pth", tmp_path / "teacher.pth")
    expanded = settings.expand_user_paths(default_config(**{key: f"~/{key}" for key in settings.PATH_SETTINGS}))
    assert all(getattr(expanded, key) == str(tmp_path / key) for key in settings.PATH_SETTINGS)
    # End to end: data and checkpoint are found under ~ (the run stops at the wrong class count, before training).
    os.rename(tmp_path / "photos" / "test" / "stripes", tmp_path / "photos" / "test" / "zebra")
    os.rename(tmp_path / "photos" / "train" / "stripes", tmp_path / "photos" / "train" / "zebra")
    code = experiment.main(["--data-dir=~/photos", "--teacher-checkpoint=~/teacher.pth", "--output-dir=~/run",
                            *ONE_EPOCH])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "was trained on classes")
    image = next((tmp_path / "photos" / "test" / "circle").iterdir())
    assert prediction_for_one.main(["--model=~/teacher.pth", f"~/{image.relative_to(tmp_path)}"]) == 0
    assert str(image) in capsys.readouterr().out


def test_ledger_records_what_was_run(tiny_run):
    with open(tiny_run.parent / "experiments.csv", newline="", encoding="utf-8") as ledger_file:
        row = next(csv.DictReader(ledger_file))
    assert row["kd_methods"] == "kd" and row["optimizer"] == "adamw" and row["teacher_checkpoint"] == ""
    assert float(row["teacher_lr"]) == experiment.TEACHER_LR and float(row["student_lr"]) == experiment.STUDENT_LR
    config = settings.Config(**{key: value for key, value in utils.read_json(tiny_run / "config.json").items()
                                  if key in settings.Config.__dataclass_fields__})
    summary = records.RunSummary.from_dict(utils.read_json(tiny_run / "summary.json"))
    reused = ledger.ledger_row(replace(config, teacher_checkpoint="t.pth", kd_methods="kd"), summary, tiny_run)
    assert reused["teacher_checkpoint"] == "t.pth" and reused["teacher_epochs"] == "" and reused["teacher_lr"] == ""
    assert reused["distilled_top1"] == f"kd={summary.models['student_kd'].test['top1']:.6f}"


def test_an_older_ledger_is_migrated_without_losing_rows(tmp_path):
    path = tmp_path / "experiments.csv"
    old_columns = ["finished_at", "run_dir", "teacher_epochs", "kd_gain_top1", "retired_column"]
    path.write_text(",".join(old_columns) + "\n2026-01-01T00:00:00,runs/old,6,0.01,kept\n", encoding="utf-8")
    ledger.append_ledger(path, {"run_dir": "runs/new", "kd_methods": "kd,dkd", "teacher_checkpoint": "t.pth"})
    ledger.append_ledger(path, {"run_dir": "runs/newer", "kd_methods": "at"})
    with open(path, newline="", encoding="utf-8") as ledger_file:
        rows = list(csv.DictReader(ledger_file))
    assert [row["run_dir"] for row in rows] == ["runs/old", "runs/new", "runs/newer"]
    assert rows[0]["teacher_epochs"] == "6" and rows[0]["retired_column"] == "kept" and rows[0]["kd_methods"] == ""
    assert rows[1]["kd_methods"] == "kd,dkd" and rows[1]["teacher_checkpoint"] == "t.pth"
    assert set(ledger.LEDGER_COLUMNS) <= set(rows[0])


def test_every_class_difference_between_splits_in_one_message(tmp_path):
    root = make_image_folder(tmp_path, {"train": 3, "val": 2, "test": 2})
    make_image_folder(tmp_path / "extra", {"val": 1})
    (tmp_path / "extra" / "val" / "circle").rename(root / "val" / "hexagon")
    shutil.rmtree(root / "test" / "cross")
    for path in (root / "val" / "stripes").iterdir():
        path.unlink()
    with pytest.raises(errors.DataError) as error:
        data_setup.load_splits(data_setup.DataDescription(data_dir=str(root), image_size=16, val_fraction=0.3, seed=0))
    message = str(error.value)
    assert "'cross' is in train and val but missing from test" in message
    assert "'hexagon' is in val but missing from train and test" in message
    assert "'stripes' in the val folder" in message and "the folder is empty" in message


def test_sigterm_stops_like_ctrl_c_with_exit_143(tiny_data, tmp_path):
    process = start_run(tiny_data, tmp_path / "run")
    output = stop_at(process, "[teacher] epoch   1", signal.SIGTERM)
    assert process.returncode == 143, output
    assert "Interrupted (SIGTERM)" in output and f"--resume {tmp_path / 'run'}" in output
    assert "Traceback" not in output
    assert (tmp_path / "run" / "teacher" / checkpoints.TRAIN_STATE).is_file()


def ignore_stop_signals() -> None:
    """What a background job of a non-interactive shell inherits (SIGTERM too, as `nohup`-like launchers do)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def test_signals_inherited_as_ignored_stay_ignored_during_saves(tiny_data, tmp_path):
    process = start_run(tiny_data, tmp_path / "run", ONE_EPOCH, ignore_stop_signals)
    stop = threading.Event()

    def keep_signalling() -> None:  # some land during a checkpoint save, most between saves
        while not stop.wait(0.01) and process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGTERM)

    sender = threading.Thread(target=keep_signalling)
    sender.start()
    try:
        output = process.communicate(timeout=600)[0]
    finally:
        stop.set()
        sender.join()
    assert process.returncode == 0, output
    assert (tmp_path / "run" / "summary.json").is_file()


def test_the_guide_speaks_of_data_a_user_has():
    guide = "\n".join(page.read_text(encoding="utf-8") for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    assert "shared/datasets" not in guide and "/tmp/cifar150" not in guide
    assert "CIFAR-10 as an ImageFolder tree" in guide and "torchvision.datasets import CIFAR10" in guide
