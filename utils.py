"""Metrics, reports, plots, checkpoints and small helpers shared by the pipeline.

Every file is written atomically: to a temporary file in the same folder, then renamed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import yaml
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

AVERAGES = ("micro", "macro", "weighted")
SCORE_NAMES = ("precision", "recall", "f1")


# ---------------------------------------------------------------- atomic files


def _process_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# Read once, at import (before any thread starts): os.umask can only be read by setting it.
UMASK = _process_umask()
FILE_MODE = 0o666 & ~UMASK  # what open() gives a new file
FOLDER_MODE = 0o777 & ~UMASK  # what mkdir() gives a new folder


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The file gets the mode a plain open() would give it under the user's umask (mkstemp's
    private 0600 would otherwise survive the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(handle, FILE_MODE)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (NaN and infinity are not valid JSON: they must be None already)."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- settings files


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML or JSON file (.json is read as JSON, anything else as YAML): a mapping of names to values.

    Raises ValueError with one sentence when the file cannot be read or holds no such mapping.
    """
    path = Path(path)
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read settings file '{path}': {getattr(error, 'strerror', None) or error}.") from None
    try:
        settings = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        detail = " ".join(str(error).split())
        raise ValueError(f"Settings file '{path}' is not valid {kind}: {detail}.") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"Settings file '{path}' must hold a mapping of setting names to values, not a {type(settings).__name__}.")
    return settings


def _setting_value(action: argparse.Action, value: Any, where: str, nullable: bool) -> Any:
    """`value` converted as argparse converts the flag's text (numbers from text too), or ValueError."""
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{where} must have a value (it cannot be null).")
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false (got {value!r}).")
        return value
    if isinstance(value, bool) and action.choices is not None and {"on", "off"} <= set(action.choices):
        return "on" if value else "off"  # YAML reads on / off as booleans; older config.json files hold them
    kind = {int: "an integer", float: "a number"}.get(action.type, "a string")
    if isinstance(value, (bool, list, dict)) or (action.type is int and isinstance(value, float)):
        raise ValueError(f"{where} must be {kind} (got {value!r}).")
    if action.type is None:
        value = str(value)
    elif isinstance(value, str) or action.type is float:
        try:
            value = action.type(value)
        except ValueError:
            raise ValueError(f"{where} must be {kind} (got {value!r}).") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where} must be one of {', '.join(map(str, action.choices))} (got {value!r}).")
    return value


def check_settings(
    settings: dict[str, Any], actions: dict[str, argparse.Action], nullable: set[str], source: str,
) -> dict[str, Any]:
    """Settings from a file, keyed as the flags' destinations ("teacher_epochs"; "teacher-epochs" works too),
    converted and checked as argparse would check the same flags. A key no flag has is refused,
    naming the closest valid key; `nullable` keys may be null."""
    checked = {}
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in actions:
            closest = difflib.get_close_matches(name, list(actions), n=1, cutoff=0.0)
            raise ValueError(f"{source}: unknown setting '{key}' (the closest valid one is '{closest[0]}').")
        checked[name] = _setting_value(actions[name], value, f"{source}: {name}", name in nullable)
    return checked


