"""Files the program writes, left broken by a crash or a refusal: a ledger cut mid-row, a summary.json cut in
half, a checkpoint's temporary file left by SIGKILL, a study refused after its folder was made; and study names
that are plain names."""

from __future__ import annotations

import csv
import io

from results import report


def test_a_ledger_cut_mid_row_does_not_fuse_with_the_next_row(tmp_path):
    ledger = tmp_path / "experiments.csv"
    for index in range(2):
        report.append_ledger(ledger, {"finished_at": f"2026-12-07T05:0{index}:00", "run_dir": f"runs/r{index}"})
    whole = ledger.read_bytes()
    ledger.write_bytes(whole[: whole.rindex(b"runs/r1") - 5])  # the crash: half of the second row, no newline
    report.append_ledger(ledger, {"finished_at": "2026-12-07T05:08:37", "run_dir": "runs/r2"})
    rows = list(csv.DictReader(io.StringIO(ledger.read_text())))
    assert [row["finished_at"] for row in rows] == ["2026-12-07T05:00:00", "2026-12-07T05:0", "2026-12-07T05:08:37"]
    assert rows[-1]["run_dir"] == "runs/r2" and rows[0]["run_dir"] == "runs/r0"
