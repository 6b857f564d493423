"""Per-image results and the skipped-files log (results.evaluation)."""

from __future__ import annotations

import pytest
import torch
from conftest import RoundedByBf16, log_entry

import utils
from core import errors
from results import evaluation, report


def test_a_file_name_holding_a_newline_cannot_fake_lines_of_the_skipped_files_log(tmp_path, capsys):
    from results import evaluation

    faked = "photo.jpg: not a readable image\n/data/cat/secret.jpg"
    skipped = [{"path": str(tmp_path / faked), "reason": "not a readable image (unknown format)"},
               {"path": str(tmp_path / "it's \"quoted\" ø.png"), "reason": "truncated image\n(line two)"}]
    evaluation.write_skipped_files(tmp_path, skipped)
    lines = (tmp_path / "skipped_files.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    for line, entry in zip(lines, skipped, strict=True):
        assert log_entry(line) == (entry["path"], " ".join(entry["reason"].split()))
    assert "Skipped 2 unreadable files" in capsys.readouterr().out


def test_per_image_results_are_read_back_for_mcnemar(tmp_path):
    utils.write_json(tmp_path / report.RESULTS, {"model": "student_kd", "test_correct": "0110"})
    assert evaluation.read_test_correct(tmp_path).tolist() == [False, True, True, False]
    utils.write_json(tmp_path / report.RESULTS, {"model": "student_kd"})  # finished by an earlier version
    with pytest.raises(errors.SettingsError, match="delete it to train that model again"):
        evaluation.read_test_correct(tmp_path)


def test_the_reported_test_figures_are_the_saved_fp32_models_and_bf16_ones_are_kept_beside(capsys):
    batches = [(torch.ones(4, 3, 2, 2), torch.ones(4, dtype=torch.long))]
    deployed, autocast = evaluation.test_outputs(RoundedByBf16(), batches, torch.device("cpu"), torch.bfloat16, "m")
    assert utils.predicted_classes(deployed[0]).tolist() == [1, 1, 1, 1], "fp32: as prediction_for_one.py gives"
    assert utils.predicted_classes(autocast[0]).tolist() == [0, 0, 0, 0]
    deployed, autocast = evaluation.test_outputs(RoundedByBf16(), batches, torch.device("cpu"), None, "m")
    assert autocast is None and utils.predicted_classes(deployed[0]).tolist() == [1, 1, 1, 1]
