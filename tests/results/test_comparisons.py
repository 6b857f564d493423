"""Head to head: Holm's step-down against hand-computed values, every pair's statistics against scipy's tests
computed here, a family of equally good students that no corrected test separates, the ranking's group tied
with the best, the record's schema, the report's tables and the ledger's columns."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import model_row, run_summary
from scipy import stats

from core import paired_tests, records
from results import comparisons, ledger, report, significance

ROLES = ["student_baseline", "student_kd", "student_dkd", "student_fitnet"]


def _flags(skills: list[float], seeds: list[int], images: int, seed: int = 0) -> comparisons.Flags:
    """Every student's per-image correctness, drawn independently with its own chance of being right."""
    rng = np.random.default_rng(seed)
    return {role: {run: rng.random(images) < skill for run in seeds}
            for role, skill in zip(ROLES[:len(skills)], skills, strict=True)}


# ---------------------------------------------------------------- Holm's step-down


def test_the_holm_correction_is_holms_and_none_leaves_the_p_values():
    p = [0.01, 0.02, 0.03]
    assert comparisons.corrected(p, "none") == p
    assert comparisons.corrected(p, "holm") == pytest.approx([0.03, 0.04, 0.04])


def test_compare_corrects_the_whole_family_by_holm():
    flags = _flags([0.55, 0.65, 0.7, 0.8], [0, 1, 2], 200, seed=3)
    result = comparisons.compare(flags, [0, 1, 2])
    raw = [pair.p for pair in result.pairs]
    assert len(raw) == 6  # every two of four students
    assert [pair.p_corrected for pair in result.pairs] == pytest.approx(paired_tests.holm(raw), abs=1e-12)
    assert [pair.p_corrected for pair in result.pairs] != pytest.approx([min(1, 6 * p) for p in raw], abs=1e-12)
    for seed in ("0", "1", "2"):
        by_seed = [pair.mcnemar_p_by_seed[seed] for pair in result.pairs]
        assert [pair.mcnemar_p_corrected_by_seed[seed] for pair in result.pairs] == pytest.approx(
            paired_tests.holm(by_seed), abs=1e-12)
    assert [pair.significant for pair in result.pairs] == [pair.p_corrected < 0.05 for pair in result.pairs]
    uncorrected = comparisons.compare(flags, [0, 1, 2], "none")
    assert uncorrected.correction == "none"
    assert [pair.p_corrected for pair in uncorrected.pairs] == [pair.p for pair in uncorrected.pairs]


# ---------------------------------------------------------------- each pair against scipy


def _recomputed(flags: comparisons.Flags, seeds: list[int], first: str, second: str) -> dict:
    """One pair's McNemar p per seed by scipy's binomtest, and over several seeds ttest_rel's p and interval."""
    mcnemar = {}
    for seed in seeds:
        a, b = flags[first][seed], flags[second][seed]
        only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
        mcnemar[str(seed)] = 1.0 if only_a + only_b == 0 else stats.binomtest(only_a, only_a + only_b).pvalue
    if len(seeds) == 1:
        return {"mcnemar": mcnemar}
    t = stats.ttest_rel([flags[first][s].mean() for s in seeds], [flags[second][s].mean() for s in seeds])
    return {"mcnemar": mcnemar, "t": t.pvalue, "ci": list(t.confidence_interval(0.95))}


def test_every_pair_equals_scipys_tests_and_the_ranking_is_by_mean_top1():
    seeds = [0, 1, 2]
    flags = _flags([0.55, 0.65, 0.7, 0.8], seeds, 200, seed=3)
    result = comparisons.compare(flags, seeds)
    means = {role: np.mean([flags[role][s].mean() for s in seeds]) for role in flags}
    assert [student.role for student in result.ranking] == sorted(means, key=lambda role: -means[role])
    for pair in result.pairs:
        assert means[pair.first] >= means[pair.second]
        scipy = _recomputed(flags, seeds, pair.first, pair.second)
        assert pair.test == "t"
        assert pair.p == pytest.approx(scipy["t"], abs=1e-12)
        assert pair.difference_ci95 == pytest.approx(scipy["ci"], abs=1e-12)
        assert pair.mcnemar_p_by_seed == pytest.approx(scipy["mcnemar"], abs=1e-12)
        assert pair.difference_mean == pytest.approx(means[pair.first] - means[pair.second], abs=1e-12)


