"""Deployment figures (results.deploy): FLOPs by hand, interleaved speed measurements and their verdicts,
and ONNX export parity."""

from __future__ import annotations

import torch
from conftest import model_row, run_summary, speed_row
from torch import nn

import model_builder
from results import deploy, report


def conv_macs(side: int, out_channels: int, in_channels: int, kernel: int = 3) -> int:
    """Multiply-adds of a convolution with a `side` x `side` output."""
    return side * side * out_channels * in_channels * kernel * kernel


def test_flops_per_image_match_hand_counts():
    # FLOPs count 2 per multiply-add of the convolutions and linear layers (batch norm, ReLU, pooling: none).
    # resnet8 at 32 px: a 16-channel stem, then one BasicBlock a stage (16, 32, 64 channels at 32, 16, 8 px),
    # the second and third with a strided 1x1 shortcut; a 64 -> 10 linear layer.
    resnet8 = (conv_macs(32, 16, 3) + 2 * conv_macs(32, 16, 16)
               + conv_macs(16, 32, 16) + conv_macs(16, 32, 32) + conv_macs(16, 32, 16, kernel=1)
               + conv_macs(8, 64, 32) + conv_macs(8, 64, 64) + conv_macs(8, 64, 32, kernel=1) + 64 * 10)
    assert resnet8 == 12_501_632
    assert deploy.flops_per_image(model_builder.build_model("resnet8", 10, 32), 32) == 2 * resnet8
    # The small-image VGG16: configuration D's 13 convolutions, max-pooled from 32 px down to 2 px, then
    # global pooling and a 512 -> 10 linear layer: 0.626 GFLOPs, the figure docs/models.md gives.
    vgg16 = (conv_macs(32, 64, 3) + conv_macs(32, 64, 64) + conv_macs(16, 128, 64) + conv_macs(16, 128, 128)
             + conv_macs(8, 256, 128) + 2 * conv_macs(8, 256, 256) + conv_macs(4, 512, 256) + 2 * conv_macs(4, 512, 512)
             + 3 * conv_macs(2, 512, 512) + 512 * 10)
    assert vgg16 == 313_201_664
    assert deploy.flops_per_image(model_builder.build_model("VGG16", 10, 32), 32) == 2 * vgg16


# ---------------------------------------------------------------- 23.2 and 19.5: both speed-ups, noisy measurements


