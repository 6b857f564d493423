"""Reproducing the papers: the step and cosine schedules (and one resumed), torchvision's CIFAR files read as
they are (and every bad one refused in one sentence), a published teacher's file used as loaded, and test
figures recorded per epoch beside the validation-selected result."""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

import data_setup
import engine
import experiment
import model_builder
import utils
from config import command_line, settings
from core import records, schedules
from core.errors import DataError, SettingsError
from data import cifar_files
from training import checkpoints, model_run

SMALL = ["--teacher-model", "resnet8", "--student-model", "resnet8", "--batch-size", "8", "--image-size", "32",
         "--seed", "0", "--device", "cpu", "--precision", "fp32", "--workers", "0"]


# ---------------------------------------------------------------- CIFAR files, fabricated


def cifar_batch(class_count: int, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Rows of 3,072 uint8 values (a fixed pattern per class plus noise) and their shuffled labels."""
    patterns = np.random.default_rng(99).integers(0, 256, (class_count, 3072))
    labels = np.repeat(np.arange(class_count), per_class)
    rng.shuffle(labels)
    noise = rng.integers(-40, 41, (len(labels), 3072))
    return np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8), labels.tolist()


def python2_style(content: object) -> bytes:
    """A pickle naming numpy as the original CIFAR files do (numpy.core.multiarray, protocol 2)."""
    return pickle.dumps(content, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar(folder: Path, variant: int, class_names: list[str], train_per_class: int,
                test_per_class: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    """torchvision's CIFAR-10 (`variant` 10: five training batches) or CIFAR-100 Python files in `folder`, the
    files written with several pickle protocols; returns each file's (data, labels)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    count = len(class_names)
    if variant == 10:
        files = {f"data_batch_{index}": cifar_batch(count, train_per_class, rng) for index in range(1, 6)}
        files["test_batch"] = cifar_batch(count, test_per_class, rng)
        labels_key, meta, names_key = "labels", "batches.meta", "label_names"
    else:
        files = {"train": cifar_batch(count, train_per_class, rng), "test": cifar_batch(count, test_per_class, rng)}
        labels_key, meta, names_key = "fine_labels", "meta", "fine_label_names"
    for index, (name, (data, labels)) in enumerate(files.items()):
        content = {"batch_label": name, labels_key: labels, "data": data, "filenames": [f"{i}.png" for i in labels]}
        protocol = 4 + index % 2
        (folder / name).write_bytes(python2_style(content) if index == 0 else pickle.dumps(content, protocol=protocol))
    (folder / meta).write_bytes(python2_style({names_key: class_names, "num_cases_per_batch": 10}))
    return files


def test_cifar_files_are_read_as_they_are(tmp_path):
    names = ["truck", "airplane", "cat"]  # not sorted: the metadata's order is the class order
    files = write_cifar(tmp_path / "cifar-10-batches-py", 10, names, 4, 3)
    data = data_setup.load_splits(data_setup.DataDescription(data_dir=str(tmp_path), image_size=32, val_fraction=0.25,
                                                             seed=0))  # the folder holding one
    assert data.class_names == names
    assert (len(data.train), len(data.val), len(data.test)) == (45, 15, 9)
    assert data.carving["class_counts"]["val"] == {"truck": 5, "airplane": 5, "cat": 5}
    test_data, test_labels = files["test_batch"]
    assert data.test.images.dtype == torch.uint8
    assert torch.equal(data.test.images, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    assert data.test.labels.tolist() == test_labels
    pool = np.concatenate([files[f"data_batch_{index}"][0] for index in range(1, 6)]).reshape(-1, 3, 32, 32)
    seen = {bytes(image) for image in pool}
    assert all(bytes(image.numpy()) in seen for image in torch.cat([data.train.images, data.val.images]))
    assert data.carving["layout"] == "torchvision's CIFAR-10 Python format"
    assert data.carving["test"].endswith("test_batch")

    write_cifar(tmp_path / "re-packed", 100, ["b", "a"], 6, 2)  # another folder name: known by its files
    data = data_setup.load_splits(data_setup.DataDescription(data_dir=str(tmp_path / "re-packed"), image_size=16,
                                                             val_fraction=0.25, seed=0))
    assert data.class_names == ["b", "a"] and (len(data.train), len(data.val), len(data.test)) == (9, 3, 4)
    assert data.test.images.shape == (4, 3, 16, 16), "resized to --image-size"


def crafted_pickle(marker: Path) -> bytes:
    """A pickle that runs a shell command when an ordinary unpickler loads it."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return pickle.dumps({"data": Payload(), "labels": [0]})


def damage(folder: Path, case: str) -> None:
    """Spoil a CIFAR-10 folder the way `case` says."""
    batch = folder / "cifar-10-batches-py" / "data_batch_2"
    if case == "truncated":
        batch.write_bytes(batch.read_bytes()[:5000])
    elif case == "crafted":
        batch.write_bytes(crafted_pickle(folder / "marker"))
    elif case == "missing test":
        (folder / "cifar-10-batches-py" / "test_batch").unlink()
    elif case == "wrong layout":
        batch.write_bytes(pickle.dumps({"data": np.zeros((12, 1024), np.uint8), "labels": [0] * 12}))
    else:  # neither CIFAR's files nor an ImageFolder tree
        for path in (folder / "cifar-10-batches-py").iterdir():
            path.unlink()
        (folder / "cifar-10-batches-py").rmdir()
        (folder / "notes.txt").write_text("no data here")


@pytest.mark.parametrize("case, expected", [
    ("truncated", "Cannot read the CIFAR-10 file"),
    ("crafted", "system, which no CIFAR file holds; nothing was run"),
    ("missing test", "lacks test_batch: torchvision's CIFAR-10 Python format holds"),
    ("wrong layout", "is not in torchvision's format: its 'data' is uint8 (12, 1024)"),
    ("neither", "nor torchvision's CIFAR-10 / CIFAR-100 Python files"),
])
def test_bad_cifar_files_are_one_sentence_and_leave_no_run_directory(tmp_path, capsys, case, expected):
    write_cifar(tmp_path / "data" / "cifar-10-batches-py", 10, ["a", "b", "c"], 4, 3)
    damage(tmp_path / "data", case)
    code = experiment.main(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), *SMALL])
    error = capsys.readouterr().err
    assert code == 2 and expected in error, error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "data" / "marker").exists(), "the crafted pickle ran nothing"


def test_the_crafted_pickle_does_run_code_when_loaded_plainly(tmp_path, monkeypatch):
    """What the refusal above protects from: the same folder, read by our reader with `os.system` on its list of
    admitted callables, runs the command; so the list, and nothing else, is what refuses it."""
    write_cifar(tmp_path / "data" / "cifar-10-batches-py", 10, ["a", "b", "c"], 4, 3)
    damage(tmp_path / "data", "crafted")
    monkeypatch.setattr(cifar_files, "ADMITTED", {*cifar_files.ADMITTED, (os.system.__module__, "system")})
    with pytest.raises(DataError):  # the command's exit status is no CIFAR data
        cifar_files.read(cifar_files.CIFAR10, tmp_path / "data" / "cifar-10-batches-py")
    assert (tmp_path / "data" / "marker").exists()


# ---------------------------------------------------------------- schedules


def rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The learning rate of each optimizer step, then the one after the last."""
    seen = []
    for _ in range(steps):
        seen.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return seen + [scheduler.optimizer.param_groups[0]["lr"]]


def optimizer(lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


def test_step_and_cosine_change_the_rate_per_epoch_as_the_references():
    # 6 epochs of 3 steps; milestones 2 and 4 (RepDistiller's `epoch > milestone`); one warm-up epoch.
    step = rates(schedules.make_scheduler(optimizer(), 0.05, 6, 3, "step", [2, 4], 0.1, 1), 18)
    per_epoch = [0.025, 0.05, 0.005, 0.005, 0.0005, 0.0005]
    assert step[:-1] == pytest.approx([rate for rate in per_epoch for _ in range(3)])
    cosine = rates(schedules.make_scheduler(optimizer(), 0.05, 4, 2, "cosine"), 8)
    assert cosine[::2] == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(5)], abs=1e-12)
    assert cosine[-1] == pytest.approx(0, abs=1e-12), "down to 0 where the run ends"
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer(), max_lr=0.05, total_steps=18, pct_start=0.25)
    assert rates(schedules.make_scheduler(optimizer(), 0.05, 6, 3), 17) == rates(reference, 17), "default unchanged"


