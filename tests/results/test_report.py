"""The comparison tables (results.report): column widths, verdicts, top-k and FLOPs ratios."""

from __future__ import annotations

import pytest
from conftest import collapsed_run, model_row, run_summary, speed_row

import utils
from core import records
from results import report, significance


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


def two_seed_collapsed_run():
    """Ants and bees over seeds 0 and 1: seed 0's baseline collapsed, so its gain (+10.46) is against a broken
    model; pooled over the two seeds the gain is within noise."""
    summary, _ = collapsed_run(share=0.6, top1=0.80)
    summary.seeds = [0, 1]
    kd = summary.models["student_kd"]
    kd.test_top1_by_seed, kd.mcnemar_p, kd.mcnemar_p_by_seed = {"0": 0.80, "1": 0.78}, 0.000402, {"0": 0.000402,
                                                                                                   "1": 0.9}
    kd.test_top1_mean, kd.test_top1_std = 0.79, 0.0141
    kd.gain_top1_by_seed, kd.gain_top1_mean, kd.gain_top1_std = {"0": 0.1046, "1": -0.01}, 0.0473, 0.0817
    kd.gain_top1_ci95, kd.gain_top1_p, kd.gain_significant, kd.gain_top1_test = [-0.687, 0.781], 0.618, False, "t"
    baseline = summary.models["student_baseline"]
    baseline.test, baseline.test_top1_by_seed = {"top1": 0.6954}, {"0": 0.5425, "1": 0.8483}
    baseline.test_top1_mean, baseline.test_top1_std = 0.6954, 0.2163
    return summary


def test_the_models_table_leads_the_gain_with_its_mean_spread_interval_and_pooled_verdict():
    summary = two_seed_collapsed_run()
    columns, rows = report._models_table(summary)
    gain = dict(zip(columns, rows[2], strict=True))["gain over baseline"]
    assert gain == ("over 2 seeds +4.73 ± 8.17, 95% interval [-68.70, +78.10]: within noise (p = 0.618); "
                    "first seed +10.46, significant (p = 0.000402)")
    assert dict(zip(columns, rows[1], strict=True))["gain over baseline"] == "—"


def test_what_the_student_keeps_over_seeds_is_its_mean_not_the_first_seeds():
    summary = two_seed_collapsed_run()
    kept = next(sentence for sentence in report.reading_of_result(summary) if "keeps" in sentence)
    assert "(its mean over seeds 0, 1 79.00% vs 85.00%)" in kept and "92.94%" in kept


def test_summary_json_gives_the_pooled_gain_first_and_an_earlier_one_still_loads():
    summary = two_seed_collapsed_run()
    for field, value in significance.headline_gain(summary.models, summary.dataset).items():
        setattr(summary, field, value)
    written = summary.to_dict()
    run_fields = [key for key in written if key.startswith("kd_gain")]
    assert run_fields[:2] == ["kd_gain_top1", "kd_gain_significant"]
    assert written["kd_gain_top1"] == 0.0473 and written["kd_gain_significant"] is False
    assert written["kd_gain_top1_by_seed"] == {"0": 0.1046, "1": -0.01}
    assert written["kd_gain_top1_ci95"] == [-0.687, 0.781]
    assert written["kd_collapsed_seeds"] == ["seed 0's baseline"]
    assert records.RunSummary.from_dict(written).kd_gain_top1_std == 0.0817
    earlier = {key: value for key, value in written.items() if not key.startswith("kd_gain_")}
    assert records.RunSummary.from_dict({**earlier, "kd_gain_top1": 0.1046}).kd_gain_significant is None
    with pytest.raises(ValueError, match="kd_gain_top1_ci95 must be"):
        records.RunSummary.from_dict({**written, "kd_gain_top1_ci95": [0.781, -0.687]})


def test_the_data_table_gives_each_splits_count_per_class():
    summary, _ = collapsed_run()
    summary.dataset.carving = {"class_counts": {"train": {"ants": 100, "bees": 120}, "test": {"ants": 70, "bees": 83}}}
    rows = dict(report._data_rows(summary))
    assert rows["train images"] == "220 (ants 100, bees 120)" and rows["test images"] == "153 (ants 70, bees 83)"
    assert rows["val images"] == "60"  # an earlier summary without the split's counts
