"""End-to-end runs of the experiment on a few dozen tiny images."""


import pytest
import torch
from conftest import TINY_FLAGS, assert_one_sentence_exit_2

import experiment
import utils
from config import command_line
from core import compute, records
from results import ledger
from training import checkpoints

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
        assert row["speedup_over_teacher"] == pytest.approx(summary["teacher"]["latency_ms"] / row["latency_ms"],
                                                             rel=1e-2)
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
    amp = compute.resolve_amp_dtype(config["precision"], torch.device("cpu"))
    metrics = engine.evaluate(model, loader, checkpoint["class_names"], torch.device("cpu"), amp)
    results = utils.read_json(tiny_run / "student_baseline" / "results.json")
    assert metrics["top1"] == results["splits"]["test"]["top1"]
    assert metrics["loss"] == pytest.approx(results["splits"]["test"]["loss"], rel=1e-6)


def test_reused_teacher_alpha_one_and_determinism(tiny_run, tiny_data, tmp_path):
    """A reused teacher is not retrained; alpha=1 makes the distilled student equal the baseline,
    and the same seed repeats the first run's baseline exactly."""
    run_dir = tmp_path / "alpha1"
    teacher = tiny_run / "teacher" / "best_model.pth"
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            "--teacher-checkpoint", str(teacher), "--alpha", "1", *TINY_FLAGS])
    assert code == 0
    first, second = utils.read_json(tiny_run / "summary.json"), utils.read_json(run_dir / "summary.json")
    assert second["teacher"]["train_seconds"] == 0 and second["teacher"]["reused_from"] == str(teacher)
    assert second["teacher"]["test"] == first["teacher"]["test"]
    assert second["student_kd"]["test"] == second["student_baseline"]["test"]
    assert second["kd_gain_top1"] == 0
    baseline = checkpoints.load_checkpoint(run_dir / "student_baseline" / "best_model.pth")["state_dict"]
    distilled = checkpoints.load_checkpoint(run_dir / "student_kd" / "best_model.pth")["state_dict"]
    assert all(torch.equal(baseline[k], distilled[k]) for k in baseline)
    assert second["student_baseline"]["test"] == first["student_baseline"]["test"]
    earlier = checkpoints.load_checkpoint(tiny_run / "student_baseline" / "best_model.pth")["state_dict"]
    assert all(torch.equal(baseline[k], earlier[k]) for k in baseline)


def test_constants_at_the_top_are_the_defaults(monkeypatch, tiny_data):
    monkeypatch.setattr(experiment, "DATA_DIR", str(tiny_data))
    monkeypatch.setattr(experiment, "STUDENT_EPOCHS", 5)
    monkeypatch.setattr(experiment, "T", 7.5)
    args = command_line.build_parser(experiment.default_config()).parse_args([])
    assert args.data_dir == str(tiny_data) and args.student_epochs == 5 and args.temperature == 7.5
    assert command_line.build_parser(experiment.default_config()).parse_args(["--temperature", "2"]).temperature == 2.0


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--alpha", "1.5"], "--alpha must be between 0 and 1"),
    (["--student-epochs", "0"], "--student-epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--teacher-model", "NoSuchNet"], "Unknown model 'NoSuchNet'"),
    (["--data-dir", "/no/such/folder"], "does not exist"),
    (["--teacher-checkpoint", "/no/such.pth"], "is not a file"),
    (["--cache-teacher-logits"], "--cache-teacher-logits needs a deterministic training view"),
    (["--image-size", "16"], "VGG16 cannot take 16x16 images"),
    (["--image-size", "4096"], "--image-size must be between 8 and 1024"),
    (["--teacher-epochs", "-1"], "--teacher-epochs must be at least 0"),
    (["--student-lr", "0"], "--student-lr must be > 0"),
    (["--teacher-lr", "-1"], "--teacher-lr must be > 0"),
    (["--val-fraction", "1"], "--val-fraction must be between 0 and 1"),
    (["--test-fraction", "0"], "--test-fraction must be between 0 and 1"),
    (["--max-per-class", "0"], "--max-per-class must be at least 1"),
    (["--augment", "trivialaugment", "--crop-padding", "0", "--hflip", "off", "--cache-teacher-logits"],
     "--cache-teacher-logits needs a deterministic training view"),
    (["--kd-methods", "kd,bogus"],
     "--kd-methods must list distinct methods of fitnet, kd, at, reviewkd, dist, dkd, dist_ls, dkd_ls, kd_ls"),
    (["--kd-methods", "kd,kd"], "--kd-methods must list distinct methods"),
    (["--kd-methods", "kd,fitnet", "--alpha", "0"], "fitnet at alpha 0 needs an explicit --beta"),
    (["--kd-methods", "at", "--beta", "-0.1"], "--beta must be >= 0"),
    (["--kd-methods", "at", "--feature-layers", "features.99:layer3"],
     "--feature-layers: VGG has no layer 'features.99'"),
    (["--kd-methods", "fitnet", "--feature-layers", "features.22"], "--feature-layers:"),
    (["--kd-methods", "fitnet", "--feature-layers", "features.5:layer4"],
     "cannot regress a student map of 4x4 onto a teacher map of 32x32"),
    (["--kd-methods", "at", "--teacher-model", "mobilenet_v3_small"], "No feature stages are known for MobileNetV3"),
    (["--kd-methods", "dkd", "--dkd-beta", "-1"], "--dkd-beta must be >= 0 (got -1.0)."),
    (["--kd-methods", "dkd_ls", "--dkd-warmup-epochs", "-2"], "--dkd-warmup-epochs must be >= 0 (got -2)."),
    (["--kd-methods", "dist", "--dist-weight", "-1"], "--dist-weight must be >= 0"),
    (["--kd-methods", "kd_ls", "--ls-temperature", "0"], "--ls-temperature must be > 0 (got 0.0)."),
    (["--kd-methods", "dist_ls", "--ls-weight", "-1"], "--ls-weight must be >= 0 (got -1.0)."),
    (["--kd-methods", "reviewkd", "--reviewkd-warmup-epochs", "-1"], "--reviewkd-warmup-epochs must be >= 0"),
    (["--kd-methods", "reviewkd", "--teacher-model", "mobilenet_v3_small"], "No feature stages are known"),
    (["--seeds", "0,x"], "--seeds must be distinct integers"),
    (["--seeds", "1,1"], "--seeds must be distinct integers"),
])
def test_bad_settings_exit_2_with_one_sentence(flags, message, capsys, tmp_path):
    code = experiment.main([*flags, "--output-dir", str(tmp_path / "run")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, message)
