"""What a finished tiny run leaves: every file, the summary's fields, checkpoints, the ledger, TensorBoard
scalars, file modes, and its config.json as a settings file."""

from __future__ import annotations

import csv
import stat
from dataclasses import replace

import pytest
import torch
from conftest import settings_of

import experiment
import utils
from config import settings
from core import records
from results import ledger
from training import checkpoints

pytestmark = pytest.mark.e2e


MODEL_FILES = [
    "best_model.pth", "history.json", "results.json", "training_metrics.txt", "detailed_metrics.txt",
    "model_summary.txt", "loss_curve.png", "accuracy_curve.png", "top1_top3_comparison.png",
    *[f"confusion_matrix_{s}.png" for s in ("train", "val", "test")],
    *[f"classification_report_{s}.txt" for s in ("train", "val", "test")],
]


SPLIT_METRICS = ["loss", "top1", "top3"] + [
    f"{m}_{a}" for m in ("precision", "recall", "f1", "auc") for a in ("micro", "macro", "weighted")
]


def test_run_directory_holds_every_file(tiny_run):
    for name in ("config.json", "summary.json", "comparison.png", "comparison.txt"):
        assert (tiny_run / name).is_file(), name
    for role in ledger.LEDGER_ROLES:
        for name in MODEL_FILES:
            path = tiny_run / role / name
            assert path.is_file() and path.stat().st_size > 0, f"{role}/{name}"
        for png in (tiny_run / role).glob("*.png"):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tiny_run.rglob("*.tmp")), "no temporary files may be left behind"


def test_summary_fields(tiny_run):
    summary = utils.read_json(tiny_run / "summary.json")
    for role in ledger.LEDGER_ROLES:
        row = summary[role]
        assert {"params", "size_mb", "best_epoch", "train_seconds", "test"} <= row.keys()
        assert row["params"] > 1_000_000 and row["size_mb"] > 1 and 1 <= row["best_epoch"] <= 2
        for key in records.TEST_KEYS:
            value = row["test"][key]
            assert value is None or 0.0 <= value <= 1.0, (role, key, value)
    assert summary["teacher"]["arch"] == "vgg16_bn" and summary["student_kd"]["arch"] == "resnet18"
    for role in ledger.LEDGER_ROLES:
        row = summary[role]
        assert row["latency_ms"] > 0 and row["throughput_img_s"] > 0 and row["file_mb"] > 1
        assert row["latency_ms_iqr"][0] <= row["latency_ms"] <= row["latency_ms_iqr"][1]
        assert row["throughput_img_s_iqr"][0] <= row["throughput_img_s"] <= row["throughput_img_s_iqr"][1]
        assert row["flops_per_image"] > 1e8  # VGG16 / ResNet18 at 32 px: hundreds of MFLOPs or more
        if role != records.TEACHER:  # the median of per-round ratios to the teacher, inside their spread
            low, high = row["speedup_over_teacher_iqr"]
            assert 0 < low <= row["speedup_over_teacher"] <= high
    assert summary["teacher"]["speedup_over_teacher"] == 1.0
    assert isinstance(summary["student_kd"]["speedup_clear"], bool)
    assert 0 < summary["student_kd"]["mcnemar_p"] <= 1 and "mcnemar_p" not in summary["student_baseline"]
    assert summary["dataset"]["images_per_class"]["val"] == {"min": 3, "max": 3}
    assert any(w.startswith("The validation split has 9 images: one image moves validation top-1 by 11.11 points "
                            "(more than 2) and its smallest class has 3 (fewer than 5)") for w in summary["warnings"])
    assert "Deployment on cpu" in (tiny_run / "comparison.txt").read_text()
    assert summary["kd_gain_top1"] == pytest.approx(
        summary["student_kd"]["test"]["top1"] - summary["student_baseline"]["test"]["top1"])
    config = utils.read_json(tiny_run / "config.json")
    assert config["teacher_epochs"] == 2 and config["alpha"] == 0.5 and config["resolved"]["device"] == "cpu"


def test_results_and_history_have_every_metric(tiny_run):
    results = utils.read_json(tiny_run / "student_kd" / "results.json")
    for split in ("train", "val", "test"):
        for key in SPLIT_METRICS:
            assert key in results["splits"][split], (split, key)
            value = results["splits"][split][key]
            assert value is not None or key in results["splits"][split]["undefined"]
    history = utils.read_json(tiny_run / "student_kd" / "history.json")
    assert len(history["epochs"]) == 2
    for record in history["epochs"]:
        assert {"loss", "ce", "kd"} <= record["train"].keys()
        for key in SPLIT_METRICS:  # AUC needs every logit on the host: the final evaluation's alone
            assert (key in record["train"] and key in record["val"]) == (not key.startswith("auc"))
    assert results["splits"]["test"]["top1"] == utils.read_json(tiny_run / "summary.json")["student_kd"]["test"]["top1"]


