"""Significance and sanity checks (results.significance): McNemar and t intervals by hand, verdicts, and the
warnings a run's numbers call for."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import collapsed_run, model_row, run_summary, tied_logits

import utils
from core import paired_tests, records
from results import report, significance

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
    assert report.reading_of_result(summary)[1].startswith("The distilled student keeps")


def test_the_headline_leads_with_the_verdict_and_names_chance_when_it_is_near():
    summary, _ = collapsed_run(share=0.6, top1=0.6405)  # KD cost 15.95 points; chance 54.25%
    summary.models["student_kd"].mcnemar_p = 0.023
    reading = report.reading_of_result(summary)
    assert reading[0].startswith("Distillation (kd) cost 15.95 points") and "significant (p = 0.023)" in reading[0]
    assert "(64.05% vs 85.00%, where always answering the most frequent class scores 54.25%)" in reading[1]
    summary.models["student_kd"].test["top1"] = 0.95  # far from chance: not named
    assert "most frequent class" not in report.reading_of_result(summary)[1]


def test_a_two_seed_verdict_leads_with_the_pooled_one_and_names_a_collapsed_baseline_seed():
    summary, _ = collapsed_run(share=0.6, top1=0.80)
    baseline, kd = summary.models["student_baseline"], summary.models["student_kd"]
    summary.seeds = [0, 1]
    baseline.test_top1_by_seed = {"0": 0.5425, "1": 0.80}  # seed 0's baseline answers one class
    kd.test_top1_by_seed = {"0": 0.6471, "1": 0.79}
    kd.mcnemar_p, kd.gain_top1_mean, kd.gain_top1_std = 0.0004, 0.0473, 0.081
    kd.gain_top1_ci95, kd.gain_top1_p, kd.gain_significant = [-0.68, 0.77], 0.618, False
    for sentence in (report.reading_of_result(summary)[0], report.comparison_table(summary)):
        assert "Distillation (kd) over seeds 0, 1: its gain is +4.73" in sentence
        assert sentence.index("within noise (p = 0.618)") < sentence.index("significant (p = 0.0004)")
        assert "seed 0's baseline collapsed (at or near chance)" in sentence


def test_every_student_of_every_seed_gets_the_chance_check():
    summary, histories = collapsed_run(share=0.6, top1=0.55)  # 55% where always answering 'bees' scores 54.25%
    rows = {"teacher": summary.models["teacher"], "student_baseline": summary.models["student_baseline"],
            "student_kd seed 1": summary.models["student_kd"]}
    warnings = significance.sanity_warnings(summary, histories, rows)
    assert len(warnings) == 1 and warnings[0].startswith(
        "student_kd seed 1 is at or near chance: 55.00% test top-1, where always answering the most frequent class "
        "scores 54.25%")


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


def test_mcnemar_refuses_predictions_of_different_lengths():
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


def test_the_zero_spread_verdict_takes_the_largest_mcnemar_p():
    images = np.arange(100)
    baseline = {0: images < 50, 1: images < 50}
    # Both seeds gain 10 images; seed 0 with 10 discordant images (all its way), seed 1 with 50 (30 against 20).
    distilled = {0: images < 60, 1: (images >= 20) & (images < 80)}
    rows = {seed: model_row(float(correct.mean())) for seed, correct in distilled.items()}
    baseline_rows = {seed: model_row(float(correct.mean())) for seed, correct in baseline.items()}
    stats = significance.gain_statistics(rows, baseline_rows, distilled, baseline)
    p = {seed: significance.mcnemar_exact(baseline[seed], distilled[seed])["p"] for seed in (0, 1)}
    assert p[0] < significance.SIGNIFICANCE_LEVEL < p[1]
    assert stats["gain_top1_test"] == records.ZERO_SPREAD_TEST
    assert stats["gain_top1_p"] == p[1] and stats["gain_significant"] is False


def test_the_verdicts_flags_count_what_the_tables_top1_counts_when_logits_tie():
    logits, labels = tied_logits(seed=1)
    flags = paired_tests.parse_correct_flags(paired_tests.correct_flags(logits, labels))
    assert round(utils.topk_accuracy(logits, labels, 1) * len(labels)) == int(flags.sum())


def test_a_student_costlier_than_its_teacher_is_warned_about_in_the_console_and_the_headline():
    summary, histories = collapsed_run(share=0.6, top1=0.80)
    summary.models["teacher"].flops_per_image = 0.626e9
    for role in ("student_baseline", "student_kd"):
        summary.models[role].flops_per_image = 1.11e9
    warning = next(w for w in significance.sanity_warnings(summary, histories) if "costs more than its teacher" in w)
    assert "1.77x its FLOPs an image (1.11 vs 0.626 GFLOPs)" in warning and "resnet8x4" in warning
    assert warning in report.reading_of_result(summary)[:2]


def test_a_student_as_costly_as_its_teacher_is_not_said_to_cost_more():
    summary, histories = collapsed_run(share=0.6, top1=0.80)
    for role in ("teacher", "student_baseline", "student_kd"):
        summary.models[role].flops_per_image = 6.25e6
    warning = next(w for w in significance.sanity_warnings(summary, histories) if "its teacher" in w)
    assert "costs as much as its teacher" in warning and "1.00x its FLOPs" in warning
