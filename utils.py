"""Metrics, reports, plots, checkpoints and small helpers shared by the pipeline.

Every file is written atomically: to a temporary file in the same folder, then renamed.
"""

from __future__ import annotations

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


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        lines.append(
            f"epoch {record['epoch']:3d}  lr={record['lr']:.5f}  train {parts} "
            f"top1={format_metric(train['top1'])}% top3={format_metric(train['top3'])}% "
            f"f1_macro={format_metric(train['f1_macro'])}  |  val loss={val['loss']:.4f} "
            f"top1={format_metric(val['top1'])}% top3={format_metric(val['top3'])}% "
            f"f1_macro={format_metric(val['f1_macro'])} auc_macro={format_metric(val['auc_macro'])}  "
            f"({format_seconds(record['seconds'])})"
        )
    return "\n".join(lines) + "\n"


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
    """A few plain sentences on what distillation bought, from the summary's numbers."""
    sentences = []
    teacher, baseline, distilled = (summary.get(k) for k in ("teacher", "student_baseline", "student_kd"))
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
    if baseline and distilled:
        gain = 100 * (distilled["test"]["top1"] - baseline["test"]["top1"])
        verdict = "added" if gain > 0 else "cost" if gain < 0 else "changed nothing in"
        samples = summary.get("dataset", {}).get("sizes", {}).get("test")
        noise = f" One test image is {100 / samples:.2f} points here." if samples else ""
        sentences.append(f"Distillation {verdict} {abs(gain):.2f} points of test top-1 "
                         f"{'over' if gain else 'compared with'} the baseline student.{noise}")
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

    parts.append("<h2>Models</h2>\n<table>\n<tr><th class=\"name\">model</th><th class=\"name\">architecture</th>"
                 "<th>test top-1 %</th><th>top-3 %</th><th>macro F1 %</th><th>macro AUC %</th><th>parameters</th>"
                 "<th>size MB</th><th>latency ms</th><th>speed-up</th><th>gain over baseline</th><th>best epoch</th></tr>\n")
    baseline_top1 = summary.get("student_baseline", {}).get("test", {}).get("top1")
    for role in roles:
        row = summary[role]
        gain = "" if role in ("teacher", "student_baseline") or baseline_top1 is None else f"{100 * (row['test']['top1'] - baseline_top1):+.2f}"
        latency = row.get("latency_ms")
        speedup = row.get("speedup_over_teacher")
        parts.append(
            f"<tr><td class=\"name\">{escape(role)}</td><td class=\"name\">{escape(row.get('arch', ''))}</td>"
            + "".join(f"<td>{format_metric(row['test'].get(k))}</td>" for k in ("top1", "top3", "f1_macro", "auc_macro"))
            + f"<td>{row['params']:,}</td><td>{row['size_mb']:.1f}</td>"
            f"<td>{'—' if latency is None else f'{latency:.2f}'}</td><td>{'—' if speedup is None else f'{speedup:.2f}×'}</td>"
            f"<td>{gain or '—'}</td><td>{row.get('best_epoch', '')}</td></tr>\n")
    parts.append("</table>\n<p class=\"muted\">Best epoch chosen on validation top-1; test metrics of those weights. "
                 "Latency and speed-up appear when the run measured them.</p>\n")

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
    skipped = summary.get("skipped_files", [])
    skipped_list = "; ".join(f"{item['path']} ({item['reason']})" for item in skipped)
    parts.append("<h2>Data</h2>\n<table class=\"settings\">\n"
                 f"<tr><th class=\"name\">classes ({len(class_names)})</th><td>{escape(', '.join(class_names))}</td></tr>\n"
                 + "".join(f"<tr><th class=\"name\">{escape(k)} images</th><td>{v}</td></tr>\n" for k, v in sizes.items())
                 + f"<tr><th class=\"name\">validation</th><td>{escape(dataset.get('validation', ''))}</td></tr>\n"
                 f"<tr><th class=\"name\">skipped files</th><td>{escape(len(skipped)) + ': ' + escape(skipped_list) if skipped else 'none'}</td></tr>\n"
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
    "finished_at", "run_dir", "dataset", "teacher_model", "student_model", "teacher_epochs", "student_epochs",
    "temperature", "alpha", "batch_size", "image_size", "seed", "teacher_top1", "student_baseline_top1",
    "student_kd_top1", "kd_gain_top1", "wall_seconds",
]


def append_ledger(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row to a CSV ledger, writing the header first when the file is new.

    An exclusive lock makes two runs finishing at once append whole rows, one after the other.
    """
    import csv
    import fcntl
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8", newline="") as ledger:
        fcntl.flock(ledger, fcntl.LOCK_EX)
        try:
            ledger.seek(0, os.SEEK_END)
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=LEDGER_COLUMNS)
            if ledger.tell() == 0:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in LEDGER_COLUMNS})
            ledger.write(buffer.getvalue())
            ledger.flush()
            os.fsync(ledger.fileno())
        finally:
            fcntl.flock(ledger, fcntl.LOCK_UN)


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
