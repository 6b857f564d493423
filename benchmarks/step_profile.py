"""What a training step dispatches, counted on any device (the CPU included): aten ops by step and by
region (the models' own forward and backward, the optimizer's step, everything else), and the ops
that make the host wait for the device.

Counting happens below autograd (a `TorchDispatchMode`), so a composite op counts as the kernels it
decomposes into and the backward pass is counted too. Views and allocations launch no kernel and are
not counted. The models' region is marked by module hooks around their forward and by hooks on the
autograd nodes their forward created; the optimizer's by its step hooks; the step by the loader.

Ops that make the host wait for the device: `nonzero` (its output size depends on the data, also
inside boolean-mask indexing), `_local_scalar_dense` (`.item()`, `int(tensor)`, `bool(tensor)`), the
other data-dependent ones below, and copies to host memory (`.cpu()`, `.to("cpu")`, `.tolist()`,
`.numpy()`, `.item()`), which on the CPU are seen where they are asked for (a move to a device
object is taken for a move to the run's device, which on a GPU it would be).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

MODEL, OPTIMIZER, OTHER = "model", "optimizer", "other"
# Ops that launch no kernel: they make a tensor (view, alias or fresh memory) without computing.
NO_KERNEL = {"detach", "alias", "empty", "empty_strided", "empty_like", "lift_fresh", "_reshape_alias", "resize_",
             "set_", "_record_function_enter_new", "_record_function_exit"}  # the last two: profiler marks
# Ops whose output size (or value on the host) depends on the data: the host waits for the device.
DATA_DEPENDENT = {"nonzero", "_local_scalar_dense", "item", "masked_select", "_unique", "_unique2", "unique_dim",
                  "unique_consecutive", "bincount", "is_nonzero", "equal", "allclose"}
# Tensor methods that bring data to the host (the CPU target of `.to` is checked separately).
HOST_COPIES = {"cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__", "__index__"}


def _is_host_transfer(func: Any, args: tuple, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    if name in HOST_COPIES:
        return True
    if name != "to":
        return False
    # Only the host named as such: a device object is the run's device or a tensor's, which on the CPU is the
    # host too, though on a GPU it would not be (moving a batch's indices to `images.device`, say).
    return any(isinstance(target, str) and target.startswith("cpu") for target in [*args[1:], kwargs.get("device")])


def _aliases(output: Any, args: tuple) -> bool:
    """Whether an op that may return a view (`to`, `reshape`, ...: seen whole under inference mode) did."""
    storages = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
    return isinstance(output, torch.Tensor) and output.untyped_storage().data_ptr() in storages


def _bool_index(func: Any, args: tuple) -> bool:
    """Indexing with a boolean mask: it calls nonzero inside."""
    if func.__name__.split(".")[0] not in ("index", "index_put_", "_index_put_impl_", "index_put"):
        return False
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or [])


class StepCounter(TorchDispatchMode):
    """Counts kernels and host waits by (step, region); see the module's docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | str = "setup"
        self.region = OTHER
        self.ops: Counter = Counter()  # (step, region) -> kernels
        self.names: dict[tuple, Counter] = {}  # (step, region) -> op name -> kernels
        self.syncs: Counter = Counter()  # (step, region) -> host waits
        self.sync_names: dict[tuple, Counter] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        key = (self.step, self.region)
        if name in DATA_DEPENDENT or _bool_index(func, args):
            self.note_sync(name)
        output = func(*args, **kwargs)
        if name not in NO_KERNEL and not (func.is_view and _aliases(output, args)):
            self.ops[key] += 1
            self.names.setdefault(key, Counter())[name] += 1
        return output

    def note_sync(self, name: str) -> None:
        key = (self.step, self.region)
        self.syncs[key] += 1
        self.sync_names.setdefault(key, Counter())[name] += 1

    @contextmanager
    def region_of(self, region: str) -> Iterator[None]:
        previous, self.region = self.region, region
        try:
            yield
        finally:
            self.region = previous

    def per_step(self, steps: Iterable[int], region: str = OTHER, syncs: bool = False) -> list[int]:
        """Kernels (or host waits, with `syncs`) of each of `steps` in `region`."""
        counts = self.syncs if syncs else self.ops
        return [counts[(step, region)] for step in steps]


class _HostCopies(TorchFunctionMode):
    """Sees the tensor methods that bring data to the host, which a CPU run cannot see as copies."""

    def __init__(self, counter: StepCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_host_transfer(func, args, kwargs):
            self.counter.note_sync(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def _mark_backward(counter: StepCounter, output: Any) -> None:
    """Mark every autograd node behind a model's output as the model's backward."""
    tensors = [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]
    pending = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen = set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        node.register_prehook(lambda grads: setattr(counter, "region", MODEL))
        node.register_hook(lambda grads_in, grads_out: setattr(counter, "region", OTHER))
        pending.extend(next_node for next_node, _ in node.next_functions)


def _hook_model(stack: ExitStack, counter: StepCounter, model: nn.Module) -> None:
    def before(module: nn.Module, inputs: Any) -> None:
        counter.region = MODEL

    def after(module: nn.Module, inputs: Any, output: Any) -> None:
        counter.region = OTHER
        if torch.is_grad_enabled():
            _mark_backward(counter, output)

    for handle in (model.register_forward_pre_hook(before), model.register_forward_hook(after)):
        stack.callback(handle.remove)


def _hook_optimizer(stack: ExitStack, counter: StepCounter, optimizer: torch.optim.Optimizer) -> None:
    handles = (optimizer.register_step_pre_hook(lambda *_: setattr(counter, "region", OPTIMIZER)),
               optimizer.register_step_post_hook(lambda *_: setattr(counter, "region", OTHER)))
    for handle in handles:
        stack.callback(handle.remove)


class CountedSteps:
    """A loader whose every batch starts a new step of `counter` (0, 1, ...); after the last, "end"."""

    def __init__(self, loader: Iterable, counter: StepCounter) -> None:
        self.loader, self.counter = loader, counter

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        iterator = iter(self.loader)
        step = 0
        while True:
            self.counter.step = step
            try:
                batch = next(iterator)
            except StopIteration:
                self.counter.step = "end"
                return
            yield batch
            step += 1


@contextmanager
def counting(models: Iterable[nn.Module] = (), optimizer: torch.optim.Optimizer | None = None) -> Iterator[StepCounter]:
    """Count what runs inside the block; `models`' forward and backward and `optimizer`'s step are marked."""
    counter = StepCounter()
    with ExitStack() as stack:
        for model in models:
            _hook_model(stack, counter, model)
        if optimizer is not None:
            _hook_optimizer(stack, counter, optimizer)
        stack.enter_context(counter)
        stack.enter_context(_HostCopies(counter))
        yield counter