# ---------------------------------------------------------------- metrics


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the k highest logits (k clipped to the class count)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int, class_names: Sequence[str]):
    """Precision / recall / F1 for each average; undefined values become None with a reason."""
    classes = list(range(num_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, predictions, labels=classes, average=None, zero_division=np.nan
        )
        micro = precision_recall_fscore_support(
            labels, predictions, labels=classes, average="micro", zero_division=np.nan
        )[:3]
    per_class = {"precision": precision, "recall": recall, "f1": f1}
    absent = [class_names[c] for c in classes if support[c] == 0]
    never_predicted = [class_names[c] for c in classes if not (predictions == c).any()]
    reasons = {
        "precision": f"precision undefined for classes never predicted: {never_predicted}",
        "recall": f"recall undefined for classes absent from the split: {absent}",
        "f1": f"F1 undefined for classes both absent and never predicted: "
        f"{sorted(set(absent) & set(never_predicted))}",
    }
    values: dict[str, float | None] = {}
    undefined: dict[str, str] = {}
    for score, micro_value in zip(SCORE_NAMES, micro):
        scores = per_class[score]
        values[f"{score}_micro"] = _nan_to_none(micro_value)
        values[f"{score}_macro"] = None if np.isnan(scores).any() else float(scores.mean())
        present = support > 0
        weighted_scores = scores[present]
        values[f"{score}_weighted"] = (
            None
            if np.isnan(weighted_scores).any() or not present.any()
            else float(np.average(weighted_scores, weights=support[present]))
        )
        for average in AVERAGES:
            if values[f"{score}_{average}"] is None:
                undefined[f"{score}_{average}"] = reasons[score]
    return values, undefined


def _auc(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]):
    """One-vs-rest ROC AUC (micro, macro, weighted); None with a reason when undefined."""
    num_classes = probabilities.shape[1]
    values: dict[str, float | None] = {f"auc_{a}": None for a in AVERAGES}
    present = np.bincount(labels, minlength=num_classes)
    absent = [class_names[c] for c in range(num_classes) if present[c] == 0]
    if not np.isfinite(probabilities).all():
        return values, {f"auc_{a}": "probabilities are not finite" for a in AVERAGES}
    if absent or len(labels) == 0:
        reason = f"one-vs-rest AUC needs every class present; absent from the split: {absent}"
        return values, {f"auc_{a}": reason for a in AVERAGES}
    if num_classes == 2:
        score = float(roc_auc_score(labels, probabilities[:, 1]))
        return {f"auc_{a}": score for a in AVERAGES}, {}
    targets = label_binarize(labels, classes=list(range(num_classes)))
    for average in AVERAGES:
        values[f"auc_{average}"] = float(roc_auc_score(targets, probabilities, average=average))
    return values, {}


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> dict[str, Any]:
    """Top-1, top-3, precision / recall / F1 and ROC AUC of a split's logits.

    Metrics are fractions in [0, 1]. Undefined values are None, and `undefined` maps
    each of them to the reason, so a missing number is never mistaken for a zero.
    """
    logits = logits.float().cpu()
    labels = labels.cpu()
    num_classes = len(class_names)
    predictions = logits.argmax(dim=1).numpy()
    label_array = labels.numpy()
    probabilities = torch.softmax(logits, dim=1).numpy()
    metrics: dict[str, Any] = {
        "samples": int(len(label_array)),
        "top1": topk_accuracy(logits, labels, 1),
        "top3": topk_accuracy(logits, labels, 3),
    }
    scores, undefined_scores = _scores(label_array, predictions, num_classes, class_names)
    aucs, undefined_aucs = _auc(label_array, probabilities, class_names)
    metrics.update(scores)
    metrics.update(aucs)
    metrics["undefined"] = {**undefined_scores, **undefined_aucs}
    return metrics


def confusion(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Confusion matrix (rows: true class, columns: predicted class)."""
    return confusion_matrix(
        labels.cpu().numpy(), logits.argmax(dim=1).cpu().numpy(), labels=list(range(num_classes))
    )


def report_text(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> str:
    """scikit-learn's per-class classification report ('nan' marks an undefined value)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return classification_report(
            labels.cpu().numpy(),
            logits.argmax(dim=1).cpu().numpy(),
            labels=list(range(len(class_names))),
            target_names=list(class_names),
            digits=4,
            zero_division=np.nan,
        )


def per_class_scores(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support of every class (None where undefined)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        report = classification_report(
            labels.cpu().numpy(), logits.argmax(dim=1).cpu().numpy(), labels=list(range(len(class_names))),
            target_names=list(class_names), zero_division=np.nan, output_dict=True,
        )
    return {
        name: {
            "precision": _nan_to_none(report[name]["precision"]),
            "recall": _nan_to_none(report[name]["recall"]),
            "f1": _nan_to_none(report[name]["f1-score"]),
            "support": int(report[name]["support"]),
        }
        for name in class_names
    }


def format_metric(value: float | None, percent: bool = True) -> str:
    """A metric for tables: a percentage with two decimals, or 'n/a' when undefined."""
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


def format_seconds(seconds: float) -> str:
    """Seconds as '1h02m03s', '2m05s' or '4.2s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


METRIC_ROWS = ["top1", "top3"] + [f"{s}_{a}" for s in SCORE_NAMES for a in AVERAGES] + [
    f"auc_{a}" for a in AVERAGES
]


def metrics_table(results: dict[str, dict[str, Any]]) -> str:
    """A text table: one row per metric, one column per split (metrics in percent)."""
    splits = list(results)
    lines = [f"{'metric':<20}" + "".join(f"{s:>12}" for s in splits)]
    lines.append(f"{'loss':<20}" + "".join(f"{format_metric(results[s].get('loss'), False):>12}" for s in splits))
    for name in METRIC_ROWS:
        lines.append(f"{name:<20}" + "".join(f"{format_metric(results[s].get(name)):>12}" for s in splits))
    for split in splits:
        for name, reason in results[split].get("undefined", {}).items():
            lines.append(f"  {split} {name}: {reason}")
    return "\n".join(lines) + "\n"


# Training-loss parts a criterion may report, with their labels on plots (KD_engine's methods).
LOSS_PARTS = {"loss": "total", "ce": "CE", "kd": "KD (T²·KL)", "feature": "FitNets feature MSE",
              "at": "attention transfer", "tckd": "DKD target-class", "nckd": "DKD non-target"}


def history_table(history: list[dict[str, Any]]) -> str:
    """One line per epoch: learning rate, training loss parts, train and validation metrics."""
    lines = []
    for record in history:
        train, val = record["train"], record["val"]
        parts = " ".join(f"{k}={train[k]:.4f}" for k in LOSS_PARTS if k in train)
        if "warmup" in train:  # DKD's mean warm-up factor
            parts += f" warmup={train['warmup']:.3f}"
        lines.append(
            f"epoch {record['epoch']:3d}  lr={record['lr']:.5f}  train {parts} "
            f"top1={format_metric(train['top1'])}% top3={format_metric(train['top3'])}% "
            f"f1_macro={format_metric(train['f1_macro'])}  |  val loss={val['loss']:.4f} "
            f"top1={format_metric(val['top1'])}% top3={format_metric(val['top3'])}% "
            f"f1_macro={format_metric(val['f1_macro'])} auc_macro={format_metric(val['auc_macro'])}  "
            f"({format_seconds(record['seconds'])})"
        )
    return "\n".join(lines) + "\n"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain-text table whose columns are as wide as their widest cell, two spaces apart.

    The first `left` columns (names) are left-aligned, the others (numbers) right-aligned.
    """
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(cell).ljust(width) if index < left else str(cell).rjust(width)
                         for index, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)]) + "\n"


