"""How wide the deployment speed measurement's spread gets on a quiet and on a busy machine (a benchmark,
not a test): the figures behind deploy.NOISY_SPREAD.

    python benchmarks/speed_noise.py [--repeats N] [--image-size PX] [--hog]

It builds the models of typical runs (untrained: speed does not depend on the weights) and measures
them `--repeats` times against the first (as teacher) with `deploy.measure_speeds` in one pass (no
re-measuring), as a run does. Per student and kind (batch-1 latency, batch-64 throughput) it prints the
relative spread of its speed-up every repeat, (q3 - q1) / median of the per-round ratios, and their median
and largest. `--hog` first starts
a second process that keeps one core busy, as another job would; the load average is printed beside.

The last line is `SPREAD hog=<on|off> load=<1-minute load average> latency_median=<x> latency_max=<y>
throughput_median=<z> throughput_max=<w>`: "quiet" means hog=off at a load average well under the core count.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model_builder  # noqa: E402
from core import compute  # noqa: E402
from results import deploy  # noqa: E402

MODELS = ("VGG16", "resnet8x4", "resnet20", "ResNet18", "mobilenet_v3_small")
HOG = "while True: pass"


def relative_spreads(repeats: int, image_size: int) -> dict[tuple[str, str], list[float]]:
    """(q3 - q1) / median of every student's per-round speed-ups (latency, throughput), once per repeat."""
    device = torch.device("cpu")
    amp_dtype = compute.resolve_amp_dtype("auto", device)
    models = {name: model_builder.build_model(name, 10, image_size).eval().to(memory_format=torch.channels_last)
              for name in MODELS}
    spreads: dict[tuple[str, str], list[float]] = {}
    for repeat in range(repeats):
        speeds = deploy.measure_speeds(models, image_size, device, amp_dtype, MODELS[0], passes=1)
        for name, speed in speeds.items():
            for kind, ((key, _, _), *_) in deploy.SPEED_KINDS.items():
                if name != MODELS[0]:
                    low, high = speed[f"{key}_iqr"]
                    spreads.setdefault((name, kind), []).append((high - low) / speed[key])
        print(f"repeat {repeat + 1}/{repeats} done (load average {os.getloadavg()[0]:.2f})", flush=True)
    return spreads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--hog", action="store_true", help="keep one core busy with a second process meanwhile")
    args = parser.parse_args()
    hog = subprocess.Popen([sys.executable, "-c", HOG]) if args.hog else None
    try:
        spreads = relative_spreads(args.repeats, args.image_size)
    finally:
        if hog is not None:
            hog.kill()
    print(f"{'model':<20}{'kind':<12}relative spread per repeat (q3 - q1) / median")
    for (name, kind), values in spreads.items():
        print(f"{name:<20}{kind:<12}" + " ".join(f"{value:.3f}" for value in values))
    summary = {kind: np.array([value for (_, k), values in spreads.items() if k == kind for value in values])
               for kind in ("latency", "throughput")}
    print(f"SPREAD hog={'on' if args.hog else 'off'} load={os.getloadavg()[0]:.2f} "
          + " ".join(f"{kind}_median={np.median(values):.3f} {kind}_max={values.max():.3f}"
                     for kind, values in summary.items()))


if __name__ == "__main__":
    main()
