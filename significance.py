"""Whether a gain is more than noise, and what makes a run's result untrustworthy.

A distilled student is compared with the baseline student of the same seed on the same test
images: McNemar's exact test per seed, and over several seeds a Student-t interval of the paired
gains. The verdict's wording, and the rule behind it, are written here once.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

import schema
import utils

SIGNIFICANCE_LEVEL = 0.05  # a gain is "significant" when its test gives p below this
CONFIDENCE = 1 - SIGNIFICANCE_LEVEL  # the interval of the per-seed gains excludes zero exactly when p < the level
NEAR_CHANCE_GAP = 0.1  # "near chance": closing less than this share of the gap from chance to 100% top-1
MIN_VAL_IMAGES_PER_CLASS = 5  # fewer validation images in a class cannot select an epoch reliably


# ---------------------------------------------------------------- paired tests


def correct_flags(logits: torch.Tensor, labels: torch.Tensor) -> str:
    """Per-sample top-1 correctness in sample order, one character each ('1' right, '0' wrong): compact in JSON."""
    return "".join("1" if right else "0" for right in (logits.argmax(dim=1) == labels).tolist())


def parse_correct_flags(flags: str) -> np.ndarray:
    """The boolean array of a `correct_flags` string."""
    return np.frombuffer(flags.encode("ascii"), dtype=np.uint8) == ord("1")


def mcnemar_exact(baseline_correct: np.ndarray, candidate_correct: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of two models' predictions on the same images.

    Only the discordant images count: `baseline_only` (the baseline right, the candidate wrong)
    and `candidate_only`. Under "equally accurate" each discordant image goes either way with
    probability 1/2: the two-sided p is scipy's exact binomial test of `candidate_only` of
    their sum (1 when there is none).
    """
    from scipy.stats import binomtest

    baseline_correct, candidate_correct = np.asarray(baseline_correct, bool), np.asarray(candidate_correct, bool)
    if baseline_correct.shape != candidate_correct.shape:
        raise ValueError(f"paired predictions differ in length ({len(baseline_correct)} vs {len(candidate_correct)})")
    baseline_only = int((baseline_correct & ~candidate_correct).sum())
    candidate_only = int((candidate_correct & ~baseline_correct).sum())
    discordant = baseline_only + candidate_only
    p = 1.0 if discordant == 0 else float(binomtest(candidate_only, discordant, 0.5).pvalue)
    return {"p": p, "baseline_only": baseline_only, "candidate_only": candidate_only}


