"""Checkpoints (training.checkpoints): the background saver, copies of the weights, the recorded head, and
sittings of wall time."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import _same, model_row, run_summary
from torch import nn

import experiment
import model_builder
import utils
from results import ledger, report
from training import checkpoints


def _checkpoint() -> dict:
    torch.manual_seed(0)
    return {"epoch": 3, "history": [{"loss": 0.5}], "weights": {"w": torch.randn(4, 3), "b": torch.arange(3)},
            "rng": (1, (2, 3), None)}


def test_background_file_equals_a_synchronous_save(tmp_path):
    checkpoints.save_checkpoint(tmp_path / "sync.pth", _checkpoint())
    with checkpoints.BackgroundSaver() as saver:
        saver.save({tmp_path / "background.pth": _checkpoint()})
    assert _same(checkpoints.load_checkpoint(tmp_path / "background.pth"),
                 checkpoints.load_checkpoint(tmp_path / "sync.pth"))
    assert _same(checkpoints.load_checkpoint(tmp_path / "background.pth"), _checkpoint())


def test_later_history_does_not_reach_the_file_and_host_tensors_are_not_copied_again(tmp_path, monkeypatch):
    """`save` returns before the write; an epoch appended to the history meanwhile changes no file. Tensors
    already on the host (the trainer's buffers, refilled only after `wait()`) are written as they are."""
    release, written = threading.Event(), []
    original = torch.save

    def slow_save(obj, *args, **kwargs):
        release.wait(5)
        written.append(obj)
        return original(obj, *args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    checkpoint = _checkpoint()
    with checkpoints.BackgroundSaver() as saver:
        saver.save({tmp_path / "state.pth": checkpoint})
        checkpoint["history"].append({"loss": 0.1})
        release.set()
    assert _same(checkpoints.load_checkpoint(tmp_path / "state.pth"), _checkpoint())
    assert written[0]["weights"]["w"].data_ptr() == checkpoint["weights"]["w"].data_ptr(), "copied a second time"


def test_files_of_one_save_are_written_in_order_and_awaited_at_exit(tmp_path, monkeypatch):
    written = []
    original = checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint",
                        lambda path, checkpoint: (original(path, checkpoint), written.append(path.name)))
    with checkpoints.BackgroundSaver() as saver:
        saver.save({tmp_path / "best_model.pth": {"epoch": 1}, tmp_path / "train_state.pth": {"epoch": 1}})
    assert written == ["best_model.pth", "train_state.pth"]


def test_ctrl_c_or_an_error_still_waits_for_the_write(tmp_path, monkeypatch):
    original = torch.save
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (time.sleep(0.5), original(*args, **kwargs)))
    with pytest.raises(KeyboardInterrupt):
        with checkpoints.BackgroundSaver() as saver:
            saver.save({tmp_path / "train_state.pth": {"epoch": 1}})
            raise KeyboardInterrupt
    assert checkpoints.load_checkpoint(tmp_path / "train_state.pth") == {"epoch": 1}


def test_a_writer_error_surfaces_at_the_next_wait_and_the_next_save(tmp_path, monkeypatch):
    def failing_save(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    saver = checkpoints.BackgroundSaver()
    saver.save({tmp_path / "a.pth": {"epoch": 1}})  # returns before the write fails
    with pytest.raises(OSError, match="No space left"):
        saver.wait()
    saver.wait()  # reported once
    saver.save({tmp_path / "a.pth": {"epoch": 2}})
    with pytest.raises(OSError, match="No space left"):
        saver.save({tmp_path / "a.pth": {"epoch": 3}})  # the previous write's error, before writing more
    saver.close()
    assert not list(tmp_path.iterdir())


def test_a_write_cut_short_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "train_state.pth"
    checkpoints.save_checkpoint(path, {"epoch": 1})

    def crash_mid_write(obj, target, *args, **kwargs):
        with open(target, "wb") as partial:
            partial.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with checkpoints.BackgroundSaver() as saver:
            saver.save({path: {"epoch": 2}})
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["train_state.pth"], "no temporary file is left behind"


def test_checkpoint_weights_are_copies_that_later_training_leaves_alone():
    """The best epoch's weights travel in every later training state: they must not follow the model."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4, 2)).to(memory_format=torch.channels_last)
    weights = checkpoints.model_weights(model)
    before = {k: v.clone() for k, v in weights.items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1)
    model(torch.randn(2, 3, 3, 3))  # training mode: batch-norm running statistics move
    assert _same(weights, before)
    assert all(v.is_contiguous() for v in weights.values())


def test_checkpoints_record_the_head_and_older_ones_rebuild_as_they_were(monkeypatch):
    built = []
    monkeypatch.setattr(model_builder, "build_model",
                        lambda arch, classes, size, head="compact": built.append(head) or nn.Linear(1, 2))
    weights = nn.Linear(1, 2).state_dict()
    for saved, expected in (({"head": "compact", "image_size": 128}, "compact"),
                            ({"image_size": 128}, "torchvision"),  # written before the choice was recorded
                            ({"image_size": 32}, "compact")):
        checkpoints.load_model({"arch": "VGG16", "class_names": ["a", "b"], "mean": [0.5] * 3, "std": [0.25] * 3,
                                "state_dict": weights, **saved})
        assert built[-1] == expected
    assert checkpoints.make_checkpoint({"class_names": ["a"], "image_size": 8, "resize": "squash", "mean": [0] * 3,
                                        "std": [1] * 3, "config": {}}, "teacher", "vgg16_bn", {}, 1, [],
                                       "torchvision")["head"] == "torchvision"


# ---------------------------------------------------------------- 23.8: wall time over sittings


def test_wall_time_counts_every_sitting(tmp_path):
    utils.write_json(tmp_path / checkpoints.SITTINGS, {"seconds": [50.0, 20.0]})
    assert checkpoints.Sittings(tmp_path, 0.0, resume=False).count() == 1, "a new run counts no earlier sitting"
    resumed = checkpoints.Sittings(tmp_path, checkpoints.time.perf_counter(), resume=True)
    assert resumed.count() == 3 and 70.0 <= resumed.total() < 71.0 and resumed.last() < 1.0
    resumed.record()
    assert utils.read_json(tmp_path / checkpoints.SITTINGS)["seconds"][:2] == [50.0, 20.0]
    summary = run_summary({"teacher": model_row(0.9)})
    summary.wall_seconds, summary.wall_seconds_last_sitting, summary.sittings = 74.2, 22.4, 2
    assert report.wall_time(summary) == "1m14s in 2 sittings (the last 22.4s)"
    row = ledger.ledger_row(experiment.default_config(), summary, tmp_path)
    assert (row["wall_seconds"], row["wall_seconds_last_sitting"]) == (74.2, 22.4)