def test_one_seed_decides_each_pair_by_mcnemar():
    flags = _flags([0.6, 0.62, 0.9], [5], 150, seed=1)
    result = comparisons.compare(flags, [5])
    for pair in result.pairs:
        assert pair.test == "mcnemar" and pair.difference_ci95 is None and pair.difference_std is None
        assert pair.p == pytest.approx(_recomputed(flags, [5], pair.first, pair.second)["mcnemar"]["5"], abs=1e-12)


def test_equal_differences_in_every_seed_take_the_largest_mcnemar_p():
    base = np.array([True] * 50 + [False] * 50)
    better = base.copy()
    better[50:60] = True  # ten more right in each seed: no spread, so no t-test
    flags = {"student_baseline": {0: base, 1: base}, "student_kd": {0: better, 1: better},
             "student_dkd": {0: base, 1: base}}
    pair = next(p for p in comparisons.compare(flags, [0, 1]).pairs if p.second == "student_baseline")
    assert pair.test == records.ZERO_SPREAD_TEST and pair.difference_ci95 is None
    assert pair.p == pytest.approx(stats.binomtest(10, 10).pvalue)


# ---------------------------------------------------------------- students that do not differ


def test_identical_students_give_no_significant_pair():
    seeds = [0, 1, 2]
    same = _flags([0.7], seeds, 300)["student_baseline"]
    result = comparisons.compare({role: same for role in ROLES}, seeds)
    assert not any(pair.significant for pair in result.pairs)
    assert all(pair.p == 1.0 and pair.difference_mean == 0.0 for pair in result.pairs)
    assert result.tied_with_best == [student.role for student in result.ranking]


def test_equally_good_students_differ_only_without_the_correction():
    """Six students of one skill, drawn apart: uncorrected tests find a 'winner' by chance, Holm's none."""
    roles = [f"student_m{index}" for index in range(6)]
    rng = np.random.default_rng(9)
    flags = {role: {seed: rng.random(400) < 0.7 for seed in (0, 1, 2)} for role in roles}
    holm = comparisons.compare(flags, [0, 1, 2])
    raw = comparisons.compare(flags, [0, 1, 2], "none")
    assert any(pair.significant for pair in raw.pairs), "this draw must hold a chance 'winner' to be a test"
    assert not any(pair.significant for pair in holm.pairs)
    assert set(holm.tied_with_best) == set(roles)


def test_a_clearly_worse_student_is_behind_the_best():
    flags = _flags([0.3, 0.85, 0.86, 0.87], [0, 1, 2, 3, 4], 1000, seed=4)
    result = comparisons.compare(flags, [0, 1, 2, 3, 4])
    assert "student_baseline" not in result.tied_with_best
    assert result.ranking[-1].role == "student_baseline" and not result.ranking[-1].tied_with_best
    assert result.ranking[0].tied_with_best


def test_fewer_than_two_distilled_students_are_not_compared(tmp_path):
    flags = _flags([0.5, 0.6], [0], 20)
    assert comparisons.head_to_head(flags, [0], "holm") is None
    assert comparisons.compare_run(tmp_path, ["student_baseline", "student_kd"], [0], "holm") is None
    with pytest.raises(ValueError, match="results.json"):
        comparisons.compare_run(tmp_path, ROLES, [0], "holm")


# ---------------------------------------------------------------- the record


def _summary(result: records.Comparisons, seeds: list[int]) -> records.RunSummary:
    summary = run_summary({"teacher": model_row(0.9), **{role: model_row(0.5) for role in ROLES}}, seeds=seeds)
    summary.comparisons = result
    return summary