def paired_gain_interval(gains: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, sample standard deviation, Student-t confidence interval and two-sided t-test p of
    paired per-seed gains (at least two). The interval excludes zero exactly when p < 1 - confidence.

    Identical gains have no spread: the interval is that one value and p is 0, or 1 for no gain.
    """
    from scipy.stats import ttest_1samp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # identical gains: scipy warns of zero variance
        test = ttest_1samp(gains, 0.0)
        low, high = test.confidence_interval(confidence)
    p = float(test.pvalue)
    return {"mean": float(np.mean(gains)), "std": float(np.std(gains, ddof=1)), "ci": [float(low), float(high)],
            "p": 1.0 if math.isnan(p) else p}


def top1_spread(rows: dict[int, schema.ModelRow]) -> dict[str, Any]:
    """Test top-1 per seed, its mean and sample standard deviation (several seeds; empty for one)."""
    if len(rows) < 2:
        return {}
    top1 = [row.test["top1"] for row in rows.values()]
    return {"test_top1_by_seed": {str(seed): row.test["top1"] for seed, row in rows.items()},
            "test_top1_mean": float(np.mean(top1)), "test_top1_std": float(np.std(top1, ddof=1))}


def gain_statistics(
    rows: dict[int, schema.ModelRow], baseline_rows: dict[int, schema.ModelRow],
    correct: dict[int, np.ndarray], baseline_correct: dict[int, np.ndarray],
) -> dict[str, Any]:
    """The verdict on a distilled student's gain over the baseline of the same seed.

    `mcnemar_p`: exact McNemar test on the first seed's paired test predictions. With several
    seeds also `mcnemar_p_by_seed`, the gains per seed and their mean, sample std, 95% Student-t
    interval and t-test p. `gain_significant`: with one seed McNemar's p < SIGNIFICANCE_LEVEL;
    with several the 95% interval of the per-seed gains excludes zero.
    """
    seeds = list(rows)
    mcnemar = {seed: mcnemar_exact(baseline_correct[seed], correct[seed])["p"] for seed in seeds}
    stats: dict[str, Any] = {"mcnemar_p": mcnemar[seeds[0]]}
    if len(seeds) == 1:
        stats["gain_significant"] = mcnemar[seeds[0]] < SIGNIFICANCE_LEVEL
        return stats
    gains = {seed: rows[seed].test["top1"] - baseline_rows[seed].test["top1"] for seed in seeds}
    interval = paired_gain_interval(list(gains.values()))
    low, high = interval["ci"]
    stats.update({
        "mcnemar_p_by_seed": {str(seed): p for seed, p in mcnemar.items()},
        "gain_top1_by_seed": {str(seed): gain for seed, gain in gains.items()},
        "gain_top1_mean": interval["mean"], "gain_top1_std": interval["std"],
        "gain_top1_ci95": [low, high], "gain_top1_p": interval["p"], "gain_significant": low > 0 or high < 0,
    })
    return stats


# ---------------------------------------------------------------- the verdict in words


def verdict(p: float, significant: bool | None = None) -> str:
    """'significant (p = ...)' or 'within noise (p = ...)'; by default significant means p < SIGNIFICANCE_LEVEL."""
    if significant is None:
        significant = p < SIGNIFICANCE_LEVEL
    return f"{'significant' if significant else 'within noise'} (p = {p:.3g})"


def rule(several_seeds: bool) -> str:
    """What "significant" means in this run's verdicts."""
    if several_seeds:
        return (f"the {100 * CONFIDENCE:g}% Student-t interval of the per-seed paired gains excludes zero "
                f"(t-test p < {SIGNIFICANCE_LEVEL:g})")
    return f"exact McNemar test of the paired test predictions, p < {SIGNIFICANCE_LEVEL:g}"


def gain_sentence(role: str, row: schema.ModelRow, baseline: schema.ModelRow, seeds: list[int]) -> str:
    """One distilled student's gain over the baseline of its seed with its verdicts: the sentence
    the console and the report both state."""
    several = len(seeds) > 1
    gain = 100 * (row.test["top1"] - baseline.test["top1"])
    if gain > 0:
        change = f"added {gain:.2f} points of test top-1 over the baseline student"
    elif gain < 0:
        change = f"cost {-gain:.2f} points of test top-1 against the baseline student"
    else:
        change = "left test top-1 as the baseline student has it"
    sentence = f"Distillation ({schema.method_of(role)}) {change}" + (f" with seed {seeds[0]}" if several else "")
    if row.mcnemar_p is not None:
        sentence += f": {verdict(row.mcnemar_p)} by the exact McNemar test on the paired test predictions"
    if several and row.gain_top1_ci95 is not None:
        low, high = row.gain_top1_ci95
        sentence += (f"; over seeds {', '.join(map(str, seeds))} its gain is {100 * row.gain_top1_mean:+.2f} ± "
                     f"{100 * row.gain_top1_std:.2f} points, {100 * CONFIDENCE:g}% interval [{100 * low:+.2f}, "
                     f"{100 * high:+.2f}]: {verdict(row.gain_top1_p, row.gain_significant)}")
    return sentence + "."


# ---------------------------------------------------------------- sanity warnings


def near_chance(top1: float, samples: int, chance: float) -> tuple[bool, float]:
    """Whether a top-1 accuracy on `samples` images is at or near the `chance` level, and the p of
    "better than chance" (one-sided exact binomial test).

    Near chance: it closes less than NEAR_CHANCE_GAP of the gap from chance to 100%, or it is not
    significantly above chance (p >= SIGNIFICANCE_LEVEL).
    """
    from scipy.stats import binomtest

    p = float(binomtest(round(top1 * samples), samples, chance, alternative="greater").pvalue)
    return top1 < chance + NEAR_CHANCE_GAP * (1 - chance) or p >= SIGNIFICANCE_LEVEL, p


def sanity_warnings(summary: schema.RunSummary, histories: dict[str, dict[str, Any]]) -> list[str]:
    """Sentences on what makes a run's result untrustworthy, from its summary and its models' histories.

    `histories` maps each trained model's name ("teacher", "student_kd", "student_kd seed 4", ...)
    to its history.json content ({"best_epoch": ..., "epochs": [...]}). Chance is the share of the
    test split's most frequent class (what always answering that class scores).
    """
    found = []
    dataset, percent = summary.dataset, utils.format_metric
    teacher, baseline = summary.models[schema.TEACHER], summary.models[schema.BASELINE]
    per_class, samples = dataset.images_per_class, dataset.sizes["test"]
    chance = per_class["test"]["max"] / samples
    teacher_top1 = teacher.test["top1"]
    at_chance, p = near_chance(teacher_top1, samples, chance)
    if at_chance:
        found.append(
            f"The teacher is at or near chance: {percent(teacher_top1)}% test top-1, where always answering the most "
            f"frequent class scores {percent(chance)}% (one-sided binomial test against chance on {samples} test "
            f"images: p = {p:.3g}); students distilled from it learn from near-random targets.")
    baseline_top1 = baseline.test["top1"] if baseline.test_top1_mean is None else baseline.test_top1_mean
    if teacher_top1 < baseline_top1:
        averaged = "" if baseline.test_top1_mean is None else " on average over the seeds"
        found.append(
            f"The teacher ({percent(teacher_top1)}% test top-1) is worse than the baseline student "
            f"({percent(baseline_top1)}%{averaged}): distillation passes on what the teacher knows, so train it longer "
            "or choose a stronger one.")
    smallest = per_class["val"]["min"]
    if smallest < MIN_VAL_IMAGES_PER_CLASS:
        found.append(
            f"The validation split has {smallest} image{'s' if smallest != 1 else ''} in its smallest class (fewer "
            f"than {MIN_VAL_IMAGES_PER_CLASS}): too few to select an epoch; give validation more images "
            "(--val-fraction or a val/ folder).")
    flat = [name for name, history in histories.items()
            if len(history["epochs"]) > 1 and len({epoch["val"]["top1"] for epoch in history["epochs"]}) == 1]
    if flat:
        found.append(
            f"Validation top-1 never changed over the epochs of {', '.join(flat)}: the kept epoch was chosen by "
            "validation loss alone; the validation split is too small or the model did not learn.")
    first = [name for name, history in histories.items()
             if schema.is_distilled(schema.role_of(name))
             and len(history["epochs"]) > 1 and history["best_epoch"] == 1]
    if first:
        found.append(
            f"The best epoch of {', '.join(first)} is the first: later epochs of distillation did not improve it on "
            "validation (a poor teacher, too high a learning rate, or a validation split too small to tell).")
    return found
