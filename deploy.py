"""What a trained model costs where it is deployed: size, FLOPs, latency and throughput, and its
ONNX export (checked against PyTorch)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import checkpoints
import model_builder
import runtime
import utils

ONNX_METADATA_KEY = "kd_pipeline"  # JSON: arch, class names, image size, normalization
ONNX_TOLERANCE = 1e-4  # largest allowed |logit difference| between ONNX Runtime and PyTorch


# ---------------------------------------------------------------- size and FLOPs


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of a model."""
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    """Size of the model's parameters and buffers in megabytes (2**20 bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def describe(model: nn.Module) -> dict[str, float]:
    """Parameter count and size of a model, for summaries."""
    plain = model_builder.unwrap(model)
    return {"params": count_parameters(plain), "size_mb": round(model_size_mb(plain), 3)}


def _cpu_copy(model: nn.Module) -> nn.Module:
    """An fp32 CPU copy of the plain model in eval mode (the model itself is left untouched)."""
    return copy.deepcopy(model_builder.unwrap(model)).cpu().float().eval()


def flops_per_image(model: nn.Module, image_size: int) -> int:
    """Floating-point operations of one forward pass on one image (torch.utils.flop_counter).

    Counted on a CPU copy in eval mode, so it works for any device and leaves the model untouched.
    """
    from torch.utils.flop_counter import FlopCounterMode

    plain = _cpu_copy(model)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        plain(torch.zeros(1, 3, image_size, image_size))
    return int(counter.get_total_flops())


def file_figures(model: nn.Module, checkpoint: Path, image_size: int) -> dict[str, Any]:
    """File size and FLOPs per image (speed is measured once every model exists: `measure_speeds`)."""
    return {"file_mb": round(checkpoint.stat().st_size / 2**20, 3),
            "flops_per_image": flops_per_image(model, image_size)}


# ---------------------------------------------------------------- speed


def measure_speeds(
    models: dict[str, nn.Module], image_size: int, device: torch.device, amp_dtype: torch.dtype | None,
    batch: int = 64, rounds: int = 3, min_run_time: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """Deployment speed of several models on this device, measured interleaved.

    In each of `rounds` rounds every model in turn is timed by `torch.utils.benchmark`
    (`Timer.blocked_autorange`) at batch 1 and at batch `batch`, so a slow moment of the machine
    hits all of them rather than one. Per model: batch-1 latency in ms and batch-`batch`
    throughput in images/s, each as the median and the interquartile range [q1, q3] of the
    timed blocks of all rounds. Each call of blocked_autorange first runs the model untimed to
    choose its block size, which also keeps first-call costs (kernel selection, allocation) out
    of the figures. Inputs are random (speed does not depend on them); the measurement uses as
    many threads as the run.
    """
    from torch.utils.benchmark import Timer

    def forward(module: nn.Module, images: torch.Tensor) -> None:
        with torch.inference_mode(), runtime.autocast(device, amp_dtype):
            module(images)

    timers = {}
    for name, model in models.items():
        module = model_builder.unwrap(model, keep_compiled=True).eval()
        for size in (1, batch):
            images = torch.randn(size, 3, image_size, image_size, device=device)
            images = images.contiguous(memory_format=torch.channels_last)
            timers[name, size] = Timer("forward(module, images)",
                                       globals={"forward": forward, "module": module, "images": images},
                                       num_threads=torch.get_num_threads())
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in timers}
    for _ in range(rounds):
        for key, timer in timers.items():
            seconds[key] += timer.blocked_autorange(min_run_time=min_run_time).times
    speeds = {}
    for name in models:
        latency = 1000 * np.percentile(seconds[name, 1], [25, 50, 75])
        throughput = batch / np.percentile(seconds[name, batch], [75, 50, 25])
        speeds[name] = {
            "latency_ms": round(float(latency[1]), 3), "latency_ms_iqr": [round(float(v), 3) for v in latency[::2]],
            "throughput_img_s": round(float(throughput[1]), 1),
            "throughput_img_s_iqr": [round(float(v), 1) for v in throughput[::2]],
        }
    return speeds


def measure_saved_models(
    folders: dict[str, Path], image_size: int, device: torch.device, amp_dtype: torch.dtype | None,
) -> dict[str, dict[str, Any]]:
    """`measure_speeds` of the models saved as best_model.pth in `folders` ({name: folder}), so that a
    resumed run measures them all too; in channels_last on `device`, as they trained."""
    paths = {name: folder / checkpoints.BEST_MODEL for name, folder in folders.items()}
    models = {name: checkpoints.load_model(checkpoints.read_state(path), path)
              .to(device, memory_format=torch.channels_last) for name, path in paths.items()}
    return measure_speeds(models, image_size, device, amp_dtype)


def speedup(teacher: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """A model's speed-up over the teacher: the ratio of median batch-1 latencies, and whether
    the measurement tells them apart (`speedup_clear`: their interquartile ranges do not overlap)."""
    (low, high), (teacher_low, teacher_high) = model["latency_ms_iqr"], teacher["latency_ms_iqr"]
    return {"speedup_over_teacher": round(teacher["latency_ms"] / model["latency_ms"], 3),
            "speedup_clear": high < teacher_low or teacher_high < low}


# ---------------------------------------------------------------- ONNX


def export_onnx(model: nn.Module, path: str | Path, image_size: int, metadata: dict[str, Any]) -> None:
    """Export a model (fp32, CPU copy, eval mode) to ONNX with a dynamic batch dimension.

    The checkpoint's description (class names, image size, normalization) rides along in the
    file's metadata, so the ONNX file alone is enough to classify images.
    """
    import onnx

    plain = _cpu_copy(model).to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, 3, image_size, image_size)
    with utils.atomic_path(path) as temporary:
        program = torch.onnx.export(
            plain, (example,), input_names=["images"], output_names=["logits"], dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
        program.save(str(temporary))
        graph = onnx.load(str(temporary))
        entry = graph.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata)
        onnx.save(graph, str(temporary))


def onnx_session(path: str | Path):
    """An onnxruntime CPU session for an exported model."""
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_metadata(session) -> dict[str, Any]:
    """The project's description stored in an exported model."""
    return json.loads(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])


