"""What a practitioner with a small photo folder meets (issue 23) and verdicts that could mislead (issue 19):
collapsed models, both speed-ups and noisy measurements, per-seed losses, the VGG head, small validation
splits, a reused teacher's settings and history, wall time over sittings, and the small things."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_FLAGS, model_row, run_summary
from torch import nn

import engine
import experiment
import model_builder
import prediction_for_one
import utils
from config import command_line
from core import records
from results import deploy, ledger, report, significance
from training import checkpoints

# ---------------------------------------------------------------- 19.1: zero spread is no certainty


def one_more_right(seed_images: int, extra: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline and distilled correctness on `seed_images` test images: the distilled student gets `extra`
    more right, and nothing else differs."""
    baseline = np.zeros(seed_images, bool)
    baseline[: seed_images // 2] = True
    distilled = baseline.copy()
    distilled[seed_images // 2: seed_images // 2 + extra] = True
    return baseline, distilled


def test_identical_gains_take_their_verdict_from_each_seeds_mcnemar_test():
    baseline, distilled = one_more_right(10_000, 1)
    # One more right image out of 10,000 in each seed; float top-1 differences are not bit-identical.
    rows = {0: model_row(0.6543), 1: model_row(0.7001)}
    baseline_rows = {0: model_row(0.6542), 1: model_row(0.7000)}
    stats = significance.gain_statistics(rows, baseline_rows, {0: distilled, 1: distilled},
                                         {0: baseline, 1: baseline})
    assert stats["mcnemar_p_by_seed"] == {"0": 1.0, "1": 1.0}
    assert stats["gain_top1_test"] == "mcnemar_every_seed"
    assert stats["gain_significant"] is False and stats["gain_top1_p"] == 1.0
    assert "gain_top1_ci95" not in stats, "an interval of zero width would read as certainty"
    row = records.ModelRow(**{**vars(rows[0]), **stats})
    assert records.ModelRow.from_dict(row.to_dict(), "summary.json: student_kd") == row, "summary.json reads it back"
    sentence = significance.gain_sentence("student_kd", row, baseline_rows[0], [0, 1])
    assert "a spread of zero that gives no interval" in sentence and "within noise (p = 1)" in sentence
    # The same number of images in every seed, each far beyond noise: significant by every seed's test.
    baseline, distilled = one_more_right(1_000, 40)
    strong = significance.gain_statistics({0: model_row(0.54), 1: model_row(0.54)},
                                          {0: model_row(0.5), 1: model_row(0.5)}, {0: distilled, 1: distilled},
                                          {0: baseline, 1: baseline})
    assert strong["gain_significant"] is True and strong["gain_top1_p"] < 1e-9


# ---------------------------------------------------------------- 23.1: models that answer one class


def collapsed_run(share: float = 1.0, top1: float = 0.4575) -> tuple[records.RunSummary, dict]:
    """Two classes ('ants' 70, 'bees' 83 test images); the distilled student answers 'ants' for `share` of them."""
    models = {"teacher": model_row(0.85, test_top_class="bees", test_top_class_share=0.55),
              "student_baseline": model_row(0.8, test_top_class="bees", test_top_class_share=0.5),
              "student_kd": model_row(top1, test_top_class="ants", test_top_class_share=share, mcnemar_p=1.0,
                                      gain_significant=False)}
    summary = run_summary(models, sizes={"train": 220, "val": 60, "test": 153},
                          images_per_class={"train": {"min": 100, "max": 120}, "val": {"min": 28, "max": 32},
                                            "test": {"min": 70, "max": 83}})
    summary.dataset.class_names = ["ants", "bees"]
    summary.dataset.carving = {"class_counts": {"test": {"ants": 70, "bees": 83}}}
    histories = {role: {"best_epoch": 2, "epochs": [{"val": {"top1": 0.5, "f1_macro": 0.4}},
                                                     {"val": {"top1": 0.6, "f1_macro": 0.5}}]}
                 for role in models}
    return summary, histories


def test_a_student_answering_one_class_is_warned_about_and_not_praised():
    summary, histories = collapsed_run()
    warnings = significance.sanity_warnings(summary, histories)
    assert warnings == [
        "student_kd answers 'ants' for 100.00% of the test images, a class that is 45.75% of them: it has not "
        "learned to tell the classes apart, so its accuracy, gain and speed-up are not results."]
    headline = report.reading_of_result(summary)[0]
    assert headline.startswith("The distilled student (kd) answers 'ants' for 100.00% of the test images")
    assert not any("keeps" in sentence for sentence in report.reading_of_result(summary))
    summary.models["student_kd"].test_top_class_share = 0.6  # a working model that prefers one class
    summary.models["student_kd"].test["top1"] = 0.78
    assert significance.sanity_warnings(summary, histories) == []
    assert report.reading_of_result(summary)[0].startswith("The distilled student keeps")


def test_every_student_of_every_seed_gets_the_chance_check():
    summary, histories = collapsed_run(share=0.6, top1=0.55)  # 55% where always answering 'bees' scores 54.25%
    rows = {"teacher": summary.models["teacher"], "student_baseline": summary.models["student_baseline"],
            "student_kd seed 1": summary.models["student_kd"]}
    warnings = significance.sanity_warnings(summary, histories, rows)
    assert len(warnings) == 1 and warnings[0].startswith(
        "student_kd seed 1 is at or near chance: 55.00% test top-1, where always answering the most frequent class "
        "scores 54.25%")


def test_torchvision_mobile_networks_are_set_up_for_short_runs():
    # torchvision builds MobileNetV3 with batch-norm momentum 0.01 and its depthwise convolutions 24x too small
    # (576 channels): after a few dozen steps the running variances were still near 1 where the batches' were
    # 1e-7, and in eval mode it answered one class for every photo.
    torch.manual_seed(0)
    model = model_builder.build_model("mobilenet_v3_small", 2, 64)
    momenta = {module.momentum for module in model.modules() if isinstance(module, nn.BatchNorm2d)}
    assert momenta == {model_builder.MIN_BATCH_NORM_MOMENTUM}
    depthwise = model.features[11].block[1][0]  # 576 channels, 5x5, one group each
    assert depthwise.groups == 576 and float(depthwise.weight.std()) == pytest.approx((2 / 25) ** 0.5, rel=0.05)
    dense = model.features[11].block[0][0]  # ungrouped 1x1: torchvision's own initialization, fan-out 576
    assert float(dense.weight.std()) == pytest.approx((2 / 576) ** 0.5, rel=0.05)


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


def test_a_student_costlier_than_torchvisions_model_of_its_size_is_named():
    peer = deploy.peer_flops("resnet8x4", 2, 128)
    assert peer["peer"] == "shufflenet_v2_x1_0"
    assert peer["flops_per_image"] > 5e9 > 1e8 > peer["peer_flops_per_image"]
    assert deploy.peer_flops("resnet8x4", 2, 64) is None, "up to 64 px the literature's networks are the fair choice"
    assert deploy.peer_flops("mobilenet_v3_small", 2, 128) is None
    summary, histories = collapsed_run(share=0.6, top1=0.8)
    summary.models["student_baseline"].flops_peer = peer
    warning = significance.sanity_warnings(summary, histories)[0]
    assert warning.startswith("At 128 px the student resnet8x4 needs 5.67 GFLOPs an image, more than torchvision's "
                              "shufflenet_v2_x1_0 of about its size")


# ---------------------------------------------------------------- 23.3: every seed shown, losses named


def three_seed_summary() -> records.RunSummary:
    summary = run_summary({
        "teacher": model_row(0.9),
        "student_baseline": model_row(0.8, test_top1_by_seed={"0": 0.8, "1": 0.79, "2": 0.81}),
        "student_kd": model_row(0.8, test_top1_by_seed={"0": 0.8, "1": 0.8, "2": 0.6727}, mcnemar_p=1.0,
                                gain_significant=False, mcnemar_p_by_seed={"0": 1.0, "1": 0.5, "2": 0.0005},
                                gain_top1_by_seed={"0": 0.0, "1": 0.01, "2": -0.1373}, gain_top1_mean=-0.0424,
                                gain_top1_std=0.08, gain_top1_ci95=[-0.24, 0.16], gain_top1_p=0.45,
                                gain_top1_test="t"),
    }, seeds=(0, 1, 2))
    return summary


def test_every_seed_is_shown_and_a_significant_loss_in_one_is_a_warning():
    summary = three_seed_summary()
    table = report.comparison_table(summary)
    line = next(line for line in table.splitlines() if line.startswith("student_kd") and " 2 " in line)
    assert line.split() == ["student_kd", "2", "67.27", "-13.73", "significant", "loss", "(p", "=", "0.0005)"]
    assert significance.sanity_warnings(summary, {}) == [
        "Distillation made the student significantly worse than the baseline of its seed: student_kd seed 2 "
        "(-13.73 points, McNemar p = 0.0005)."]


# ---------------------------------------------------------------- 23.4: the VGG head


def test_vgg_above_64_px_gets_the_compact_head_unless_torchvisions_weights_load():
    compact = model_builder.build_on_meta("VGG16", 2, 128)
    full = model_builder.build_on_meta("VGG16", 2, 128, model_builder.default_head(object()))
    assert sum(p.numel() for p in compact.parameters()) < 15e6 < 130e6 < sum(p.numel() for p in full.parameters())
    assert (checkpoints.head_of(compact), checkpoints.head_of(full)) == ("compact", "torchvision")
    assert model_builder.default_head(None) == "compact"


def test_checkpoints_record_the_head_and_older_ones_rebuild_as_they_were(monkeypatch):
    built = []
    monkeypatch.setattr(model_builder, "build_model",
                        lambda arch, classes, size, head="compact": built.append(head) or nn.Linear(1, 2))
    weights = nn.Linear(1, 2).state_dict()
    for saved, expected in (({"head": "compact", "image_size": 128}, "compact"),
                            ({"image_size": 128}, "torchvision"),  # written before the choice was recorded
                            ({"image_size": 32}, "compact")):
        checkpoints.load_model({"arch": "VGG16", "class_names": ["a", "b"], "mean": [0.5] * 3, "std": [0.25] * 3,
                                "state_dict": weights, **saved})
        assert built[-1] == expected
    assert checkpoints.make_checkpoint({"class_names": ["a"], "image_size": 8, "resize": "squash", "mean": [0] * 3,
                                        "std": [1] * 3, "config": {}}, "teacher", "vgg16_bn", {}, 1, [],
                                       "torchvision")["head"] == "torchvision"


# ---------------------------------------------------------------- 23.5 and 19.3: validation


def test_small_validation_warns_by_what_one_image_is_worth_and_names_the_fraction():
    summary, histories = collapsed_run(share=0.6, top1=0.8)
    summary.dataset.sizes["val"] = 25
    summary.dataset.images_per_class["val"] = {"min": 12, "max": 13}
    summary.dataset.carving["val_fraction"] = 0.1
    assert significance.sanity_warnings(summary, histories) == [
        "The validation split has 25 images: one image moves validation top-1 by 4.00 points (more than 2), too "
        "coarse to choose an epoch by; --val-fraction 0.21 would carve about 52 (one image: 1.92 points)."]
    summary.dataset.sizes["val"] = 51
    assert significance.sanity_warnings(summary, histories) == []


@pytest.mark.parametrize("metric, expected", [
    ("loss", "Validation top-1 never changed over the epochs of teacher: the kept epoch was chosen by validation "
             "loss, the --select-metric;"),
    ("f1_macro", "Validation macro F1 never changed over the epochs of teacher: the kept epoch was chosen by the "
                 "tie-break of --select-metric f1_macro, the lower validation loss;"),
])
def test_the_flat_validation_warning_names_the_selection_metric(metric, expected):
    summary, histories = collapsed_run(share=0.6, top1=0.8)
    histories["teacher"] = {"best_epoch": 1, "epochs": [{"val": {"top1": 0.5, "f1_macro": 0.4, "loss": 0.7}},
                                                        {"val": {"top1": 0.5, "f1_macro": 0.4, "loss": 0.6}}]}
    warnings = significance.sanity_warnings(summary, histories, select_metric=metric)
    assert len(warnings) == 1 and warnings[0].startswith(expected)


def test_the_report_names_the_selection_metric_used(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    config = utils.read_json(copy / "config.json")
    utils.write_json(copy / "config.json", {**config, "select_metric": "f1_macro"})
    assert "Best epoch chosen on validation macro F1" in report.build_report(copy)


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
    assert "validation images (tolerance 1e-04): passed" in out
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


# ---------------------------------------------------------------- 23.8: wall time over sittings


def test_wall_time_counts_every_sitting(tmp_path):
    utils.write_json(tmp_path / checkpoints.SITTINGS, {"seconds": [50.0, 20.0]})
    assert checkpoints.Sittings(tmp_path, 0.0, resume=False).count() == 1, "a new run counts no earlier sitting"
    resumed = checkpoints.Sittings(tmp_path, checkpoints.time.perf_counter(), resume=True)
    assert resumed.count() == 3 and 70.0 <= resumed.total() < 71.0 and resumed.last() < 1.0
    resumed.record()
    assert utils.read_json(tmp_path / checkpoints.SITTINGS)["seconds"][:2] == [50.0, 20.0]
    summary = run_summary({"teacher": model_row(0.9)})
    summary.wall_seconds, summary.wall_seconds_last_sitting, summary.sittings = 74.2, 22.4, 2
    assert report.wall_time(summary) == "1m14s in 2 sittings (the last 22.4s)"
    row = ledger.ledger_row(experiment.default_config(), summary, tmp_path)
    assert (row["wall_seconds"], row["wall_seconds_last_sitting"]) == (74.2, 22.4)


# ---------------------------------------------------------------- 23.9: small things


def test_a_cpu_run_does_not_import_what_warns_of_a_missing_cuda_runtime():
    code = ("import sys, torch; from results import deploy; from torch import nn; "
            "deploy.measure_speeds({'m': nn.Conv2d(3, 2, 3)}, 8, torch.device('cpu'), None, batch=2, rounds=1, "
            "min_run_time=0.001); print('torch.utils.cpp_extension' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False", result.stderr


def test_top_k_is_hidden_where_it_cannot_miss():
    summary, _ = collapsed_run(share=0.6, top1=0.8)  # two classes: top-3 is 100% by definition
    header = report.comparison_table(summary).splitlines()[0].split()
    assert "top1" in header and "top3" not in header
    assert "top-3 %" not in report._models_table(summary)[0]
    record = {"epoch": 1, "lr": 0.1, "seconds": 1.0, "train": {"loss": 0.5, "top1": 0.5, "top3": 1.0, "f1_macro": 0.5},
              "val": {"loss": 0.5, "top1": 0.5, "top3": 1.0, "f1_macro": 0.5, "auc_macro": 0.5}}
    assert "top3" not in utils.history_table([record], 2) and "top3" in utils.history_table([record], 10)


def test_flops_ratios_keep_their_significant_digits():
    summary = run_summary({"teacher": model_row(0.9, flops_per_image=30_900_000_000),
                           "student_baseline": model_row(0.8, flops_per_image=59_000_000)})
    assert ("The student needs 0.00191x the teacher's FLOPs per image (0.059 vs 30.9 GFLOPs)."
            in report.reading_of_result(summary))


def test_a_flag_typo_names_the_closest_flag_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        command_line.parse_command_line(["--studnet-model", "resnet8"], experiment.default_config())
    error = capsys.readouterr().err
    assert stop.value.code == 2
    assert error == ("experiment.py: error: unknown flag --studnet-model (did you mean --student-model?) "
                     "(python experiment.py --help lists every flag)\n")


def test_prediction_help_shows_the_top_k_default(capsys):
    with pytest.raises(SystemExit):
        prediction_for_one.main(["--help"])
    assert "how many classes to show per image (default: 3)" in " ".join(capsys.readouterr().out.split())
