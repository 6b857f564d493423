"""What a trained model costs where it is deployed: size, FLOPs, latency and throughput, and its
ONNX export (checked against PyTorch)."""

from __future__ import annotations

import copy
import functools
import json
import math
import timeit
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import model_builder
import utils
from core import compute, records
from training import checkpoints

ONNX_METADATA_KEY = "kd_pipeline"  # JSON: arch, class names, image size, normalization
ONNX_TOLERANCE = 1e-4  # largest allowed |logit difference| between ONNX Runtime and PyTorch
# A speed measurement whose interquartile range is wider than this share of its median is taken again, and
# marked noisy (no speed-up claimed from it) if it stays so: set from measurements on a quiet and a busy machine
# (docs/deploying.md).
NOISY_SPREAD = 0.25
MEASURE_PASSES = 3  # a noisy measurement is taken up to this many times in all
THROUGHPUT_BATCH = 64  # images per forward pass when throughput is measured
# Per kind of speed-up, its ModelRow fields (ratio, clear, noisy), what it measures and the unit of its figure.
SPEED_KINDS = {
    "latency": (("speedup_over_teacher", "speedup_clear", "latency_noisy"), "batch-1 latency", "latency_ms", "ms"),
    "throughput": (("throughput_speedup_over_teacher", "throughput_speedup_clear", "throughput_noisy"),
                   f"batch-{THROUGHPUT_BATCH} throughput", "throughput_img_s", "images/s"),
}
# torchvision classifiers made for photos (a stem that shrinks the image 4-fold, then 8-fold more): a student needing
# more FLOPs than the one of them nearest its size is a poor choice at that image size.
TORCHVISION_PEERS = ("shufflenet_v2_x0_5", "mobilenet_v3_small", "shufflenet_v2_x1_0", "mobilenet_v2",
                     "mobilenet_v3_large", "efficientnet_b0", "resnet18", "resnet34", "resnet50")


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
    plain = compute.unwrap(model)
    return {"params": count_parameters(plain), "size_mb": round(model_size_mb(plain), 3)}


def _cpu_copy(model: nn.Module) -> nn.Module:
    """An fp32 CPU copy of the plain model in eval mode (the model itself is left untouched)."""
    return copy.deepcopy(compute.unwrap(model)).cpu().float().eval()


def flops_per_image(model: nn.Module, image_size: int) -> int:
    """Floating-point operations of one forward pass on one image (torch.utils.flop_counter).

    Counted on a CPU copy in eval mode, so it works for any device and leaves the model untouched.
    """
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


def block_times(run: Callable[[], None], min_run_time: float, min_blocks: int = 2) -> list[float]:
    """Seconds per call of `run`, one figure per timed block of calls, as torch.utils.benchmark's
    `blocked_autorange` measures (which is not imported: it pulls in torch.utils.cpp_extension, which
    logs a CUDA warning on CPU-only machines).

    A first untimed call keeps one-off costs (kernel selection, allocation) out; the calls per block
    grow tenfold from one until a block takes a thousandth of `min_run_time`; then blocks are timed
    until `min_run_time` has passed and at least `min_blocks` were timed.
    """
    timer = timeit.Timer(run)
    timer.timeit(1)
    number = 1
    while timer.timeit(number) < min_run_time / 1000:
        number *= 10
    times: list[float] = []
    while sum(times) * number < min_run_time or len(times) < min_blocks:
        times.append(timer.timeit(number) / number)
    return times


