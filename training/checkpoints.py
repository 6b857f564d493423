"""Weights on disk: self-describing checkpoints, the state a resumed run continues from, writes in
the background, and saves that a stop signal (Ctrl-C, SIGTERM) cannot cut short.

Every file is written atomically and read with `weights_only=True`, so a crafted file cannot run code.
"""

from __future__ import annotations

import functools
import json
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torchvision import models

import engine
import model_builder
import utils
from core import compute, errors, host_weights, records
from data import decoding, folders

TRAIN_STATE = "train_state.pth"  # per model: everything needed to continue after its last finished epoch
BEST_MODEL = "best_model.pth"  # per model: the weights of its best epoch, with their description
DESCRIPTION_KEYS = ("class_names", "image_size", "mean", "std")  # what using a model needs besides its weights
MODEL_KEYS = ("arch", "state_dict", *DESCRIPTION_KEYS)  # what rebuilding a model from a checkpoint needs
TEACHER_KEYS = (*MODEL_KEYS, "epoch")  # what a teacher reused from another run needs
SITTINGS = "sittings.json"  # per run: the wall seconds of each sitting (the first, then one per --resume)


# ---------------------------------------------------------------- files


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically (tensors, numbers, strings, lists and dicts only)."""
    with utils.atomic_path(path) as temporary:
        torch.save(checkpoint, temporary)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without running code from it (weights_only=True)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def host_copy(value: Any) -> Any:
    """Checkpoint contents a background write can take while training goes on: dicts, lists and tuples
    rebuilt (an epoch appended to the history later does not reach the file), tensors on a device
    copied to the host, and tensors already on the host taken as they are, not copied a second time
    (the trainer's host buffers, refilled only once the write is done: see `host_weights`)."""
    return host_weights.map_tensors(value, lambda path, tensor: tensor.detach().cpu())


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's weights as contiguous host copies (what every checkpoint stores), whatever
    the layout the model trains in."""
    return host_weights.HostBuffers().fill(compute.unwrap(model).state_dict())


def make_checkpoint(
    description: dict[str, Any], role: str, arch: str, weights: dict[str, torch.Tensor], epoch: int,
    history: list[dict[str, Any]], head: str = "compact",
) -> dict[str, Any]:
    """A self-describing checkpoint: `weights` plus everything needed to rebuild and use them.

    `description` holds "class_names", "image_size", "resize", "mean", "std" and "config"; `head` is
    the classifier head the model was built with (`model_builder.build_model`).
    """
    return {
        "role": role, "arch": arch, "head": head, "num_classes": len(description["class_names"]),
        "class_names": list(description["class_names"]), "image_size": description["image_size"],
        "resize": description["resize"], "mean": list(description["mean"]), "std": list(description["std"]),
        "config": description["config"], "epoch": epoch, "history": history, "state_dict": weights,
    }


# ---------------------------------------------------------------- a model from its file: the description checked


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _are_numbers(value: Any, count: int) -> bool:
    """A list of `count` finite numbers (true and false are not numbers)."""
    return isinstance(value, list) and len(value) == count and all(
        isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item) for item in value)


def _is_history(value: Any) -> bool:
    """A list of epochs as history.json holds them (records.EpochRecord)."""
    try:
        records.ModelHistory.from_dict({"best_epoch": 0, "epochs": value})
    except ValueError:
        return False
    return True


SMALLEST_IMAGE, LARGEST_IMAGE = decoding.IMAGE_SIZES
SMALLEST_STD = 1e-3  # of pixels scaled to [0, 1]: below it normalization sends every logit past float range
# Every field a model file's description may hold: (whether a value is usable, what it must be).
DESCRIPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "arch": (lambda value: isinstance(value, str) and value != "", "a model name"),
    "class_names": (folders.are_class_names, folders.CLASS_NAMES_RULE),
    "num_classes": (_is_integer, "an integer"),
    "image_size": (lambda value: _is_integer(value) and SMALLEST_IMAGE <= value <= LARGEST_IMAGE,
                   f"an integer from {SMALLEST_IMAGE} to {LARGEST_IMAGE} (pixels)"),
    "resize": (lambda value: isinstance(value, str) and value in decoding.RESIZE_MODES,
               f"one of {', '.join(decoding.RESIZE_MODES)}"),
    "mean": (lambda value: _are_numbers(value, 3), "a list of 3 finite numbers, one per colour channel"),
    "std": (lambda value: _are_numbers(value, 3) and min(value) >= SMALLEST_STD,
            f"a list of 3 finite positive numbers (at least {SMALLEST_STD:g}), one per colour channel"),
    "head": (lambda value: isinstance(value, str) and value in model_builder.HEADS,
             f"one of {', '.join(model_builder.HEADS)}"),
    "epoch": (lambda value: _is_integer(value) and value >= 0, "a whole number of epochs"),
    "history": (_is_history, "a list of epochs, each with its 'epoch' number and its 'train' and 'val' metrics"),
    "state_dict": (lambda value: isinstance(value, dict) and all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in value.items()),
        "a mapping of parameter names to tensors"),
}


def _shown(value: Any) -> str:
    """A short, one-line rendering of a field's value for an error message."""
    plain = isinstance(value, (str, int, float, bool, list, type(None)))
    text = " ".join(repr(value).split()) if plain else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _unusable(path: str | Path | None) -> str:
    return "The model's description is not usable" if path is None else \
        f"'{path}' is not a usable model file of this project"


def check_description(path: str | Path | None, description: Any, required: tuple[str, ...] = DESCRIPTION_KEYS) -> None:
    """Refuse a model file (a checkpoint, or an exported model's metadata) whose description cannot be used as
    it says: lacking a `required` field, a field of DESCRIPTION_RULES of the wrong type, length or range, or a
    num_classes other than its number of class names. SettingsError: one sentence naming the file and the field."""
    if not isinstance(description, dict):
        raise errors.SettingsError(f"{_unusable(path)}: it holds a {type(description).__name__}, not a checkpoint "
                                   "written by experiment.py.")
    missing = [key for key in required if key not in description]
    if missing:
        raise errors.SettingsError(f"{_unusable(path)}: it lacks {', '.join(repr(key) for key in missing)} "
                                   "(is it a best_model.pth written by experiment.py?).")
    for key, (usable, expected) in DESCRIPTION_RULES.items():
        if key in description and not usable(description[key]):
            raise errors.SettingsError(f"{_unusable(path)}: its '{key}' must be {expected}, not "
                                       f"{_shown(description[key])}.")
    if "num_classes" in description and "class_names" in description:
        check_outputs(path, description, description["num_classes"], "its 'num_classes' says")


def check_outputs(path: str | Path | None, description: dict[str, Any], outputs: int,
                  source: str = "the model gives") -> None:
    """Refuse a model whose number of outputs is not its description's number of class names."""
    names = len(description["class_names"])
    if outputs != names:
        raise errors.SettingsError(f"{_unusable(path)}: its 'class_names' holds {names} name{'s' * (names != 1)}, "
                                   f"but {source} {outputs} classes.")


def head_of(model: nn.Module) -> str:
    """The head a model was built with (what its checkpoint records): "torchvision" for a VGG with
    torchvision's fully connected classifier, else "compact" (`model_builder.build_model`)."""
    plain = compute.unwrap(model)
    fully_connected = isinstance(plain, models.VGG) and isinstance(plain.classifier[0], nn.Linear)
    return "torchvision" if fully_connected else "compact"


def saved_head(checkpoint: dict[str, Any]) -> str:
    """The head a checkpoint's model was built with (`model_builder.HEADS`); files written before the choice
    was recorded used torchvision's above SMALL_IMAGE_MAX pixels."""
    if checkpoint.get("head") in model_builder.HEADS:
        return checkpoint["head"]
    return "torchvision" if checkpoint["image_size"] > model_builder.SMALL_IMAGE_MAX else "compact"


def load_model(checkpoint: dict[str, Any], path: str | Path | None = None) -> nn.Module:
    """The model a checkpoint describes, with its weights, on the CPU in eval mode: the one way a
    model is rebuilt from a file (the run, deployment figures, prediction). Its description is
    checked first (`check_description`: SettingsError naming `path`, the file it was read from)."""
    check_description(path, checkpoint, MODEL_KEYS)
    model = model_builder.build_model(checkpoint["arch"], len(checkpoint["class_names"]), checkpoint["image_size"],
                                      saved_head(checkpoint))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def read_state(path: Path) -> dict[str, Any]:
    """Read a checkpoint this run wrote (without running code from it), or say why it cannot be used."""
    try:
        return load_checkpoint(path)
    except Exception as error:  # a damaged or foreign file is the user's to remove
        raise errors.SettingsError(f"Cannot read '{path}': {error!r}. Delete it to start that model afresh.") from None


# ---------------------------------------------------------------- a teacher from another run


def read_teacher_checkpoint(path: str) -> dict[str, Any]:
    """Read a teacher checkpoint (without running code from it), with a clear error if unusable."""
    if not Path(path).is_file():
        raise errors.SettingsError(f"--teacher-checkpoint '{path}' is not a file.")
    try:
        checkpoint = load_checkpoint(path)
    except Exception as error:  # any unreadable or foreign file is the user's to fix
        raise errors.SettingsError(f"Cannot read teacher checkpoint '{path}': "
                                   f"{errors.one_line(error, brief=True)}.") from None
    check_description(path, checkpoint, TEACHER_KEYS)
    return checkpoint


def check_teacher_fits(path: str, checkpoint: dict[str, Any], class_names: list[str]) -> None:
    """Refuse a teacher checkpoint whose classes or weights do not fit this run (checked on the meta device)."""
    if checkpoint["class_names"] != class_names:
        raise errors.SettingsError(f"Teacher checkpoint '{path}' was trained on classes {checkpoint['class_names']}, "
                                   f"not this data's {class_names}.")
    model = model_builder.build_on_meta(checkpoint["arch"], len(class_names), checkpoint["image_size"],
                                        saved_head(checkpoint))
    try:
        model.load_state_dict(checkpoint["state_dict"], assign=True)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:2]]
        raise errors.SettingsError(f"Teacher checkpoint '{path}' does not hold weights of a {checkpoint['arch']} for "
                                   f"{len(class_names)} classes ({'; '.join(details) or error}).") from None


