"""experiment.py's settings: the constants at its top are the defaults."""

from __future__ import annotations

import shutil

import pytest
from conftest import SMALL_MODELS, TINY_FLAGS, assert_one_sentence_exit_2, class_folders_only

import experiment
from config import command_line


def test_constants_at_the_top_are_the_defaults(monkeypatch, tiny_data):
    monkeypatch.setattr(experiment, "DATA_DIR", str(tiny_data))
    monkeypatch.setattr(experiment, "STUDENT_EPOCHS", 5)
    monkeypatch.setattr(experiment, "T", 7.5)
    args = command_line.build_parser(experiment.default_config()).parse_args([])
    assert args.data_dir == str(tiny_data) and args.student_epochs == 5 and args.temperature == 7.5
    assert command_line.build_parser(experiment.default_config()).parse_args(["--temperature", "2"]).temperature == 2.0


@pytest.mark.parametrize(("method", "why"), [("dkd", "NCKD is always zero"), ("dist_ls", "only a sign")])
def test_a_method_that_breaks_down_on_two_classes_is_refused_by_name_before_training(tmp_path, capsys, method, why):
    two_classes = class_folders_only(tmp_path / "data", 8)
    shutil.rmtree(two_classes / "stripes")
    code = experiment.main(["--data-dir", str(two_classes), "--output-dir", str(tmp_path / "run"),
                            "--kd-methods", f"kd,{method}", *SMALL_MODELS, *TINY_FLAGS])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, f"--kd-methods {method} needs at least 3 classes", why)
    assert not list((tmp_path / "run").rglob("*.pth"))  # nothing trained
