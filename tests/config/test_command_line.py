"""The command line (config.command_line): settings files beside flags, YAML and JSON alike, help texts, the
--compile choices and a flag typo's one line."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import default_config, settings_of

import experiment
from config import command_line, settings
from core import errors


def test_a_flag_typo_names_the_closest_flag_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        command_line.parse_command_line(["--studnet-model", "resnet8"], experiment.default_config())
    error = capsys.readouterr().err
    assert stop.value.code == 2
    assert error == ("experiment.py: error: unknown flag --studnet-model (did you mean --student-model?) "
                     "(python experiment.py --help lists every flag)\n")



def test_a_prefix_of_a_flag_is_not_taken_for_it(capsys):
    with pytest.raises(SystemExit) as stop:
        command_line.parse_command_line(["--student-epoch", "3"], experiment.default_config())
    assert stop.value.code == 2
    assert "unknown flag --student-epoch (did you mean --student-epochs?)" in capsys.readouterr().err


def test_a_bad_item_of_kd_methods_is_named():
    with pytest.raises(errors.SettingsError, match="--kd-methods: 'dkdd' is not a method"):
        settings.kd_methods(default_config(kd_methods="kd,dkdd"))


SETTINGS = {"teacher_epochs": 3, "student_lr": 1e-4, "decode_cache": False, "data_dir": None, "seeds": "0,1",
            "select_metric": "f1_macro", "patience": 2}


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


def test_compile_flag_is_tri_state():
    parser = command_line.build_parser(experiment.default_config())
    assert parser.parse_args([]).compile == "auto"
    assert parser.parse_args(["--compile"]).compile == "on"
    assert parser.parse_args(["--compile", "off"]).compile == "off"


def test_a_settings_file_can_hold_the_sweep(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep: temperature=1:10:log,alpha=0.1:0.9\ntrials: 12\nstudy_name: kd-sweep\n")
    _, args, given = command_line.parse_command_line(["--config", str(path)], experiment.default_config())
    assert (args["sweep"], args["trials"], args["study_name"]) == ("temperature=1:10:log,alpha=0.1:0.9", 12, "kd-sweep")
    assert {"sweep", "trials", "study_name"} <= given
