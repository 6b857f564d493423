"""The pipeline's figures: learning curves, top-k bars, confusion matrices, model comparisons, per-class F1;
each saved as PNG atomically (utils.atomic_path)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import utils


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}  # never over a curve


def save_figure(figure, path: str | Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    png = figure_png(figure)
    with utils.atomic_path(path) as temporary:
        temporary.write_bytes(png)


def _values(history: list[dict[str, Any]], split: str, key: str) -> list[float]:
    return [np.nan if record[split].get(key) is None else record[split][key] for record in history]


def curves_figure(
    histories: dict[str, list[dict[str, Any]]], key: str, ylabel: str, title: str = "",
    part_labels: dict[str, str] | None = None,
):
    """Train (dashed) and validation (solid) curves of one metric over epochs, one colour and marker a model.
    With `part_labels` (the objective's parts, name -> label) a single model's training loss is drawn part by
    part. Losses are drawn on a log scale; the legend sits beside the axes."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(6.4, 4))
    for index, (name, history) in enumerate(histories.items()):
        epochs = [record["epoch"] for record in history]
        prefix = f"{name} " if len(histories) > 1 else ""
        parts = [part for part in part_labels or {} if part in history[0]["train"]]
        series = [(key, f"{prefix}train {key}", f"C{index}")]
        if key == "loss" and len(histories) == 1 and len(parts) > 1:
            series = [(part, f"train {part_labels[part]}", f"C{number + 1}") for number, part in enumerate(parts)]
        # Coinciding curves (models that learned alike) stay visible: later ones thinner, with hollow markers.
        style = {"marker": "osD^v<>p"[index % 8], "markersize": 3 + 2 / (index + 1),
                 "fillstyle": "none" if index else "full", "linewidth": 2.4 / (index + 1) ** 0.5}
        for part, label, color in series:
            axis.plot(epochs, _values(history, "train", part), "--", color=color, label=label, **style)
        axis.plot(epochs, _values(history, "val", key), "-", color=f"C{index}", label=f"{prefix}val {key}", **style)
    if key == "loss":
        axis.set_yscale("log")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, **LEGEND_OUTSIDE)
    return figure


def plot_topk(results: dict[str, dict[str, Any]], title: str, path: str | Path, num_classes: int | None = None) -> None:
    """Grouped bars of top-1 and top-3 accuracy per split (top-1 alone where top-3 says nothing: `shows_top_k`)."""
    plt = _pyplot()
    splits, x = list(results), np.arange(len(results))
    figure, axis = plt.subplots(figsize=(6, 4))
    keys = ((-0.2, "top1"), (0.2, "top3")) if utils.shows_top_k(num_classes) else ((0.0, "top1"),)
    for offset, key in keys:
        values = [100 * results[s][key] for s in splits]
        bars = axis.bar(x + offset, values, width=0.4, label=key)
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_xticks(x, splits)
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 105)
    axis.set_title(title)
    axis.legend(**LEGEND_OUTSIDE)
    save_figure(figure, path)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], title: str, path: str | Path) -> None:
    """A seaborn heat map of a confusion matrix."""
    import seaborn as sns

    plt = _pyplot()
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


def plot_comparison(
    tests: dict[str, dict[str, Any]], params: dict[str, int], path: str | Path, num_classes: int | None = None,
) -> None:
    """Test metrics (`tests`: model -> its test metrics, see `shown_metrics`) and parameter counts of the
    models side by side."""
    plt = _pyplot()
    names = list(tests)
    keys = list(utils.shown_metrics(num_classes))
    # Wider with more models, so every bar keeps room for its value label.
    figure, (metric_axis, size_axis) = plt.subplots(
        1, 2, figsize=(8 + 1.4 * len(names), 4.5), gridspec_kw={"width_ratios": [3, 1]}
    )
    width = 0.8 / len(names)
    x = np.arange(len(keys))
    defined = [100 * v for n in names for v in (tests[n].get(k) for k in keys) if v is not None]
    floor = max(0.0, min(defined, default=0.0) - 10)  # zoom in: the differences are what matter
    for i, name in enumerate(names):
        values = [tests[name].get(k) for k in keys]
        bars = metric_axis.bar(
            x + (i - (len(names) - 1) / 2) * width,
            [floor if v is None else 100 * v for v in values], width=width, label=name,
        )
        metric_axis.bar_label(bars, labels=[utils.format_metric(v) for v in values], fontsize=7,
                              rotation=90 if len(names) > 3 else 0, padding=2)
    metric_axis.set_xticks(x, [f"test {k}" for k in keys])
    metric_axis.set_ylabel("%")
    metric_axis.set_ylim(floor, 100 + (100 - floor) * (0.08 if len(names) <= 3 else 0.2))
    metric_axis.legend(loc="upper left", bbox_to_anchor=(0, -0.08), ncol=min(len(names), 6), fontsize=8, frameon=False)
    metric_axis.set_title("Test metrics")
    bars = size_axis.bar(names, [params[n] / 1e6 for n in names], color="gray")
    size_axis.bar_label(bars, fmt="%.2fM", fontsize=7, rotation=90 if len(names) > 3 else 0, padding=2)
    size_axis.set_ylabel("parameters (millions)")
    size_axis.set_title("Model size")
    size_axis.set_ylim(0, max(params.values()) / 1e6 * 1.3)
    size_axis.tick_params(axis="x", rotation=35)
    plt.setp(size_axis.get_xticklabels(), horizontalalignment="right")
    save_figure(figure, path)


def per_class_f1_figure(per_class: dict[str, dict[str, dict[str, Any]]], class_names: Sequence[str]):
    """Grouped bars of test F1 per class for the given models (model -> class -> its scores)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(6.4, 0.5 * len(class_names) * len(per_class)), 3.8))
    width = 0.8 / len(per_class)
    x = np.arange(len(class_names))
    for index, (role, scores) in enumerate(per_class.items()):
        values = [scores[c]["f1"] for c in class_names]
        axis.bar(x + (index - (len(per_class) - 1) / 2) * width, [np.nan if v is None else 100 * v for v in values],
                 width=width, label=role)
    axis.set_xticks(x, class_names, rotation=45 if len(class_names) > 12 else 0, fontsize=8)
    axis.set_ylabel("test F1 (%)")
    axis.set_ylim(0, 100.5)  # from 0: a zoomed axis multiplies the look of a difference
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, **LEGEND_OUTSIDE)
    return figure
