"""The verdict on a gain (McNemar, t-interval), sanity warnings, honest speed figures, and tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import model_row, run_summary
from torch import nn

import utils
from core import errors
from results import deploy, evaluation, report, significance


def paired(baseline_only: int, candidate_only: int, both: int = 5, neither: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of two models on the same images, with the given discordant counts."""
    baseline = [True] * baseline_only + [False] * candidate_only + [True] * both + [False] * neither
    candidate = [False] * baseline_only + [True] * candidate_only + [True] * both + [False] * neither
    return np.array(baseline), np.array(candidate)


@pytest.mark.parametrize("baseline_only, candidate_only, expected", [
    (1, 6, 2 * (math.comb(7, 0) + math.comb(7, 1)) / 2**7),  # 0.125
    (6, 1, 0.125),  # two-sided: the direction does not matter
    (2, 10, 2 * sum(math.comb(12, k) for k in range(3)) / 2**12),  # 0.0386
    (3, 3, 1.0),  # 2 * P(X <= 3 | n=6) exceeds 1: capped
    (0, 0, 1.0),  # no discordant image: nothing tells the models apart
])
def test_mcnemar_exact_p_matches_hand_computation(baseline_only, candidate_only, expected):
    result = significance.mcnemar_exact(*paired(baseline_only, candidate_only))
    assert result["p"] == pytest.approx(expected, rel=1e-9)
    assert (result["baseline_only"], result["candidate_only"]) == (baseline_only, candidate_only)


def test_correct_flags_round_trip_and_mismatched_lengths():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    flags = significance.correct_flags(logits, torch.tensor([0, 0, 0]))
    assert flags == "101"
    assert significance.parse_correct_flags(flags).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="differ in length"):
        significance.mcnemar_exact(np.ones(3, bool), np.ones(4, bool))


