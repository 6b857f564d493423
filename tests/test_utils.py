"""utils: metrics by hand and against scikit-learn, formatting, escaped files, and atomic writes."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, tied_logits

import utils
from core import plots
from results import significance


def test_the_classification_report_file_escapes_class_names():
    text = utils.report_text(torch.eye(3), torch.tensor([0, 1, 2]), ["\x1b[31mred", "a\nb", "c"])
    assert "\x1b" not in text and "\\x1b[31mred" in text and "a\\nb" in text
    assert len(text.splitlines()) == len(utils.report_text(torch.eye(3), torch.tensor([0, 1, 2]),
                                                           ["x", "y", "z"]).splitlines())


def test_atomic_writes_follow_the_umask(tmp_path):
    script = "import sys, utils; utils.write_text(sys.argv[1], 'x')"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.txt")], cwd=ROOT, check=True,
                   preexec_fn=lambda: os.umask(0o027))
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o640


NAMES = ["a", "b", "c"]


def onehot_logits(predictions, num_classes=3):
    logits = torch.full((len(predictions), num_classes), -5.0)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = 5.0
    return logits


def test_topk_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1, 3])
    assert utils.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    # sample 1: label 1 is third-ranked (in top-3); sample 2: label 3 is last (not in top-3).
    assert utils.topk_accuracy(logits, labels, 3) == pytest.approx(2 / 3)
    assert utils.topk_accuracy(logits[:, :2], torch.tensor([0, 1, 1]), 3) == 1.0  # k clipped to 2 classes


def test_equal_count_gains_are_the_same_gain_for_the_verdicts():
    """Two seeds whose distilled student beats the baseline by 7 of 60 images each: the same gain, as the
    zero-spread rule needs (in float32, 17/60 - 10/60 and 27/60 - 20/60 differ by 4e-8)."""
    labels = torch.zeros(60, dtype=torch.long)

    def top1(hits: int) -> float:
        logits = torch.zeros(60, 2)
        logits[hits:, 1] = 1.0  # the first `hits` samples predict class 0, their label
        return utils.topk_accuracy(logits, labels, 1)

    assert top1(17) == 17 / 60
    assert abs((top1(17) - top1(10)) - (top1(27) - top1(20))) < significance.SAME_GAIN
    counts = np.array([17.0, 43.0, 0.0, 0.0, 17.0, 60.0])  # metric_counts' layout for 2 classes: the epoch's path
    assert utils.metrics_from_counts(counts, ["a", "b"])["top1"] == 17 / 60


def test_precision_recall_f1_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predictions = [0, 0, 1, 1, 2, 2]
    metrics = utils.classification_metrics(onehot_logits(predictions), labels, NAMES)
    # per class: a: P=2/2 R=2/3; b: P=1/2 R=1/2; c: P=1/2 R=1/1
    precision = [1.0, 0.5, 0.5]
    recall = [2 / 3, 0.5, 1.0]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    support = [3, 2, 1]
    assert metrics["top1"] == pytest.approx(4 / 6)
    assert metrics["precision_macro"] == pytest.approx(sum(precision) / 3)
    assert metrics["recall_macro"] == pytest.approx(sum(recall) / 3)
    assert metrics["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert metrics["f1_weighted"] == pytest.approx(sum(f * s for f, s in zip(f1, support, strict=True)) / 6)
    assert metrics["precision_micro"] == pytest.approx(4 / 6)
    assert metrics["undefined"] == {}


def test_auc_by_hand():
    # Class scores chosen so each one-vs-rest AUC is easy to count by hand.
    probabilities = torch.tensor([[0.7, 0.05, 0.25], [0.4, 0.45, 0.15], [0.3, 0.3, 0.4], [0.2, 0.6, 0.2]])
    labels = torch.tensor([0, 0, 1, 2])
    metrics = utils.classification_metrics(probabilities.log(), labels, NAMES)
    # a: positives {0.7, 0.4} vs negatives {0.3, 0.2}: 4/4 pairs ranked right -> 1.0
    # b: positive {0.3} vs {0.05, 0.45, 0.6}: 1/3; c: positive {0.2} vs {0.25, 0.15, 0.4}: 1/3
    per_class = [1.0, 1 / 3, 1 / 3]
    assert metrics["auc_macro"] == pytest.approx(sum(per_class) / 3)
    assert metrics["auc_weighted"] == pytest.approx((2 * 1.0 + 1 / 3 + 1 / 3) / 4)
    # micro: all 12 (sample, class) scores pooled against the one-hot labels: positives {0.7, 0.4, 0.3, 0.2},
    # negatives {0.05, 0.25, 0.45, 0.15, 0.3, 0.4, 0.2, 0.6}. Pairs ranked right, a tie counting half:
    # 0.7 beats all 8; 0.4 beats 5, ties 1; 0.3 beats 4, ties 1; 0.2 beats 2, ties 1 -> 20.5 of 32.
    assert 0.0 <= metrics["auc_micro"] <= 1.0
    assert metrics["auc_micro"] == pytest.approx(20.5 / 32)


def test_class_absent_from_split_is_null_with_reason_not_zero():
    labels = torch.tensor([0, 0, 1, 1])  # class c never occurs
    metrics = utils.classification_metrics(onehot_logits([0, 1, 1, 2]), labels, NAMES)
    assert metrics["recall_macro"] is None
    assert "absent" in metrics["undefined"]["recall_macro"] and "'c'" in metrics["undefined"]["recall_macro"]
    for average in ("micro", "macro", "weighted"):
        assert metrics[f"auc_{average}"] is None
        assert "'c'" in metrics["undefined"][f"auc_{average}"]
    # micro recall stays defined (2 of 4 right); weighted recall gives the empty class weight 0:
    # a: 1/2 with support 2, b: 1/2 with support 2.
    assert metrics["recall_micro"] == pytest.approx(2 / 4)
    assert metrics["recall_weighted"] == pytest.approx(1 / 2)
    # precision of c is defined (predicted once, wrongly): 0; a: 1/1, b: 1/2.
    assert metrics["precision_macro"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_class_never_predicted_makes_macro_precision_null():
    labels = torch.tensor([0, 1, 2, 2])
    metrics = utils.classification_metrics(onehot_logits([0, 1, 1, 1]), labels, NAMES)
    assert metrics["precision_macro"] is None
    assert "never predicted" in metrics["undefined"]["precision_macro"]
    assert metrics["recall_macro"] == pytest.approx((1 + 1 + 0) / 3)
    assert metrics["f1_macro"] is not None  # F1 of c is 0 (recall 0, precision undefined -> 0 by definition)


def test_non_finite_logits_give_null_auc():
    logits = torch.tensor([[math.nan, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    metrics = utils.classification_metrics(logits, torch.tensor([0, 1, 2]), NAMES)
    assert metrics["auc_macro"] is None and "not finite" in metrics["undefined"]["auc_macro"]


def test_metrics_json_is_strict(tmp_path):
    metrics = utils.classification_metrics(onehot_logits([0, 1, 1, 2]), torch.tensor([0, 0, 1, 1]), NAMES)
    utils.write_json(tmp_path / "m.json", metrics)  # allow_nan=False: no NaN may leak into JSON
    assert utils.read_json(tmp_path / "m.json")["auc_macro"] is None
    # A NaN that did leak in is refused, and nothing is left on disk (Python's json would write a bare NaN).
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        utils.write_json(tmp_path / "nan.json", {**metrics, "auc_macro": math.nan})
    assert list(tmp_path.iterdir()) == [tmp_path / "m.json"]


def test_format_seconds():
    assert utils.format_seconds(4.24) == "4.2s"
    assert utils.format_seconds(125) == "2m05s"
    assert utils.format_seconds(3723) == "1h02m03s"


def _device_metrics(logits, labels, names=NAMES):
    return utils.metrics_from_counts(utils.metric_counts(logits, labels, len(names)).numpy(), names)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_metrics_equal_scikit_learns_on_the_same_predictions(seed):
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, top_k_accuracy_score

    generator = torch.Generator().manual_seed(seed)
    names = [str(c) for c in range(7)]
    logits = torch.randn(300, 7, generator=generator).bfloat16().float()  # bf16 steps: tied top logits occur
    labels = torch.randint(0, 7, (300,), generator=generator)
    metrics = _device_metrics(logits, labels, names)
    predictions = logits.argmax(dim=1).numpy()  # the first of tied classes, as the confusion matrix counts
    assert metrics["samples"] == 300
    for k in (1, 3):  # ranked as the final evaluation ranks them (ties and all)
        assert metrics[f"top{k}"] == utils.topk_accuracy(logits, labels, k)
    continuous = torch.randn(300, 7, generator=generator)  # without ties, where every tie rule agrees
    assert _device_metrics(continuous, labels, names)["top1"] == pytest.approx(
        accuracy_score(labels.numpy(), continuous.argmax(dim=1).numpy()), abs=1e-7)
    assert _device_metrics(continuous, labels, names)["top3"] == pytest.approx(
        top_k_accuracy_score(labels.numpy(), continuous.numpy(), k=3, labels=range(7)), abs=1e-7)
    for average in ("micro", "macro", "weighted"):
        reference = precision_recall_fscore_support(labels.numpy(), predictions, labels=range(7), average=average,
                                                    zero_division=np.nan)[:3]
        for name, value in zip(("precision", "recall", "f1"), reference, strict=True):
            assert metrics[f"{name}_{average}"] == value, (name, average)  # the same formulas, bit for bit
    full = utils.classification_metrics(continuous, labels, names)
    device = _device_metrics(continuous, labels, names)
    assert {key: device[key] for key in device} == {key: full[key] for key in device}  # as the final evaluation's


@pytest.mark.parametrize("predictions, labels", [
    ([0, 1, 1, 2], [0, 0, 1, 1]),  # class c absent: recall and AUC-free reasons
    ([0, 1, 1, 1], [0, 1, 2, 2]),  # class c never predicted
    ([0, 0, 0, 0], [1, 1, 1, 1]),  # a and c absent, b and c never predicted
])
def test_device_metrics_keep_undefined_values_and_their_reasons(predictions, labels):
    logits, labels = onehot_logits(predictions), torch.tensor(labels)
    device, full = _device_metrics(logits, labels), utils.classification_metrics(logits, labels, NAMES)
    for key, value in device.items():
        if key != "undefined":
            assert value == full[key], key
    assert device["undefined"] == {key: reason for key, reason in full["undefined"].items()
                                   if not key.startswith("auc")}
    assert device["undefined"], "these cases have undefined values"


def test_atomic_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(handle):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{handle}")))
        fsync(handle)

    def recorded_replace(source, target):
        events.append(("rename", str(source), str(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    utils.write_text(tmp_path / "results.json", "{}")
    (_, temporary), rename, directory = events
    assert rename == ("rename", temporary, str(tmp_path / "results.json"))
    assert directory == ("fsync", str(tmp_path))
    assert (tmp_path / "results.json").read_text() == "{}"


def test_holds_json_tells_a_whole_file_from_a_torn_or_missing_one(tmp_path):
    whole, torn = tmp_path / "summary.json", tmp_path / "torn.json"
    utils.write_json(whole, {"models": [1, 2, 3]})
    torn.write_text(whole.read_text()[: len(whole.read_text()) // 2])
    assert utils.holds_json(whole) and not utils.holds_json(torn) and not utils.holds_json(tmp_path / "none.json")


def test_remove_orphans_takes_only_what_atomic_writes_left(tmp_path):
    kept = [tmp_path / "teacher" / "train_state.pth", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    orphan = tmp_path / "teacher" / ".train_state.pth.x1y2.tmp"
    for path in [*kept, orphan]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert utils.remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and all(path.exists() for path in kept)


def test_one_prediction_rule_decides_top1_top3_and_the_per_class_scores_when_logits_tie():
    logits, labels = tied_logits()
    tied_rows = (logits == logits.max(dim=1, keepdim=True).values).sum(dim=1) > 1
    assert tied_rows.sum() >= 50  # the ties are real
    predicted = utils.predicted_classes(logits)
    assert torch.equal(predicted, logits.argmax(dim=1))  # ties go to the lowest index
    correct = int((predicted == labels).sum())
    metrics = utils.classification_metrics(logits, labels, [str(c) for c in range(10)])
    assert round(metrics["top1"] * len(labels)) == correct
    counted = utils.metrics_from_counts(utils.metric_counts(logits, labels, 10).numpy(), [str(c) for c in range(10)])
    assert round(counted["top1"] * len(labels)) == correct
    assert torch.equal(utils.ranked_classes(logits, 3)[:, 0], predicted)
    assert utils.ranked_classes(torch.zeros(2, 10), 3).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_label_ranks_place_each_label_where_the_stable_sort_does_with_ties_infinities_and_nan():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(-2, 3, (400, 6), generator=generator).float()  # many ties
    kind = torch.rand(400, 6, generator=generator)
    logits[kind < 0.1], logits[kind > 0.9], logits[(kind > 0.85) & (kind < 0.9)] = math.nan, math.inf, -math.inf
    labels = torch.randint(0, 6, (400,), generator=generator)
    ranks = utils.label_ranks(logits, labels)
    for k in range(1, 7):
        assert torch.equal(ranks < k, (utils.ranked_classes(logits, k) == labels[:, None]).any(dim=1)), k
    assert utils.label_ranks(torch.tensor([[1.0, math.nan, 1.0, math.nan]]), torch.tensor([2])).tolist() == [3]


def _legend_beside_axes(figure) -> bool:
    """Whether every axes' legend lies wholly right of its axes (so it covers no curve or bar)."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    return all(axis.get_legend().get_window_extent(renderer).x0 >= axis.get_window_extent(renderer).x1
               for axis in figure.axes if axis.get_legend() is not None)


def test_identical_curves_stay_visible_and_legends_cover_none():
    history = [{"epoch": epoch, "train": {"top1": 0.5}, "val": {"top1": 0.6}} for epoch in (1, 2, 3)]
    figure = plots.curves_figure({"student_baseline": history, "student_kd": history}, "top1", "top1")
    first, second = (line for line in figure.axes[0].get_lines() if line.get_label().endswith("val top1"))
    assert first.get_marker() != second.get_marker() and second.get_linewidth() < first.get_linewidth()
    assert second.get_fillstyle() == "none" and second.get_markersize() < first.get_markersize()
    assert _legend_beside_axes(figure)


def test_the_per_class_f1_axis_starts_at_zero_beside_its_legend():
    scores = {"student_baseline": {"a": {"f1": 0.91}, "b": {"f1": 0.93}},
              "student_kd": {"a": {"f1": 0.95}, "b": {"f1": None}}}
    figure = plots.per_class_f1_figure(scores, ["a", "b"])
    assert figure.axes[0].get_ylim()[0] == 0
    assert _legend_beside_axes(figure)
