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

import utils
from core import paired_tests, records

SIGNIFICANCE_LEVEL = 0.05  # a gain is "significant" when its test gives p below this
CONFIDENCE = 1 - SIGNIFICANCE_LEVEL  # the interval of the per-seed gains excludes zero exactly when p < the level
NEAR_CHANCE_GAP = 0.1  # "near chance": closing less than this share of the gap from chance to 100% top-1
CHANCE_SHOWN_GAP = 0.5  # the headline names chance for a student closing less than this share of that gap
MIN_VAL_IMAGES_PER_CLASS = 5  # fewer validation images in a class cannot select an epoch reliably
MAX_POINTS_PER_VAL_IMAGE = 2.0  # one validation image moving top-1 by more points than this cannot select an epoch
SAME_GAIN = 1e-9  # per-seed gains closer than this are the same (one test image is 1e-8 of top-1 even at 1e8 images)
SINGLE_CLASS_SHARE = 0.95  # a model answering one class for at least this share of the test images has collapsed
# What decided a distilled student's gain_significant (summary.json's gain_top1_test), in words.
GAIN_TESTS = {
    "mcnemar": f"exact McNemar test of the paired test predictions, p < {SIGNIFICANCE_LEVEL:g}",
    "t": (f"the {100 * CONFIDENCE:g}% Student-t interval of the per-seed paired gains excludes zero "
          f"(t-test p < {SIGNIFICANCE_LEVEL:g})"),
    records.ZERO_SPREAD_TEST: ("every seed gained the same number of test images (zero spread, so no interval): "
                              "the exact McNemar test of every seed's paired test predictions, "
                              f"p < {SIGNIFICANCE_LEVEL:g} in each (p: the largest)"),
}
METRIC_NAMES = {"top1": "top-1", "loss": "loss", "f1_macro": "macro F1"}  # the selection metrics in words


# ---------------------------------------------------------------- paired tests