def t_quantile_df2(p: float) -> float:
    """Student-t quantile with 2 degrees of freedom, in closed form."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def test_t_interval_of_three_gains_matches_hand_computation():
    result = significance.paired_gain_interval([0.01, 0.03, 0.02])
    mean, std = 0.02, 0.01
    half = t_quantile_df2(0.975) * std / math.sqrt(3)  # 4.3027 * 0.005774
    t = mean / (std / math.sqrt(3))
    assert result["mean"] == pytest.approx(mean) and result["std"] == pytest.approx(std)
    assert result["ci"] == pytest.approx([mean - half, mean + half])  # [-0.00484, 0.04484]
    assert result["p"] == pytest.approx(1 - t / math.sqrt(t**2 + 2))  # two-sided, df 2: 0.0742


def test_t_interval_of_two_gains_and_of_identical_ones():
    result = significance.paired_gain_interval([0.0, 0.04])
    half = math.tan(math.pi * 0.475) * 0.02  # df 1: the quantile is tan(pi (p - 1/2)); sd/sqrt(2) = 0.02
    assert result["ci"] == pytest.approx([0.02 - half, 0.02 + half])
    assert result["p"] == pytest.approx(0.5)  # t = 1, df 1: 1 - 2 atan(1) / pi
    still = significance.paired_gain_interval([0.0, 0.0])
    assert still["ci"] == [0.0, 0.0] and still["p"] == 1.0


def rows_of(top1: dict[int, float]) -> dict:
    return {seed: model_row(value) for seed, value in top1.items()}


def test_gain_statistics_one_seed_decides_by_mcnemar():
    baseline, candidate = paired(1, 6)
    stats = significance.gain_statistics(rows_of({0: 0.8}), rows_of({0: 0.5}), {0: candidate}, {0: baseline})
    assert stats == {"mcnemar_p": pytest.approx(0.125), "gain_significant": False, "gain_top1_test": "mcnemar"}
    baseline, candidate = paired(2, 10)
    assert significance.gain_statistics(rows_of({0: 0.8}), rows_of({0: 0.5}), {0: candidate},
                                        {0: baseline})["gain_significant"]


def test_gain_statistics_several_seeds_decide_by_the_interval():
    baseline, candidate = paired(1, 6)
    correct, baseline_correct = {3: candidate, 4: candidate, 5: candidate}, {3: baseline, 4: baseline, 5: baseline}
    stats = significance.gain_statistics(rows_of({3: 0.51, 4: 0.53, 5: 0.52}), rows_of({3: 0.5, 4: 0.5, 5: 0.5}),
                                  correct, baseline_correct)
    assert stats["mcnemar_p_by_seed"] == {"3": pytest.approx(0.125), "4": pytest.approx(0.125),
                                          "5": pytest.approx(0.125)}
    assert stats["gain_top1_by_seed"] == {"3": pytest.approx(0.01), "4": pytest.approx(0.03), "5": pytest.approx(0.02)}
    half = t_quantile_df2(0.975) * 0.01 / math.sqrt(3)
    assert stats["gain_top1_ci95"] == pytest.approx([0.02 - half, 0.02 + half], abs=1e-9)
    assert stats["gain_significant"] is False  # the interval reaches below zero
    steady = significance.gain_statistics(rows_of({3: 0.52, 4: 0.53, 5: 0.525}), rows_of({3: 0.5, 4: 0.5, 5: 0.5}),
                                   correct, baseline_correct)
    assert steady["gain_top1_ci95"][0] > 0 and steady["gain_significant"] is True
    assert steady["gain_top1_p"] < significance.SIGNIFICANCE_LEVEL


def test_verdict_sentences():
    assert significance.verdict(0.125) == "within noise (p = 0.125)"
    assert significance.verdict(0.0012) == "significant (p = 0.0012)"
    assert significance.verdict(0.2, significant=True) == "significant (p = 0.2)"


# ---------------------------------------------------------------- sanity warnings


def history(val_top1: list[float], best_epoch: int) -> dict:
    return {"best_epoch": best_epoch, "epochs": [{"epoch": i + 1, "val": {"top1": v}} for i, v in enumerate(val_top1)]}


def sane_run() -> tuple:
    """A summary and histories that deserve no warning: 10 balanced classes, 10 validation images each."""
    summary = run_summary({"teacher": model_row(0.9), "student_baseline": model_row(0.8),
                           "student_kd": model_row(0.82)})
    histories = {"teacher": history([0.5, 0.8, 0.9], 3), "student_baseline": history([0.5, 0.7, 0.8], 3),
                 "student_kd": history([0.6, 0.7, 0.82], 3)}
    return summary, histories


def test_a_sane_run_gets_no_warning():
    assert significance.sanity_warnings(*sane_run()) == []


@pytest.mark.parametrize("teacher_top1, test_images, classes", [
    (0.1, 100, 10),  # exactly chance
    (0.18, 100, 10),  # above chance by the binomial test (p = 0.011), but closes under 10% of the gap to 100%
    (5 / 9, 9, 3),  # closes a third of the gap, but 5 of 9 is not significantly above 1/3 (p = 0.14)
])
def test_teacher_near_chance(teacher_top1, test_images, classes):
    summary, histories = sane_run()
    per_class = test_images // classes
    summary.dataset.sizes["test"] = test_images
    summary.dataset.images_per_class["test"] = {"min": per_class, "max": per_class}
    summary.models["teacher"].test["top1"] = teacher_top1
    warnings = significance.sanity_warnings(summary, histories)
    assert any(w.startswith("The teacher is at or near chance") for w in warnings), warnings


def test_teacher_clearly_above_chance_is_not_near_it():
    summary, histories = sane_run()
    # 30 of 100, chance 10%
    summary.models["teacher"].test["top1"] = summary.models["student_baseline"].test["top1"] = 0.3
    assert significance.sanity_warnings(summary, histories) == []


def test_chance_is_the_most_frequent_test_class():
    summary, histories = sane_run()
    summary.dataset.images_per_class["test"] = {"min": 2, "max": 60}  # always answering it scores 60%
    summary.models["teacher"].test["top1"] = 0.62
    summary.models["student_baseline"].test["top1"] = 0.6
    assert "at or near chance" in significance.sanity_warnings(summary, histories)[0]


def test_teacher_worse_than_the_baseline():
    summary, histories = sane_run()
    teacher = summary.models["teacher"]
    teacher.test["top1"] = 0.79
    teacher.vs_baseline_top1_by_seed, teacher.vs_baseline_mcnemar_p_by_seed = {"0": -0.01}, {"0": 1.0}
    assert significance.sanity_warnings(summary, histories) == []  # one image behind: the paired test cannot tell
    teacher.test["top1"] = 0.7
    teacher.vs_baseline_top1_by_seed, teacher.vs_baseline_mcnemar_p_by_seed = {"0": -0.1}, {"0": 0.002}
    warnings = significance.sanity_warnings(summary, histories)
    assert warnings == [
        "The teacher (70.00% test top-1) is worse than the baseline student by the exact McNemar test on the same "
        "test images (10.00 points behind, McNemar p = 0.002): distillation passes on what the teacher knows, so "
        "train it longer or choose a stronger one."]


def test_validation_split_too_small():
    summary, histories = sane_run()
    summary.dataset.images_per_class["val"]["min"] = 4
    assert significance.sanity_warnings(summary, histories) == [
        "The validation split has 100 images: its smallest class has 4 (fewer than 5), too coarse to choose an epoch "
        "by; put at least 126 images into the validation folder."]
    summary.dataset.images_per_class["val"]["min"] = 5
    assert significance.sanity_warnings(summary, histories) == []


def test_validation_top1_that_never_changed():
    summary, histories = sane_run()
    histories["teacher"] = history([0.3333, 0.3333, 0.3333], 2)
    histories["student_kd seed 4"] = history([0.5], 1)  # one epoch cannot change
    warnings = significance.sanity_warnings(summary, histories)
    assert len(warnings) == 1 and warnings[0].startswith("Validation top-1 never changed over the epochs of teacher:")


def test_distilled_student_whose_best_epoch_is_the_first():
    summary, histories = sane_run()
    histories["student_baseline"] = history([0.8, 0.7, 0.75], 1)  # the baseline is not distilled
    histories["student_kd seed 1"] = history([0.8], 1)  # one epoch: first by necessity
    assert significance.sanity_warnings(summary, histories) == []
    histories["student_kd seed 2"] = history([0.8, 0.7, 0.75], 1)
    warnings = significance.sanity_warnings(summary, histories)
    assert len(warnings) == 1 and warnings[0].startswith("The best epoch of student_kd seed 2 is the first")


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


def speed_row(latency: float, iqr: list[float]) -> dict:
    return {"latency_ms": latency, "latency_ms_iqr": iqr, "throughput_img_s": 1000 / latency,
            "throughput_img_s_iqr": [1000 / iqr[1], 1000 / iqr[0]]}


def test_speedup_is_clear_only_when_the_spreads_do_not_overlap():
    teacher = speed_row(10.0, [9.0, 11.0])
    assert deploy.speedup(teacher, speed_row(5.0, [4.5, 5.5])) == {
        "speedup_over_teacher": 2.0, "speedup_clear": True,
        "throughput_speedup_over_teacher": 2.0, "throughput_speedup_clear": True}
    assert deploy.speedup(teacher, speed_row(20.0, [18.0, 22.0]))["speedup_clear"] is True  # clearly slower
    overlapping = deploy.speedup(teacher, speed_row(10.5, [10.8, 12.0]))
    assert overlapping == {"speedup_over_teacher": round(10 / 10.5, 3), "speedup_clear": False,
                           "throughput_speedup_over_teacher": round(10 / 10.5, 3), "throughput_speedup_clear": False}


# ---------------------------------------------------------------- printed tables

LONG_NAMES = {"teacher": "efficientnet_b0", "student_baseline": "mobilenet_v3_small",
              "student_fitnet": "mobilenet_v3_small", "student_fitnet seed_2": "mobilenet_v3_small"}


def long_name_summary():
    """A run's summary with long model and architecture names, and a speed-up the spread cannot support."""
    models = {}
    latencies = {"teacher": (12.5, [12.0, 13.0]), "student_baseline": (5.0, [4.9, 5.1]),
                 "student_fitnet": (6.0, [5.9, 6.1]), "student_fitnet seed_2": (12.4, [12.2, 12.6])}
    for index, (role, arch) in enumerate(LONG_NAMES.items()):
        latency, iqr = latencies[role]
        models[role] = model_row(
            0.9 - index / 100, arch=arch, params=5_288_548 - index * 1_000_000, size_mb=20.2, best_epoch=12,
            train_seconds=3725.0, test={"top1": 0.9 - index / 100, "top3": 0.99, "f1_macro": 0.9, "auc_macro": 0.99},
            mcnemar_p=0.5, gain_significant=False, file_mb=20.3, flops_per_image=401_000_000,
            **speed_row(latency, iqr), speedup_over_teacher=round(12.5 / latency, 3),
            speedup_clear=role != "student_fitnet seed_2",  # its spread overlaps the teacher's
        )
    return run_summary(models)


