"""Which student wins: every pair of a run's students compared head to head, corrected for the family.

With several distilled students, every two students (the baseline among them) are compared on the same
test images: per seed by McNemar's exact test, and over seeds by the paired t-test of the per-seed
differences (`significance.paired_gain_interval`, the interval of the differences beside it). With k
students there are k (k - 1) / 2 pairs, and uncorrected p-values would find "winners" by chance, so the
family's p-values are corrected (Holm's step-down by default) before any pair is said to differ. The
students are ranked by mean test top-1; those no corrected test separates from the best are tied with it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core import paired_tests, records
from results import report, significance

Flags = dict[str, dict[int, np.ndarray]]  # role -> seed -> which test images it classified correctly


def corrected(p_values: Sequence[float], correction: str) -> list[float]:
    """The family's p-values corrected by `correction` (records.COMPARISON_CORRECTIONS)."""
    return paired_tests.holm(p_values) if correction == "holm" else [float(p) for p in p_values]


def read_flags(run_dir: Path, roles: list[str], seeds: list[int]) -> Flags:
    """Every student's per-image test correctness in every seed, from its results.json (ValueError naming a file
    that is missing, damaged or written before the flags were kept)."""
    flags: Flags = {}
    for role in roles:
        flags[role] = {}
        for seed in seeds:
            path = records.model_folder(run_dir, role, seed, seeds) / report.RESULTS
            results = report.read_run_file(path)
            if not isinstance(results.get("test_correct"), str):
                raise ValueError(f"'{path}' holds no per-image test results (test_correct)")
            flags[role][seed] = paired_tests.parse_correct_flags(results["test_correct"])
    return flags


def _pair(first: dict[int, np.ndarray], second: dict[int, np.ndarray], seeds: list[int]) -> dict[str, Any]:
    """One pair's raw statistics: per seed the difference of test top-1 and McNemar's exact test; over seeds the
    verdict's test as significance.gain_statistics makes it (t-test, or every seed's McNemar at zero spread)."""
    tests = {seed: significance.mcnemar_exact(second[seed], first[seed]) for seed in seeds}
    differences = {seed: float(first[seed].mean() - second[seed].mean()) for seed in seeds}
    mcnemar = {seed: test["p"] for seed, test in tests.items()}
    values = list(differences.values())
    pair = {"difference_by_seed": {str(seed): value for seed, value in differences.items()},
            "difference_mean": float(np.mean(values)),
            "first_only_by_seed": {str(seed): test["candidate_only"] for seed, test in tests.items()},
            "second_only_by_seed": {str(seed): test["baseline_only"] for seed, test in tests.items()},
            "mcnemar_p_by_seed": {str(seed): p for seed, p in mcnemar.items()}}
    if len(seeds) == 1:
        return {**pair, "test": "mcnemar", "p": mcnemar[seeds[0]]}
    if max(values) - min(values) < significance.SAME_GAIN:
        return {**pair, "test": records.ZERO_SPREAD_TEST, "p": max(mcnemar.values()), "difference_std": 0.0}
    interval = significance.paired_gain_interval(values)
    return {**pair, "test": "t", "p": interval["p"], "difference_std": interval["std"],
            "difference_ci95": interval["ci"]}


def _ranked(flags: Flags, seeds: list[int]) -> list[tuple[str, dict[str, float], float]]:
    """(role, test top-1 by seed, its mean) of every student, best mean first (ties: in the run's order)."""
    rows = []
    for role, by_seed in flags.items():
        top1 = {str(seed): float(by_seed[seed].mean()) for seed in seeds}
        rows.append((role, top1, float(np.mean(list(top1.values())))))
    return sorted(rows, key=lambda row: -row[2])


def compare(flags: Flags, seeds: list[int], correction: str = "holm") -> records.Comparisons:
    """Every pair of students head to head, the family corrected by `correction`, and the ranking.

    `flags` maps each student's role (the baseline's too) to its per-image test correctness per seed, all on
    the same test images; at least two students. Each pair is written higher-ranked first. Its decisive p (the
    t-test's over several seeds, McNemar's with one) is corrected over every pair; each seed's McNemar p over
    that seed's pairs.
    """
    ranked = _ranked(flags, seeds)
    pairs = [{"first": first[0], "second": second[0], **_pair(flags[first[0]], flags[second[0]], seeds)}
             for first, second in itertools.combinations(ranked, 2)]
    for pair, p in zip(pairs, corrected([pair["p"] for pair in pairs], correction), strict=True):
        pair.update(p_corrected=p, significant=p < significance.SIGNIFICANCE_LEVEL, mcnemar_p_corrected_by_seed={})
    for seed in map(str, seeds):
        by_seed = corrected([pair["mcnemar_p_by_seed"][seed] for pair in pairs], correction)
        for pair, p in zip(pairs, by_seed, strict=True):
            pair["mcnemar_p_corrected_by_seed"][seed] = p
    best = ranked[0][0]
    separated = {pair["second"] for pair in pairs if pair["first"] == best and pair["significant"]}
    ranking = [records.RankedStudent(role=role, test_top1_mean=mean, test_top1_by_seed=top1,
                                     tied_with_best=role not in separated) for role, top1, mean in ranked]
    return records.Comparisons(correction=correction, level=significance.SIGNIFICANCE_LEVEL, ranking=ranking,
                               pairs=[records.ComparedPair(**pair) for pair in pairs])


def several_distilled(roles: Sequence[str]) -> bool:
    """Whether a run's students hold two distilled ones or more: with one, its verdict against the baseline is
    the whole comparison."""
    return sum(records.is_distilled(role) for role in roles) >= 2


def head_to_head(flags: Flags, seeds: list[int], correction: str) -> records.Comparisons | None:
    """`compare` for a run with several distilled students; None for one with fewer."""
    return compare(flags, seeds, correction) if several_distilled(list(flags)) else None


def compare_run(run_dir: Path, roles: list[str], seeds: list[int], correction: str) -> records.Comparisons | None:
    """The head-to-head comparisons of a run's students (`roles`, the baseline's among them) read from their
    results.json files (ValueError naming one that cannot serve); None with fewer than two distilled students."""
    return head_to_head(read_flags(run_dir, roles, seeds), seeds, correction) if several_distilled(roles) else None
