"""The guide's pictures: the top of a run's report.html, or a served page (the MLflow UI), in headless Chromium.

    python docs/screenshot.py RUN/report.html [--output docs/images/report_top.png] [--width 1200] [--height 900]
    python docs/screenshot.py "http://127.0.0.1:5000/#/compare-runs?runs=[...]" --wait-ms 20000 \
        --output docs/images/mlflow_compare.png     (the MLflow UI of docs/tracking.md, served by `mlflow ui`)

Refresh the report's from a run of the README's first command (`python experiment.py`, the bundled digits), the
MLflow one from two real runs with --track mlflow compared in `mlflow ui` (docs/tracking.md). Chromium
opens the self-contained report from disk (it fetches nothing) with a fresh profile, no sandbox (so it also
runs as root in a container) and no background networking; the PNG is then reduced to 256 colours, which
keeps it small enough for the repository, and written atomically.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")
TIMEOUT_S = 120  # a report page renders in seconds; a browser that hangs should not hold the shell


def find_browser() -> str:
    """The path of an installed Chromium (or Chrome)."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path is not None:
            return path
    raise FileNotFoundError(f"no Chromium found (looked for {', '.join(BROWSERS)}): install one, e.g. "
                            "apt-get install chromium")


def capture(page: str, width: int, height: int, wait_ms: int = 0) -> Image.Image:
    """The first `height` pixels at `width` of the page at URL `page`, as Chromium renders them once its scripts
    have run for `wait_ms` of the browser's virtual time (a single-page app such as the MLflow UI needs it)."""
    with tempfile.TemporaryDirectory() as scratch:
        png = Path(scratch) / "shot.png"
        command = [find_browser(), *CHROMIUM_FLAGS, f"--user-data-dir={Path(scratch) / 'profile'}",
                   f"--screenshot={png}", f"--window-size={width},{height}",
                   *([f"--virtual-time-budget={wait_ms}"] if wait_ms else []), page]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        if not png.is_file():
            raise RuntimeError(f"Chromium wrote no screenshot (exit {finished.returncode}): "
                               f"{finished.stderr.strip()[-400:]}")
        with Image.open(png) as shot:
            return shot.convert("RGB")


def save_small(image: Image.Image, output: Path) -> int:
    """Write `image` as a 256-colour PNG, atomically; returns its size in bytes."""
    with utils.atomic_path(output) as temporary:
        image.quantize(colors=256, dither=Image.Dither.NONE).save(temporary, format="PNG", optimize=True)
    return output.stat().st_size


def main(argv: list[str] | None = None) -> int:
    """Take the screenshot; exit 2 with one sentence when the report or a browser is missing."""
    parser = argparse.ArgumentParser(description="Screenshot the top of a run's report.html for the README.")
    parser.add_argument("report", help="a run's report.html, or a served page's http:// URL")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images" / "report_top.png",
                        help="the PNG to write (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1200, help="window width in pixels (default: %(default)s)")
    parser.add_argument("--height", type=int, default=900, help="window height in pixels (default: %(default)s)")
    parser.add_argument("--wait-ms", type=int, default=0, help="let the page's scripts run this long before the "
                        "picture (the MLflow UI: 20000; default: %(default)s)")
    args = parser.parse_args(argv)
    served = args.report.startswith(("http://", "https://"))
    if not served and not Path(args.report).is_file():
        print(f"error: no report at '{args.report}': give a run's report.html.", file=sys.stderr)
        return 2
    try:
        page = args.report if served else Path(args.report).resolve().as_uri()
        size = save_small(capture(page, args.width, args.height, args.wait_ms), args.output)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {args.output} ({size / 1024:.0f} KB, {args.width}x{args.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
