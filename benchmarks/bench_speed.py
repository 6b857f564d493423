"""Training speed in images per second and TFLOP/s, measured in one run on the same data (not a test).

    python benchmarks/bench_speed.py [--quick] [--data-dir DIR] [--device cpu|cuda]

1. raw limit: the teacher's and the student's forward + backward + optimizer step on synthetic
   in-memory tensors, for every precision x layout this device supports (on CUDA at batches 256
   and 512, with cuDNN autotuning); warm-up runs until the step time is stable, then at least 50
   steps are timed on CUDA (synchronized). The best variant counts;
2. our plain student epoch through engine.train_one_epoch;
3. our distillation epoch through KD_engine's kd step and the same loop;
4. a weak reference distillation epoch written as typical public KD code: torchvision
   ImageFolder, PIL transforms, a DataLoader with 2 workers, fp32, a per-batch teacher forward
   and per-batch `.item()` bookkeeping;
5. a strong reference distillation epoch, the best loop a user writes by hand: the same
   ImageFolder and PIL transforms, a DataLoader with a worker per core, persistent workers and
   pinned memory, bf16 autocast where the device has it, channels_last, no per-batch host sync.

Achieved TFLOP/s are images/s times the FLOPs of one image's forward + backward
(torch.utils.flop_counter; a distillation step adds the teacher's forward).
The last line is `RATIOS plain/limit=<x> kd/plain=<y> ours/reference=<z> ours/strong=<w>`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_setup  # noqa: E402
import engine  # noqa: E402
import KD_engine  # noqa: E402
import model_builder  # noqa: E402
from core import compute  # noqa: E402
from data import decoding, folders  # noqa: E402

TEMPERATURE, ALPHA = 4.0, 0.5
CUDA_BATCHES = (256, 512)  # raw-limit batch sizes on CUDA (the CPU uses --batch-size)
CUDA_MIN_STEPS = 50  # timed steps per raw-limit variant on CUDA
STABLE_WITHIN = 0.05  # warm-up ends when two successive windows differ by less than this share
# Warm-up windows at most: on CUDA autotuning settles within a few; a CPU's step time is as noisy
# after the first window as it will ever be (its warm-up is first-call costs), and time there is short.
MAX_WARMUP_WINDOWS = {"cuda": 20, "cpu": 3}


def default_data_dir() -> Path | None:
    """The team's CIFAR-10 ImageFolder tree when this machine has one beside any checkout, else None."""
    for folder in ROOT.parents:
        candidate = folder / "shared" / "datasets" / "cifar10"
        if (candidate / "train").is_dir():
            return candidate
    return None


