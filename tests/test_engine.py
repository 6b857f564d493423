"""The training loop (engine): best-epoch selection and restore, early stopping, the selection metric, label
smoothing and class weights, and non-finite losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
import KD_engine
from methods import kd

TRAIN = [(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 0]))]


LABELS = torch.tensor([0, 1])


# Validation logits (the scripted model adds its bias, which the optimizer sets to the epoch number on
# both classes, so the predictions and losses below are exactly these).
RIGHT = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # top-1 100%


WRONG = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # top-1 50%


# top-1 100% with a weak margin, against top-1 50% with a lower loss (and a lower macro F1).
WEAK_BUT_RIGHT = torch.tensor([[0.1, 0.0], [0.0, 0.1]])


CONFIDENT_ONE_WRONG = torch.tensor([[9.0, 0.0], [0.1, 0.0]])


class ScriptedValidation:
    """A validation loader handing out the next scripted batch each epoch."""

    def __init__(self, epochs: list[torch.Tensor]) -> None:
        self.epochs = iter(epochs)

    def __iter__(self):
        yield next(self.epochs), LABELS


def run_fit(val_epochs: list[torch.Tensor], epochs: int, resume=None,
            **selection) -> tuple[engine.FitResult, ScriptedModel]:
    model = ScriptedModel()
    optimizer = EpochCountingOptimizer(model.parameters(), 1)
    if resume is not None:
        optimizer.steps = len(resume[0].history)
    result = engine.fit(model, TRAIN, ScriptedValidation(val_epochs), engine.SupervisedCriterion(), optimizer, epochs,
                        NAMES, torch.device("cpu"), hooks=engine.FitHooks(log=lambda line: None), resume=resume,
                        selection=engine.Selection(**selection))
    return result, model


def test_patience_stops_after_that_many_epochs_without_improvement_and_keeps_the_best():
    scripted = [WRONG, RIGHT, WRONG, WRONG, RIGHT, RIGHT]
    result, model = run_fit(scripted, 6, patience=2)
    assert len(result.history) == 4 and result.stopped_early
    assert result.best_epoch == 2
    assert torch.allclose(model.bias, torch.full((2,), 2.0)), "the best epoch's weights are the ones kept"
    unlimited, _ = run_fit(scripted, 6, patience=0)
    assert len(unlimited.history) == 6 and not unlimited.stopped_early


def test_a_resumed_run_stops_where_an_uninterrupted_one_would():
    """The count of epochs without improvement comes from the saved history alone."""
    stopped, _ = run_fit([WRONG, RIGHT, WRONG, WRONG], 6, patience=2)
    saved = engine.FitResult(history=list(stopped.history), best_epoch=stopped.best_epoch,
                             train_seconds=stopped.train_seconds, best_val_outputs=stopped.best_val_outputs)
    resumed, _ = run_fit([], 6, resume=(saved, ScriptedModel().state_dict()), patience=2)
    assert len(resumed.history) == 4 and resumed.stopped_early and resumed.best_epoch == 2
    one_short = engine.FitResult(history=stopped.history[:3], best_epoch=2)
    continued, _ = run_fit([WRONG, RIGHT], 6, resume=(one_short, ScriptedModel().state_dict()), patience=2)
    assert len(continued.history) == 4 and continued.stopped_early


@pytest.mark.parametrize("metric, best_epoch", [("top1", 1), ("loss", 2), ("f1_macro", 1)])
def test_select_metric_picks_its_epoch(metric, best_epoch):
    result, _ = run_fit([WEAK_BUT_RIGHT, CONFIDENT_ONE_WRONG], 2, metric=metric)
    first, second = (record["val"] for record in result.history)
    assert first["top1"] == 1.0 and second["top1"] == 0.5 and second["loss"] < first["loss"]
    assert second["f1_macro"] < first["f1_macro"]
    assert result.best_epoch == best_epoch


def test_selection_ties_go_to_the_lower_loss_and_an_undefined_f1_is_worst():
    assert engine.is_better({"f1_macro": 0.8, "loss": 0.2}, {"f1_macro": 0.8, "loss": 0.3}, "f1_macro")
    assert not engine.is_better({"f1_macro": 0.8, "loss": 0.3}, {"f1_macro": 0.8, "loss": 0.2}, "f1_macro")
    assert engine.is_better({"f1_macro": 0.1, "loss": 9.0}, {"f1_macro": None, "loss": 0.1}, "f1_macro")
    assert engine.is_better({"top1": 0.1, "loss": 0.1}, {"top1": 0.9, "loss": 0.2}, "loss")


LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [1.0, 1.0, 1.0]])


TARGETS = torch.tensor([0, 2, 1, 0])


def by_hand(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0, weights=None) -> float:
    """Cross-entropy written out: per sample (1 - e) * -log p_y + e * mean_k -log p_k, weighted by w_y."""
    total, weight_sum = 0.0, 0.0
    for row, target in zip(logits.tolist(), targets.tolist(), strict=True):
        log_norm = math.log(sum(math.exp(value) for value in row))
        nll = [log_norm - value for value in row]
        loss = (1 - smoothing) * nll[target] + smoothing * sum(nll) / len(row)
        weight = 1.0 if weights is None else weights[target]
        total, weight_sum = total + weight * loss, weight_sum + weight
    return total / weight_sum


def test_label_smoothing_against_the_hand_computed_loss():
    criterion = engine.SupervisedCriterion(engine.hard_label_loss(label_smoothing=0.1))
    loss = criterion(torch.nn.Identity(), LOGITS, TARGETS)["loss"]
    assert loss.item() == pytest.approx(by_hand(LOGITS, TARGETS, smoothing=0.1), rel=1e-6)
    assert loss.item() != pytest.approx(by_hand(LOGITS, TARGETS), rel=1e-3)


def test_balanced_class_weights_against_the_hand_computed_loss():
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])  # 6, 3 and 1 images of 3 classes
    weights = engine.class_weights(labels, 3)
    assert weights == pytest.approx([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])
    criterion = engine.SupervisedCriterion(engine.hard_label_loss(weights=weights))
    loss = criterion(torch.nn.Identity(), LOGITS, TARGETS)["loss"]
    assert loss.item() == pytest.approx(by_hand(LOGITS, TARGETS, weights=weights), rel=1e-6)


def test_distillation_smooths_and_weighs_only_its_ce_term():
    teacher_logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.5, 0.0], [0.5, 0.0, 0.0]])
    hard_loss = engine.hard_label_loss(label_smoothing=0.2, weights=[1.0, 2.0, 0.5])
    parts = kd.distillation_loss(LOGITS, teacher_logits, TARGETS, temperature=4.0, alpha=0.3, hard_loss=hard_loss)
    plain = kd.distillation_loss(LOGITS, teacher_logits, TARGETS, temperature=4.0, alpha=0.3)
    assert parts["kd"].item() == pytest.approx(plain["kd"].item(), rel=1e-7)
    expected_ce = F.cross_entropy(LOGITS, TARGETS, weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.2)
    assert parts["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    assert parts["loss"].item() == pytest.approx(0.3 * parts["ce"].item() + 0.7 * parts["kd"].item(), rel=1e-6)
    setup = KD_engine.library_setup(alpha=0.3, hard_loss=hard_loss)
    criterion = KD_engine.make_criterion("dkd", torch.nn.Identity(), torch.nn.Identity(), setup)
    assert (criterion(torch.nn.Identity(), LOGITS, TARGETS, teacher_logits)["ce"].item()
            == pytest.approx(expected_ce.item(), rel=1e-6))


NAMES = ["a", "b"]


class ScriptedModel(nn.Module):
    """Outputs logits from a learnable bias; each epoch's 'quality' is scripted by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x[:, :2] + self.bias


