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


def fake_timer(seconds: dict[str, list[float]], calls: dict[tuple[str, int], int]):
    """A stand-in for block_times (no real timing in tests): model NAME's k-th timing at batch 1 gives
    seconds[NAME][k modulo its length], at any other batch seconds[NAME][0]; `calls` counts the timings."""
    def fake_block_times(run, min_run_time, min_blocks=2):
        key = (run.args[0].name, len(run.args[1]))
        calls[key] = calls.get(key, 0) + 1
        times = seconds[key[0]]
        return [times[(calls[key] - 1) % len(times)] if key[1] == 1 else times[0]] * 2
    return fake_block_times


def test_a_wide_speed_up_is_measured_again_and_marked_noisy_if_it_stays_so(monkeypatch):
    calls: dict[tuple[str, int], int] = {}
    # student: per-round ratios 4, 2, 1 in the first pass (wide), then 4, 4, 4; wobbly: 4, 2, 1 in every pass
    seconds = {"teacher": [0.020], "student": [0.005, 0.010, 0.020, 0.005], "wobbly": [0.005, 0.010, 0.020]}
    monkeypatch.setattr(deploy, "block_times", fake_timer(seconds, calls))
    models = {name: Named(name) for name in seconds}
    speeds = deploy.measure_speeds(models, 8, torch.device("cpu"), None, "teacher", batch=4)
    assert calls[("student", 1)] == 6 and calls[("wobbly", 1)] == 9 and calls[("student", 4)] == 3
    assert calls[("teacher", 1)] == 15, "the teacher is timed once beside every timing of another model"
    assert speeds["student"]["speedup_over_teacher"] == 4.0 and speeds["student"]["speedup_clear"] is True
    assert speeds["wobbly"]["latency_noisy"] is True and speeds["wobbly"]["speedup_clear"] is False
    assert speeds["wobbly"]["throughput_speedup_over_teacher"] == 4.0 and not speeds["wobbly"]["throughput_noisy"]
    teacher = model_row(0.9, **speeds["teacher"])
    row = model_row(0.8, **speeds["wobbly"])
    assert deploy.speedup_cell(row, "latency", teacher) == "noisy"
    assert deploy.speedup_cell(row, "throughput", teacher) == "4.00x"


def test_identical_architectures_measured_apart_mark_the_whole_table_noisy(monkeypatch):
    # a busy machine: two identical students, each tight in its own rounds, 4x and 2x against the teacher
    seconds = {"teacher": [0.020], "student_baseline": [0.005], "student_kd": [0.010]}
    monkeypatch.setattr(deploy, "block_times", fake_timer(seconds, {}))
    models = {name: Named(name) for name in seconds}
    speeds = deploy.measure_speeds(models, 8, torch.device("cpu"), None, "teacher", batch=4)
    assert speeds["student_baseline"]["speedup_clear"] and speeds["student_baseline"]["speedup_over_teacher"] == 4
    other_archs = {"teacher": "vgg16_bn", "student_baseline": "resnet8x4", "student_kd": "resnet20"}
    assert deploy.mark_table_noisy(speeds, other_archs) == speeds, "different architectures may differ"
    marked = deploy.mark_table_noisy(speeds, {**other_archs, "student_kd": "resnet8x4"})
    assert marked["student_baseline"]["speeds_apart"] == ("student_baseline and student_kd (all resnet8x4) measured "
                                                          "batch-1 latency speed-ups of 4.00x and 2.00x")
    sizes = {"file_mb": 1.0, "flops_per_image": 10**9}
    summary = run_summary({role: model_row(0.8, **speed, **sizes) for role, speed in marked.items()})
    for role in ("student_baseline", "student_kd"):
        for kind in deploy.SPEED_KINDS:
            assert deploy.speedup_cell(summary.models[role], kind, summary.models["teacher"]) == "noisy"
    table = report.deployment_table(summary)
    rows, note = table.split("\nnoisy: ")
    assert "4.00x" not in rows and note.endswith("no speed-up of this table is claimed\n")
    sentence = next(s for s in report.reading_of_result(summary) if s.startswith("Measured"))
    assert "no batch-1 latency speed-up is claimed" in sentence and "as fast" not in sentence


def test_both_speed_ups_each_with_its_own_verdict_and_the_headline_names_them():
    sizes = {"file_mb": 1.0, "flops_per_image": 10**9}
    teacher = model_row(0.9, **speed_row(11.6, [11.0, 12.0]), **sizes, speedup_over_teacher=1.0,
                        throughput_speedup_over_teacher=1.0)
    student = model_row(0.8, **speed_row(1.0, [0.95, 1.05]), **sizes, speedup_over_teacher=11.6, speedup_clear=True,
                        throughput_speedup_over_teacher=1.306, throughput_speedup_clear=False)
    summary = run_summary({"teacher": teacher, "student_baseline": student})
    sentence = next(s for s in report.reading_of_result(summary) if s.startswith("Measured"))
    assert sentence == ("Measured on cpu against the teacher, the student: by batch-1 latency it is 11.60x as fast "
                        "(1 against 11.6 ms, median of per-round ratios); its batch-64 throughput cannot be told from "
                        "the teacher's (1000 against 86.2069 images/s; the interquartile range of its per-round "
                        "ratios holds 1).")
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


def test_speeds_are_measured_against_the_teacher_in_alternating_rounds_with_median_and_iqr():
    log: list[str] = []
    models = {"teacher": Logged("teacher", log), "student": Logged("student", log)}
    speeds = deploy.measure_speeds(models, 8, torch.device("cpu"), None, "teacher", batch=4, rounds=3,
                                   min_run_time=0.001, passes=1)
    turns = [name for index, name in enumerate(log) if index == 0 or log[index - 1] != name]
    assert turns == ["teacher", "student"] * 6  # three rounds, teacher then student at each batch size
    for speed in speeds.values():
        low, high = speed["latency_ms_iqr"]
        assert 0 < low <= speed["latency_ms"] <= high
        low, high = speed["throughput_img_s_iqr"]
        assert 0 < low <= speed["throughput_img_s"] <= high
    low, high = speeds["student"]["speedup_over_teacher_iqr"]
    assert 0 < low <= speeds["student"]["speedup_over_teacher"] <= high


def test_a_speed_up_is_clear_only_when_its_per_round_range_excludes_one():
    assert deploy._ratio_fields("latency", [1.9, 2.0, 2.1]) == {
        "speedup_over_teacher": 2.0, "speedup_over_teacher_iqr": [1.95, 2.05], "latency_noisy": False,
        "speedup_clear": True}
    assert deploy._ratio_fields("throughput", [0.5, 0.52, 0.55])["throughput_speedup_clear"] is True  # slower
    assert deploy._ratio_fields("latency", [0.95, 1.0, 1.1])["speedup_clear"] is False


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
