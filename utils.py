"""Metrics, text tables and atomic file writes shared by the pipeline (the plots: core/plots.py).

Every file is written atomically: to a temporary file in the same folder, then renamed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import unicodedata
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
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


# ---------------------------------------------------------------- text from files, shown to people

# The first characters that make a spreadsheet read a cell as a formula (OWASP's CSV injection list).
FORMULA_STARTS = ("=", "+", "-", "@")  # tab and carriage return, also on the list, are escaped first


def printable(text: str, limit: int | None = None) -> str:
    """`text` safe for a terminal or a text file: control and format characters (escape sequences, newlines,
    direction overrides) shown as Python escapes, and at most `limit` characters kept."""
    text = text if limit is None else text[: limit + 1]  # escapes only lengthen it: never walk a megabyte of text
    shown = "".join(character.encode("unicode_escape").decode("ascii")
                    if unicodedata.category(character).startswith("C") else character for character in text)
    return shown if limit is None or len(shown) <= limit else shown[: limit - 3] + "..."


def spreadsheet_cell(text: str) -> str:
    """`text` for a CSV cell a spreadsheet will not run: printable, and a leading formula character quoted with
    an apostrophe, as spreadsheets themselves do."""
    text = printable(text)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


# ---------------------------------------------------------------- atomic files


def _process_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# Read once, at import (before any thread starts): os.umask can only be read by setting it.
UMASK = _process_umask()
FILE_MODE = 0o666 & ~UMASK  # what open() gives a new file
FOLDER_MODE = 0o777 & ~UMASK  # what mkdir() gives a new folder


def fsync_path(path: str | Path) -> None:
    """Wait until a file's data, or a folder's list of names, is on disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The file gets the mode a plain open() would give it under the user's umask (mkstemp's
    private 0600 would otherwise survive the rename). It is synced to disk before the rename, and
    its folder after it: otherwise a power cut can leave the new name pointing at an empty file
    (the rename reached the disk, the data not yet), or bring the old file back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(handle, FILE_MODE)
    os.close(handle)
    try:
        yield Path(temporary)
        fsync_path(temporary)
        os.replace(temporary, path)
        fsync_path(path.parent)
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


def holds_json(path: str | Path) -> bool:
    """Whether a file exists and is whole JSON (a crash while it was written can leave it cut)."""
    try:
        read_json(path)
    except (OSError, ValueError):
        return False
    return True


def remove_orphans(folder: str | Path) -> list[Path]:
    """Remove the temporary files `atomic_path` left below `folder` when a process was killed mid-write (the
    file each was for is untouched: it is replaced only by the final rename); returns them."""
    orphans = [path for path in Path(folder).rglob(".*.tmp") if path.is_file()]
    for path in orphans:
        path.unlink()
    return orphans


# ---------------------------------------------------------------- metrics


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """The one prediction rule of the project: the highest logit, ties to the lowest class index (torch.argmax)."""
    return logits.argmax(dim=1)


