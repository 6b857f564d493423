"""Whole runs on the user's own folders: class folders only, and a folder full of hostile files."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CLASSES, class_folders_only, log_entry

import data_setup
import experiment
import utils
from training import checkpoints

pytestmark = pytest.mark.e2e


def test_experiment_completes_on_the_hostile_folder_and_lists_what_it_skipped(hostile, tmp_path, capsys):
    from conftest import SMALL_MODELS, TINY_FLAGS

    import experiment

    root, good, bad = hostile
    run_dir = tmp_path / "run"
    code = experiment.main(["--data-dir", str(root), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            *TINY_FLAGS, *SMALL_MODELS, "--teacher-epochs", "1",
                            "--student-epochs", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"Skipped {len(bad)} unreadable files" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [item["path"] for item in summary["skipped_files"]] == sorted(bad)
    log = (run_dir / "skipped_files.log").read_text(encoding="utf-8").splitlines()
    assert [log_entry(line)[0] for line in log] == sorted(bad)
    assert summary["dataset"]["sizes"] == {"train": 30, "val": 10, "test": 12}
    assert "skipped files" in (run_dir / "report.html").read_text(encoding="utf-8")


def test_class_folders_only_end_to_end_records_every_carving(tmp_path):
    root = class_folders_only(tmp_path / "photos", 10)
    run_dir = tmp_path / "run"
    code = experiment.main([
        "--data-dir", str(root), "--output-dir", str(run_dir), "--test-fraction", "0.2", "--val-fraction", "0.25",
        "--max-per-class", "4", "--resize", "center-crop", "--augment", "trivialaugment", "--balanced-sampler",
        "--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "8", "--image-size", "32",
        "--seed", "0", "--device", "cpu", "--no-decode-cache",
    ])
    assert code == 0
    config = utils.read_json(run_dir / "config.json")
    assert (config["test_fraction"], config["max_per_class"], config["resize"]) == (0.2, 4, "center-crop")
    assert config["augment"] == "trivialaugment" and config["balanced_sampler"] is True
    carving = config["dataset"]["carving"]
    assert config["dataset"]["sizes"] == {"train": 12, "val": 6, "test": 6}
    assert carving["layout"] == "class folders only" and carving["max_per_class"] == 4
    assert carving["class_counts"]["train"] == {name: 4 for name in TINY_CLASSES}
    checkpoint = checkpoints.load_checkpoint(run_dir / "student_kd" / "best_model.pth")
    assert checkpoint["resize"] == "center-crop"
    # the recorded settings rebuild the same splits
    splits = data_setup.load_splits(data_setup.DataDescription(data_dir=config["data_dir"], image_size=32,
                                                               val_fraction=config["val_fraction"], seed=config["seed"],
                                                               test_fraction=config["test_fraction"],
                                                               max_per_class=config["max_per_class"]))
    assert {name: len(getattr(splits, name)) for name in ("train", "val", "test")} == config["dataset"]["sizes"]
    assert splits.carving["class_counts"] == carving["class_counts"]
