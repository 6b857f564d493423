"""Head to head through the whole pipeline: a tiny run with kd, dkd and fitnet under two seeds. Its summary.json's
`comparisons` equals a recomputation made here from the students' results.json files with scipy's binomtest
(McNemar exact), ttest_rel and Holm's step-down; the console, the report and the ledger show it, and
--report-only rebuilds it from the run's files, with the correction given."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
from conftest import SMALL_MODELS, TINY_FLAGS, make_image_folder
from scipy import stats

import experiment
from results import significance

pytestmark = pytest.mark.e2e
SEEDS = [0, 1]
STUDENTS = ["student_baseline", "student_kd", "student_dkd", "student_fitnet"]


@pytest.fixture(scope="module")
def compared_run(tmp_path_factory):
    """Students that learn (60 test images; the tiny data's 15 leave every model at chance, every p at 1), and
    differ: some pairs by a t-test over the seeds, some by the same difference in both (McNemar then decides)."""
    root = tmp_path_factory.mktemp("head_to_head")
    data = make_image_folder(root / "data", {"train": 30, "test": 20})
    flags = [*TINY_FLAGS, *SMALL_MODELS, "--teacher-epochs", "3", "--teacher-lr", "0.01", "--student-lr", "0.01"]
    code = experiment.main(["--data-dir", str(data), "--output-dir", str(root / "run"), "--val-fraction", "0.25",
                            *flags, "--kd-methods", "kd,dkd,fitnet", "--seeds", ",".join(map(str, SEEDS))])
    assert code == 0
    return root / "run"


def _results(run_dir, role, seed):
    folder = run_dir / role if seed == SEEDS[0] else run_dir / role / f"seed_{seed}"
    return json.loads((folder / "results.json").read_text())


def _holm(p_values):
    """Holm's step-down written out: sort, multiply the i-th smallest by m - i, keep it non-decreasing, cap at 1."""
    order = np.argsort(p_values, kind="stable")
    adjusted, running = [None] * len(p_values), 0.0
    for step, index in enumerate(order):
        running = max(running, (len(p_values) - step) * p_values[index])
        adjusted[index] = min(running, 1.0)
    return adjusted


def _correct(run_dir, role, seed):
    """A student's per-image test correctness in one seed, from its results.json."""
    return np.array([flag == "1" for flag in _results(run_dir, role, seed)["test_correct"]])


def _top1(run_dir, role, seed):
    """Test top-1 from the per-image flags: an exact count over the images (results.json's `test.top1` is rounded
    to float32, 1e-8 apart for equal counts, which would spread equal differences)."""
    return _correct(run_dir, role, seed).mean()


def _recomputed_pair(run_dir, first, second):
    """One pair from the two students' results.json files: McNemar's exact p per seed (scipy's binomtest of the
    discordant images), the top-1 differences, and over the seeds ttest_rel's p and 95% interval (every seed's
    McNemar, the largest p, where the differences are all equal)."""
    mcnemar, top1 = {}, {first: [], second: []}
    for seed in SEEDS:
        a, b = _correct(run_dir, first, seed), _correct(run_dir, second, seed)
        only_first, only_second = int((a & ~b).sum()), int((b & ~a).sum())
        mcnemar[str(seed)] = (1.0 if only_first + only_second == 0
                              else stats.binomtest(only_first, only_first + only_second, 0.5).pvalue)
        top1[first].append(a.mean())
        top1[second].append(b.mean())
    differences = np.subtract(top1[first], top1[second])
    expected = {"mcnemar_p_by_seed": mcnemar, "difference_by_seed": dict(zip(map(str, SEEDS), differences,
                                                                                strict=True))}
    if np.ptp(differences) < 1e-9:
        return {**expected, "test": "mcnemar_every_seed", "p": max(mcnemar.values()), "difference_ci95": None}
    t = stats.ttest_rel(top1[first], top1[second])
    return {**expected, "test": "t", "p": t.pvalue, "difference_ci95": list(t.confidence_interval(0.95))}


def test_comparisons_equal_a_recomputation_from_the_students_results(compared_run):
    comparisons = json.loads((compared_run / "summary.json").read_text())["comparisons"]
    assert comparisons["correction"] == "holm"
    means = {role: np.mean([_top1(compared_run, role, seed) for seed in SEEDS]) for role in STUDENTS}
    ranked = [student["role"] for student in comparisons["ranking"]]
    assert sorted(ranked) == sorted(STUDENTS)
    assert [means[role] for role in ranked] == pytest.approx(sorted(means.values(), reverse=True), abs=1e-9)
    pairs = comparisons["pairs"]
    assert {frozenset((pair["first"], pair["second"])) for pair in pairs} == {
        frozenset(pair) for pair in itertools.combinations(STUDENTS, 2)}
    expected = [_recomputed_pair(compared_run, pair["first"], pair["second"]) for pair in pairs]
    for pair, want in zip(pairs, expected, strict=True):
        assert pair["test"] == want["test"]
        assert pair["p"] == pytest.approx(want["p"], abs=1e-9)
        assert pair["mcnemar_p_by_seed"] == pytest.approx(want["mcnemar_p_by_seed"], abs=1e-9)
        assert pair["difference_by_seed"] == pytest.approx(want["difference_by_seed"], abs=1e-9)
        if want["difference_ci95"] is None:
            assert "difference_ci95" not in pair
        else:
            assert pair["difference_ci95"] == pytest.approx(want["difference_ci95"], abs=1e-9)
    holm = _holm([want["p"] for want in expected])
    assert [pair["p_corrected"] for pair in pairs] == pytest.approx(holm, abs=1e-9)
    assert [pair["significant"] for pair in pairs] == [p < 0.05 for p in holm]
    for seed in map(str, SEEDS):
        assert [pair["mcnemar_p_corrected_by_seed"][seed] for pair in pairs] == pytest.approx(
            _holm([want["mcnemar_p_by_seed"][seed] for want in expected]), abs=1e-9)
    assert len({round(want["p"], 9) for want in expected}) > 2, "the run must give pairs that differ to be a test"
    best = ranked[0]
    separated = {pair["second"] for pair, p in zip(pairs, holm, strict=True) if pair["first"] == best and p < 0.05}
    assert [student["tied_with_best"] for student in comparisons["ranking"]] == [
        role not in separated for role in ranked]


def test_console_report_and_ledger_show_the_head_to_head(compared_run):
    text = (compared_run / "comparison.txt").read_text()
    assert "has the best mean test top-1" in text and "Every pair" in text and "Holm p" in text
    assert text.count(" - ") >= 6  # every pair's row
    html = (compared_run / "report.html").read_text()
    assert "<h2>Head to head</h2>" in html and "row minus column" in html and "Holm p" in html
    with open(compared_run.parent / "experiments.csv", encoding="utf-8", newline="") as ledger:
        row = list(csv.DictReader(ledger))[-1]
    comparisons = json.loads((compared_run / "summary.json").read_text())["comparisons"]
    assert row["best_method"] == comparisons["ranking"][0]["role"].removeprefix("student_")
    assert row["tied_with_best"].split() == [student["role"].removeprefix("student_")
                                             for student in comparisons["ranking"] if student["tied_with_best"]]


def test_report_only_rebuilds_the_comparisons_from_the_run_files(compared_run, capsys):
    summary_path = compared_run / "summary.json"
    original = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({key: value for key, value in original.items() if key != "comparisons"}))
    (compared_run / "report.html").unlink()
    assert experiment.main(["--report-only", str(compared_run)]) == 0
    assert json.loads(summary_path.read_text())["comparisons"] == original["comparisons"]
    assert "has the best mean test top-1" in capsys.readouterr().out
    assert "<h2>Head to head</h2>" in (compared_run / "report.html").read_text()
    assert experiment.main(["--report-only", str(compared_run), "--comparison-correction", "none"]) == 0
    uncorrected = json.loads(summary_path.read_text())["comparisons"]
    assert uncorrected["correction"] == "none"
    assert [pair["p_corrected"] for pair in uncorrected["pairs"]] == [pair["p"] for pair in uncorrected["pairs"]]
    assert "uncorrected p" in (compared_run / "report.html").read_text()
    assert experiment.main(["--report-only", str(compared_run)]) == 0  # the run's own correction again
    assert json.loads(summary_path.read_text())["comparisons"] == original["comparisons"]
    assert significance.SIGNIFICANCE_LEVEL == original["comparisons"]["level"]