def ranked_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest classes of each row (k clipped to the class count), ties in class order, so the first is
    `predicted_classes`' (topk's order among tied values is unspecified and differs from argmax's)."""
    return logits.sort(dim=1, descending=True, stable=True).indices[:, : min(k, logits.shape[1])]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the k highest logits, ranked as `ranked_classes` ranks them."""
    return int((ranked_classes(logits, k) == labels[:, None]).any(dim=1).sum()) / len(labels)


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int, class_names: Sequence[str]):
    """Precision / recall / F1 for each average, by scikit-learn; undefined values become None with a reason."""
    classes = list(range(num_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, predictions, labels=classes, average=None, zero_division=np.nan
        )
        micro = precision_recall_fscore_support(
            labels, predictions, labels=classes, average="micro", zero_division=np.nan
        )[:3]
    predicted = np.bincount(predictions, minlength=num_classes)
    per_class = {"precision": precision, "recall": recall, "f1": f1}
    return _averaged_scores(per_class, dict(zip(SCORE_NAMES, micro, strict=True)), support, predicted, class_names)


def _averaged_scores(
    per_class: dict[str, np.ndarray], micro: dict[str, float], support: np.ndarray, predicted: np.ndarray,
    class_names: Sequence[str],
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Micro, macro and weighted precision / recall / F1 from per-class scores (NaN where undefined) and
    the micro values; undefined averages become None, with the reason under the second dict."""
    absent = [name for name, count in zip(class_names, support, strict=True) if count == 0]
    never_predicted = [name for name, count in zip(class_names, predicted, strict=True) if count == 0]
    reasons = {
        "precision": f"precision undefined for classes never predicted: {never_predicted}",
        "recall": f"recall undefined for classes absent from the split: {absent}",
        "f1": f"F1 undefined for classes both absent and never predicted: "
        f"{sorted(set(absent) & set(never_predicted))}",
    }
    values: dict[str, float | None] = {}
    undefined: dict[str, str] = {}
    present = support > 0
    for score in SCORE_NAMES:
        scores = per_class[score]
        values[f"{score}_micro"] = _nan_to_none(micro[score])
        values[f"{score}_macro"] = None if np.isnan(scores).any() else float(scores.mean())
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


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator as scikit-learn's precision_recall_fscore_support divides: NaN where 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator == 0, np.nan, numerator / np.where(denominator == 0, 1, denominator))


def _confusion_scores(confusion: np.ndarray, class_names: Sequence[str]):
    """`_scores` from a confusion matrix (rows: true class, columns: predicted), with scikit-learn's
    formulas: precision tp / predicted, recall tp / true, F1 2 tp / (true + predicted)."""
    true_positives, support, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    per_class = {"precision": _divide(true_positives, predicted), "recall": _divide(true_positives, support),
                 "f1": _divide(2.0 * true_positives, (support + predicted).astype(np.float64))}
    hits, total = np.array([true_positives.sum()]), np.array([confusion.sum()])
    micro_f1 = _divide(2.0 * hits, (total + total).astype(np.float64))[0]
    micro = {"precision": _divide(hits, total)[0], "recall": _divide(hits, total)[0], "f1": micro_f1}
    return _averaged_scores(per_class, micro, support, predicted, class_names)


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
    predictions = predicted_classes(logits).numpy()
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


def most_predicted(logits: torch.Tensor, class_names: Sequence[str]) -> tuple[str, float]:
    """The class a model predicts most often on a split, and the share of the split's samples it is predicted for."""
    counts = torch.bincount(predicted_classes(logits).cpu(), minlength=len(class_names))
    top = int(counts.argmax())
    return class_names[top], float(counts[top]) / max(len(logits), 1)


def label_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many classes `ranked_classes` puts before each row's label: the higher logits (NaN above any number, as
    sort ranks it), then the tied ones of a lower class index. Counted without sorting the rows."""
    label_logits = logits.gather(1, labels[:, None])
    earlier = torch.arange(logits.shape[1], device=logits.device) < labels[:, None]
    nan = logits.isnan()
    # In place on the fresh masks, and counted in int32 (an int64 sum of booleans along short rows is ~10x slower).
    before = (logits > label_logits).logical_or_(nan.logical_and_(earlier.logical_or(~label_logits.isnan())))
    return before.logical_or_((logits == label_logits).logical_and_(earlier)).sum(dim=1, dtype=torch.int32)


def metric_counts(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """What an epoch's metrics need, counted on the logits' device (float64, to be read in one copy):
    the confusion matrix by bincount (rows: true class, columns: `predicted_classes`), flattened, then the
    samples whose label is among the 1 and the 3 highest logits as `ranked_classes` ranks them (the first: the
    confusion matrix's diagonal, `predicted_classes` being `ranked_classes`' first)."""
    confusion = torch.bincount(labels * num_classes + predicted_classes(logits), minlength=num_classes * num_classes)
    top1 = confusion[:: num_classes + 1].sum()
    top3 = (label_ranks(logits, labels) < 3).sum()
    return torch.cat([confusion, top1[None], top3[None]]).double()


def _fraction(count: float, total: float) -> float:
    """count / total in float64, as `topk_accuracy` gives it: equal counts give equal values, and per-seed gains
    of equal counts agree far inside `results.significance.SAME_GAIN` (float32 fractions missed it)."""
    return float(count) / float(total)


def metrics_from_counts(counts: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Top-1, top-3 and precision / recall / F1 from `metric_counts` (read to the host), with the values
    and conventions of `classification_metrics`: fractions in [0, 1], undefined values None with the
    reason under `undefined`. No AUC: it needs every logit, and is computed for the final evaluation only."""
    num_classes = len(class_names)
    cells = num_classes * num_classes
    confusion = counts[:cells].astype(np.int64).reshape(num_classes, num_classes)
    samples = int(confusion.sum())
    scores, undefined = _confusion_scores(confusion, class_names)
    top1, top3 = (_fraction(hits, samples) for hits in counts[cells:])
    return {"samples": samples, "top1": top1, "top3": top3, **scores, "undefined": undefined}