# ---------------------------------------------------------------- statistics

SIGNIFICANCE_LEVEL = 0.05  # a gain is "significant" when its test gives p below this
NEAR_CHANCE_GAP = 0.1  # "near chance": closing less than this share of the gap from chance to 100% top-1
MIN_VAL_IMAGES_PER_CLASS = 5  # fewer validation images in a class cannot select an epoch reliably


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


def paired_gain_interval(gains: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
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


def top1_spread(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Test top-1 per seed, its mean and sample standard deviation (several seeds; empty for one)."""
    if len(rows) < 2:
        return {}
    top1 = [row["test"]["top1"] for row in rows.values()]
    return {"test_top1_by_seed": {str(seed): row["test"]["top1"] for seed, row in rows.items()},
            "test_top1_mean": float(np.mean(top1)), "test_top1_std": float(np.std(top1, ddof=1))}


def gain_statistics(
    rows: dict[int, dict[str, Any]], baseline_rows: dict[int, dict[str, Any]],
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
    gains = {seed: rows[seed]["test"]["top1"] - baseline_rows[seed]["test"]["top1"] for seed in seeds}
    interval = paired_gain_interval(list(gains.values()))
    low, high = interval["ci"]
    stats.update({
        "mcnemar_p_by_seed": {str(seed): p for seed, p in mcnemar.items()},
        "gain_top1_by_seed": {str(seed): gain for seed, gain in gains.items()},
        "gain_top1_mean": interval["mean"], "gain_top1_std": interval["std"],
        "gain_top1_ci95": [low, high], "gain_top1_p": interval["p"], "gain_significant": low > 0 or high < 0,
    })
    return stats


def verdict(p: float, significant: bool | None = None) -> str:
    """'significant (p = ...)' or 'within noise (p = ...)'; by default significant means p < SIGNIFICANCE_LEVEL."""
    if significant is None:
        significant = p < SIGNIFICANCE_LEVEL
    return f"{'significant' if significant else 'within noise'} (p = {p:.3g})"


def speedup(teacher: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """A model's speed-up over the teacher: the ratio of median batch-1 latencies, and whether
    the measurement tells them apart (`speedup_clear`: their interquartile ranges do not overlap)."""
    (low, high), (teacher_low, teacher_high) = model["latency_ms_iqr"], teacher["latency_ms_iqr"]
    return {"speedup_over_teacher": round(teacher["latency_ms"] / model["latency_ms"], 3),
            "speedup_clear": high < teacher_low or teacher_high < low}


def near_chance(top1: float, samples: int, chance: float) -> tuple[bool, float]:
    """Whether a top-1 accuracy on `samples` images is at or near the `chance` level, and the p of
    "better than chance" (one-sided exact binomial test).

    Near chance: it closes less than NEAR_CHANCE_GAP of the gap from chance to 100%, or it is not
    significantly above chance (p >= SIGNIFICANCE_LEVEL).
    """
    from scipy.stats import binomtest

    p = float(binomtest(round(top1 * samples), samples, chance, alternative="greater").pvalue)
    return top1 < chance + NEAR_CHANCE_GAP * (1 - chance) or p >= SIGNIFICANCE_LEVEL, p


def sanity_warnings(summary: dict[str, Any], histories: dict[str, dict[str, Any]]) -> list[str]:
    """Sentences on what makes a run's result untrustworthy, from its summary and its models' histories.

    `histories` maps each trained model's name ("teacher", "student_kd", "student_kd seed 4", ...)
    to its history.json content ({"best_epoch": ..., "epochs": [...]}). Chance is the share of the
    test split's most frequent class (what always answering that class scores).
    """
    found = []
    dataset, teacher, baseline = summary["dataset"], summary["teacher"], summary["student_baseline"]
    per_class, samples = dataset["images_per_class"], dataset["sizes"]["test"]
    chance = per_class["test"]["max"] / samples
    teacher_top1 = teacher["test"]["top1"]
    at_chance, p = near_chance(teacher_top1, samples, chance)
    if at_chance:
        found.append(f"The teacher is at or near chance: {format_metric(teacher_top1)}% test top-1, where always answering "
                     f"the most frequent class scores {format_metric(chance)}% (one-sided binomial test against chance on "
                     f"{samples} test images: p = {p:.3g}); students distilled from it learn from near-random targets.")
    baseline_top1 = baseline.get("test_top1_mean", baseline["test"]["top1"])
    if teacher_top1 < baseline_top1:
        found.append(f"The teacher ({format_metric(teacher_top1)}% test top-1) is worse than the baseline student "
                     f"({format_metric(baseline_top1)}%"
                     f"{' on average over the seeds' if 'test_top1_mean' in baseline else ''}): distillation passes on "
                     "what the teacher knows, so train it longer or choose a stronger one.")
    smallest = per_class["val"]["min"]
    if smallest < MIN_VAL_IMAGES_PER_CLASS:
        found.append(f"The validation split has {smallest} image{'s' if smallest != 1 else ''} in its smallest class "
                     f"(fewer than {MIN_VAL_IMAGES_PER_CLASS}): too few to select an epoch; give validation more images "
                     "(--val-fraction or a val/ folder).")
    flat = [name for name, history in histories.items()
            if len(history["epochs"]) > 1 and len({epoch["val"]["top1"] for epoch in history["epochs"]}) == 1]
    if flat:
        found.append(f"Validation top-1 never changed over the epochs of {', '.join(flat)}: the kept epoch was chosen by "
                     "validation loss alone; the validation split is too small or the model did not learn.")
    first = [name for name, history in histories.items()
             if name.startswith("student_") and not name.startswith("student_baseline")
             and len(history["epochs"]) > 1 and history["best_epoch"] == 1]
    if first:
        found.append(f"The best epoch of {', '.join(first)} is the first: later epochs of distillation did not improve it "
                     "on validation (a poor teacher, too high a learning rate, or a validation split too small to tell).")
    return found


# ---------------------------------------------------------------- plots


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    _figure().close(figure)


def plot_curves(history: list[dict[str, Any]], key: str, title: str, path: str | Path) -> None:
    """Train and validation curves of one metric over epochs (for the loss, also its parts)."""
    plt = _figure()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    figure, axis = plt.subplots(figsize=(6, 4))
    series = [("train", key, f"train {key}"), ("val", key, f"val {key}")]
    parts = [part for part in LOSS_PARTS if part in history[0]["train"]]
    if key == "loss" and len(parts) > 1:
        series = [("train", part, f"train {LOSS_PARTS[part]}") for part in parts] + [("val", "loss", "val CE")]
    for split, name, label in series:
        values = [r[split].get(name) for r in history]
        axis.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=label)
    if key == "loss":
        axis.set_yscale("log")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel(key)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def plot_topk(results: dict[str, dict[str, Any]], title: str, path: str | Path) -> None:
    """Grouped bars of top-1 and top-3 accuracy per split."""
    plt = _figure()
    splits = list(results)
    x = np.arange(len(splits))
    figure, axis = plt.subplots(figsize=(6, 4))
    for offset, key in ((-0.2, "top1"), (0.2, "top3")):
        values = [100 * results[s][key] for s in splits]
        bars = axis.bar(x + offset, values, width=0.4, label=key)
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_xticks(x, splits)
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 105)
    axis.set_title(title)
    axis.legend(loc="lower right")
    save_figure(figure, path)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], title: str, path: str | Path) -> None:
    """A seaborn heat map of a confusion matrix."""
    import seaborn as sns

    plt = _figure()
    size = max(5.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size * 0.85))
    sns.heatmap(
        matrix, annot=len(class_names) <= 20, fmt="d", cmap="Blues", cbar=True,
        xticklabels=class_names, yticklabels=class_names, ax=axis,
    )
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    save_figure(figure, path)


def plot_comparison(summary: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Test metrics and parameter counts of the trained models side by side."""
    plt = _figure()
    names = list(summary)
    keys = ["top1", "top3", "f1_macro", "auc_macro"]
    # Wider with more models, so every bar keeps room for its value label.
    figure, (metric_axis, size_axis) = plt.subplots(
        1, 2, figsize=(8 + 1.4 * len(names), 4.5), gridspec_kw={"width_ratios": [3, 1]}
    )
    width = 0.8 / len(names)
    x = np.arange(len(keys))
    defined = [100 * v for n in names for v in (summary[n]["test"].get(k) for k in keys) if v is not None]
    floor = max(0.0, min(defined, default=0.0) - 10)  # zoom in: the differences are what matter
    for i, name in enumerate(names):
        values = [summary[name]["test"].get(k) for k in keys]
        bars = metric_axis.bar(
            x + (i - (len(names) - 1) / 2) * width,
            [floor if v is None else 100 * v for v in values], width=width, label=name,
        )
        metric_axis.bar_label(bars, labels=[format_metric(v) for v in values], fontsize=7,
                              rotation=90 if len(names) > 3 else 0, padding=2)
    metric_axis.set_xticks(x, [f"test {k}" for k in keys])
    metric_axis.set_ylabel("%")
    metric_axis.set_ylim(floor, 100 + (100 - floor) * (0.08 if len(names) <= 3 else 0.2))
    metric_axis.legend(loc="upper left", bbox_to_anchor=(0, -0.08), ncol=min(len(names), 6), fontsize=8, frameon=False)
    metric_axis.set_title("Test metrics")
    bars = size_axis.bar(names, [summary[n]["params"] / 1e6 for n in names], color="gray")
    size_axis.bar_label(bars, fmt="%.2fM", fontsize=7, rotation=90 if len(names) > 3 else 0, padding=2)
    size_axis.set_ylabel("parameters (millions)")
    size_axis.set_title("Model size")
    size_axis.set_ylim(0, max(summary[n]["params"] for n in names) / 1e6 * 1.3)
    size_axis.tick_params(axis="x", rotation=35)
    for label in size_axis.get_xticklabels():
        label.set_horizontalalignment("right")
    save_figure(figure, path)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically (tensors, numbers, strings, lists and dicts only)."""
    with atomic_path(path) as temporary:
        torch.save(checkpoint, temporary)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without running code from it (weights_only=True)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def snapshot(value: Any) -> Any:
    """A copy of checkpoint contents that later training cannot change: every tensor copied to the
    CPU, dicts, lists and tuples rebuilt (other leaves, numbers and strings, are immutable)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(item) for item in value)
    return value


def _save_checkpoints(files: list[tuple[Path, dict[str, Any]]]) -> None:
    for path, checkpoint in files:
        save_checkpoint(path, checkpoint)


class BackgroundSaver:
    """Writes checkpoints on a background thread, so training does not wait for serialization and disk.

    `save` copies the tensors to the CPU at once (cheap), then returns while one thread writes
    the files atomically, in the given order. A new `save` first waits for the previous one;
    `wait()` (and leaving a `with` block, also on an error or Ctrl-C) waits for the last one and
    raises any error the writer met. A write cut short leaves the previous file in place.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending = None

    def save(self, files: dict[Path, dict[str, Any]]) -> None:
        """Write `{path: checkpoint}` in the background, in order, each file atomically."""
        self.wait()
        copies = [(Path(path), snapshot(checkpoint)) for path, checkpoint in files.items()]
        self._pending = self._executor.submit(_save_checkpoints, copies)

    def wait(self) -> None:
        """Return once every file handed to `save` is written; raise the writer's error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the last write, then stop the thread."""
        try:
            self.wait()
        finally:
            self._executor.shutdown()

    def __enter__(self) -> "BackgroundSaver":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()



# ---------------------------------------------------------------- HTML report

REPORT_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 24px 32px; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
.lead { font-size: 1.1em; background: #f6f8fa; border-left: 4px solid #2f81f7; padding: 10px 16px; }
.warnings { background: #fff8c5; border-left: 4px solid #d4a72c; padding: 10px 16px; margin-top: 12px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.93em; }
th, td { border: 1px solid #d0d7de; padding: 5px 10px; text-align: right; }
th { background: #f6f8fa; } td.name, th.name { text-align: left; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; }
.figures figure { margin: 0; flex: 1 1 320px; } .figures img { width: 100%; height: auto; }
.figures figure.wide { flex: 0 1 820px; }
figcaption { text-align: center; font-size: 0.9em; color: #57606a; }
.settings td { text-align: left; font-family: monospace; } .muted { color: #57606a; }
"""


def _png_data_uri(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(figure) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _figure().close(figure)
    return buffer.getvalue()


def model_roles(summary: dict[str, Any]) -> list[str]:
    """The trained models of a run's summary, in the order they were trained."""
    return [name for name, row in summary.items() if isinstance(row, dict) and "test" in row]


def _overlaid_curves(histories: dict[str, list[dict[str, Any]]], key: str, ylabel: str) -> bytes:
    """Train (dashed) and validation (solid) curves of every model on one chart."""
    plt = _figure()
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(6.4, 4))
    for index, (role, history) in enumerate(histories.items()):
        color = f"C{index}"
        epochs = [r["epoch"] for r in history]
        for split, style in (("train", "--"), ("val", "-")):
            values = [r[split].get(key) for r in history]
            axis.plot(epochs, [np.nan if v is None else v for v in values], style, color=color,
                      marker="o", markersize=3, label=f"{role} {split}")
    if key == "loss":
        axis.set_yscale("log")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    return _figure_png(figure)


def _per_class_f1_chart(per_class: dict[str, dict[str, dict[str, Any]]], class_names: Sequence[str]) -> bytes:
    """Grouped bars of test F1 per class for the given models."""
    plt = _figure()
    figure, axis = plt.subplots(figsize=(max(6.4, 0.5 * len(class_names) * len(per_class)), 3.8))
    width = 0.8 / len(per_class)
    x = np.arange(len(class_names))
    for index, (role, scores) in enumerate(per_class.items()):
        values = [scores[c]["f1"] for c in class_names]
        axis.bar(x + (index - (len(per_class) - 1) / 2) * width, [np.nan if v is None else 100 * v for v in values],
                 width=width, label=role)
    axis.set_xticks(x, class_names, rotation=45 if len(class_names) > 12 else 0, fontsize=8)
    axis.set_ylabel("test F1 (%)")
    low = min((100 * s[c]["f1"] for s in per_class.values() for c in class_names if s[c]["f1"] is not None), default=0)
    axis.set_ylim(max(0, low - 5), 100.5)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    return _figure_png(figure)


def reading_of_result(summary: dict[str, Any]) -> list[str]:
    """A few plain sentences on what distillation bought and what the student costs, from the summary's numbers."""
    sentences = []
    teacher, baseline = summary.get("teacher"), summary.get("student_baseline")
    distilled_roles = [role for role in model_roles(summary) if role.startswith("student_") and role != "student_baseline"]
    distilled = summary[distilled_roles[0]] if distilled_roles else None
    student = distilled or baseline  # every student has the same architecture
    if teacher and distilled:
        kept = distilled["test"]["top1"] / teacher["test"]["top1"] if teacher["test"]["top1"] else None
        share = distilled["params"] / teacher["params"]
        sentences.append(
            f"The distilled student keeps {format_metric(kept)}% of the teacher's test top-1 "
            f"({format_metric(distilled['test']['top1'])}% vs {format_metric(teacher['test']['top1'])}%) "
            f"with {100 * share:.0f}% of its parameters.")
        if distilled["test"]["top1"] > teacher["test"]["top1"]:
            sentences.append("The student outscored its teacher on the test split: the teacher was not the "
                             "stronger model here, so the soft targets carried little extra knowledge.")
    if teacher and student and "flops_per_image" in student:
        ratio = student["flops_per_image"] / teacher["flops_per_image"]
        cost = (f"{ratio:.2f}x the teacher's FLOPs per image ({student['flops_per_image'] / 1e9:.2f} vs "
                f"{teacher['flops_per_image'] / 1e9:.2f} GFLOPs)")
        sentences.append(f"The student is not cheaper than its teacher: it needs {cost}." if ratio >= 1
                         else f"The student needs {cost}.")
    if teacher and student and "speedup_clear" in student:
        measured = (f"median batch-1 latency {student['latency_ms']:.2f} ms against the teacher's "
                    f"{teacher['latency_ms']:.2f} ms on {summary.get('device', 'this device')}")
        sentences.append(f"Measured, the student runs {student['speedup_over_teacher']:.2f}x as fast as the teacher ({measured})."
                         if student["speedup_clear"] else
                         f"The speed measurement cannot tell student and teacher apart ({measured}, with overlapping "
                         "interquartile ranges).")
    for role in distilled_roles if baseline else []:
        row = summary[role]
        gain = 100 * (row["test"]["top1"] - baseline["test"]["top1"])
        verb = "added" if gain > 0 else "cost" if gain < 0 else "changed nothing in"
        sentence = (f"Distillation ({role.removeprefix('student_')}) {verb} {abs(gain):.2f} points of test top-1 "
                    f"{'over' if gain else 'compared with'} the baseline student"
                    + (f" with seed {summary['seeds'][0]}" if len(summary.get("seeds", [])) > 1 else ""))
        if "mcnemar_p" in row:
            sentence += f": {verdict(row['mcnemar_p'])} by the exact McNemar test on the paired test predictions"
        if "gain_top1_ci95" in row:
            low, high = row["gain_top1_ci95"]
            sentence += (f"; over seeds {', '.join(map(str, summary.get('seeds', [])))} its gain is "
                         f"{100 * row['gain_top1_mean']:+.2f} ± {100 * row['gain_top1_std']:.2f} points, 95% interval "
                         f"[{100 * low:+.2f}, {100 * high:+.2f}]: {verdict(row['gain_top1_p'], row['gain_significant'])}")
        sentences.append(sentence + ".")
    samples = summary.get("dataset", {}).get("sizes", {}).get("test")
    if baseline and distilled_roles and samples:
        sentences.append(f"One test image is {100 / samples:.2f} points here.")
    return sentences


def build_report(run_dir: str | Path) -> str:
    """A self-contained HTML report of a finished run, read from the files in its directory."""
    import html

    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json")
    config = read_json(run_dir / "config.json")
    roles = model_roles(summary)
    dataset = summary.get("dataset", {})
    class_names = dataset.get("class_names", [])
    results = {role: read_json(run_dir / role / "results.json") for role in roles}
    histories = {role: read_json(run_dir / role / "history.json")["epochs"] for role in roles}
    escape = lambda value: html.escape(str(value))  # noqa: E731
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<title>Distillation report: {escape(run_dir.name)}</title>\n<style>{REPORT_STYLE}</style>\n</head>\n<body>\n"
             f"<h1>Knowledge distillation report</h1>\n<p class=\"muted\">Run <code>{escape(run_dir.name)}</code>"
             f"{' · finished ' + escape(summary['finished_at']) if 'finished_at' in summary else ''}"
             f" · device {escape(summary.get('device', '?'))}, {escape(summary.get('precision', '?'))}"
             f" · wall time {escape(format_seconds(summary.get('wall_seconds', 0)))}</p>\n"]
    parts.append("<div class=\"lead\">" + "".join(f"<p>{escape(s)}</p>" for s in reading_of_result(summary)) + "</div>\n")
    if summary.get("warnings"):
        parts.append("<div class=\"warnings\">" + "".join(f"<p>Warning: {escape(w)}</p>" for w in summary["warnings"]) + "</div>\n")

    parts.append("<h2>Models</h2>\n<table>\n<tr><th class=\"name\">model</th><th class=\"name\">architecture</th>"
                 "<th>test top-1 %</th><th>top-3 %</th><th>macro F1 %</th><th>macro AUC %</th><th>parameters</th>"
                 "<th>size MB</th><th>GFLOPs / image</th><th>latency ms, median (IQR)</th><th>speed-up</th>"
                 "<th>gain over baseline</th><th>best epoch</th></tr>\n")
    baseline_top1 = summary.get("student_baseline", {}).get("test", {}).get("top1")
    for role in roles:
        row = summary[role]
        gain = "" if role in ("teacher", "student_baseline") or baseline_top1 is None else f"{100 * (row['test']['top1'] - baseline_top1):+.2f}"
        if gain and "mcnemar_p" in row:
            gain += f", {verdict(row['mcnemar_p'])}"
        latency = None if "latency_ms" not in row else (
            f"{row['latency_ms']:.2f}" + (" ({:.2f}–{:.2f})".format(*row["latency_ms_iqr"]) if "latency_ms_iqr" in row else ""))
        speedup = None if "speedup_over_teacher" not in row else (
            f"{row['speedup_over_teacher']:.2f}×" if row.get("speedup_clear", True) else "unclear (IQRs overlap)")
        flops = "—" if "flops_per_image" not in row else f"{row['flops_per_image'] / 1e9:.3f}"
        parts.append(
            f"<tr><td class=\"name\">{escape(role)}</td><td class=\"name\">{escape(row.get('arch', ''))}</td>"
            + "".join(f"<td>{format_metric(row['test'].get(k))}</td>" for k in ("top1", "top3", "f1_macro", "auc_macro"))
            + f"<td>{row['params']:,}</td><td>{row['size_mb']:.1f}</td>"
            f"<td>{flops}</td><td>{latency or '—'}</td><td>{speedup or '—'}</td>"
            f"<td>{gain or '—'}</td><td>{row.get('best_epoch', '')}</td></tr>\n")
    parts.append("</table>\n<p class=\"muted\">Best epoch chosen on validation top-1; test metrics of those weights. "
                 "Latency: batch 1, measured with the other models in interleaved rounds; speed-up: the teacher's median "
                 "latency over the model's, 'unclear' where the two interquartile ranges overlap. Gain verdict: exact "
                 "McNemar test of the paired test predictions (first seed), significant when p < 0.05.</p>\n")

    parts.append("<h2>Learning curves</h2>\n<div class=\"figures\">\n")
    for key, label in (("loss", "loss (train: training objective, val: CE)"), ("top1", "top-1 accuracy")):
        parts.append(f"<figure><img alt=\"{escape(label)}\" src=\"{_png_data_uri(_overlaid_curves(histories, key, key))}\">"
                     f"<figcaption>{escape(label)}: train dashed, validation solid</figcaption></figure>\n")
    parts.append("</div>\n<h2>Test confusion matrices</h2>\n<div class=\"figures\">\n")
    for role in roles:
        png = (run_dir / role / "confusion_matrix_test.png").read_bytes()
        parts.append(f"<figure><img alt=\"{escape(role)} confusion matrix\" src=\"{_png_data_uri(png)}\">"
                     f"<figcaption>{escape(role)}</figcaption></figure>\n")
    parts.append("</div>\n")
    students = [r for r in roles if r.startswith("student") and "per_class" in results[r]["splits"]["test"]]
    if students and class_names:
        per_class = {role: results[role]["splits"]["test"]["per_class"] for role in students}
        parts.append("<h2>Per-class F1 on the test split</h2>\n<div class=\"figures\"><figure class=\"wide\">"
                     f"<img alt=\"per-class F1\" src=\"{_png_data_uri(_per_class_f1_chart(per_class, class_names))}\">"
                     "<figcaption>students' test F1 per class</figcaption></figure></div>\n")

    sizes = dataset.get("sizes", {})
    carving = dataset.get("carving", {})
    skipped = summary.get("skipped_files", [])
    skipped_list = "; ".join(f"{item['path']} ({item['reason']})" for item in skipped)
    parts.append("<h2>Data</h2>\n<table class=\"settings\">\n"
                 f"<tr><th class=\"name\">classes ({len(class_names)})</th><td>{escape(', '.join(class_names))}</td></tr>\n"
                 + "".join(f"<tr><th class=\"name\">{escape(k)} images</th><td>{v}</td></tr>\n" for k, v in sizes.items())
                 + f"<tr><th class=\"name\">validation</th><td>{escape(dataset.get('validation', ''))}</td></tr>\n"
                 + "".join(f"<tr><th class=\"name\">{label}</th><td>{escape(carving[key])}</td></tr>\n"
                           for key, label in (("test", "test"), ("train_subset", "training subset")) if carving.get(key))
                 + f"<tr><th class=\"name\">skipped files</th><td>{escape(len(skipped)) + ': ' + escape(skipped_list) if skipped else 'none'}</td></tr>\n"
                 "</table>\n")
    parts.append("<h2>Settings</h2>\n<table class=\"settings\">\n")
    for key, value in config.items():
        if key not in ("dataset",):
            parts.append(f"<tr><th class=\"name\">{escape(key)}</th><td>{escape(json.dumps(value))}</td></tr>\n")
    parts.append("</table>\n</body>\n</html>\n")
    return "".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html (atomically) and return its path."""
    path = Path(run_dir) / "report.html"
    write_text(path, build_report(run_dir))
    return path


LEDGER_COLUMNS = [
    "finished_at", "run_dir", "dataset", "teacher_model", "student_model", "teacher_checkpoint", "teacher_epochs",
    "student_epochs", "optimizer", "teacher_lr", "student_lr", "kd_methods", "temperature", "alpha", "batch_size",
    "image_size", "seed", "seeds", "teacher_top1", "student_baseline_top1", "student_kd_top1", "distilled_top1",
    "kd_gain_top1", "wall_seconds",
]


def append_ledger(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row to a CSV ledger, writing the header first when the file is new.

    A ledger written by an older version, with fewer columns, is migrated: its header gains the
    missing columns (its own columns, even unknown ones, keep their values), rewritten atomically.
    An exclusive lock on a companion `.lock` file makes runs finishing at once append whole rows,
    one after the other, and never lose one to a migration.
    """
    import csv
    import fcntl
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            header: list[str] = []
            if path.is_file() and path.stat().st_size:
                with open(path, encoding="utf-8", newline="") as ledger:
                    header = next(csv.reader(ledger), [])
            columns = header + [column for column in LEDGER_COLUMNS if column not in header]
            if header and columns == header:
                buffer = io.StringIO()
                csv.DictWriter(buffer, fieldnames=columns).writerow({k: row.get(k, "") for k in columns})
                with open(path, "a", encoding="utf-8", newline="") as ledger:
                    ledger.write(buffer.getvalue())
                    ledger.flush()
                    os.fsync(ledger.fileno())
                return
            rows = []
            if header:
                with open(path, encoding="utf-8", newline="") as ledger:
                    rows = list(csv.DictReader(ledger))
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows + [{k: row.get(k, "") for k in columns}])
            write_text(path, buffer.getvalue())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------- ONNX export

ONNX_METADATA_KEY = "kd_pipeline"  # JSON: arch, class names, image size, normalization


def export_onnx(model: torch.nn.Module, path: str | Path, image_size: int, metadata: dict[str, Any]) -> None:
    """Export a model (fp32, CPU copy, eval mode) to ONNX with a dynamic batch dimension.

    The checkpoint's description (class names, image size, normalization) rides along in the
    file's metadata, so the ONNX file alone is enough to classify images.
    """
    import copy

    import onnx

    plain = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, 3, image_size, image_size)
    with atomic_path(path) as temporary:
        program = torch.onnx.export(
            plain, (example,), input_names=["images"], output_names=["logits"], dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
        program.save(str(temporary))
        graph = onnx.load(str(temporary))
        entry = graph.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata)
        onnx.save(graph, str(temporary))


def onnx_session(path: str | Path):
    """An onnxruntime CPU session for an exported model."""
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_metadata(session) -> dict[str, Any]:
    """The project's description stored in an exported model."""
    return json.loads(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])


def onnx_logits(session, images: torch.Tensor) -> torch.Tensor:
    """Logits of normalized float images through onnxruntime."""
    inputs = {session.get_inputs()[0].name: images.detach().cpu().float().contiguous().numpy()}
    return torch.from_numpy(session.run(None, inputs)[0])


@torch.no_grad()
def onnx_parity(model: torch.nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """Largest absolute difference between PyTorch (fp32, CPU) and onnxruntime logits on `images`."""
    import copy

    plain = copy.deepcopy(model).cpu().float().eval()
    expected = plain(images.cpu().float().contiguous())
    return float((onnx_logits(onnx_session(path), images) - expected).abs().max())
