"""The training state copied to the host once per epoch, into buffers that are reused epoch after epoch.

A checkpoint needs the weights and the optimizer state on the host. Copying them into fresh memory
every epoch, and copying the copy again before a background write, costs two blocking transfers of
every tensor. Here each tensor is copied once into a host buffer of its own, allocated at the first
copy and refilled in place afterwards; buffers are pinned when the tensors come from a GPU, so the
copies run without blocking and the host waits once, when all are issued. Whoever refills buffers
must first make sure nothing still reads them (a background write: see `WeightSnapshots`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core import compute

Path = tuple[Any, ...]  # where a tensor sits in a nested structure of dicts, lists and tuples


def map_tensors(value: Any, function: Callable[[Path, torch.Tensor], Any], path: Path = ()) -> Any:
    """`value` with every tensor replaced by `function(path, tensor)`; dicts, lists and tuples are
    rebuilt (so later changes to the original containers do not reach the result), other leaves kept."""
    if isinstance(value, torch.Tensor):
        return function(path, value)
    if isinstance(value, dict):
        return {key: map_tensors(item, function, (*path, key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, function, (*path, index)) for index, item in enumerate(value))
    return value


class HostBuffers:
    """Host copies of the tensors of a nested structure, refilled in place by every `fill`.

    Buffers are contiguous (what checkpoints store, whatever layout a model trains in) and, for
    tensors on a GPU, pinned; a buffer is made anew only when its tensor's shape or type changes.
    """

    def __init__(self) -> None:
        self._buffers: dict[Path, torch.Tensor] = {}

    def fill(self, value: Any) -> Any:
        """`value` with every tensor replaced by its buffer, holding the tensor's current contents."""
        from_gpu = set()

        def copy(path: Path, tensor: torch.Tensor) -> torch.Tensor:
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
                self._buffers[path] = buffer
            if tensor.is_cuda:
                from_gpu.add(tensor.device)
            return buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)

        filled = map_tensors(value, copy)
        for device in from_gpu:  # the copies were queued without blocking: wait for them, once
            torch.cuda.synchronize(device)
        return filled


class WeightSnapshots:
    """A model's weights on the host: the latest copy, and the best epoch's, in two sets of buffers
    that swap roles when the latest becomes the best (so keeping the best costs no second copy).

    `before_refill` runs before a buffer is refilled: with a background writer still saving the
    previous epoch's files from these buffers, it waits for that write to finish.
    """

    def __init__(self, best: dict[str, torch.Tensor] | None = None,
                 before_refill: Callable[[], None] = lambda: None) -> None:
        self.best = best
        self.latest: dict[str, torch.Tensor] | None = None
        self._before_refill = before_refill
        self._latest_buffers, self._best_buffers = HostBuffers(), HostBuffers()

    def take(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Copy the plain model's weights (see `compute.unwrap`) into the latest buffers."""
        self._before_refill()
        self.latest = self._latest_buffers.fill(compute.unwrap(model).state_dict())
        return self.latest

    def take_best(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`take`, kept as the best weights; the previous best's buffers receive the next copy."""
        self.best = self.take(model)
        self._latest_buffers, self._best_buffers = self._best_buffers, self._latest_buffers
        return self.best
