"""experiment.py's settings: the constants at its top are the defaults."""

from __future__ import annotations

import experiment
from config import command_line


def test_constants_at_the_top_are_the_defaults(monkeypatch, tiny_data):
    monkeypatch.setattr(experiment, "DATA_DIR", str(tiny_data))
    monkeypatch.setattr(experiment, "STUDENT_EPOCHS", 5)
    monkeypatch.setattr(experiment, "T", 7.5)
    args = command_line.build_parser(experiment.default_config()).parse_args([])
    assert args.data_dir == str(tiny_data) and args.student_epochs == 5 and args.temperature == 7.5
    assert command_line.build_parser(experiment.default_config()).parse_args(["--temperature", "2"]).temperature == 2.0
