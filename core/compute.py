"""Where and how a run computes: the device, the processes of a torchrun job, the precision, and
whether to compile.

A plain `python experiment.py` is a world of one process; under torchrun every rank runs the same
code, and rank 0 alone writes files and prints.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from core import errors


def init_distributed() -> tuple[int, int, int]:
    """Join the process group when launched by torchrun; return (rank, world size, local rank).

    gloo on CPU, nccl on CUDA. A plain `python experiment.py` is a world of one and starts nothing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without torchrun)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def broadcast_object(value: Any) -> Any:
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order (shards may differ in length)."""
    if not dist.is_initialized():
        return tensor
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, length)
    longest = int(max(lengths).item())
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[: int(n.item())] for rows, n in zip(gathered, lengths, strict=True)])


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all ranks (the tensor itself in a single process)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def reduce_over_ranks(values: np.ndarray, device: torch.device, op: str = "sum") -> np.ndarray:
    """Host values combined over all ranks by `op` ("sum" or "max"), through `device` (NCCL needs GPU
    tensors); the values themselves in a single process."""
    if not dist.is_initialized():
        return values
    tensor = torch.as_tensor(values, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def resolve_device(setting: str) -> torch.device:
    """'auto' picks CUDA when available, else the CPU; other values are used as given."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device '{setting}' was requested but CUDA is not available here.")
    return device


# --compile auto compiles a model's training step on CUDA when it takes at least this many optimizer steps.
# CUDA graphs replay a whole step with one launch, so what compiling saves is about the host time of
# launching the step's kernels one by one, about 2 ms a step (ResNet18 and its loss: 300 to 400 kernels), the
# same at any batch size; compiling the step costs about a minute. 60 s / 2 ms = 30,000 steps. Both figures
# are estimates, not yet measured on a GPU. On the CPU there are no CUDA graphs, compiling takes minutes on a
# few cores and the step is compute-bound: auto leaves it off.
COMPILE_AUTO_MIN_STEPS = 30_000
COMPILE_AUTO_RULE = (f"on for CUDA runs of at least {COMPILE_AUTO_MIN_STEPS:,} optimizer steps per model "
                     "(compiling costs about 60 s; CUDA graphs save about 2 ms of kernel launches per step: "
                     "estimates, unmeasured on a GPU), off on the CPU")


def resolve_compile(setting: str, device: torch.device, steps: int) -> bool:
    """Whether to compile a model's training step: 'on', 'off', or 'auto' (see COMPILE_AUTO_RULE) for a
    model that trains for `steps` optimizer steps."""
    if setting in ("on", "off"):
        return setting == "on"
    return torch.device(device).type == "cuda" and steps >= COMPILE_AUTO_MIN_STEPS


class CompiledStep:
    """A criterion whose call (the models' forward passes and the loss, whose backward autograd then
    runs compiled too) goes through torch.compile: on CUDA with CUDA graphs (mode "reduce-overhead"),
    elsewhere in the default mode; shapes are static (`dynamic=False`), so the loader must hand out
    batches of one size. Other attributes are the criterion's.

    Compiling happens at the first call. If compiling fails then or later, one line says so and the
    step, and every later one, runs eagerly. CUDA graphs overwrite their outputs at the next replay:
    the logits, which the epoch keeps, are copied out.
    """

    def __init__(self, criterion: Callable[..., dict[str, torch.Tensor]], device: torch.device,
                 log: Callable[[str], None] = print) -> None:
        self.criterion = criterion
        self._graphs = torch.device(device).type == "cuda"

        def step(model: nn.Module, *batch: torch.Tensor) -> dict[str, torch.Tensor]:
            return criterion(model, *batch)

        self._compiled: Callable[..., dict[str, torch.Tensor]] | None = torch.compile(
            step, mode="reduce-overhead" if self._graphs else None, dynamic=False)
        self._log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["criterion"], name)

    def __call__(self, model: nn.Module, *batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._compiled is None:
            return self.criterion(model, *batch)
        try:
            if self._graphs:
                torch.compiler.cudagraph_mark_step_begin()
            outputs = self._compiled(model, *batch)
        except Exception as error:  # whatever compiling raises, the eager step can still run
            self._compiled = None
            if is_main_process():
                self._log(f"torch.compile failed ({errors.one_line(error, brief=True)}); training continues without "
                          "compiling")
            return self.criterion(model, *batch)
        if self._graphs:
            outputs = {**outputs, "logits": outputs["logits"].detach().clone()}
        return outputs


def enable_autotuning(device: torch.device) -> None:
    """On CUDA, let cuDNN benchmark its convolution algorithms once per input shape and keep the fastest."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def cpu_has_native_bf16() -> bool:
    """True when the processor computes bf16 natively (AVX512-BF16 or AMX), where bf16 is faster."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision: 'auto' uses bf16 on CUDA and on CPUs with native bf16, else fp32 (None)."""
    if setting == "fp32":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """'bf16' or 'fp32', as config.json, summary.json and the console name a run's precision."""
    return "bf16" if amp_dtype == torch.bfloat16 else "fp32"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU has nothing to wait for)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for reduced precision, or a no-op when `dtype` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def store_for_autocast(frozen: nn.Module, amp_dtype: torch.dtype | None) -> nn.Module:
    """Keep a frozen model's convolution and linear layers in `amp_dtype`, as autocast casts them on
    every forward (it caches casts only of weights that need gradients): the same outputs under
    autocast, bit for bit, without the cast in every step. Batch-norm layers stay in float32, as under
    autocast. Without reduced precision (`amp_dtype` None) the model is left as it is."""
    if amp_dtype is not None:
        for module in frozen.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                module.to(amp_dtype)
    return frozen


def unwrap(model: nn.Module, keep_compiled: bool = False) -> nn.Module:
    """The plain module behind a DistributedDataParallel and a torch.compile wrapper.

    With `keep_compiled`, only the DDP wrapper is taken off (its forward involves no other rank, so
    ranks may call it a different number of times), and a compiled model stays compiled unless it
    wraps DDP itself.
    """
    module = getattr(model, "module", model)
    return module if keep_compiled else getattr(module, "_orig_mod", module)