def subset_paths(train_dir: Path, count: int) -> tuple[list[str], list[int], list[str]]:
    """The first count/classes images of every class (deterministic), with labels and class names."""
    folder = folders.image_folder(train_dir)
    per_class = max(1, count // len(folder.classes))
    chosen = [s for c in range(len(folder.classes)) for s in [x for x in folder.samples if x[1] == c][:per_class]]
    return [p for p, _ in chosen], [label for _, label in chosen], folder.classes


def variants(device: torch.device) -> list[tuple[torch.dtype | None, bool]]:
    """(autocast dtype, channels_last) pairs worth trying on this device."""
    amp_dtype = compute.resolve_amp_dtype("auto", device)  # the pipeline's own choice of where bf16 pays
    precisions = [None] if amp_dtype is None else [None, amp_dtype]
    return [(dtype, channels_last) for dtype in precisions for channels_last in (False, True)]


def training_flops_per_image(arch: str, classes: int, size: int) -> int:
    """FLOPs of one image's forward + backward, counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = model_builder.build_model(arch, classes, size).train()
        images, labels = torch.randn(2, 3, size, size), torch.randint(0, classes, (2,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() // 2


def timed(run: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call, after the device has finished."""
    compute.synchronize(device)
    start = time.perf_counter()
    run()
    compute.synchronize(device)
    return time.perf_counter() - start


def steady_step_seconds(step: Callable[[], None], device: torch.device, steps: int) -> float:
    """Seconds per step once warm: windows of steps run until two in a row agree within
    STABLE_WITHIN (autotuning, allocator and caches settled), then `steps` steps are timed."""
    window = max(1, steps // 5)
    run_window = lambda: [step() for _ in range(window)]  # noqa: E731
    previous = timed(run_window, device)
    for _ in range(MAX_WARMUP_WINDOWS.get(device.type, 3)):
        current = timed(run_window, device)
        if abs(current - previous) <= STABLE_WITHIN * previous:
            break
        previous = current
    return timed(lambda: [step() for _ in range(steps)], device) / steps


def raw_limit(
    arch: str, classes: int, size: int, batches: list[int], device: torch.device, steps: int, flops: int,
) -> tuple[float, list[str]]:
    """Best forward+backward+step images/s over precisions, layouts and batch sizes, and one line per
    variant (with TFLOP/s from `flops`, the training FLOPs of one image)."""
    best, lines = 0.0, []
    for batch, (dtype, channels_last) in itertools.product(batches, variants(device)):
        torch.manual_seed(0)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model = model_builder.build_model(arch, classes, size).to(device, memory_format=layout).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)
        labels = torch.randint(0, classes, (batch,), device=device)

        def step(model=model, images=images, labels=labels, optimizer=optimizer, dtype=dtype) -> None:
            with compute.autocast(device, dtype):
                loss = F.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        speed = batch / steady_step_seconds(step, device, steps)
        best = max(best, speed)
        lines.append(f"  {arch:<10} batch {batch:<4} {'bf16' if dtype else 'fp32'} "
                     f"{'channels_last' if channels_last else 'contiguous':<14} {speed:9.1f} img/s "
                     f"{tflops(speed, flops)}")
    return best, lines


def tflops(images_per_second: float, flops_per_image: float) -> str:
    return f"{images_per_second * flops_per_image / 1e12:7.2f} TFLOP/s"


def our_epochs(args, paths, labels, classes, device) -> tuple[float, float]:
    """Images/s of our plain student epoch and our distillation epoch on the decoded subset."""
    images = decoding.decode_cached(paths, args.image_size, os.cpu_count() or 1, None, decode_device=device)
    split = data_setup.ImageTensors(images, torch.tensor(labels), paths, args.image_size)
    mean, std = data_setup.channel_stats(split, 0)
    amp = compute.resolve_amp_dtype("auto", device)
    augmentation = data_setup.Augmentation(pad=4, hflip=True)
    speeds = []
    for distill in (False, True):
        torch.manual_seed(0)
        student = model_builder.build_model(args.student, len(classes),
                                            args.image_size).to(device, memory_format=torch.channels_last)
        criterion: engine.Criterion = engine.SupervisedCriterion()
        if distill:
            teacher = model_builder.build_model(args.teacher, len(classes), args.image_size).eval()
            teacher = compute.store_for_autocast(teacher.to(device, memory_format=torch.channels_last), amp)
            criterion = KD_engine.make_criterion("kd", teacher, student, KD_engine.library_setup(
                temperature=TEMPERATURE, alpha=ALPHA))
        # As experiment.make_optimizer: one fused kernel per step.
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, fused=True)
        loader = data_setup.BatchLoader(split, args.batch_size, mean, std, device, augmentation, seed=0)
        warm_up = list(itertools.islice(iter(loader), 3))
        engine.train_one_epoch(student, warm_up, criterion, optimizer, classes, device, amp_dtype=amp)
        seconds = timed(lambda student=student, loader=loader, criterion=criterion, optimizer=optimizer:
                        engine.train_one_epoch(student, loader, criterion, optimizer, classes, device, amp_dtype=amp),
                        device)
        speeds.append(len(split) / seconds)
    return speeds[0], speeds[1]