def confusion(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Confusion matrix (rows: true class, columns: predicted class)."""
    return confusion_matrix(
        labels.cpu().numpy(), predicted_classes(logits).cpu().numpy(), labels=list(range(num_classes))
    )


def report_text(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> str:
    """scikit-learn's per-class classification report ('nan' marks an undefined value)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return classification_report(
            labels.cpu().numpy(),
            predicted_classes(logits).cpu().numpy(),
            labels=list(range(len(class_names))),
            target_names=[printable(name) for name in class_names],  # a text file, read in a terminal
            digits=4,
            zero_division=np.nan,
        )


def per_class_scores(
    logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support of every class (None where undefined)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        report = classification_report(
            labels.cpu().numpy(), predicted_classes(logits).cpu().numpy(), labels=list(range(len(class_names))),
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


TOP_K = 3  # the k of top-k accuracy beside top-1


def shows_top_k(num_classes: int | None) -> bool:
    """Whether top-k says anything: with k classes or fewer it is 100% by definition, and tables and
    figures leave it out (None: the class count is unknown, show it)."""
    return num_classes is None or num_classes > TOP_K


def shown_metrics(num_classes: int | None) -> tuple[str, ...]:
    """The test metrics tables and figures show: top-1, top-3 (see `shows_top_k`), macro F1, macro AUC."""
    return tuple(key for key in ("top1", "top3", "f1_macro", "auc_macro") if key != "top3" or shows_top_k(num_classes))


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


# The keys `classification_metrics` gives (an epoch's records lack AUC); a training record's other keys are what its
# criterion reported.
METRIC_KEYS = frozenset({"samples", "top1", "top3", "undefined", *METRIC_ROWS})


def history_table(history: list[dict[str, Any]], num_classes: int | None = None) -> str:
    """One line per epoch: learning rate, what the criterion reported (the loss and its parts, DKD's
    warm-up factor), train and validation metrics (top-3 only where `shows_top_k`)."""
    lines = []
    for record in history:
        train, val = record["train"], record["val"]
        parts = " ".join(f"{key}={value:.4f}" for key, value in train.items() if key not in METRIC_KEYS)
        train_top3, val_top3 = (f" top3={format_metric(split['top3'])}%" if shows_top_k(num_classes) else ""
                                for split in (train, val))
        lines.append(
            f"epoch {record['epoch']:3d}  lr={record['lr']:.5f}  train {parts} "
            f"top1={format_metric(train['top1'])}%{train_top3} "
            f"f1_macro={format_metric(train['f1_macro'])}  |  val loss={val['loss']:.4f} "
            f"top1={format_metric(val['top1'])}%{val_top3} "
            f"f1_macro={format_metric(val['f1_macro'])}  "
            f"({format_seconds(record['seconds'])})"
        )
    return "\n".join(lines) + "\n"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain-text table whose columns are as wide as their widest cell, two spaces apart.

    The first `left` columns (names) are left-aligned, the others (numbers) right-aligned; every cell is
    `printable` (a class name from a file cannot move the cursor or start a line).
    """
    header, rows = [printable(str(cell)) for cell in header], [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) if index < left else cell.rjust(width)
                         for index, (cell, width) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)]) + "\n"
