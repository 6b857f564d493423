"""The epoch loop: model selection on validation data, restored best weights, weighted averages."""

from pathlib import Path

import pytest
import torch
from torch import nn

import engine
from core import compute

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


def test_resolve_amp_dtype(monkeypatch):
    cpu = torch.device("cpu")
    assert compute.resolve_amp_dtype("fp32", cpu) is None
    assert compute.resolve_amp_dtype("bf16", cpu) is torch.bfloat16
    # auto: bf16 exactly on processors that compute it natively (AVX512-BF16 or AMX), read here from the flags.
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8").split() if Path("/proc/cpuinfo").is_file() else []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert compute.resolve_amp_dtype("auto", cpu) in (None, torch.bfloat16)
    assert compute.resolve_amp_dtype("auto", cpu) is (torch.bfloat16 if native else None)
    for has_bf16, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert compute.resolve_amp_dtype("auto", cpu) is expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            compute.resolve_device("cuda")