def mcnemar_exact(baseline_correct: np.ndarray, candidate_correct: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test of two models' predictions on the same images.

    Only the discordant images count: `baseline_only` (the baseline right, the candidate wrong)
    and `candidate_only`. Under "equally accurate" each discordant image goes either way with
    probability 1/2: the two-sided p is scipy's exact binomial test of `candidate_only` of
    their sum (1 when there is none).
    """
    baseline_correct, candidate_correct = np.asarray(baseline_correct, bool), np.asarray(candidate_correct, bool)
    if baseline_correct.shape != candidate_correct.shape:
        raise ValueError(f"paired predictions differ in length ({len(baseline_correct)} vs {len(candidate_correct)})")
    baseline_only = int((baseline_correct & ~candidate_correct).sum())
    candidate_only = int((candidate_correct & ~baseline_correct).sum())
    return {"p": paired_tests.mcnemar_p(baseline_only, candidate_only), "baseline_only": baseline_only,
            "candidate_only": candidate_only}


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


def top1_spread(rows: dict[int, records.ModelRow]) -> dict[str, Any]:
    """Test top-1 per seed, its mean and sample standard deviation (several seeds; empty for one)."""
    if len(rows) < 2:
        return {}
    top1 = [row.test["top1"] for row in rows.values()]
    return {"test_top1_by_seed": {str(seed): row.test["top1"] for seed, row in rows.items()},
            "test_top1_mean": float(np.mean(top1)), "test_top1_std": float(np.std(top1, ddof=1))}


def gain_statistics(
    rows: dict[int, records.ModelRow], baseline_rows: dict[int, records.ModelRow],
    correct: dict[int, np.ndarray], baseline_correct: dict[int, np.ndarray],
) -> dict[str, Any]:
    """The verdict on a distilled student's gain over the baseline of the same seed.

    `mcnemar_p`: exact McNemar test on the first seed's paired test predictions. With several
    seeds also `mcnemar_p_by_seed`, the gains per seed and their mean, sample std, 95% Student-t
    interval and t-test p. `gain_significant`: with one seed McNemar's p < SIGNIFICANCE_LEVEL;
    with several the 95% interval of the per-seed gains excludes zero. When every seed gained the
    same number of test images the gains have no spread, and an interval of zero width (a t-test
    dividing by zero) would read as certainty: then the verdict is the per-seed McNemar tests', all
    below SIGNIFICANCE_LEVEL, with the largest of their p as `gain_top1_p` and no interval.
    `gain_top1_test` names the rule that decided (a key of GAIN_TESTS).
    """
    seeds = list(rows)
    tests = {seed: mcnemar_exact(baseline_correct[seed], correct[seed]) for seed in seeds}
    mcnemar = {seed: test["p"] for seed, test in tests.items()}
    stats: dict[str, Any] = {"mcnemar_p": mcnemar[seeds[0]]}
    if len(seeds) == 1:
        stats.update(gain_significant=mcnemar[seeds[0]] < SIGNIFICANCE_LEVEL, gain_top1_test="mcnemar")
        return stats
    gains = {seed: rows[seed].test["top1"] - baseline_rows[seed].test["top1"] for seed in seeds}
    stats.update({"mcnemar_p_by_seed": {str(seed): p for seed, p in mcnemar.items()},
                  "gain_top1_by_seed": {str(seed): gain for seed, gain in gains.items()},
                  "gain_top1_mean": float(np.mean(list(gains.values())))})
    if max(gains.values()) - min(gains.values()) < SAME_GAIN:
        largest = max(mcnemar.values())
        stats.update(gain_top1_std=0.0, gain_top1_p=largest, gain_significant=largest < SIGNIFICANCE_LEVEL,
                     gain_top1_test=records.ZERO_SPREAD_TEST)
        return stats
    interval = paired_gain_interval(list(gains.values()))
    low, high = interval["ci"]
    stats.update({"gain_top1_std": interval["std"], "gain_top1_ci95": [low, high], "gain_top1_p": interval["p"],
                  "gain_significant": low > 0 or high < 0, "gain_top1_test": "t"})
    return stats


def teacher_against_baseline(
    teacher_correct: np.ndarray, baseline_rows: dict[int, records.ModelRow],
    baseline_correct: dict[int, np.ndarray], teacher_top1: float,
) -> dict[str, Any]:
    """The teacher against the baseline student of every seed on the same test images: its top-1 minus
    theirs, and the exact McNemar p of the two (the teacher-worse warning needs p < SIGNIFICANCE_LEVEL)."""
    return {"vs_baseline_top1_by_seed": {str(seed): teacher_top1 - row.test["top1"]
                                         for seed, row in baseline_rows.items()},
            "vs_baseline_mcnemar_p_by_seed": {str(seed): mcnemar_exact(baseline_correct[seed], teacher_correct)["p"]
                                              for seed in baseline_rows}}


# ---------------------------------------------------------------- the verdict in words


def verdict(p: float, significant: bool | None = None) -> str:
    """'significant (p = ...)' or 'within noise (p = ...)'; by default significant means p < SIGNIFICANCE_LEVEL."""
    if significant is None:
        significant = p < SIGNIFICANCE_LEVEL
    return f"{'significant' if significant else 'within noise'} (p = {p:.3g})"


def rule(several_seeds: bool, zero_spread: bool = False) -> str:
    """What "significant" means in this run's verdicts (`zero_spread`: some student gained the same in every seed)."""
    if several_seeds:
        return GAIN_TESTS["t"] + (f"; where {GAIN_TESTS[records.ZERO_SPREAD_TEST]}" if zero_spread else "")
    return GAIN_TESTS["mcnemar"]


def collapsed_seeds(row: records.ModelRow, baseline: records.ModelRow, dataset: records.DatasetRecord) -> list[str]:
    """'seed 0's baseline' / 'seed 1's student' for each seed whose baseline or distilled student scored at or near
    chance (`near_chance`) on the test split: a gain in such a seed is against (or of) a model that learned nothing."""
    samples, chance = dataset.sizes.get("test"), chance_level(dataset)
    if not samples:
        return []
    named = []
    for seed, top1 in (baseline.test_top1_by_seed or {}).items():
        for who, value in (("baseline", top1), ("student", (row.test_top1_by_seed or {}).get(seed))):
            if value is not None and near_chance(value, samples, chance)[0]:
                named.append(f"seed {seed}'s {who}")
    return named


def _pooled_clause(row: records.ModelRow, seeds: list[int]) -> str:
    """The verdict over seeds: the t-interval of the per-seed gains, or each seed's McNemar test at zero spread."""
    shown = ", ".join(map(str, seeds))
    if row.zero_spread:
        return (f"over seeds {shown}: every seed gained the same {100 * row.gain_top1_mean:+.2f} points, a spread of "
                "zero that gives no interval: by the McNemar test of each seed it is "
                f"{verdict(row.gain_top1_p, row.gain_significant)} (the largest p)")
    low, high = row.gain_top1_ci95
    return (f"over seeds {shown}: its gain is {100 * row.gain_top1_mean:+.2f} ± {100 * row.gain_top1_std:.2f} points, "
            f"{100 * CONFIDENCE:g}% interval [{100 * low:+.2f}, {100 * high:+.2f}]: "
            f"{verdict(row.gain_top1_p, row.gain_significant)}")


def gain_sentence(role: str, row: records.ModelRow, baseline: records.ModelRow, seeds: list[int],
                  collapsed: Sequence[str] = ()) -> str:
    """One distilled student's gain over the baseline of its seed with its verdicts: the sentence the console and
    the report both state. Over several seeds the pooled verdict leads and the first seed's follows, and the seeds
    whose baseline or student `collapsed` (see `collapsed_seeds`) are named."""
    several = len(seeds) > 1 and (row.zero_spread or row.gain_top1_ci95 is not None)
    gain = 100 * (row.test["top1"] - baseline.test["top1"])
    if gain > 0:
        change = f"added {gain:.2f} points of test top-1 over the baseline student"
    elif gain < 0:
        change = f"cost {-gain:.2f} points of test top-1 against the baseline student"
    else:
        change = "left test top-1 as the baseline student has it"
    first = f" by the exact McNemar test: {verdict(row.mcnemar_p)}" if row.mcnemar_p is not None else ""
    if not several:
        return f"Distillation ({records.method_of(role)}) {change}" + (
            f": {verdict(row.mcnemar_p)} by the exact McNemar test on the paired test predictions"
            if row.mcnemar_p is not None else "") + "."
    sentence = f"Distillation ({records.method_of(role)}) {_pooled_clause(row, seeds)}; seed {seeds[0]} alone {change}"
    sentence += first
    if collapsed:
        sentence += (f"; {', '.join(collapsed)} collapsed (at or near chance), so the gains of "
                     "those seeds compare with a model that learned nothing")
    return sentence + "."


def headline_gain(models: dict[str, records.ModelRow], dataset: records.DatasetRecord) -> dict[str, Any]:
    """summary.json's headline gain of plain KD over the baseline, pooled first: `kd_gain_top1` (over several
    seeds the mean of the per-seed gains) and `kd_gain_significant` (the pooled verdict), then the spread and
    interval of the gains, the per-seed gains and the seeds whose baseline or KD student collapsed
    (`collapsed_seeds`; None when none did). Empty without a plain KD student."""
    kd, baseline = models.get(records.distilled_role("kd")), models.get(records.BASELINE)
    if kd is None or baseline is None:
        return {}
    pooled = kd.gain_top1_mean is not None
    return {"kd_gain_top1": kd.gain_top1_mean if pooled else kd.test["top1"] - baseline.test["top1"],
            "kd_gain_significant": kd.gain_significant, "kd_gain_top1_std": kd.gain_top1_std,
            "kd_gain_top1_ci95": kd.gain_top1_ci95, "kd_gain_top1_by_seed": kd.gain_top1_by_seed,
            "kd_collapsed_seeds": collapsed_seeds(kd, baseline, dataset) or None}


def seed_verdict(gain: float, p: float) -> str:
    """One seed's verdict on a gain: 'significant gain', 'significant loss' or 'within noise', with its p."""
    if p >= SIGNIFICANCE_LEVEL:
        return verdict(p)
    return f"significant {'gain' if gain > 0 else 'loss'} (p = {p:.3g})"


def seed_results(summary: records.RunSummary) -> list[tuple[str, str, float, float | None, float | None]]:
    """Every student's (role, seed, test top-1, gain over the baseline of that seed, McNemar p of the two) for
    every seed, in training order; the gain and p are None for the baseline."""
    first, baseline = str(summary.seeds[0]), summary.models[records.BASELINE]
    results = []
    for role, row in summary.models.items():
        if role == records.TEACHER:
            continue
        top1 = row.test_top1_by_seed or {first: row.test["top1"]}
        gains = row.gain_top1_by_seed or ({first: row.test["top1"] - baseline.test["top1"]}
                                          if row.mcnemar_p is not None else {})
        p_values = row.mcnemar_p_by_seed or ({first: row.mcnemar_p} if row.mcnemar_p is not None else {})
        results += [(role, seed, value, gains.get(seed), p_values.get(seed)) for seed, value in top1.items()]
    return results


def seed_rows(summary: records.RunSummary) -> list[list[str]]:
    """`seed_results` as table cells: role, seed, top-1 %, gain in points, the seed's verdict."""
    return [[role, seed, utils.format_metric(top1), "" if gain is None else f"{100 * gain:+.2f}",
             "" if p is None else seed_verdict(gain, p)] for role, seed, top1, gain, p in seed_results(summary)]


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


def test_share(dataset: records.DatasetRecord, class_name: str) -> float:
    """The share of the test split's images in one class (the largest class's share when the record
    does not count them per class)."""
    counts = (dataset.carving.get("class_counts") or {}).get("test") or {}
    if class_name in counts:
        return counts[class_name] / dataset.sizes["test"]
    return dataset.images_per_class["test"]["max"] / dataset.sizes["test"]


def single_class(row: records.ModelRow, dataset: records.DatasetRecord) -> bool:
    """Whether a model answers one class for (nearly) every test image: at least SINGLE_CLASS_SHARE of
    them, more than that class's own share of the test split."""
    share = row.test_top_class_share
    return share is not None and share >= SINGLE_CLASS_SHARE and share > test_share(dataset, row.test_top_class)


def chance_level(dataset: records.DatasetRecord) -> float:
    """What always answering the test split's most frequent class scores."""
    return dataset.images_per_class["test"]["max"] / dataset.sizes["test"]


def failure(row: records.ModelRow, dataset: records.DatasetRecord) -> str | None:
    """Why a model is no working classifier, in words ('answers ... for ... of the test images', 'is at or
    near chance ...'), or None. The report's headline and the warnings use it alike."""
    if single_class(row, dataset):
        return (f"answers '{row.test_top_class}' for {utils.format_metric(row.test_top_class_share)}% of the test "
                f"images, a class that is {utils.format_metric(test_share(dataset, row.test_top_class))}% of them")
    chance = chance_level(dataset)
    at_chance, p = near_chance(row.test["top1"], dataset.sizes["test"], chance)
    if at_chance:
        return (f"is at or near chance: {utils.format_metric(row.test['top1'])}% test top-1, where always answering "
                f"the most frequent class scores {utils.format_metric(chance)}% (one-sided binomial test against "
                f"chance on {dataset.sizes['test']} test images: p = {p:.3g})")
    return None


def _model_warnings(summary: records.RunSummary, rows: dict[str, records.ModelRow]) -> list[str]:
    """Models that have not learned the task: the teacher at chance, and any model (each seed's) that
    answers one class for nearly every test image or, for a student, scores at or near chance."""
    found = []
    teacher = summary.models[records.TEACHER]
    chance, samples = chance_level(summary.dataset), summary.dataset.sizes["test"]
    at_chance, p = near_chance(teacher.test["top1"], samples, chance)
    if at_chance:
        found.append(
            f"The teacher is at or near chance: {utils.format_metric(teacher.test['top1'])}% test top-1, where always "
            f"answering the most frequent class scores {utils.format_metric(chance)}% (one-sided binomial test "
            f"against chance on {samples} test images: p = {p:.3g}); students distilled from it learn from "
            "near-random targets.")
    for name, row in rows.items():
        teacher_told = records.role_of(name) == records.TEACHER and not single_class(row, summary.dataset)
        reason = None if teacher_told else failure(row, summary.dataset)  # the teacher's chance is told above
        if reason is not None:
            found.append(f"{name} {reason}: it has not learned to tell the classes apart, so its accuracy, gain and "
                         "speed-up are not results.")
    return found


def _teacher_worse(summary: records.RunSummary) -> list[str]:
    """The teacher scoring significantly below the baseline student of some seed on the same test images."""
    teacher = summary.models[records.TEACHER]
    gaps, p_values = teacher.vs_baseline_top1_by_seed or {}, teacher.vs_baseline_mcnemar_p_by_seed or {}
    worse = [(seed, gap, p_values[seed]) for seed, gap in gaps.items()
             if gap < 0 and p_values[seed] < SIGNIFICANCE_LEVEL]
    if not worse:
        return []
    which = ", ".join(f"{'seed ' + seed + ': ' if len(gaps) > 1 else ''}{100 * -gap:.2f} points behind, McNemar p = "
                      f"{p:.3g}" for seed, gap, p in worse)
    return [f"The teacher ({utils.format_metric(teacher.test['top1'])}% test top-1) is worse than the baseline student "
            f"by the exact McNemar test on the same test images ({which}): distillation passes on what the teacher "
            "knows, so train it longer or choose a stronger one."]


def _validation_advice(dataset: records.DatasetRecord, needed: float) -> str:
    """What would give validation more than `needed` times its images: a --val-fraction, or more images in val/."""
    size, fraction = dataset.sizes["val"], dataset.carving.get("val_fraction")
    want = math.floor(needed * size) + 1
    if not fraction:
        return f"put at least {want} images into the validation folder"
    wanted = math.ceil(100 * fraction * want / size) / 100
    if wanted > 0.5:
        return (f"--val-fraction would have to exceed 0.5 to carve {want} images, leaving too few to train: give "
                "the data a val/ folder or more images")
    carved = round(wanted / fraction * size)
    return f"--val-fraction {wanted:g} would carve about {carved} (one image: {100 / carved:.2f} points)"


def _validation_warnings(
    summary: records.RunSummary, histories: dict[str, dict[str, Any]], select_metric: str,
) -> list[str]:
    """A validation split too small to choose epochs by, and models whose validation metric never changed."""
    found = []
    size, smallest = summary.dataset.sizes["val"], summary.dataset.images_per_class["val"]["min"]
    points = 100 / size if size else math.inf
    reasons = ([f"one image moves validation top-1 by {points:.2f} points (more than {MAX_POINTS_PER_VAL_IMAGE:g})"]
               if points > MAX_POINTS_PER_VAL_IMAGE else [])
    if smallest < MIN_VAL_IMAGES_PER_CLASS:
        reasons.append(f"its smallest class has {smallest} (fewer than {MIN_VAL_IMAGES_PER_CLASS})")
    if reasons:
        needed = max(points / MAX_POINTS_PER_VAL_IMAGE, MIN_VAL_IMAGES_PER_CLASS / max(smallest, 1))
        found.append(f"The validation split has {size} images: {' and '.join(reasons)}, too coarse to choose an epoch "
                     f"by; {_validation_advice(summary.dataset, needed)}.")
    watched = "top1" if select_metric == "loss" else select_metric
    flat = [name for name, history in histories.items()
            if len(history["epochs"]) > 1 and len({epoch["val"].get(watched) for epoch in history["epochs"]}) == 1]
    if flat:
        chosen = ("by validation loss, the --select-metric" if select_metric == "loss" else
                  f"by the tie-break of --select-metric {select_metric}, the lower validation loss")
        found.append(
            f"Validation {METRIC_NAMES[watched]} never changed over the epochs of {', '.join(flat)}: the kept epoch "
            f"was chosen {chosen}; the validation split is too small or the model did not learn.")
    first = [name for name, history in histories.items()
             if records.is_distilled(records.role_of(name))
             and len(history["epochs"]) > 1 and history["best_epoch"] == 1]
    if first:
        found.append(
            f"The best epoch of {', '.join(first)} is the first: later epochs of distillation did not improve it on "
            "validation (a poor teacher, too high a learning rate, or a validation split too small to tell).")
    return found


def _loss_warnings(summary: records.RunSummary) -> list[str]:
    """Every seed in which distillation cost the student significantly (McNemar on that seed's test images)."""
    losses = [f"{records.model_name(role, int(seed), summary.seeds)} ({100 * gain:+.2f} points, McNemar p = {p:.3g})"
              for role, seed, _, gain, p in seed_results(summary)
              if gain is not None and p is not None and gain < 0 and p < SIGNIFICANCE_LEVEL]
    if not losses:
        return []
    return [f"Distillation made the student significantly worse than the baseline of its seed: {', '.join(losses)}."]


def costlier_sentence(student: records.ModelRow, teacher: records.ModelRow) -> str | None:
    """The warning on a student that needs at least its teacher's FLOPs an image, with the measured ratio and
    students that are really cheaper; None for a cheaper student (or FLOPs not counted)."""
    if not student.flops_per_image or not teacher.flops_per_image or student.flops_per_image < teacher.flops_per_image:
        return None
    costs = "as much as" if student.flops_per_image == teacher.flops_per_image else "more than"
    return (f"The student {student.arch} costs {costs} its teacher {teacher.arch}: "
            f"{student.flops_per_image / teacher.flops_per_image:.2f}x its FLOPs an image "
            f"({student.flops_per_image / 1e9:.3g} vs {teacher.flops_per_image / 1e9:.3g} GFLOPs), so distilling into "
            "it saves nothing at inference; up to 64 px a small-image student of the KD literature such as resnet8x4 "
            "or resnet20 is really cheaper, above it mobilenet_v3_small (--student-model; docs/models.md).")


def _cost_warnings(summary: records.RunSummary) -> list[str]:
    """A student costlier than its teacher, or than torchvision's model of about its size at the run's image size."""
    baseline, teacher = summary.models[records.BASELINE], summary.models.get(records.TEACHER)
    costlier = None if teacher is None else costlier_sentence(baseline, teacher)
    peer = baseline.flops_peer
    return [sentence for sentence in (costlier, None if peer is None else peer_sentence(peer)) if sentence]


def peer_sentence(peer: dict[str, Any]) -> str:
    """The warning on a student costlier than torchvision's model of about its size (deploy.peer_flops)."""
    return (f"At {peer['image_size']} px the student {peer['arch']} needs {peer['flops_per_image'] / 1e9:.3g} GFLOPs "
            f"an image, more than torchvision's {peer['peer']} of about its size ({peer['params'] / 1e6:.2f}M against "
            f"{peer['peer_params'] / 1e6:.2f}M parameters) needs there ({peer['peer_flops_per_image'] / 1e9:.3g}): "
            "the KD literature's small-image networks do not shrink the image in their stem, so their cost grows with "
            "its square; above 64 px a torchvision student (mobilenet_v3_small, shufflenet_v2_x1_0, resnet18, ...) "
            "is the cheaper choice (docs/models.md, 'Which student for photos').")


def sanity_warnings(
    summary: records.RunSummary, histories: dict[str, dict[str, Any]],
    rows: dict[str, records.ModelRow] | None = None, select_metric: str = "top1",
) -> list[str]:
    """Sentences on what makes a run's result untrustworthy, from its summary and its models' histories.

    `histories` maps each trained model's name ("teacher", "student_kd", "student_kd seed 4", ...)
    to its history.json content ({"best_epoch": ..., "epochs": [...]}), and `rows` the same names to
    their summary rows (by default the summary's own, the first seed's). Chance is the share of the
    test split's most frequent class (what always answering that class scores). `select_metric` is
    the validation metric the run chose epochs by.
    """
    rows = dict(summary.models) if rows is None else rows
    return [*_model_warnings(summary, rows), *_teacher_worse(summary),
            *_validation_warnings(summary, histories, select_metric), *_loss_warnings(summary),
            *_cost_warnings(summary)]
