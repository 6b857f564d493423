"""Pretrained weights: torchvision names from a fabricated torch hub cache, state-dict files, and the errors.

Nothing here may download: every test runs with torch.hub's download replaced by a failure and the
proxies pointed at a closed port.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch
from conftest import TINY_FLAGS, assert_one_sentence_exit_2
from torchvision import models

import experiment
import model_builder
import utils
from config import command_line, settings
from training import checkpoints

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch) -> list[str]:
    """An empty torch hub cache in `tmp_path`, and a network that refuses every download (the URLs tried are listed)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    tried = []

    def refuse(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tried


def hub_file(weights: models.WeightsEnum) -> Path:
    """The path torch.hub uses for `weights`: $TORCH_HOME/hub/checkpoints/<the URL's file name>."""
    return Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def fabricate(path: Path, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return state_dict


def imagenet_resnet18() -> dict[str, torch.Tensor]:
    """A state dict shaped as torchvision's ImageNet ResNet18 weights (1000 classes, 7x7 stem), random values."""
    torch.manual_seed(1)
    return models.resnet18(num_classes=1000).state_dict()


def assert_loaded(model: torch.nn.Module, file_tensors: dict[str, torch.Tensor], reinitialized: list[str]) -> None:
    """Every tensor outside the re-initialized layers equals the file's; those layers do not."""
    for name, tensor in model.state_dict().items():
        layer = name.rpartition(".")[0]
        if layer in reinitialized:
            assert name not in file_tensors or file_tensors[name].shape != tensor.shape, name
        else:
            assert torch.equal(tensor, file_tensors[name]), name


@pytest.mark.parametrize("image_size, reinitialized", [(32, ["conv1", "fc"]), (96, ["fc"])])
def test_torchvision_name_loads_the_hub_file_and_lists_what_does_not_fit(image_size, reinitialized, offline):
    file_tensors = fabricate(hub_file(models.ResNet18_Weights.IMAGENET1K_V1), imagenet_resnet18())
    pretrained = model_builder.read_pretrained("ResNet18", "DEFAULT")
    assert pretrained.source == "ResNet18_Weights.IMAGENET1K_V1"
    assert pretrained.file == str(hub_file(models.ResNet18_Weights.IMAGENET1K_V1))
    assert (pretrained.mean, pretrained.std) == (IMAGENET_MEAN, IMAGENET_STD)
    model = model_builder.build_model("ResNet18", 3, image_size)
    record = model_builder.load_pretrained(model, pretrained)
    assert record["reinitialized"] == reinitialized
    left_alone = [name for name in model.state_dict() if name.rpartition(".")[0] in reinitialized]
    assert record["loaded_tensors"] == len(model.state_dict()) - len(left_alone)
    assert_loaded(model, file_tensors, reinitialized)
    assert offline == [], "a file in the cache must not be downloaded again"


def test_vgg16_means_vgg16_bn_and_its_weights_file(offline):
    weights = model_builder.weights_by_name("VGG16", "IMAGENET1K_V1")
    assert weights is models.VGG16_BN_Weights.IMAGENET1K_V1
    assert model_builder.weights_by_name("vgg16", "VGG16_BN_Weights.DEFAULT") is weights
    assert model_builder.hub_weights_file(weights) == hub_file(weights)
    assert model_builder.weights_by_name("VGG16", "IMAGENET9") is None


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


def test_state_dict_file_and_a_run_checkpoint_as_weights(tmp_path):
    torch.manual_seed(2)
    trained = model_builder.build_model("ResNet18", 3, 32)
    plain = fabricate(tmp_path / "plain.pt", trained.state_dict())
    pretrained = model_builder.read_pretrained("ResNet18", str(tmp_path / "plain.pt"))
    assert pretrained.mean is None and pretrained.source == str(tmp_path / "plain.pt")
    model = model_builder.build_model("ResNet18", 3, 32)
    assert model_builder.load_pretrained(model, pretrained)["reinitialized"] == []
    assert_loaded(model, plain, [])

    checkpoints.save_checkpoint(tmp_path / "best_model.pth",
                                {"state_dict": plain, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]})
    from_run = model_builder.read_pretrained("ResNet18", str(tmp_path / "best_model.pth"))
    assert (from_run.mean, from_run.std) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    five_classes = model_builder.build_model("ResNet18", 5, 32)
    assert model_builder.load_pretrained(five_classes, from_run)["reinitialized"] == ["fc"]


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