class Named(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


def test_a_wide_measurement_is_taken_again_and_marked_noisy_if_it_stays_so(monkeypatch):
    calls: dict[tuple[str, int], int] = {}

    def fake_block_times(run, min_run_time, min_blocks=2):
        key = (run.args[0].name, len(run.args[1]))
        calls[key] = calls.get(key, 0) + 1
        passes_so_far = (calls[key] - 1) // 3  # three rounds a pass
        if key == ("teacher", 1) or (key == ("student", 1) and passes_so_far == 0):
            return [0.010, 0.020]  # busy: the interquartile range is half the median wide
        return {"teacher": [0.020, 0.0201], "student": [0.005, 0.0051]}[key[0]]

    monkeypatch.setattr(deploy, "block_times", fake_block_times)
    speeds = deploy.measure_speeds({"teacher": Named("teacher"), "student": Named("student")}, 8,
                                   torch.device("cpu"), None, batch=4)
    assert calls == {("teacher", 1): 9, ("teacher", 4): 3, ("student", 1): 6, ("student", 4): 3}
    assert speeds["teacher"]["latency_noisy"] is True and speeds["student"]["latency_noisy"] is False
    verdict = deploy.speedup(speeds["teacher"], speeds["student"])
    assert verdict["speedup_clear"] is False, "no speed-up is claimed from a noisy measurement"
    assert verdict["throughput_speedup_clear"] is True and verdict["throughput_speedup_over_teacher"] > 3.9
    row, teacher = model_row(0.8, **speeds["student"], **verdict), model_row(0.9, **speeds["teacher"])
    assert deploy.speedup_cell(row, "latency", teacher) == "noisy"
    assert deploy.speedup_cell(row, "throughput", teacher) == "3.97x"


def speeds(latency: float, latency_iqr: list[float], throughput: float, throughput_iqr: list[float]) -> dict:
    return {"latency_ms": latency, "latency_ms_iqr": latency_iqr, "throughput_img_s": throughput,
            "throughput_img_s_iqr": throughput_iqr, "latency_noisy": False, "throughput_noisy": False}


def test_both_speed_ups_each_with_its_own_verdict_and_the_headline_names_them():
    teacher = speeds(11.6, [11.0, 12.0], 59.5, [57.0, 62.0])
    student = speeds(1.0, [0.95, 1.05], 77.7, [60.0, 80.0])  # 11.6x at batch 1, 1.3x in bulk
    verdict = deploy.speedup(teacher, student)
    assert verdict == {"speedup_over_teacher": 11.6, "speedup_clear": True,
                       "throughput_speedup_over_teacher": 1.306, "throughput_speedup_clear": False}
    sizes = {"file_mb": 1.0, "flops_per_image": 10**9}
    summary = run_summary({"teacher": model_row(0.9, **teacher, **sizes, speedup_over_teacher=1.0,
                                                throughput_speedup_over_teacher=1.0),
                           "student_baseline": model_row(0.8, **student, **sizes, **verdict)})
    sentence = next(s for s in report.reading_of_result(summary) if s.startswith("Measured"))
    assert sentence == ("Measured on cpu against the teacher, the student: by batch-1 latency it is 11.60x as fast "
                        "(1 against 11.6 ms); its batch-64 throughput cannot be told from the teacher's (77.7 against "
                        "59.5 images/s, overlapping interquartile ranges).")
    table = report.deployment_table(summary)
    assert "11.60x" in table and "student_baseline batch-64 throughput 1.31x" in table


# ---------------------------------------------------------------- speed


class Logged(nn.Module):
    """A tiny model that records its name in a shared log at every forward pass."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        return self.conv(images)


def test_speeds_are_measured_interleaved_with_median_and_iqr():
    log: list[str] = []
    models = {"teacher": Logged("teacher", log), "student": Logged("student", log)}
    speeds = deploy.measure_speeds(models, 8, torch.device("cpu"), None, batch=4, rounds=3, min_run_time=0.001,
                                   passes=1)
    turns = [name for index, name in enumerate(log) if index == 0 or log[index - 1] != name]
    assert turns == ["teacher", "student"] * 3  # three rounds, the models taking turns in each
    for speed in speeds.values():
        low, high = speed["latency_ms_iqr"]
        assert 0 < low <= speed["latency_ms"] <= high
        low, high = speed["throughput_img_s_iqr"]
        assert 0 < low <= speed["throughput_img_s"] <= high


def test_speedup_is_clear_only_when_the_spreads_do_not_overlap():
    teacher = speed_row(10.0, [9.0, 11.0])
    assert deploy.speedup(teacher, speed_row(5.0, [4.5, 5.5])) == {
        "speedup_over_teacher": 2.0, "speedup_clear": True,
        "throughput_speedup_over_teacher": 2.0, "throughput_speedup_clear": True}
    assert deploy.speedup(teacher, speed_row(20.0, [18.0, 22.0]))["speedup_clear"] is True  # clearly slower
    overlapping = deploy.speedup(teacher, speed_row(10.5, [10.8, 12.0]))
    assert overlapping == {"speedup_over_teacher": round(10 / 10.5, 3), "speedup_clear": False,
                           "throughput_speedup_over_teacher": round(10 / 10.5, 3), "throughput_speedup_clear": False}


def test_the_onnx_check_counts_images_over_batches_and_compares_predictions(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([0.0, 0.0, 100.0]))  # class 2 everywhere, far from any other
    batches = [torch.randn(5, 3, 2, 2), torch.randn(2, 3, 2, 2)]
    check = deploy.export_checked(model, tmp_path / "m.onnx", 2, {"role": "student_kd"}, batches)
    assert check["checked_images"] == 7 and check["differing_predictions"] == 0 and check["passed"]
    assert check["checked_split"] == "test"
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([0.0, 100.0, 0.0]))  # the model no longer predicts as its export does
    parity = deploy.onnx_parity(model, tmp_path / "m.onnx", batches)
    assert parity["differing_predictions"] == 7 and parity["checked_images"] == 7
    assert "7 of its predictions differ" in report.export_sentence(
        {"onnx": "m.onnx", **check, **parity, "passed": False})