def onnx_logits(session, images: torch.Tensor) -> torch.Tensor:
    """Logits of normalized float images through onnxruntime."""
    inputs = {session.get_inputs()[0].name: images.detach().cpu().float().contiguous().numpy()}
    return torch.from_numpy(session.run(None, inputs)[0])


@torch.no_grad()
def onnx_parity(model: nn.Module, path: str | Path, images: torch.Tensor) -> float:
    """Largest absolute difference between PyTorch (fp32, CPU) and onnxruntime logits on `images`."""
    expected = _cpu_copy(model)(images.cpu().float().contiguous())
    return float((onnx_logits(onnx_session(path), images) - expected).abs().max())


def export_checked(
    model: nn.Module, path: Path, image_size: int, metadata: dict[str, Any], images: torch.Tensor,
) -> dict[str, Any]:
    """Write `path` (ONNX, with `metadata`) and check it against PyTorch on `images` (real, normalized).

    Returns the check: images used, the largest logit difference, the tolerance and whether it passed.
    """
    export_onnx(model, path, image_size, metadata)
    difference = onnx_parity(model, path, images)
    passed = difference <= ONNX_TOLERANCE
    if not passed:
        print(f"warning: {metadata.get('role', 'the model')}'s ONNX export differs from PyTorch by "
              f"{difference:.2e} (> {ONNX_TOLERANCE:.0e})")
    return {"checked_images": len(images), "max_abs_diff": difference, "tolerance": ONNX_TOLERANCE, "passed": passed}