class EpochCountingOptimizer(torch.optim.SGD):
    """SGD whose step writes the epoch number into the bias, so the restored epoch is visible."""

    def __init__(self, params, steps_per_epoch):
        super().__init__(params, lr=0.0)
        self.steps, self.steps_per_epoch = 0, steps_per_epoch

    def step(self, closure=None):
        self.steps += 1
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(self.steps / self.steps_per_epoch)


def test_best_epoch_is_chosen_on_validation_and_restored():
    # The validation loader hands out different data each epoch, scripting 50%, 100%, 50%.
    val_sets = iter([
        [(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]))],  # epoch 1: 50%
        [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))],  # epoch 2: 100%
        [(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]))],  # epoch 3: 50%
    ])

    class ValLoader:
        def __iter__(self):
            yield from next(val_sets)

    model = ScriptedModel()
    train = [(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 0]))]
    saved = []
    result = engine.fit(
        model, train, ValLoader(), engine.SupervisedCriterion(), EpochCountingOptimizer(model.parameters(), 1),
        3, NAMES, torch.device("cpu"),
        hooks=engine.FitHooks(on_best=lambda epoch, history: saved.append(epoch), log=lambda _: None),
    )
    assert result.best_epoch == 2
    assert saved == [1, 2]
    assert [r["val"]["top1"] for r in result.history] == [0.5, 1.0, 0.5]
    assert torch.allclose(model.bias, torch.full((2,), 2.0)), "the best epoch's weights must be restored"


