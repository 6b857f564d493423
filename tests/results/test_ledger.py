"""The experiments.csv ledger (results.ledger): older ledgers migrated, concurrent and torn appends."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from conftest import collapsed_run, default_config

from results import ledger


def test_an_older_ledger_is_migrated_without_losing_rows(tmp_path):
    path = tmp_path / "experiments.csv"
    old_columns = ["finished_at", "run_dir", "teacher_epochs", "kd_gain_top1", "retired_column"]
    path.write_text(",".join(old_columns) + "\n2026-01-01T00:00:00,runs/old,6,0.01,kept\n", encoding="utf-8")
    ledger.append_ledger(path, {"run_dir": "runs/new", "kd_methods": "kd,dkd", "teacher_checkpoint": "t.pth"})
    ledger.append_ledger(path, {"run_dir": "runs/newer", "kd_methods": "at"})
    with open(path, newline="", encoding="utf-8") as ledger_file:
        rows = list(csv.DictReader(ledger_file))
    assert [row["run_dir"] for row in rows] == ["runs/old", "runs/new", "runs/newer"]
    assert rows[0]["teacher_epochs"] == "6" and rows[0]["retired_column"] == "kept" and rows[0]["kd_methods"] == ""
    assert rows[1]["kd_methods"] == "kd,dkd" and rows[1]["teacher_checkpoint"] == "t.pth"
    assert set(ledger.LEDGER_COLUMNS) <= set(rows[0])


def test_a_ledger_cut_mid_row_does_not_fuse_with_the_next_row(tmp_path):
    path = tmp_path / "experiments.csv"
    for index in range(2):
        ledger.append_ledger(path, {"finished_at": f"2026-12-07T05:0{index}:00", "run_dir": f"runs/r{index}"})
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.rindex(b"runs/r1") - 5])  # the crash: half of the second row, no newline
    ledger.append_ledger(path, {"finished_at": "2026-12-07T05:08:37", "run_dir": "runs/r2"})
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [row["finished_at"] for row in rows] == ["2026-12-07T05:00:00", "2026-12-07T05:0", "2026-12-07T05:08:37"]
    assert rows[-1]["run_dir"] == "runs/r2" and rows[0]["run_dir"] == "runs/r0"


def test_concurrent_ledger_appends_keep_whole_rows(tmp_path):
    from multiprocessing import Pool

    path = tmp_path / "experiments.csv"
    with Pool(4) as pool:
        pool.starmap(ledger.append_ledger, [(path, {"run_dir": f"run{i}", "alpha": i}) for i in range(40)])
    with open(path, newline="", encoding="utf-8") as ledger_file:
        rows = list(csv.DictReader(ledger_file))
    assert sorted(r["run_dir"] for r in rows) == sorted(f"run{i}" for i in range(40))
    assert path.read_text().count("finished_at") == 1  # one header


def test_a_two_seed_run_is_recorded_with_its_pooled_gain_and_verdict():
    summary, _ = collapsed_run(share=0.6, top1=0.80)
    summary.seeds, summary.kd_gain_top1 = [0, 1], 0.1046  # the first seed's, against a collapsed baseline
    kd = summary.models["student_kd"]
    kd.gain_top1_mean, kd.gain_significant = 0.0473, False
    kd.test_top1_by_seed = {"0": 0.80, "1": 0.78}
    summary.models["student_baseline"].test_top1_by_seed = {"0": 0.5425, "1": 0.8483}  # seed 0's at chance
    row = ledger.ledger_row(default_config(seeds="0,1"), summary, Path("runs/two"))
    assert row["kd_gain_top1"] == 0.0473 and row["kd_gain_significant"] is False
    assert row["kd_collapsed_seeds"] == "seed 0's baseline"


def test_a_run_at_its_references_loss_weights_says_so_where_alpha_stands():
    summary, _ = collapsed_run(share=0.6, top1=0.80)
    assert ledger.ledger_row(default_config(alpha=0.1), summary, Path("runs/a"))["alpha"] == 0.1
    row = ledger.ledger_row(default_config(alpha=0.1, loss_weights="reference"), summary, Path("runs/r"))
    assert row["alpha"] == "reference", "no student's loss used --alpha 0.1"
