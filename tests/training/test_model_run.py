"""Training one model (training.model_run): a resumed training continues the schedule."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

import engine
import experiment
from core import records
from training import checkpoints, model_run


def test_a_resumed_training_continues_the_schedule(tiny_data, tmp_path, monkeypatch):
    config = replace(experiment.default_config(), data_dir=str(tiny_data), val_fraction=0.25, batch_size=8,
                     optimizer="sgd", lr_schedule="step", milestones="2,3", warmup_epochs=1, precision="fp32",
                     device="cpu", workers=0, student_epochs=4)
    device = torch.device("cpu")
    context = experiment.make_context(config, experiment.load_data(config, device), device, None, tmp_path, {}, None,
                                      time.perf_counter(), False)
    folder = tmp_path / records.BASELINE

    def train() -> list[float]:
        context.saver = checkpoints.BackgroundSaver()
        with context.saver:
            _, fit = model_run.train_model(context, records.BASELINE, "resnet8", 4, 0.05,
                                         lambda model, steps: engine.SupervisedCriterion(), folder, seed=0)
        return [epoch["lr"] for epoch in fit.history]

    uninterrupted = train()
    save = checkpoints.BackgroundSaver.save

    def save_then_stop(self, files):
        save(self, files)
        if len(files[folder / checkpoints.TRAIN_STATE]["history"]) == 2:
            raise KeyboardInterrupt  # as Ctrl-C once epoch 2 is handed to the writer

    (folder / checkpoints.TRAIN_STATE).unlink()
    monkeypatch.setattr(checkpoints.BackgroundSaver, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.undo()
    assert len(checkpoints.load_checkpoint(folder / checkpoints.TRAIN_STATE)["history"]) == 2
    resumed = train()
    assert uninterrupted == pytest.approx([0.025, 0.05, 0.005, 0.0005])
    assert resumed == uninterrupted


def test_the_teacher_serving_distillation_under_autocast_is_a_copy_the_reported_teacher_keeps_fp32():
    from types import SimpleNamespace

    from conftest import RoundedByBf16

    from results import evaluation

    teacher, batches = RoundedByBf16(), [(torch.ones(4, 3, 2, 2), torch.ones(4, dtype=torch.long))]
    context = SimpleNamespace(config=SimpleNamespace(cache_teacher_logits=False), amp_dtype=torch.bfloat16,
                              device=torch.device("cpu"), eval_loaders={})
    served, cached = model_run.distillation_teacher(context, teacher)
    assert cached is None and served.head.weight.dtype == torch.bfloat16
    assert teacher.head.weight.dtype == torch.float32 and teacher.head.weight[1, 0].item() == pytest.approx(1.001)
    deployed, _ = evaluation.test_outputs(teacher, batches, torch.device("cpu"), torch.bfloat16, "teacher")
    assert deployed[0].argmax(1).tolist() == [1, 1, 1, 1], "the teacher's own fp32 weights, not the bf16 copy's tie"
    context.amp_dtype = None
    assert model_run.distillation_teacher(context, teacher)[0] is teacher, "no copy where nothing is cast"