def test_the_record_round_trips_and_refuses_what_does_not_fit():
    result = comparisons.compare(_flags([0.5, 0.6, 0.7, 0.8], [0, 1], 100), [0, 1])
    data = _summary(result, [0, 1]).to_dict()
    assert records.RunSummary.from_dict(data).comparisons == result
    broken = {**data["comparisons"], "correction": "bonferroni"}
    with pytest.raises(ValueError, match="correction"):
        records.RunSummary.from_dict({**data, "comparisons": broken})
    with pytest.raises(ValueError, match="pairs"):
        records.RunSummary.from_dict({**data, "comparisons": {**data["comparisons"],
                                                             "pairs": data["comparisons"]["pairs"][1:]}})
    with pytest.raises(ValueError, match="ranking"):
        records.RunSummary.from_dict({**data, "comparisons": {**data["comparisons"],
                                                             "ranking": data["comparisons"]["ranking"][::-1]}})
    pair = {**data["comparisons"]["pairs"][0], "p_corrected": 1.5}
    with pytest.raises(ValueError, match="p_corrected"):
        records.RunSummary.from_dict({**data, "comparisons": {**data["comparisons"],
                                                             "pairs": [pair, *data["comparisons"]["pairs"][1:]]}})


# ---------------------------------------------------------------- what people read


def test_tables_give_holm_p_beside_raw_p_and_the_matrix_is_antisymmetric():
    result = comparisons.compare(_flags([0.3, 0.6, 0.62, 0.9], [0, 1, 2], 400, seed=2), [0, 1, 2])
    summary = _summary(result, [0, 1, 2])
    columns = report.pair_columns(result)
    raw, holm = columns.index("p"), columns.index("Holm p")
    assert holm == raw + 1 and "95% interval" in columns and "McNemar p per seed (Holm p)" in columns
    for pair, cells in zip(result.pairs, [report.pair_cells(pair) for pair in result.pairs], strict=True):
        assert len(cells) == len(columns)
        assert [cells[raw], cells[holm]] == [f"{pair.p:.3g}", f"{pair.p_corrected:.3g}"]
        assert cells[-1] == ("differ" if pair.significant else "tied")
    assert len(report.ranking_rows(result)[0]) == len(report.ranking_columns(result)) == 5
    matrix = report.difference_matrix(result)
    for row, column in itertools.permutations(range(4), 2):
        assert float(matrix[row][column][0]) == pytest.approx(-float(matrix[column][row][0]))
        assert matrix[row][column][1] == matrix[column][row][1]
    assert all(matrix[index][index] == ("", False) for index in range(4))
    text = report.head_to_head_text(summary, every_pair=False)
    differing = [pair for pair in result.pairs if pair.significant]
    assert differing and len(differing) < len(result.pairs)
    assert text.count(" - ") == len(differing)
    assert "Holm's step-down over the family of 6 pairs" in text and "--comparison-correction holm" in text
    assert report.head_to_head_text(summary).count(" - ") == 6
    html = report.head_to_head_sentence(result)
    assert html.startswith(f"Head to head, {records.method_of(result.ranking[0].role)} has the best")


def test_uncorrected_tables_say_so():
    result = comparisons.compare(_flags([0.3, 0.6, 0.62, 0.9], [0], 100), [0], "none")
    columns = report.pair_columns(result)
    assert columns == ["pair", "difference", "test", "p", "uncorrected p", "verdict"]
    assert all(len(report.pair_cells(pair)) == len(columns) for pair in result.pairs)
    assert len(report.ranking_rows(result)[0]) == len(report.ranking_columns(result)) == 4
    assert "not corrected for the family of 6 pairs" in report.comparison_rule(result, [0])


def test_the_ledger_names_the_best_method_and_its_group():
    result = comparisons.compare(_flags([0.3, 0.85, 0.86, 0.87], [0, 1, 2, 3, 4], 1000, seed=4), [0, 1, 2, 3, 4])
    row = ledger._best_group(result)
    assert row["best_method"] == records.method_of(result.ranking[0].role)
    assert row["tied_with_best"].split() == [records.method_of(role) for role in result.tied_with_best]
    assert "baseline" not in row["tied_with_best"].split()
    assert ledger._best_group(None) == {"best_method": "", "tied_with_best": ""}
    assert {"best_method", "tied_with_best"} <= set(ledger.LEDGER_COLUMNS)
    assert math.isclose(significance.SIGNIFICANCE_LEVEL, result.level)
