"""The ledger of runs: one CSV row per finished run (what was run, with which key settings, how it scored),
appended under a lock so runs finishing at once never lose a row.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
from pathlib import Path
from typing import Any

import utils
from config import settings
from core import records
from methods import base
from results import significance
from sweep import findings

LEDGER_ROLES = (records.TEACHER, records.BASELINE, records.distilled_role("kd"))  # each has its own top-1 column
LEDGER_COLUMNS = [
    "finished_at", "run_dir", "dataset", "teacher_model", "student_model", "teacher_checkpoint", "teacher_epochs",
    "student_epochs", "optimizer", "teacher_lr", "student_lr", "kd_methods", "temperature", "alpha", "batch_size",
    "image_size", "seed", "seeds", *(f"{role}_top1" for role in LEDGER_ROLES), "distilled_top1", "kd_gain_top1",
    "kd_gain_significant", "kd_collapsed_seeds", "best_method", "tied_with_best", "wall_seconds",
    "wall_seconds_last_sitting", "sweep",
]


def _kd_gain(summary: records.RunSummary) -> dict[str, Any]:
    """KD's gain over the baseline and its verdict: over several seeds the pooled ones (the mean gain, the
    interval's verdict), as summary.json, the console and the report lead with them; else the one seed's."""
    headline = significance.headline_gain(summary.models, summary.dataset)
    if not headline:
        return {"kd_gain_top1": None, "kd_gain_significant": None, "kd_collapsed_seeds": None}
    return {"kd_gain_top1": round(headline["kd_gain_top1"], 6), "kd_gain_significant": headline["kd_gain_significant"],
            "kd_collapsed_seeds": "; ".join(headline["kd_collapsed_seeds"] or [])}


def _best_group(comparisons: records.Comparisons | None) -> dict[str, str]:
    """The head-to-head ranking's best method and the methods tied with it (space-separated, the best first);
    empty for a run without comparisons (fewer than two distilled students)."""
    if comparisons is None:
        return {"best_method": "", "tied_with_best": ""}
    return {"best_method": records.method_of(comparisons.ranking[0].role),
            "tied_with_best": " ".join(map(records.method_of, comparisons.tied_with_best))}


def ledger_row(config: settings.Config, summary: records.RunSummary, run_dir: Path) -> dict[str, Any]:
    """One line of the runs ledger: what was run, with which key settings, and how it scored."""
    dataset = "bundled digits" if settings.is_bundled(config) else (config.data_dir or config.train_dir)
    models = summary.models
    distilled = [role for role in models if records.is_distilled(role)]
    return {
        "finished_at": summary.finished_at, "run_dir": str(run_dir), "dataset": dataset,
        **{key: getattr(config, key) for key in ("teacher_model", "student_model", "student_epochs", "optimizer",
                                                  "student_lr", "temperature", "alpha", "batch_size", "image_size",
                                                  "seed")},
        # Under --loss-weights reference no student's loss uses --alpha: each has its reference's weights.
        **({"alpha": base.REFERENCE_MIX} if config.loss_weights == base.REFERENCE_MIX else {}),
        # A reused teacher was not trained in this run: its checkpoint stands where its training settings would.
        "teacher_checkpoint": config.teacher_checkpoint or "",
        "teacher_epochs": "" if config.teacher_checkpoint else config.teacher_epochs,
        "teacher_lr": "" if config.teacher_checkpoint else config.teacher_lr,
        "kd_methods": ",".join(settings.kd_methods(config)), "seeds": ",".join(map(str, settings.seeds(config))),
        **{f"{role}_top1": round(models[role].test["top1"], 6) if role in models else None for role in LEDGER_ROLES},
        "distilled_top1": " ".join(f"{records.method_of(role)}={models[role].test['top1']:.6f}" for role in distilled),
        **_kd_gain(summary),
        **_best_group(summary.comparisons),
        "wall_seconds": summary.wall_seconds,  # every sitting of a resumed run
        "wall_seconds_last_sitting": (summary.wall_seconds if summary.wall_seconds_last_sitting is None
                                      else summary.wall_seconds_last_sitting),
        # A sweep's row: the settings above are its best trial's.
        "sweep": "" if summary.sweep is None else findings.ledger_text(summary.sweep),
    }


def append_ledger(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row to a CSV ledger, writing the header first when the file is new.

    A ledger written by an older version, with fewer columns, is migrated: its header gains the
    missing columns (its own columns, even unknown ones, keep their values), rewritten atomically.
    An exclusive lock on a companion `.lock` file makes runs finishing at once append whole rows,
    one after the other, and never lose one to a migration. A run has one row: a resumed run that
    published before (its summary.json was damaged) replaces its row.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            header: list[str] = []
            if path.is_file() and path.stat().st_size:
                with open(path, encoding="utf-8", newline="") as ledger:
                    header = next(csv.reader(ledger), [])
            columns = header + [column for column in LEDGER_COLUMNS if column not in header]
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
            if header and columns == header and _ends_whole(path) and not _holds_run(path, row):  # else rewritten
                writer.writerow({k: row.get(k, "") for k in columns})
                _append_durably(path, buffer.getvalue())
                return
            rows = []
            if header:
                with open(path, encoding="utf-8", newline="") as ledger:  # a rebuilt run's older row gives way
                    rows = [old for old in csv.DictReader(ledger) if old.get("run_dir") != row.get("run_dir")]
            writer.writeheader()
            writer.writerows(rows + [{k: row.get(k, "") for k in columns}])
            utils.write_text(path, buffer.getvalue())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _holds_run(path: Path, row: dict[str, Any]) -> bool:
    """Whether the ledger has a row of `row`'s run directory already (a run whose summary.json was rebuilt):
    a run has one row."""
    with open(path, encoding="utf-8", newline="") as ledger:
        return any(old.get("run_dir") == row.get("run_dir") for old in csv.DictReader(ledger))


def _ends_whole(path: Path) -> bool:
    """Whether a ledger's last row is whole: a crash during an append can leave half a row without its newline,
    which the next row appended would fuse with (then the ledger is rewritten, the fragment a row of its own)."""
    with open(path, "rb") as ledger:
        ledger.seek(-1, os.SEEK_END)
        return ledger.read(1) == b"\n"


def _append_durably(path: Path, text: str) -> None:
    """Append text to a file and wait until it is on disk."""
    with open(path, "a", encoding="utf-8", newline="") as ledger:
        ledger.write(text)
        ledger.flush()
        os.fsync(ledger.fileno())
