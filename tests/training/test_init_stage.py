"""A method's initialization stage in a model's training (training.init_stage): trained once before the student's
epochs, saved, and read back by a resumed training instead of being trained again."""

from __future__ import annotations

import functools
import time
from dataclasses import replace

import pytest
import torch

import experiment
import KD_engine
import model_builder
from core.errors import SettingsError
from training import checkpoints, init_stage, model_run


@pytest.fixture
def ab_training(tiny_data, tmp_path):
    config = replace(experiment.default_config(), data_dir=str(tiny_data), val_fraction=0.25, batch_size=8,
                     image_size=16, precision="fp32", device="cpu", workers=0, student_epochs=2, init_epochs=2,
                     teacher_model="resnet8x4", student_model="resnet8", kd_methods="ab", optimizer="sgd",
                     nesterov=False, momentum=0.9, weight_decay=5e-4)  # RepDistiller's, as configs/ set them
    device = torch.device("cpu")
    context = experiment.make_context(config, experiment.load_data(config, device), device, None, tmp_path, {}, None,
                                      time.perf_counter(), False)
    torch.manual_seed(5)
    teacher = KD_engine.freeze(model_builder.build_model("resnet8x4", len(context.data.class_names), 16))
    folder = tmp_path / "student_ab"
    fits = []

    def train() -> list[dict]:
        context.saver = checkpoints.BackgroundSaver()
        with context.saver:
            _, fit = model_run.train_model(
                context, "student_ab", "resnet8", 2, 0.05,
                functools.partial(model_run.distillation_criterion, context, "ab", teacher), folder, seed=0)
        fits.append(fit)
        return [(epoch["train"], epoch["val"]) for epoch in fit.history]

    return train, folder, fits


def test_the_stage_is_trained_once_and_a_resumed_training_reads_it_back(ab_training, monkeypatch):
    train, folder, fits = ab_training
    trained = []
    real_train_stage = init_stage.train_stage

    def counted(*args, **kwargs):
        trained.append(args[0].epochs)
        group = args[5].param_groups[0]  # the run's optimizer at its learning rate, without a schedule
        assert isinstance(args[5], torch.optim.SGD) and group["lr"] == 0.05 and group["weight_decay"] == 5e-4
        assert group["momentum"] == 0.9 and not group["nesterov"] and "initial_lr" not in group
        return real_train_stage(*args, **kwargs)

    monkeypatch.setattr(init_stage, "train_stage", counted)
    uninterrupted = train()
    assert trained == [2]
    saved = checkpoints.load_checkpoint(folder / init_stage.INIT_STAGE)
    assert len(saved["losses"]) == 2 and any(key.startswith("1.") for key in saved["trains"]), "connectors kept"
    assert fits[-1].train_seconds > saved["seconds"] > 0, "the stage counts in the model's training time"

    # Interrupted after the stage, before any epoch was saved: the stage comes back from its file.
    (folder / checkpoints.TRAIN_STATE).unlink()
    (folder / checkpoints.BEST_MODEL).unlink()
    assert train() == uninterrupted
    assert trained == [2], "the stage was not trained again"
    assert fits[-1].train_seconds > saved["seconds"], "and its seconds still count"

    # Interrupted after epoch 1: the stage's file and the training state together give the same history.
    save = checkpoints.BackgroundSaver.save

    def save_then_stop(self, files):
        save(self, files)
        if len(files[folder / checkpoints.TRAIN_STATE]["history"]) == 1:
            raise KeyboardInterrupt

    (folder / checkpoints.TRAIN_STATE).unlink()
    monkeypatch.setattr(checkpoints.BackgroundSaver, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(checkpoints.BackgroundSaver, "save", save)
    assert train() == uninterrupted and trained == [2]


def test_a_lost_stage_file_means_the_stage_is_trained_again_to_the_same_result(ab_training):
    train, folder, _ = ab_training
    first = train()
    saved = checkpoints.load_checkpoint(folder / init_stage.INIT_STAGE)
    for name in (init_stage.INIT_STAGE, checkpoints.TRAIN_STATE, checkpoints.BEST_MODEL):
        (folder / name).unlink()
    assert train() == first
    again = checkpoints.load_checkpoint(folder / init_stage.INIT_STAGE)
    assert saved["losses"] == again["losses"]
    assert all(torch.equal(saved["trains"][key], again["trains"][key]) for key in saved["trains"])


def test_a_stage_file_that_does_not_fit_is_refused_in_one_sentence(ab_training):
    train, folder, _ = ab_training
    folder.mkdir()
    checkpoints.save_checkpoint(folder / init_stage.INIT_STAGE, {"trains": {"0.weight": torch.zeros(1)}})
    with pytest.raises(SettingsError, match=r"does not hold this model's initialization stage .*Delete it"):
        train()