def test_tie_on_top1_goes_to_lower_validation_loss():
    assert engine.is_better({"top1": 0.9, "loss": 0.2}, {"top1": 0.9, "loss": 0.3})
    assert not engine.is_better({"top1": 0.9, "loss": 0.3}, {"top1": 0.9, "loss": 0.2})
    assert not engine.is_better({"top1": 0.8, "loss": 0.01}, {"top1": 0.9, "loss": 0.3})
    assert engine.is_better({"top1": 0.0, "loss": 9.0}, None)


def test_epoch_loss_is_weighted_by_samples_not_batches():
    model = ScriptedModel()
    big = (torch.tensor([[0.0, 0.0]] * 3), torch.tensor([0, 0, 0]))  # CE = log 2 each
    small = (torch.tensor([[0.0, 10.0]]), torch.tensor([0]))  # CE ~= 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = engine.train_one_epoch(model, [big, small], engine.SupervisedCriterion(), optimizer, NAMES,
                                     torch.device("cpu"))
    per_sample = [torch.log(torch.tensor(2.0)).item()] * 3 + [nn.functional.cross_entropy(small[0], small[1]).item()]
    assert metrics["loss"] == pytest.approx(sum(per_sample) / 4, rel=1e-6)
    assert metrics["samples"] == 4


def test_evaluate_reports_cross_entropy_and_metrics():
    model = ScriptedModel()
    loader = [(torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]), torch.tensor([0, 1, 1]))]
    metrics = engine.evaluate(model, loader, NAMES, torch.device("cpu"))
    assert metrics["top1"] == pytest.approx(2 / 3)
    expected = nn.functional.cross_entropy(loader[0][0], loader[0][1]).item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert not model.training


def test_epoch_metrics_are_the_final_evaluations_without_auc():
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 4, generator=generator), torch.randint(0, 4, (50,), generator=generator)
    names = ["a", "b", "c", "d"]
    epoch, final = engine.epoch_metrics(logits, labels, names), engine.metrics_from_logits(logits, labels, names)
    assert epoch == {key: value for key, value in final.items() if not key.startswith("auc")}


class NaNAtBatch:
    """A criterion whose loss turns NaN at one batch of one epoch."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.bad, self.epoch, self.batch = (epoch, batch), 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0

    def __call__(self, model, images, labels):
        self.batch += 1
        outputs = engine.SupervisedCriterion()(model, images, labels)
        if (self.epoch, self.batch) == self.bad:
            outputs["loss"] = outputs["loss"] * float("nan")
        return outputs


def test_non_finite_loss_stops_naming_model_epoch_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])) for _ in range(3)]
    saved = []
    with pytest.raises(engine.NonFiniteLossError, match=r"student_kd: .* epoch 2, batch 3; .*epoch 1, is kept"):
        engine.fit(model, batches, batches, NaNAtBatch(epoch=2, batch=3), torch.optim.SGD(model.parameters(), lr=0.1),
                   3, ["a", "b", "c"], torch.device("cpu"), name="student_kd",
                   hooks=engine.FitHooks(on_best=lambda epoch, history: saved.append(epoch), log=lambda line: None))
    assert saved == [1]
