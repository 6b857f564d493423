"""Checkpoints written by a background thread: same files, isolated from training, errors surfaced, atomic."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from core import host_weights
from training import checkpoints


def _checkpoint() -> dict:
    torch.manual_seed(0)
    return {"epoch": 3, "history": [{"loss": 0.5}], "weights": {"w": torch.randn(4, 3), "b": torch.arange(3)},
            "rng": (1, (2, 3), None)}


def _same(first, second) -> bool:
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and torch.equal(first, second)
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(_same(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)):
        return type(first) is type(second) and len(first) == len(second) and all(map(_same, first, second))
    return first == second


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


def test_weight_snapshots_reuse_their_buffers_keep_the_best_and_wait_before_refilling():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    events = []
    weights = host_weights.WeightSnapshots(before_refill=lambda: events.append("waited"))
    best = weights.take_best(model)
    assert events == ["waited"] and all(v.is_contiguous() for v in best.values())
    first_best = {k: v.clone() for k, v in best.items()}
    with torch.no_grad():
        model[0].weight.add_(1)
    latest = weights.take(model)
    assert _same(weights.best, first_best), "a later epoch's copy must not overwrite the best weights"
    assert torch.equal(latest["0.weight"], model[0].weight)
    again = weights.take(model)  # the same buffers, refilled: no new host memory every epoch
    assert again["0.weight"].data_ptr() == latest["0.weight"].data_ptr()
    assert weights.take_best(model)["0.weight"].data_ptr() == latest["0.weight"].data_ptr()
    assert weights.take(model)["0.weight"].data_ptr() == best["0.weight"].data_ptr()  # the old best's buffers
    assert events == ["waited"] * 5


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
