"""Do two finished runs give the same results? For checking that a change to the code kept its behaviour.

Usage: python benchmarks/compare_runs.py RUN_A RUN_B

Compares, model by model, which test images each classified correctly (results.json
`test_correct`), then config.json and summary.json with what differs from one sitting to the next
left out: paths, times, timestamps and speed measurements. Prints every difference and, last,
`SAME` or `DIFFERENT`; exits 0 when the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# Keys whose values depend on where and when a run sat, not on what it computed.
VOLATILE = {"output_dir", "run_dir", "train_seconds", "wall_seconds", "finished_at", "seconds", "latency_ms",
            "latency_ms_iqr", "throughput_img_s", "throughput_img_s_iqr", "speedup_over_teacher", "speedup_clear",
            "reused_from", "file", "onnx", "wall_seconds_last_sitting"}


def volatile(key: str) -> bool:
    """Whether a key's value depends on where and when a run sat (speeds and their verdicts included)."""
    return key in VOLATILE or key.startswith(("throughput_", "latency_"))


def stable(value: Any) -> Any:
    """`value` without its volatile keys, at every depth."""
    if isinstance(value, dict):
        return {key: stable(item) for key, item in value.items() if not volatile(key)}
    if isinstance(value, list):
        return [stable(item) for item in value]
    return value


def differences(first: Any, second: Any, where: str) -> list[str]:
    """Every place two JSON values differ, as 'where: a != b'."""
    if isinstance(first, dict) and isinstance(second, dict):
        found = []
        for key in sorted(set(first) | set(second)):
            if key not in first or key not in second:
                found.append(f"{where}.{key}: only in {'the first' if key in first else 'the second'}")
            else:
                found += differences(first[key], second[key], f"{where}.{key}")
        return found
    if isinstance(first, list) and isinstance(second, list) and len(first) == len(second):
        return [line for index, (a, b) in enumerate(zip(first, second, strict=True))
                for line in differences(a, b, f"{where}[{index}]")]
    return [] if first == second else [f"{where}: {json.dumps(first)[:80]} != {json.dumps(second)[:80]}"]


def results_files(run: Path) -> dict[str, Path]:
    """Every model's results.json in a run, by its folder relative to the run."""
    return {str(path.parent.relative_to(run)): path for path in sorted(run.rglob("results.json"))}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    first, second = (Path(path) for path in argv)
    found = []
    models_first, models_second = results_files(first), results_files(second)
    if models_first.keys() != models_second.keys():
        found.append(f"models differ: {sorted(models_first)} vs {sorted(models_second)}")
    for model in sorted(models_first.keys() & models_second.keys()):
        correct = [json.loads(models[model].read_text())["test_correct"] for models in (models_first, models_second)]
        same = correct[0] == correct[1]
        print(f"{model}: test_correct {'identical' if same else 'DIFFERENT'} ({len(correct[0])} images, "
              f"{correct[0].count('1')} and {correct[1].count('1')} right)")
        if not same:
            found.append(f"{model}: test_correct differs")
    for name in ("config.json", "summary.json"):
        contents = [stable(json.loads((run / name).read_text())) for run in (first, second)]
        lines = differences(contents[0], contents[1], name)
        print(f"{name}: {'identical apart from paths, times and speeds' if not lines else f'{len(lines)} differences'}")
        found += lines
    for line in found:
        print("  " + line)
    print("SAME" if not found else "DIFFERENT")
    return 0 if not found else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