@pytest.mark.parametrize("changes, expected", [
    ({"lr_schedule": "step"}, "--lr-schedule step needs --milestones"),
    ({"lr_schedule": "step", "milestones": "3,2"}, "--milestones must be increasing positive epochs"),
    ({"lr_schedule": "step", "milestones": "2,6"}, "--milestones 2,6 does not fit the 6 epochs the teacher trains"),
    ({"lr_schedule": "cosine", "milestones": "2"}, "--milestones belong to --lr-schedule step, not cosine"),
    ({"warmup_epochs": 1}, "onecycle has its own warm-up"),
    ({"lr_schedule": "cosine", "warmup_epochs": 3}, "--warmup-epochs 3 does not fit the 3 epochs each student trains"),
    ({"teacher_epochs": 0}, "--teacher-epochs 0 uses the teacher as --teacher-weights gives it"),
])
def test_schedule_and_teacher_settings_that_cannot_work_are_refused(changes, expected):
    config = replace(experiment.default_config(), **{"teacher_epochs": 6, "student_epochs": 3, **changes})
    with pytest.raises(SettingsError, match=expected):
        settings.validate(config)


def test_each_recipe_file_is_valid_settings():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        values = command_line.config_file_settings(str(path))
        config = replace(experiment.default_config(), **values, teacher_weights="teacher.pth", data_dir="data")
        settings.validate(config)
        assert (config.lr_schedule, config.milestones, config.student_epochs) == ("step", "150,180,210", 240), path
        assert config.teacher_epochs == 0 and config.batch_size == 64 and not config.nesterov, path


