"""Teachers and pretrained weights in whole runs: a reused or published teacher, checkpoints that do not fit,
and torchvision weights offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cifar_batches import SMALL, write_cifar
from conftest import (
    BAD_DESCRIPTIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ONE_EPOCH,
    RESUME_FLAGS,
    TINY_FLAGS,
    assert_one_sentence_exit_2,
    default_config,
    fabricate,
    hub_file,
    imagenet_resnet18,
    make_image_folder,
    optimizer,
)
from torchvision import models

import engine
import experiment
import model_builder
import prediction_for_one
import utils
from config import command_line, settings
from core import records
from training import checkpoints

# Nothing here may download: torch.hub's download fails and the proxies point at a closed port.
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("offline")]


@pytest.mark.long
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


@pytest.mark.long
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


@pytest.mark.parametrize("case", ["a std of zero", "a mean of two values", "an unknown resize mode",
                                  "the image size as text"])
def test_a_teacher_checkpoint_whose_description_cannot_be_used_is_refused_before_any_work(
        case, small_model_files, tmp_path, capsys):
    import experiment

    description, _, folder = small_model_files
    change, message = BAD_DESCRIPTIONS[case]
    path = tmp_path / "teacher.pth"
    checkpoints.save_checkpoint(path, {**description, **change})
    code = experiment.main(["--teacher-checkpoint", str(path), "--output-dir", str(tmp_path / "run")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, f"'{path}' is not a usable model file", message)
    assert not (tmp_path / "run").exists()


def test_a_weights_file_with_an_unusable_normalization_is_refused(small_model_files, tmp_path, capsys):
    import experiment

    description, _, _ = small_model_files
    checkpoints.save_checkpoint(tmp_path / "weights.pth", {**description, "std": [0.0, 0.25, 0.25]})
    code = experiment.main(["--student-model", "resnet8", "--student-weights", str(tmp_path / "weights.pth"),
                            "--output-dir", str(tmp_path / "run")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "its 'std' must be a list of 3 finite positive numbers")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 23.6, 23.7: a reused teacher, the ONNX export


def test_a_reused_teacher_names_its_settings_and_keeps_every_epoch(tiny_data, tmp_path, capsys, monkeypatch):
    # Only the first epoch is ever "better": best_model.pth is written at epoch 1 of 2.
    monkeypatch.setattr(engine, "is_better", lambda candidate, best, metric="top1": best is None)
    flags = [*TINY_FLAGS, "--teacher-model", "resnet8", "--student-model", "resnet8", "--student-epochs", "1",
             "--image-size", "24", "--resize", "center-crop"]
    first = tmp_path / "first"
    assert experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(first), *flags, "--export", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "[teacher] exported teacher/model.onnx: ONNX Runtime's logits differ from PyTorch's by at most" in out
    assert "test images (tolerance 1e-04), and 0 of its predictions differ: passed" in out
    saved = checkpoints.load_checkpoint(first / "teacher" / checkpoints.BEST_MODEL)
    assert (saved["epoch"], len(saved["history"]), saved["head"]) == (1, 2, "compact")
    html = (first / "report.html").read_text(encoding="utf-8")
    assert "ONNX export" in html and "student_kd: exported student_kd/model.onnx" in html

    second = tmp_path / "second"
    assert experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(second), "--batch-size", "8",
                            "--seed", "0", "--device", "cpu", "--student-model", "resnet8", "--student-epochs", "1",
                            "--teacher-checkpoint", str(first / "teacher" / checkpoints.BEST_MODEL)]) == 0
    out = capsys.readouterr().out
    assert (f"The teacher checkpoint '{first / 'teacher' / checkpoints.BEST_MODEL}' sets --teacher-model resnet8, "
            "--image-size 24, --resize center-crop and the input normalization (mean ") in out
    assert len(utils.read_json(second / "teacher" / "history.json")["epochs"]) == 2


def test_offline_with_the_file_missing_names_the_file_and_the_folder(tiny_data, tmp_path, capsys, offline):
    run_dir = tmp_path / "run"
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *TINY_FLAGS,
                            "--teacher-weights", "IMAGENET1K_V1"])
    error = capsys.readouterr().err
    expected = hub_file(models.VGG16_BN_Weights.IMAGENET1K_V1)
    assert offline == [models.VGG16_BN_Weights.IMAGENET1K_V1.url]
    assert_one_sentence_exit_2(code, error, expected.name, str(expected.parent))
    assert not run_dir.exists(), "nothing may be done before the weights are found"


def test_offline_with_both_files_missing_names_both(tiny_data, tmp_path, capsys, offline):
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "run"), *TINY_FLAGS,
                            "--teacher-weights", "DEFAULT", "--student-weights", "DEFAULT"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    for weights in (models.VGG16_BN_Weights.IMAGENET1K_V1, models.ResNet18_Weights.IMAGENET1K_V1):
        assert hub_file(weights).name in error


@pytest.mark.parametrize("flags, message", [
    (["--teacher-weights", "IMAGENET9"], "--teacher-weights IMAGENET9: 'IMAGENET9' is neither a weights name of "
                                         "vgg16_bn (IMAGENET1K_V1, DEFAULT) nor a state-dict file."),
    (["--student-weights", "/no/such/weights.pth"], "There is no weights file '/no/such/weights.pth'."),
    (["--student-weights", "{junk}"], "Cannot read weights file"),
    (["--student-weights", "{folder}"], "is a folder, not a state-dict file"),
    (["--teacher-weights", "{resnet18}"], "No tensor of {resnet18} fits VGG"),
    (["--teacher-weights", "DEFAULT", "--teacher-checkpoint", "{junk}"], "give one of them"),
])
def test_bad_weights_exit_2_with_one_sentence(flags, message, tiny_data, tmp_path, capsys):
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    (tmp_path / "folder").mkdir()
    torch.save(models.resnet18(num_classes=3).state_dict(), tmp_path / "resnet18.pth")
    paths = {name: str(tmp_path / file) for name, file in
             (("junk", "junk.pth"), ("folder", "folder"), ("resnet18", "resnet18.pth"))}
    run_dir = tmp_path / "run"
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), *TINY_FLAGS,
                            *[flag.format(**paths) for flag in flags]])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, message.format(**paths))
    assert not run_dir.exists()


@pytest.mark.long
def test_a_run_from_a_settings_file_with_pretrained_weights_and_budgets(tiny_data, tmp_path, capsys, offline):
    """One tiny run: a YAML file (one flag overriding it), ImageNet-named teacher weights from the fabricated
    cache, student weights from a file, early stopping, selection by loss, label smoothing, class weights."""
    teacher_file = hub_file(models.VGG16_BN_Weights.IMAGENET1K_V1)
    full_vgg = model_builder.build_model("VGG16", 1000, 32).state_dict()
    fabricate(teacher_file, {name: tensor for name, tensor in full_vgg.items() if name.startswith("features.")})
    student_file = tmp_path / "student.pt"
    fabricate(student_file, imagenet_resnet18())
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(f"data_dir: {tiny_data}\nval_fraction: 0.25\nteacher_epochs: 2\nstudent_epochs: 2\n"
                        "batch_size: 8\nimage_size: 32\nseed: 0\ndevice: cpu\n"
                        f"teacher_weights: IMAGENET1K_V1\nstudent_weights: {student_file}\n"
                        "patience: 1\nselect_metric: loss\nlabel_smoothing: 0.1\nclass_weights: balanced\n")
    run = tmp_path / "run"
    assert experiment.main(["--config", str(settings_file), "--output-dir", str(run), "--student-epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert ("The teacher starts from VGG16_BN_Weights.IMAGENET1K_V1: 91 of 93 tensors loaded; re-initialized "
            "(no tensor of that shape in the file): classifier.2") in out
    assert f"The student starts from {student_file}: 119 of 122 tensors loaded" in out and ": conv1, fc" in out
    assert offline == []

    summary, config = utils.read_json(run / "summary.json"), utils.read_json(run / "config.json")
    assert summary["teacher"]["pretrained"]["reinitialized"] == ["classifier.2"]
    assert summary["teacher"]["pretrained"]["file"] == str(teacher_file)
    for role in ("student_baseline", "student_kd"):
        assert summary[role]["pretrained"]["reinitialized"] == ["conv1", "fc"]
        assert summary[role]["pretrained"]["weights"] == str(student_file)
    assert (config["dataset"]["mean"], config["dataset"]["std"]) == (IMAGENET_MEAN, IMAGENET_STD)
    assert config["dataset"]["normalization"] == "teacher weights VGG16_BN_Weights.IMAGENET1K_V1"
    assert config["dataset"]["class_weights"] == {"circle": 1.0, "cross": 1.0, "stripes": 1.0}
    assert config["student_epochs"] == 3 and config["label_smoothing"] == 0.1 and config["patience"] == 1
    assert checkpoints.load_checkpoint(run / "student_kd" / "best_model.pth")["mean"] == IMAGENET_MEAN

    for role, epochs in (("teacher", 2), ("student_baseline", 3), ("student_kd", 3)):
        history = utils.read_json(run / role / "history.json")["epochs"]
        losses = [record["val"]["loss"] for record in history]
        row = summary[role]
        assert row["best_epoch"] == losses.index(min(losses)) + 1, role
        assert row["epochs_trained"] == len(history)
        assert len(history) == (row["best_epoch"] + 1 if row["stopped_early"] else epochs), role

    _, args, _ = command_line.parse_command_line(["--config", str(run / "config.json")], experiment.default_config())
    repeated = {key: args[key] for key in settings.Config.__dataclass_fields__}
    assert repeated == {**{key: config[key] for key in settings.Config.__dataclass_fields__}, "output_dir": None}


# ---------------------------------------------------------------- a published teacher, used as loaded


def reference_checkpoint(path: Path, arch: str, class_count: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """A teacher file as RepDistiller and mdistiller publish them (ckpt_epoch_240.pth: the state dict of a
    DataParallel model under "model", beside the epoch, accuracy and optimizer state); returns its weights."""
    torch.manual_seed(seed)
    model = model_builder.build_model(arch, class_count, 32)
    with torch.no_grad():  # batch norms that matter, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    weights = model.state_dict()
    torch.save({"epoch": 240, "model": {f"module.{name}": value for name, value in weights.items()},
                "accuracy": torch.tensor(71.5), "optimizer": optimizer().state_dict()}, path)
    return weights


def test_a_published_teacher_is_used_as_loaded_and_test_figures_are_recorded(tmp_path):
    files = write_cifar(tmp_path / "cifar-100-python", 100, ["oak", "maple", "pine", "palm"], 10, 5)
    weights = reference_checkpoint(tmp_path / "ckpt_epoch_240.pth", "resnet8", 4)
    run = tmp_path / "run"
    code = experiment.main([
        "--data-dir", str(tmp_path / "cifar-100-python"), "--output-dir", str(run), *SMALL, "--val-fraction", "0.25",
        "--teacher-weights", str(tmp_path / "ckpt_epoch_240.pth"), "--teacher-epochs", "0", "--student-epochs", "2",
        "--optimizer", "sgd", "--no-nesterov", "--student-lr", "0.05", "--lr-schedule", "step", "--milestones", "1",
        "--eval-test-every-epoch"])
    assert code == 0
    summary = utils.read_json(run / "summary.json")
    teacher = summary[records.TEACHER]
    assert teacher["epochs_trained"] == 0 and utils.read_json(run / "teacher" / "history.json")["epochs"] == []
    saved = checkpoints.load_checkpoint(run / "teacher" / checkpoints.BEST_MODEL)["state_dict"]
    assert all(torch.equal(saved[name], value) for name, value in weights.items()), "the file's weights, untrained"

    # The same weights' test top-1, computed directly from the test file and the run's normalization.
    dataset = json.loads((run / "config.json").read_text())["dataset"]
    mean, std = (torch.tensor(dataset[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    test_data, test_labels = files["test"]
    images = (torch.from_numpy(test_data.reshape(-1, 3, 32, 32)).float() / 255 - mean) / std
    model = model_builder.build_model("resnet8", 4, 32)
    model.load_state_dict(weights)
    with torch.no_grad():
        right = model.eval()(images).argmax(1) == torch.tensor(test_labels)
    assert teacher["test"]["top1"] == pytest.approx(right.float().mean().item(), abs=1e-6)
    flags = utils.read_json(run / "teacher" / "results.json")["test_correct"]
    assert flags == "".join("1" if flag else "0" for flag in right.tolist()), "the same images right and wrong"

    for role in (records.BASELINE, "student_kd"):
        history = utils.read_json(run / role / "history.json")["epochs"]
        assert [epoch["lr"] for epoch in history] == pytest.approx([0.05, 0.005])
        tested = [epoch["test"]["top1"] for epoch in history]
        assert summary[role]["test_top1_last_epoch"] == tested[-1]
        assert summary[role]["test_top1_best_epoch_on_test"] == max(tested)
        assert summary[role]["test"]["top1"] == tested[summary[role]["best_epoch"] - 1], "selected on validation"
    assert summary["notes"] == {"test_top1_best_epoch_on_test": records.CHOSEN_ON_TEST}
    assert records.CHOSEN_ON_TEST.replace("'", "&#39;") in (run / "report.html").read_text()
    assert records.CHOSEN_ON_TEST in (run / "comparison.txt").read_text()


def test_a_teacher_file_that_does_not_fit_names_its_layers(tmp_path, capsys):
    write_cifar(tmp_path / "cifar-100-python", 100, ["oak", "maple", "pine", "palm"], 10, 2)
    reference_checkpoint(tmp_path / "teacher.pth", "resnet8", 10)
    code = experiment.main(["--data-dir", str(tmp_path / "cifar-100-python"), "--output-dir", str(tmp_path / "run"),
                            *SMALL, "--teacher-weights", str(tmp_path / "teacher.pth"), "--teacher-epochs", "0"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1, error
    assert ("2 of its tensors do not fit a resnet8 for 4 classes: fc.weight: (10, 64) in the file, (4, 64) in the "
            "model; fc.bias: (10,) in the file, (4,) in the model.") in error
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_for_another_model_gets_a_clear_error(tiny_run, tiny_data, tmp_path, capsys):
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "run"), *RESUME_FLAGS,
                            "--teacher-model", "ResNet18",
                            "--teacher-checkpoint", str(tiny_run / "teacher" / "best_model.pth")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err,
                               "--teacher-model ResNet18 contradicts the teacher checkpoint")
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["teacher"]["arch"] == "vgg16_bn"
