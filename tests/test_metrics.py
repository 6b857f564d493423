"""Metrics against hand-computed values, including the cases where a metric is undefined."""

import math

import pytest
import torch

import utils

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
