"""Training speed in images per second, measured in one run on the same data (not a test).

    python benchmarks/bench_speed.py [--quick] [--data-dir DIR] [--device cpu|cuda]

1. raw limit: the teacher's and the student's forward + backward + optimizer step on synthetic
   in-memory tensors, for each layout and precision this processor supports; the best counts;
2. our plain student epoch through engine.train_one_epoch;
3. our distillation epoch through KD_engine.DistillationCriterion and the same loop;
4. a reference distillation epoch written as typical public KD code: torchvision ImageFolder,
   PIL transforms, a DataLoader with 2 workers, fp32, a per-batch teacher forward and per-batch
   `.item()` bookkeeping.

The last line is `RATIOS plain/limit=<x> kd/plain=<y> ours/reference=<z>`.
By default the data is a CIFAR-10 subset from ../shared/datasets/cifar10 when present, else the
bundled digits.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_setup  # noqa: E402
import engine  # noqa: E402
import KD_engine  # noqa: E402
import model_builder  # noqa: E402

CIFAR_DIR = ROOT.parent / "shared" / "datasets" / "cifar10"
TEMPERATURE, ALPHA = 4.0, 0.5


def subset_paths(train_dir: Path, count: int) -> tuple[list[str], list[int], list[str]]:
    """The first count/classes images of every class (deterministic), with labels and class names."""
    folder = data_setup.image_folder(train_dir)
    per_class = max(1, count // len(folder.classes))
    chosen = [s for c in range(len(folder.classes)) for s in [x for x in folder.samples if x[1] == c][:per_class]]
    return [p for p, _ in chosen], [label for _, label in chosen], folder.classes


def variants(device: torch.device) -> list[tuple[torch.dtype | None, bool]]:
    """(autocast dtype, channels_last) pairs worth trying on this device."""
    bf16 = device.type == "cuda" or engine.cpu_has_native_bf16()
    precisions = [None, torch.bfloat16] if bf16 else [None]
    return [(dtype, channels_last) for dtype in precisions for channels_last in (False, True)]


def raw_limit(arch: str, classes: int, size: int, batch: int, device: torch.device, steps: int) -> tuple[float, list[str]]:
    """Best forward+backward+step images/s over layouts and precisions, and one line per variant."""
    best, lines = 0.0, []
    for dtype, channels_last in variants(device):
        torch.manual_seed(0)
        model = model_builder.build_model(arch, classes, size).to(device)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=layout).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)
        labels = torch.randint(0, classes, (batch,), device=device)

        def step() -> None:
            with engine.autocast(device, dtype):
                loss = F.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(2):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        speed = steps * batch / (time.perf_counter() - start)
        best = max(best, speed)
        lines.append(f"  {arch:<10} {'bf16' if dtype else 'fp32'} {'channels_last' if channels_last else 'contiguous':<14} {speed:8.1f} img/s")
    return best, lines


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_epoch(run_epoch, device: torch.device) -> float:
    """Seconds of one call, after the device has finished."""
    synchronize(device)
    start = time.perf_counter()
    run_epoch()
    synchronize(device)
    return time.perf_counter() - start


def our_epochs(args, paths, labels, classes, device) -> tuple[float, float]:
    """Images/s of our plain student epoch and our distillation epoch on the decoded subset."""
    images = data_setup.decode_cached(paths, args.image_size, 2, None)
    split = data_setup.ImageTensors(images, torch.tensor(labels), paths, args.image_size)
    mean, std = data_setup.channel_stats(split, 0)
    amp = engine.resolve_amp_dtype("auto", device)
    augmentation = data_setup.Augmentation(pad=4, hflip=True)
    speeds = []
    for distill in (False, True):
        torch.manual_seed(0)
        student = model_builder.build_model(args.student, len(classes), args.image_size).to(device, memory_format=torch.channels_last)
        criterion: engine.Criterion = engine.SupervisedCriterion()
        if distill:
            teacher = model_builder.build_model(args.teacher, len(classes), args.image_size)
            criterion = KD_engine.DistillationCriterion(teacher.to(device, memory_format=torch.channels_last), TEMPERATURE, ALPHA)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        loader = data_setup.BatchLoader(split, args.batch_size, mean, std, device, augmentation, seed=0)
        warm_up = list(itertools.islice(iter(loader), 3))
        engine.train_one_epoch(student, warm_up, criterion, optimizer, classes, device, amp_dtype=amp)
        seconds = timed_epoch(lambda: engine.train_one_epoch(student, loader, criterion, optimizer, classes, device, amp_dtype=amp), device)
        speeds.append(len(split) / seconds)
    return speeds[0], speeds[1]


def reference_epoch(args, train_dir: Path, paths, classes, device) -> float:
    """Images/s of a distillation epoch written the way typical public KD repositories do it."""
    transform = transforms.Compose([
        transforms.Resize((args.image_size, args.image_size)),
        transforms.RandomCrop(args.image_size, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    ])
    folder = datasets.ImageFolder(str(train_dir), transform=transform)
    wanted = set(paths)
    subset = torch.utils.data.Subset(folder, [i for i, (p, _) in enumerate(folder.samples) if p in wanted])
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
    return len(subset) / timed_epoch(lambda: run(loader), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(CIFAR_DIR) if CIFAR_DIR.is_dir() else None,
                        help="ImageFolder root with train/ (default: the CIFAR-10 copy if present, else the digits)")
    parser.add_argument("--quick", action="store_true", help="a smaller measurement (under 3 minutes on 2 CPU cores)")
    parser.add_argument("--images", type=int, default=None, help="training images per epoch (default 640 quick, 2560 full)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--teacher", default="VGG16")
    parser.add_argument("--student", default="ResNet18")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = engine.resolve_device(args.device)
    default_images = 640 if args.quick else 2560
    if device.type == "cuda":
        default_images *= 8
    count = args.images or default_images
    steps = 5 if args.quick else 10
    train_dir = Path(args.data_dir or data_setup.bundled_digits_dir()) / "train"
    paths, labels, classes = subset_paths(train_dir, count)
    count = len(paths) - len(paths) % args.batch_size  # whole batches only: no odd-sized last step
    paths, labels = paths[:count], labels[:count]
    print(f"data: {len(paths)} images of {train_dir}, {args.image_size}px, batch {args.batch_size}, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {engine.cpu_has_native_bf16()}")
    print("raw limit (synthetic tensors, forward + backward + step):")
    teacher_limit, lines = raw_limit(args.teacher, len(classes), args.image_size, args.batch_size, device, steps)
    print("\n".join(lines))
    student_limit, lines = raw_limit(args.student, len(classes), args.image_size, args.batch_size, device, steps)
    print("\n".join(lines))
    plain, distill = our_epochs(args, paths, labels, classes, device)
    reference = reference_epoch(args, train_dir, paths, classes, device)
    print(f"teacher raw limit          {teacher_limit:8.1f} img/s")
    print(f"student raw limit          {student_limit:8.1f} img/s")
    print(f"ours: plain student epoch  {plain:8.1f} img/s")
    print(f"ours: distillation epoch   {distill:8.1f} img/s")
    print(f"reference distillation     {reference:8.1f} img/s")
    print(f"RATIOS plain/limit={plain / student_limit:.2f} kd/plain={distill / plain:.2f} ours/reference={distill / reference:.2f}")


if __name__ == "__main__":
    main()
