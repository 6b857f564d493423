"""What a training step and an epoch do besides the model, counted and timed on the CPU (not a test).

    python benchmarks/step_overhead.py [--steps 20] [--batch-size 64] [--repeats 5]

1. Kernels per step: `--steps` training steps (after a first one, which also draws the epoch) of plain,
   kd and dkd training through engine.train_one_epoch, on in-memory data (random 32 px uint8 images,
   10 classes, the default augmentation: crop with 4 px padding and flip), tiny models, fp32, fused
   AdamW and the one-cycle schedule, counted by step_profile: the aten kernels outside the models'
   own forward and backward and the optimizer's step (what the loader, the loss with its backward and
   the bookkeeping add), and the ops that make the host wait for the device, in every region.
2. Host work per epoch at 45,000 training images (steps of 512) with 10 and with 100 classes: the
   training metrics from the epoch's logits (engine.training_metrics, as train_one_epoch ends) and the
   checkpoint's copies of a small-image ResNet18 with its AdamW state (a best epoch: the weights kept
   as the best, the optimizer's state, and what BackgroundSaver.save takes before writing in the
   background; the write itself is left out). The median of `--repeats` epochs, buffers already made.

Last line:
    OVERHEAD plain_ops=<n> kd_ops=<n> dkd_ops=<n> syncs=<max over methods> epoch_host_ms_10=<ms> epoch_host_ms_100=<ms>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import step_profile  # noqa: E402

import data_setup  # noqa: E402
import engine  # noqa: E402
import KD_engine  # noqa: E402
import model_builder  # noqa: E402
from core import host_weights  # noqa: E402
from training import checkpoints  # noqa: E402

CLASSES, IMAGE_SIZE = 10, 32
EPOCH_IMAGES, EPOCH_BATCH = 45_000, 512  # CIFAR-10's training split after validation, at the GPU batch
DEVICE = torch.device("cpu")


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, CLASSES)).to(DEVICE, memory_format=torch.channels_last)


def step_counts(method: str, steps: int, batch_size: int) -> tuple[list[int], list[int], int]:
    """(kernels besides the models and the optimizer, host waits in any region) of each of `steps` steps
    after the first, and the first step's kernels (it draws the epoch too)."""
    torch.manual_seed(0)
    count = (steps + 1) * batch_size
    images = torch.randint(0, 256, (count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    data = data_setup.ImageTensors(images, torch.randint(0, CLASSES, (count,)), [str(i) for i in range(count)],
                                   IMAGE_SIZE)
    loader = data_setup.BatchLoader(data, batch_size, [0.5] * 3, [0.25] * 3, DEVICE, data_setup.Augmentation(4, True))
    student, teacher = tiny_model(), tiny_model()
    if method == "plain":
        criterion = engine.SupervisedCriterion()
    else:
        # DKD's warm-up spans the epoch, so its factor changes every step.
        criterion = KD_engine.make_criterion(method, teacher, student, KD_engine.library_setup(
            steps_per_epoch=len(loader), dkd_warmup_epochs=1))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=len(loader))
    criterion.set_epoch(1)
    with step_profile.counting([student, teacher], optimizer) as counter:
        engine.train_one_epoch(student, step_profile.CountedSteps(loader, counter), criterion, optimizer,
                               [str(c) for c in range(CLASSES)], DEVICE, scheduler)
    measured = range(1, steps + 1)
    regions = (step_profile.MODEL, step_profile.OPTIMIZER, step_profile.OTHER)
    waits = [sum(counter.syncs[(step, region)] for region in regions) for step in measured]
    return counter.per_step(measured), waits, counter.ops[(0, step_profile.OTHER)]


def milliseconds(work, repeats: int) -> float:
    """The median wall time of `work()` over `repeats` runs, after one run that makes buffers."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def epoch_host_work(classes: int, repeats: int) -> tuple[float, float]:
    """(training metrics ms, checkpoint ms) of one epoch's end at EPOCH_IMAGES images of `classes` classes."""
    generator = torch.Generator().manual_seed(0)
    steps = -(-EPOCH_IMAGES // EPOCH_BATCH)
    step_logits = list(torch.randn(EPOCH_IMAGES, classes, generator=generator).split(EPOCH_BATCH))
    labels = torch.randint(0, classes, (EPOCH_IMAGES,), generator=generator)
    rows = torch.rand(steps, 3, generator=generator)  # a kd epoch's loss, ce and kd per step
    batch_sizes = np.array([len(logits) for logits in step_logits])
    names = [str(c) for c in range(classes)]

    def metrics() -> None:
        engine.training_metrics(rows, ["loss", "ce", "kd"], batch_sizes, torch.cat(step_logits).float(), labels,
                                names)

    model = model_builder.build_model("ResNet18", classes, IMAGE_SIZE).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)).sum().backward()
    optimizer.step()  # the AdamW state exists from the first step on
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=100)
    weights, state_buffers = host_weights.WeightSnapshots(), host_weights.HostBuffers()
    result = engine.FitResult(history=[{"epoch": 1}], best_epoch=1,
                              best_val_outputs=(torch.randn(5000, classes), torch.zeros(5000, dtype=torch.long)))

    def checkpoint() -> None:
        best = weights.take_best(model)
        state = state_buffers.fill({"optimizer": optimizer.state_dict(), "criterion": None})
        files = [checkpoints.make_checkpoint({"class_names": names, "image_size": IMAGE_SIZE, "resize": "squash",
                                              "mean": [0.5] * 3, "std": [0.25] * 3, "config": {}},
                                             "student", "resnet18", best, 1, result.history),
                 checkpoints.training_state("student", "resnet18", best, None, state["optimizer"], scheduler, None,
                                            torch.Generator(), result)]
        for file in files:
            checkpoints.host_copy(file)  # what BackgroundSaver.save takes before writing

    return milliseconds(metrics, repeats), milliseconds(checkpoint, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    ops, syncs = {}, 0
    print(f"kernels per step besides the models and the optimizer ({args.steps} steps of batch {args.batch_size}, "
          "tiny models, fp32):")
    for method in ("plain", "kd", "dkd"):
        counts, waits, first = step_counts(method, args.steps, args.batch_size)
        ops[method], syncs = max(counts), max(syncs, max(waits))
        print(f"  {method:6s} {min(counts)}-{max(counts)} kernels a step (the epoch's first step: {first}), "
              f"host waits a step: {max(waits)}")
    host = {}
    print(f"host work per epoch, {EPOCH_IMAGES:,} images in steps of {EPOCH_BATCH} (median of {args.repeats}):")
    for classes in (10, 100):
        metrics_ms, checkpoint_ms = epoch_host_work(classes, args.repeats)
        host[classes] = metrics_ms + checkpoint_ms
        print(f"  {classes:3d} classes: training metrics {metrics_ms:7.1f} ms, checkpoint copies (ResNet18 + AdamW) "
              f"{checkpoint_ms:7.1f} ms")
    print(f"OVERHEAD plain_ops={ops['plain']} kd_ops={ops['kd']} dkd_ops={ops['dkd']} syncs={syncs} "
          f"epoch_host_ms_10={host[10]:.0f} epoch_host_ms_100={host[100]:.0f}")


if __name__ == "__main__":
    main()