# ---------------------------------------------------------------- resuming


def rng_states() -> dict[str, Any]:
    """Every random generator's state, in types a weights_only checkpoint can hold."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put every random generator back where `rng_states()` found it."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def training_state(
    role: str, arch: str, weights: dict[str, torch.Tensor], best_weights: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any], scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion_state: dict[str, Any] | None, loader_generator: torch.Generator, result: engine.FitResult,
) -> dict[str, Any]:
    """Everything a resumed run needs to continue after the epoch `result` ends with.

    `optimizer_state` and `criterion_state` (the trainable part of a criterion, if any) are the
    state dicts, in host copies. The best weights travel with the state rather than being read back
    from best_model.pth: a kill between writing that file and this one would pair them with the
    wrong epoch. None means the state's own weights are the best.
    """
    return {
        "role": role, "arch": arch, "model": weights, "best_model": best_weights,
        "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "criterion": criterion_state,
        "loader_generator": loader_generator.get_state(), "rng": rng_states(),
        "history": result.history, "best_epoch": result.best_epoch, "train_seconds": result.train_seconds,
        "best_val_logits": result.best_val_outputs[0], "best_val_labels": result.best_val_outputs[1],
    }


def _parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor shaped as its parameter the parameter's memory layout. The state is
    saved contiguous (`host_weights.HostBuffers`), and a channels_last weight updated with contiguous moments takes
    other kernels, with other rounding: a resumed run would drift from an uninterrupted one."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape \
                        and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def restore_training(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, trainable: nn.Module | None, loader_generator: torch.Generator,
) -> tuple[engine.FitResult, dict[str, torch.Tensor]]:
    """Put a saved training state back in place; return what `engine.fit` needs to continue."""
    compute.unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _parameter_layouts(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    if trainable is not None:
        trainable.load_state_dict(state["criterion"])
    loader_generator.set_state(state["loader_generator"])
    set_rng_states(state["rng"])
    result = engine.FitResult(history=state["history"], best_epoch=state["best_epoch"],
                              train_seconds=state["train_seconds"],
                              best_val_outputs=(state["best_val_logits"], state["best_val_labels"]))
    return result, state["model"] if state["best_model"] is None else state["best_model"]


class Sittings:
    """The wall time of a run over its sittings: the first, and one more per --resume.

    `record()` (rank 0, after every epoch and at the end) saves every sitting's seconds so far in
    RUN/sittings.json, so a resumed run counts the earlier ones: each up to its last record when it
    was killed outright. A run begun before this file existed counts its last sitting only.
    """

    def __init__(self, run_dir: Path, start: float, resume: bool) -> None:
        self.path, self.start = Path(run_dir) / SITTINGS, start
        self.earlier: list[float] = []
        if resume and self.path.is_file():
            try:
                self.earlier = [float(seconds) for seconds in json.loads(self.path.read_text())["seconds"]]
            except (OSError, ValueError, TypeError, KeyError):  # a damaged record loses the earlier sittings only
                self.earlier = []

    def last(self) -> float:
        """Seconds of this sitting so far."""
        return time.perf_counter() - self.start

    def total(self) -> float:
        """Seconds of every sitting, this one so far included."""
        return sum(self.earlier) + self.last()

    def count(self) -> int:
        """How many sittings the run has had, this one included."""
        return len(self.earlier) + 1

    def record(self) -> None:
        """Save every sitting's seconds, this one's so far."""
        utils.write_json(self.path, {"seconds": [*self.earlier, round(self.last(), 2)]})


# ---------------------------------------------------------------- writing in the background


def _save_checkpoints(files: list[tuple[Path, dict[str, Any]]]) -> None:
    for path, checkpoint in files:
        save_checkpoint(path, checkpoint)


class BackgroundSaver:
    """Writes checkpoints on a background thread, so training does not wait for serialization and disk.

    `save` takes the checkpoints as `host_copy` gives them (device tensors copied to the host, host
    tensors as they are), then returns while one thread writes the files atomically, in the given
    order. A new `save` first waits for the previous one; `wait()` (and leaving a `with` block, also
    on an error or Ctrl-C) waits for the last one and raises any error the writer met. A write cut
    short leaves the previous file in place.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending = None

    def save(self, files: dict[Path, dict[str, Any]]) -> None:
        """Write `{path: checkpoint}` in the background, in order, each file atomically. Tensors already
        on the host are written as they are: leave them unchanged until `wait()` returns (the next
        `save` waits first)."""
        self.wait()
        copies = [(Path(path), host_copy(checkpoint)) for path, checkpoint in files.items()]
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

    def __enter__(self) -> BackgroundSaver:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ---------------------------------------------------------------- stop signals