def spread(values: list[float]) -> dict[str, Any]:
    """Median and interquartile range [q1, q3] of measured values, and whether the range is wide against the
    median (`noisy`: wider than NOISY_SPREAD of it)."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "iqr": [float(q1), float(q3)], "noisy": bool(q3 - q1 > NOISY_SPREAD * median)}


def _ratio_fields(kind: str, ratios: list[float]) -> dict[str, Any]:
    """A model's speed-up of one kind from its per-round ratios to the teacher: their median, interquartile
    range, whether it is noisy (`spread`) and, if not, whether it is clear (the range excludes 1)."""
    ratio_field, clear_field, noisy_field = SPEED_KINDS[kind][0]
    judged = spread(ratios)
    low, high = judged["iqr"]
    return {ratio_field: round(judged["median"], 3), f"{ratio_field}_iqr": [round(low, 3), round(high, 3)],
            noisy_field: judged["noisy"], clear_field: not judged["noisy"] and (low > 1 or high < 1)}


def measure_speeds(
    models: dict[str, nn.Module], image_size: int, device: torch.device, amp_dtype: torch.dtype | None,
    teacher: str, batch: int = THROUGHPUT_BATCH, rounds: int = 3, min_run_time: float = 0.05,
    passes: int = MEASURE_PASSES,
) -> dict[str, dict[str, Any]]:
    """Deployment speed of several models on this device, each measured against `teacher` in alternating rounds.

    In each of `rounds` rounds, for every other model and each batch size (1 and `batch`), the teacher
    and then the model are timed (`block_times`), and the ratio of their median times is that round's
    speed-up, so a slow moment of the machine weighs on both sides of a ratio. Per model: batch-1
    latency in ms and batch-`batch` throughput in images/s (median and interquartile range of all its
    timed blocks), and per kind the speed-up as the median of its per-round ratios with their range
    (`_ratio_fields`). A speed-up whose range is wide against its median is measured again, in up to
    `passes` passes in all; one still wide is marked noisy. Inputs are random (speed does not depend on
    them); the measurement uses as many threads as the run.
    """
    def forward(module: nn.Module, images: torch.Tensor) -> None:
        with torch.inference_mode(), compute.autocast(device, amp_dtype):
            module(images)
        compute.synchronize(device)

    calls = {}
    for name, model in models.items():
        module = compute.unwrap(model, keep_compiled=True).eval()
        for size in (1, batch):
            images = torch.randn(size, 3, image_size, image_size, device=device)
            calls[name, size] = functools.partial(forward, module, images.contiguous(memory_format=torch.channels_last))
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    ratios: dict[tuple[str, int], list[float]] = {}
    # The teacher alone is timed against itself, so that it has figures too.
    pending = [(name, size) for name in models if name != teacher for size in (1, batch)] or \
        [(teacher, 1), (teacher, batch)]
    for _ in range(passes):
        ratios.update({key: [] for key in pending})
        for _ in range(rounds):
            for name, size in pending:
                reference = block_times(calls[teacher, size], min_run_time)
                own = block_times(calls[name, size], min_run_time)
                seconds[teacher, size] += reference
                seconds[name, size] += own
                ratios[name, size].append(float(np.median(reference) / np.median(own)))
        pending = [key for key in pending if spread(ratios[key])["noisy"]]
        if not pending:
            break
    speeds = {}
    for name in models:
        latency, throughput = spread(seconds[name, 1]), spread(seconds[name, batch])
        speeds[name] = {
            "latency_ms": round(1000 * latency["median"], 3),
            "latency_ms_iqr": [round(1000 * value, 3) for value in latency["iqr"]],
            "throughput_img_s": round(batch / throughput["median"], 1),
            "throughput_img_s_iqr": [round(batch / value, 1) for value in throughput["iqr"][::-1]],
            **({field: value for (ratio_field, _, noisy_field), *_ in SPEED_KINDS.values()
                for field, value in ((ratio_field, 1.0), (noisy_field, False))} if name == teacher else
               {**_ratio_fields("latency", ratios[name, 1]), **_ratio_fields("throughput", ratios[name, batch])}),
        }
    return speeds


def identical_apart(speeds: dict[str, dict[str, Any]], archs: dict[str, str]) -> str | None:
    """Models of one architecture (`archs`: name to architecture, the teacher's speed-up being 1) whose median
    speed-ups of one kind differ by more than NOISY_SPREAD: the machine's load changed between them, and no
    speed-up of the table can be trusted. Says which, in words; None when none do."""
    for (ratio_field, _, _), measure, _, _ in SPEED_KINDS.values():
        for arch in sorted(set(archs.values())):
            same = {name: speeds[name][ratio_field] for name in archs if archs[name] == arch}
            if len(same) > 1 and max(same.values()) > (1 + NOISY_SPREAD) * min(same.values()):
                return (f"{' and '.join(same)} (all {arch}) measured {measure} speed-ups of "
                        f"{' and '.join(f'{ratio:.2f}x' for ratio in same.values())}")
    return None


def mark_table_noisy(speeds: dict[str, dict[str, Any]], archs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """`speeds` with every speed-up of every model marked noisy and `speeds_apart` set where `identical_apart`
    finds identical architectures measured apart; else as they were."""
    apart = identical_apart(speeds, archs)
    if apart is None:
        return speeds
    noisy = {field: value for (_, clear_field, noisy_field), *_ in SPEED_KINDS.values()
             for field, value in ((noisy_field, True), (clear_field, False))}
    return {name: {**speed, **noisy, "speeds_apart": apart} for name, speed in speeds.items()}


def measure_saved_models(
    folders: dict[str, Path], image_size: int, device: torch.device, amp_dtype: torch.dtype | None, teacher: str,
) -> dict[str, dict[str, Any]]:
    """`measure_speeds` against `teacher` of the models saved as best_model.pth in `folders` ({name: folder}), so
    that a resumed run measures them all too; in channels_last on `device`, as they trained; the table marked
    noisy where identical architectures measured apart (`mark_table_noisy`)."""
    states = {name: (checkpoints.read_state(folder / checkpoints.BEST_MODEL), folder / checkpoints.BEST_MODEL)
              for name, folder in folders.items()}
    models = {name: checkpoints.load_model(state, path).to(device, memory_format=torch.channels_last)
              for name, (state, path) in states.items()}
    speeds = measure_speeds(models, image_size, device, amp_dtype, teacher)
    return mark_table_noisy(speeds, {name: state["arch"] for name, (state, _) in states.items()})


def speedup_cell(row: records.ModelRow, kind: str, teacher: records.ModelRow | None = None) -> str:
    """A model's speed-up of one kind ("latency", "throughput") for tables: '2.10x', 'unclear' (the range of its
    per-round ratios holds 1), 'noisy' (that range stayed wide, or identical architectures measured apart: no
    speed-up claimed) or 'n/a'."""
    ratio_field, clear_field, noisy_field = SPEED_KINDS[kind][0]
    ratio = getattr(row, ratio_field)
    if ratio is None:
        return "n/a"
    if getattr(row, noisy_field) or (teacher is not None and getattr(teacher, noisy_field)):
        return "noisy"
    return f"{ratio:.2f}x" if getattr(row, clear_field) is not False else "unclear"


def speed_clause(student: records.ModelRow, teacher: records.ModelRow, kind: str) -> str | None:
    """What one kind of measured speed-up says about the student against the teacher, in words (None when
    the summary has no such measurement)."""
    (ratio_field, clear_field, noisy_field), measure, figure, unit = SPEED_KINDS[kind]
    ratio = getattr(student, ratio_field)
    if ratio is None:
        return None
    figures = f"{getattr(student, figure):g} against {getattr(teacher, figure):g} {unit}"
    if student.speeds_apart:
        return (f"no {measure} speed-up is claimed ({figures}): {student.speeds_apart}, so the machine's load "
                "changed while it measured")
    if getattr(student, noisy_field) or getattr(teacher, noisy_field):
        return (f"its {measure} speed-up stayed noisy (the interquartile range of its per-round ratios wider than "
                f"{100 * NOISY_SPREAD:g}% of their median, after {MEASURE_PASSES} tries; {figures}), so no {measure} "
                "speed-up is claimed")
    if getattr(student, clear_field) is False:
        return (f"its {measure} cannot be told from the teacher's ({figures}; the interquartile range of its "
                "per-round ratios holds 1)")
    return f"by {measure} it is {ratio:.2f}x as fast ({figures}, median of per-round ratios)"


# ---------------------------------------------------------------- students for photos


def peer_flops(arch: str, num_classes: int, image_size: int) -> dict[str, Any] | None:
    """Above SMALL_IMAGE_MAX pixels: the torchvision classifier of TORCHVISION_PEERS whose parameter count
    is nearest `arch`'s (by ratio), with both models' parameters and FLOPs per image at `image_size`,
    when `arch` needs more FLOPs than it. None otherwise (also at small sizes, where torchvision's
    ImageNet networks, which shrink an image 32-fold, are no fair comparison). Counted on the meta device."""
    if image_size <= model_builder.SMALL_IMAGE_MAX:
        return None

    def cost(name: str) -> tuple[int, int]:
        model = model_builder.build_on_meta(name, num_classes, image_size).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.device("meta"):
            model(torch.zeros(1, 3, image_size, image_size))
        return count_parameters(model), int(counter.get_total_flops())

    params, flops = cost(arch)
    peers = {name: cost(name) for name in TORCHVISION_PEERS}
    peer = min(peers, key=lambda name: abs(math.log(peers[name][0] / params)))
    if peer == model_builder.architecture_name(arch) or flops <= peers[peer][1]:
        return None
    return {"arch": model_builder.architecture_name(arch), "image_size": image_size, "params": params,
            "flops_per_image": flops,
            "peer": peer, "peer_params": peers[peer][0], "peer_flops_per_image": peers[peer][1]}


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
def onnx_parity(model: nn.Module, path: str | Path, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """PyTorch (fp32, CPU, as saved) against onnxruntime on every batch of `batches`: the images checked,
    the largest absolute logit difference, and in how many images their predictions
    (`utils.predicted_classes`) differ."""
    plain, session = _cpu_copy(model), onnx_session(path)
    images, difference, differing = 0, 0.0, 0
    for batch in batches:
        expected = plain(batch.cpu().float().contiguous())
        exported = onnx_logits(session, batch)
        images += len(batch)
        difference = max(difference, float((exported - expected).abs().max()))
        differing += int((utils.predicted_classes(exported) != utils.predicted_classes(expected)).sum())
    return {"checked_images": images, "max_abs_diff": difference, "differing_predictions": differing}


def export_checked(
    model: nn.Module, path: Path, image_size: int, metadata: dict[str, Any], batches: Iterable[torch.Tensor],
    split: str = "test",
) -> dict[str, Any]:
    """Write `path` (ONNX, with `metadata`) and check it against PyTorch on `batches` (real, normalized images
    of `split`).

    Returns the check: split and images used, the largest logit difference, the tolerance, the predictions
    that differ, and whether it passed (within the tolerance and no prediction differing).
    """
    export_onnx(model, path, image_size, metadata)
    check = onnx_parity(model, path, batches)
    passed = check["max_abs_diff"] <= ONNX_TOLERANCE and check["differing_predictions"] == 0
    if not passed:
        print(f"warning: {metadata.get('role', 'the model')}'s ONNX export differs from PyTorch by "
              f"{check['max_abs_diff']:.2e} (tolerance {ONNX_TOLERANCE:.0e}) and in "
              f"{check['differing_predictions']} predictions")
    return {"checked_split": split, **check, "tolerance": ONNX_TOLERANCE, "passed": passed}