def reference_subset(args, train_dir: Path, paths) -> torch.utils.data.Subset:
    """The benchmark's images as torchvision's ImageFolder gives them to hand-written loops: PIL
    transforms resize, randomly crop and flip, then normalize each image."""
    transform = transforms.Compose([
        transforms.Resize((args.image_size, args.image_size)),
        transforms.RandomCrop(args.image_size, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    ])
    folder = datasets.ImageFolder(str(train_dir), transform=transform)
    wanted = set(paths)
    return torch.utils.data.Subset(folder, [i for i, (p, _) in enumerate(folder.samples) if p in wanted])


def reference_epoch(args, train_dir: Path, paths, classes, device) -> float:
    """Images/s of a distillation epoch written the way typical public KD repositories do it."""
    subset = reference_subset(args, train_dir, paths)
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, shuffle=True, num_workers=2,
                                         pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    teacher = model_builder.build_model(args.teacher, len(classes), args.image_size).to(device).eval()
    student = model_builder.build_model(args.student, len(classes), args.image_size).to(device).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def run(batches) -> None:
        running_loss, correct, seen = 0.0, 0, 0
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            with torch.no_grad():
                teacher_logits = teacher(images)
            student_logits = student(images)
            soft = F.kl_div(F.log_softmax(student_logits / TEMPERATURE, 1), F.softmax(teacher_logits / TEMPERATURE, 1),
                            reduction="batchmean") * TEMPERATURE**2
            loss = ALPHA * F.cross_entropy(student_logits, labels) + (1 - ALPHA) * soft
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * labels.size(0)
            correct += (student_logits.argmax(1) == labels).sum().item()
            seen += labels.size(0)

    run(itertools.islice(loader, 3))
    return len(subset) / timed(lambda: run(loader), device)


def strong_reference_epoch(args, train_dir: Path, paths, classes, device) -> float:
    """Images/s of a distillation epoch as a careful user writes it by hand with torchvision."""
    subset = reference_subset(args, train_dir, paths)
    loader = torch.utils.data.DataLoader(subset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=os.cpu_count() or 1,
                                         persistent_workers=True, pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    teacher = model_builder.build_model(args.teacher, len(classes), args.image_size)
    teacher = teacher.to(device, memory_format=torch.channels_last).eval()
    student = model_builder.build_model(args.student, len(classes), args.image_size)
    student = student.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    bf16 = compute.resolve_amp_dtype("auto", device) is not None

    def run(batches) -> None:
        for images, labels in batches:
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                with torch.no_grad():
                    teacher_logits = teacher(images)
                student_logits = student(images)
            soft = F.kl_div(F.log_softmax(student_logits.float() / TEMPERATURE, 1),
                            F.log_softmax(teacher_logits.float() / TEMPERATURE, 1),
                            log_target=True, reduction="batchmean") * TEMPERATURE**2
            loss = ALPHA * F.cross_entropy(student_logits.float(), labels) + (1 - ALPHA) * soft
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    run(itertools.islice(loader, 3))
    return len(subset) / timed(lambda: run(loader), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="ImageFolder root with train/, e.g. CIFAR-10 as an ImageFolder tree "
                             "(default: the team's copy when this machine has one, else the bundled digits)")
    parser.add_argument("--quick", action="store_true", help="a smaller measurement (under 3 minutes on 2 CPU cores)")
    parser.add_argument("--images", type=int, default=None,
                        help="training images per epoch (default 640 quick, 2560 full; x8 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch of our and the reference epochs (default 256 on CUDA, 64 elsewhere)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--teacher", default="VGG16")
    parser.add_argument("--student", default="ResNet18")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = compute.resolve_device(args.device)
    compute.enable_autotuning(device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 64)
    count = args.images or (640 if args.quick else 2560) * (8 if cuda else 1)
    steps = CUDA_MIN_STEPS if cuda else (5 if args.quick else 10)
    limit_batches = list(CUDA_BATCHES) if cuda else [args.batch_size]
    train_dir = Path(args.data_dir or data_setup.bundled_digits_dir()) / "train"
    paths, labels, classes = subset_paths(train_dir, count)
    count = len(paths) - len(paths) % args.batch_size  # whole batches only: no odd-sized last step
    paths, labels = paths[:count], labels[:count]
    print(f"data: {len(paths)} images of {train_dir}, {args.image_size}px, batch {args.batch_size}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"native bf16: {compute.cpu_has_native_bf16()}" + (f", {torch.cuda.get_device_name(device)}" if cuda else ""))
    print(f"raw limit (synthetic tensors, forward + backward + step, {steps} timed steps after a stable warm-up):")
    teacher_flops = training_flops_per_image(args.teacher, len(classes), args.image_size)
    student_flops = training_flops_per_image(args.student, len(classes), args.image_size)
    kd_flops = student_flops + teacher_flops / 3
    teacher_limit, lines = raw_limit(args.teacher, len(classes), args.image_size, limit_batches, device, steps,
                                     teacher_flops)
    print("\n".join(lines))
    student_limit, lines = raw_limit(args.student, len(classes), args.image_size, limit_batches, device, steps,
                                     student_flops)
    print("\n".join(lines))
    plain, distill = our_epochs(args, paths, labels, classes, device)
    reference = reference_epoch(args, train_dir, paths, classes, device)
    strong = strong_reference_epoch(args, train_dir, paths, classes, device)
    print(f"teacher raw limit            {teacher_limit:9.1f} img/s")
    print(f"student raw limit            {student_limit:9.1f} img/s {tflops(student_limit, student_flops)}")
    print(f"ours: plain student epoch    {plain:9.1f} img/s {tflops(plain, student_flops)}")
    print(f"ours: distillation epoch     {distill:9.1f} img/s {tflops(distill, kd_flops)}")
    print(f"weak reference distillation  {reference:9.1f} img/s {tflops(reference, kd_flops)}")
    print(f"strong reference distillation{strong:9.1f} img/s {tflops(strong, kd_flops)}")
    print(f"RATIOS plain/limit={plain / student_limit:.2f} kd/plain={distill / plain:.2f} "
          f"ours/reference={distill / reference:.2f} ours/strong={distill / strong:.2f}")


if __name__ == "__main__":
    main()