def test_checkpoint_describes_itself_and_holds_the_best_epoch(tiny_run):
    summary = utils.read_json(tiny_run / "summary.json")
    for role in ledger.LEDGER_ROLES:
        checkpoint = checkpoints.load_checkpoint(tiny_run / role / "best_model.pth")
        assert checkpoint["class_names"] == ["circle", "cross", "stripes"]
        assert checkpoint["image_size"] == 32 and len(checkpoint["mean"]) == 3 and len(checkpoint["std"]) == 3
        assert checkpoint["epoch"] == summary[role]["best_epoch"]
        assert checkpoint["config"]["seed"] == 0 and checkpoint["role"] == role


def test_best_checkpoint_reproduces_reported_test_metrics(tiny_run):
    """The test report must come from the selected (best-on-validation) weights."""
    import data_setup
    import engine
    import model_builder

    checkpoint = checkpoints.load_checkpoint(tiny_run / "student_baseline" / "best_model.pth")
    config = checkpoint["config"]
    model = model_builder.build_model(checkpoint["arch"], checkpoint["num_classes"], checkpoint["image_size"])
    model.load_state_dict(checkpoint["state_dict"])
    model = model.to(memory_format=torch.channels_last)
    splits = data_setup.load_splits(data_setup.DataDescription(data_dir=config["data_dir"], image_size=32,
                                                               val_fraction=config["val_fraction"],
                                                               seed=config["seed"]))
    loader = data_setup.BatchLoader(splits.test, config["eval_batch_size"], checkpoint["mean"], checkpoint["std"],
                                    torch.device("cpu"))
    # In fp32, as the saved model runs in prediction_for_one.py and ONNX: the reported test figures are those.
    metrics = engine.evaluate(model, loader, checkpoint["class_names"], torch.device("cpu"), None)
    results = utils.read_json(tiny_run / "student_baseline" / "results.json")
    assert metrics["top1"] == results["splits"]["test"]["top1"]
    assert metrics["loss"] == pytest.approx(results["splits"]["test"]["loss"], rel=1e-6)


def test_written_files_get_the_mode_open_would_give(tiny_run):
    expected = 0o666 & ~utils.UMASK
    written = [path for path in tiny_run.rglob("*") if path.is_file() and "tensorboard" not in path.parts]
    assert {"report.html", "summary.json", "best_model.pth", "config.json"} <= {path.name for path in written}
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


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


def test_ledger_gets_one_row_per_run(tiny_run):
    with open(tiny_run.parent / "experiments.csv", newline="", encoding="utf-8") as ledger_file:
        rows = list(csv.DictReader(ledger_file))
    summary = utils.read_json(tiny_run / "summary.json")
    assert len(rows) == 1
    assert rows[0]["run_dir"] == str(tiny_run)
    assert float(rows[0]["student_kd_top1"]) == pytest.approx(summary["student_kd"]["test"]["top1"], abs=1e-6)
    assert float(rows[0]["kd_gain_top1"]) == pytest.approx(summary["kd_gain_top1"], abs=1e-6)
    assert rows[0]["alpha"] == "0.5" and rows[0]["temperature"] == "4.0"


def test_tensorboard_scalars_for_every_model(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for role in ledger.LEDGER_ROLES:
        events = EventAccumulator(str(tiny_run / "tensorboard" / role))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"lr", "train/loss", "train/top1", "val/loss", "val/top1"} <= tags, role
        assert [e.step for e in events.Scalars("val/top1")] == [1, 2]
    kd_tags = EventAccumulator(str(tiny_run / "tensorboard" / "student_kd"))
    kd_tags.Reload()
    assert {"train/ce", "train/kd"} <= set(kd_tags.Tags()["scalars"])


def test_a_runs_config_json_repeats_its_settings_in_a_new_folder(tiny_run):
    saved = utils.read_json(tiny_run / "config.json")
    assert {"resolved", "dataset", "output_dir"} <= saved.keys()
    repeated = settings_of(["--config", str(tiny_run / "config.json")])
    assert repeated == {**{key: saved[key] for key in settings.Config.__dataclass_fields__}, "output_dir": None}


def test_flags_beside_a_config_file_override_it(tiny_run):
    saved = utils.read_json(tiny_run / "config.json")
    settings = settings_of(["--config", str(tiny_run / "config.json"), "--alpha", "0.3", "--decode-cache",
                            "--output-dir", "elsewhere"])
    assert settings["alpha"] == 0.3 and saved["alpha"] == 0.5
    assert settings["decode_cache"] is True and settings["output_dir"] == "elsewhere"
    assert settings["teacher_epochs"] == saved["teacher_epochs"] == 2