def assert_cells_under_their_headers(table: str, columns: dict[str, tuple[str, callable]], roles: list[str]) -> None:
    """Every row's cell sits under its column's header: left-aligned names start with their header,
    right-aligned numbers end with it."""
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("model "))
    for role in roles:
        line = next(line for line in lines if line.startswith(role + " "))
        for label, (align, cell) in columns.items():
            start = header.index(label)
            value = cell(role)
            if align == "left":
                assert line[start:start + len(value)] == value, (role, label, line)
            else:
                end = start + len(label)
                assert line[end - len(value):end] == value and line[end:end + 1] in ("", " "), (role, label, line)


def test_tables_size_their_columns_from_long_names():
    summary = long_name_summary()
    roles = list(LONG_NAMES)
    def row(role: str) -> dict:
        return summary.models[role].to_dict()

    comparison = report.comparison_table(summary)
    assert_cells_under_their_headers(comparison, {
        "model": ("left", lambda role: role), "arch": ("left", lambda role: row(role)["arch"]),
        "params": ("right", lambda role: f"{row(role)['params']:,}"),
        "best ep": ("right", lambda role: str(row(role)["best_epoch"])),
        "top1": ("right", lambda role: utils.format_metric(row(role)["test"]["top1"])),
        "auc_macro": ("right", lambda role: utils.format_metric(row(role)["test"]["auc_macro"])),
    }, roles)
    deployment = report.deployment_table(summary)
    assert_cells_under_their_headers(deployment, {
        "model": ("left", lambda role: role), "params": ("right", lambda role: f"{row(role)['params']:,}"),
        "GFLOPs/img": ("right", lambda role: f"{row(role)['flops_per_image'] / 1e9:.3f}"),
        "latency ms": ("right", lambda role: f"{row(role)['latency_ms']:.2f}"),
        "img/s @64": ("right", lambda role: f"{row(role)['throughput_img_s']:.1f}"),
    }, roles)