class StopRequested(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send before preempting a job), handled as Ctrl-C is."""


class Interrupted(Exception):
    """The run was stopped (Ctrl-C or SIGTERM); every finished epoch is saved in `run_dir`."""

    def __init__(self, run_dir: Path, signum: int) -> None:
        super().__init__(str(run_dir))
        self.run_dir, self.signum = run_dir, signum


# Exceptions the stop signals raise (SIGINT: Python's own KeyboardInterrupt).
STOP_SIGNALS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: StopRequested}


def stop_signal(error: KeyboardInterrupt) -> int:
    """The signal behind a stop: SIGTERM for StopRequested, SIGINT for any other KeyboardInterrupt."""
    return signal.SIGTERM if isinstance(error, StopRequested) else signal.SIGINT


def request_stop(signum: int, frame: Any) -> None:
    """Signal handler: stop the run as Ctrl-C does (the exception type tells which signal)."""
    raise STOP_SIGNALS[signum]


def handle_stop_signals() -> None:
    """Make SIGTERM stop a run as Ctrl-C does, unless it was inherited as ignored (then it stays ignored)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, request_stop)


def finish_before_interrupt(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run `function` with Ctrl-C and SIGTERM held back until it returns (its value), so a save it makes is never
    cut short, nor a library call that would turn the interrupt into an error of its own (sqlite's "interrupted");
    a signal that arrived meanwhile then stops the run. A signal inherited as ignored (e.g. SIGINT in a background
    job of a non-interactive shell) stays ignored."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return function(*args, **kwargs)
        received: list[int] = []
        held = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS
                if signal.getsignal(signum) not in (signal.SIG_IGN, None)}
        for signum in held:
            signal.signal(signum, lambda signum, frame: received.append(signum))
        try:
            result = function(*args, **kwargs)
        finally:
            for signum, previous in held.items():
                signal.signal(signum, previous)
        if received:
            raise STOP_SIGNALS[received[0]]
        return result

    return wrapper