def test_a_resumed_training_continues_the_schedule(tiny_data, tmp_path, monkeypatch):
    config = replace(experiment.default_config(), data_dir=str(tiny_data), val_fraction=0.25, batch_size=8,
                     optimizer="sgd", lr_schedule="step", milestones="2,3", warmup_epochs=1, precision="fp32",
                     device="cpu", workers=0, student_epochs=4)
    device = torch.device("cpu")
    context = experiment.make_context(config, experiment.load_data(config, device), device, None, tmp_path, {}, None,
                                      time.perf_counter(), False)
    folder = tmp_path / records.BASELINE

    def train() -> list[float]:
        context.saver = checkpoints.BackgroundSaver()
        with context.saver:
            _, fit = model_run.train_model(context, records.BASELINE, "resnet8", 4, 0.05,
                                         lambda model, steps: engine.SupervisedCriterion(), folder, seed=0)
        return [epoch["lr"] for epoch in fit.history]

    uninterrupted = train()
    save = checkpoints.BackgroundSaver.save

    def save_then_stop(self, files):
        save(self, files)
        if len(files[folder / checkpoints.TRAIN_STATE]["history"]) == 2:
            raise KeyboardInterrupt  # as Ctrl-C once epoch 2 is handed to the writer

    (folder / checkpoints.TRAIN_STATE).unlink()
    monkeypatch.setattr(checkpoints.BackgroundSaver, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.undo()
    assert len(checkpoints.load_checkpoint(folder / checkpoints.TRAIN_STATE)["history"]) == 2
    resumed = train()
    assert uninterrupted == pytest.approx([0.025, 0.05, 0.005, 0.0005])
    assert resumed == uninterrupted


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


def test_the_references_files_are_read_whatever_their_key_prefix_or_layer_names(tmp_path):
    torch.manual_seed(0)
    wide = model_builder.build_model("wrn_16_1", 5, 32).eval()
    # RepDistiller's WRN names its blocks' layers block1.layer.0...; pytorch-cifar's files keep weights under "net".
    renamed = {name.replace("block1.", "block1.layer.").replace("block2.", "block2.layer.")
               .replace("block3.", "block3.layer."): value for name, value in wide.state_dict().items()}
    torch.save({"net": renamed, "acc": 90.0}, tmp_path / "wrn.pth")
    loaded = model_builder.build_model("wrn_16_1", 5, 32)
    record = model_builder.load_pretrained(loaded, model_builder.read_pretrained("wrn_16_1", str(tmp_path / "wrn.pth")))
    assert record["reinitialized"] == []
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), wide(images))
    plain = model_builder.build_model("resnet8", 3, 32).state_dict()
    torch.save({"model_state_dict": {f"module.{name}": value for name, value in plain.items()}}, tmp_path / "r.pth")
    state_dict, extra = model_builder.read_state_dict(tmp_path / "r.pth")
    assert list(state_dict) == list(plain) and "model_state_dict" in extra