def test_tables_state_verdicts_and_unclear_speedups():
    summary = long_name_summary()
    comparison = report.comparison_table(summary)
    assert ("Distillation (fitnet) cost 1.00 points of test top-1 against the baseline student: within noise "
            "(p = 0.5) by the exact McNemar test on the paired test predictions." in comparison)
    assert "significant: exact McNemar test of the paired test predictions, p < 0.05" in comparison
    deployment = report.deployment_table(summary)
    line = next(line for line in deployment.splitlines() if line.startswith("student_fitnet seed_2 "))
    assert line.split()[7] == "unclear"  # the batch-1 latency speed-up
    assert next(line for line in deployment.splitlines() if line.startswith("student_fitnet ")).split()[6] == "2.08x"
    assert "median ratios: student_fitnet seed_2 batch-1 latency 1.01x" in deployment


def test_per_image_results_are_read_back_for_mcnemar(tmp_path):
    utils.write_json(tmp_path / report.RESULTS, {"model": "student_kd", "test_correct": "0110"})
    assert evaluation.read_test_correct(tmp_path).tolist() == [False, True, True, False]
    utils.write_json(tmp_path / report.RESULTS, {"model": "student_kd"})  # finished by an earlier version
    with pytest.raises(errors.SettingsError, match="delete it to train that model again"):
        evaluation.read_test_correct(tmp_path)
