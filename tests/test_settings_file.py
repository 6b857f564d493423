"""--config files (YAML and JSON, a run's own config.json) and a --help a user can act on."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import assert_one_sentence_exit_2

import experiment
import utils
from config import command_line, settings

SETTINGS = {"teacher_epochs": 3, "student_lr": 1e-4, "decode_cache": False, "data_dir": None, "seeds": "0,1",
            "select_metric": "f1_macro", "patience": 2}


def settings_of(argv: list[str]) -> dict:
    """The Config fields the command line would run with."""
    _, args, _ = command_line.parse_command_line(argv, experiment.default_config())
    return {key: args[key] for key in settings.Config.__dataclass_fields__}


def test_a_runs_config_json_repeats_its_settings_in_a_new_folder(tiny_run):
    saved = utils.read_json(tiny_run / "config.json")
    assert {"resolved", "dataset", "output_dir"} <= saved.keys()
    repeated = settings_of(["--config", str(tiny_run / "config.json")])
    assert repeated == {**{key: saved[key] for key in settings.Config.__dataclass_fields__}, "output_dir": None}


def test_flags_beside_a_config_file_override_it(tiny_run):
    saved = utils.read_json(tiny_run / "config.json")
    settings = settings_of(["--config", str(tiny_run / "config.json"), "--alpha", "0.3", "--decode-cache",
                            "--output-dir", "elsewhere"])
    assert settings["alpha"] == 0.3 and saved["alpha"] == 0.5
    assert settings["decode_cache"] is True and settings["output_dir"] == "elsewhere"
    assert settings["teacher_epochs"] == saved["teacher_epochs"] == 2


def test_yaml_and_json_give_the_same_settings(tmp_path):
    # YAML reads 1e-4 (no dot) as text: it is converted as the flag's text would be. Dashes work as in flags.
    (tmp_path / "settings.yaml").write_text("teacher-epochs: 3\nstudent_lr: 1e-4\ndecode_cache: false\n"
                                            "data_dir: null\nseeds: 0,1\nselect_metric: f1_macro\npatience: 2\n")
    (tmp_path / "settings.json").write_text(json.dumps(SETTINGS))
    from_yaml = settings_of(["--config", str(tmp_path / "settings.yaml")])
    assert from_yaml == settings_of(["--config", str(tmp_path / "settings.json")])
    assert {key: from_yaml[key] for key in SETTINGS} == SETTINGS
    defaults = settings_of([])
    assert all(from_yaml[key] == defaults[key] for key in from_yaml if key not in SETTINGS)


def test_on_and_off_read_as_booleans_by_yaml_stay_the_words(tmp_path):
    (tmp_path / "settings.yaml").write_text("compile: off\nhflip: on\n")
    (tmp_path / "settings.json").write_text(json.dumps({"compile": True, "hflip": False}))  # an older config.json
    assert {key: settings_of(["--config", str(tmp_path / "settings.yaml")])[key] for key in ("compile", "hflip")} == \
        {"compile": "off", "hflip": "on"}
    assert {key: settings_of(["--config", str(tmp_path / "settings.json")])[key] for key in ("compile", "hflip")} == \
        {"compile": "on", "hflip": "off"}


@pytest.mark.parametrize("name, text, message", [
    ("s.yaml", "teacher_epoch: 3\n", "unknown setting 'teacher_epoch' (the closest valid one is 'teacher_epochs')"),
    ("s.yaml", "temprature: 3\n", "unknown setting 'temprature' (the closest valid one is 'temperature')"),
    ("s.yaml", "student_epochs: ten\n", "student_epochs must be an integer (got 'ten')"),
    ("s.yaml", "student_epochs: 2.5\n", "student_epochs must be an integer (got 2.5)"),
    ("s.json", '{"alpha": "high"}', "alpha must be a number (got 'high')"),
    ("s.json", '{"alpha": true}', "alpha must be a number (got True)"),
    ("s.yaml", "compile: sometimes\n", "compile must be one of auto, on, off (got 'sometimes')"),
    ("s.yaml", "optimizer: adam\n", "optimizer must be one of adamw, sgd (got 'adam')"),
    ("s.yaml", "teacher_epochs: null\n", "teacher_epochs must have a value"),
    ("s.yaml", "- 1\n- 2\n", "must hold a mapping of setting names to values, not a list"),
    ("s.yaml", "alpha: [\n", "is not valid YAML"),
    ("s.json", "{", "is not valid JSON"),
    ("s.yaml", "resume: runs/x\n", "unknown setting 'resume'"),
])
def test_bad_config_files_exit_2_with_one_sentence(name, text, message, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    code = experiment.main(["--config", str(path), "--output-dir", str(tmp_path / "run")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, str(path), message)
    assert not (tmp_path / "run").exists()


def test_a_missing_config_file_and_config_with_resume_are_refused(tmp_path, capsys):
    code = experiment.main(["--config", str(tmp_path / "none.yaml")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "Cannot read settings file")
    (tmp_path / "s.yaml").write_text("alpha: 0.3\n")
    code = experiment.main(["--config", str(tmp_path / "s.yaml"), "--resume", str(tmp_path)])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "leave out --config")


def test_every_flag_has_a_help_text_and_shows_its_default_once():
    parser = command_line.command_line_parser(experiment.default_config())
    formatter = parser._get_formatter()
    flags = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert {action.dest for action in flags} >= set(settings.Config.__dataclass_fields__)
    for action in flags:
        assert action.help, action.option_strings
        text = formatter._expand_help(action)
        assert text.count("(default:") == 1 and "(default: None)" not in text, (action.option_strings, text)
    help_text = " ".join(parser.format_help().split())
    assert "--output-dir OUTPUT_DIR run directory (default: runs/<timestamp>)" in help_text
    for example in ("--teacher-weights DEFAULT", "--batch-size 512", "--teacher-epochs 1 --student-epochs 1",
                    "--config runs/<run>/config.json"):
        assert example in help_text


def test_resume_of_a_run_saved_before_a_setting_existed_uses_its_default(tiny_run, tmp_path):
    saved = utils.read_json(tiny_run / "config.json")
    older = {key: value for key, value in saved.items() if key not in ("patience", "label_smoothing")}
    older["compile"] = False  # before --compile auto it was a switch
    utils.write_json(tmp_path / "config.json", older)
    parser, args, _ = command_line.parse_command_line([], experiment.default_config())
    for key in ("report_only", "resume", "config"):
        args.pop(key)
    config = command_line.resumed_config(str(tmp_path), args, parser)
    assert config.patience is None and config.label_smoothing == 0.0 and config.compile == "off"
    assert config.output_dir == str(tmp_path) and config.teacher_epochs == saved["teacher_epochs"]
