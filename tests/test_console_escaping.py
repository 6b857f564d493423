"""Class names come from files a user may have been sent: each printed to a terminal, or written to a CSV or text
file, is escaped (control characters shown as escapes, a leading formula character quoted for spreadsheets), and
a model file's description is refused when its names are empty, repeated or huge, its std is near zero or below
it, or its image size is out of range."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from conftest import assert_one_sentence_exit_2
from test_hostile_data import small_model_files  # noqa: F401  (a fixture)

import prediction_for_one
import utils
from training import checkpoints

HOSTILE_NAMES = ["\x1b[2Jcleared", "ok\nerror: fake line", '=HYPERLINK("http://x.example","click")']


def hostile_checkpoint(small_model_files, names: list[str]) -> tuple:  # noqa: F811
    description, _, folder = small_model_files
    path = folder / f"hostile_{len(names[0])}.pth"
    checkpoints.save_checkpoint(path, {**description, "class_names": names})
    return path, folder / "image.png"


def test_class_names_printed_to_the_console_are_escaped(small_model_files, capsys):  # noqa: F811
    path, image = hostile_checkpoint(small_model_files, HOSTILE_NAMES)
    assert prediction_for_one.main(["--model", str(path), str(image), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2Jcleared" in out
    assert not any(line.startswith("error:") for line in out.splitlines()) and "ok\\nerror: fake line" in out


@pytest.mark.parametrize("formula", ['=HYPERLINK("http://x.example","click")', "@SUM(A1:A9)", "+1+2", "-2+3"])
def test_a_csv_cell_a_spreadsheet_would_run_is_quoted(small_model_files, tmp_path, formula):  # noqa: F811
    path, image = hostile_checkpoint(small_model_files, [formula, "\x1b[2Jcleared", "b"])
    target = tmp_path / "predictions.csv"
    assert prediction_for_one.main(["--model", str(path), str(image), "--top-k", "3", "--csv", str(target)]) == 0
    rows = list(csv.reader(io.StringIO(target.read_text())))
    classes = {cell for row in rows[1:] for cell in row[1:-1:2]}
    assert classes == {"'" + formula, "\\x1b[2Jcleared", "b"}, classes


def test_the_classification_report_file_escapes_class_names():
    text = utils.report_text(torch.eye(3), torch.tensor([0, 1, 2]), ["\x1b[31mred", "a\nb", "c"])
    assert "\x1b" not in text and "\\x1b[31mred" in text and "a\\nb" in text
    assert len(text.splitlines()) == len(utils.report_text(torch.eye(3), torch.tensor([0, 1, 2]),
                                                           ["x", "y", "z"]).splitlines())


@pytest.mark.parametrize("change, message", [
    ({"class_names": ["a", "a", "b"]}, "its 'class_names' must be a non-empty list of distinct, non-empty"),
    ({"class_names": ["a", "", "b"]}, "its 'class_names' must be a non-empty list of distinct, non-empty"),
    ({"class_names": ["a", "  ", "b"]}, "its 'class_names' must be a non-empty list of distinct, non-empty"),
    ({"class_names": ["a", "x" * 10_000_000, "b"]}, "class names of at most 255 characters, not ['a', 'xxx"),
    ({"std": [1e-300] * 3}, "its 'std' must be a list of 3 finite positive numbers (at least 0.001)"),
    ({"std": [-0.25, 0.25, 0.25]}, "its 'std' must be a list of 3 finite positive numbers"),
    ({"image_size": 7}, "its 'image_size' must be an integer from 8 to 1024"),
    ({"image_size": 0}, "its 'image_size' must be an integer from 8 to 1024"),
])
def test_a_description_with_unusable_names_std_or_size_is_refused(small_model_files, capsys, change,  # noqa: F811
                                                                  message):
    description, _, folder = small_model_files
    path = folder / "refused.pth"
    checkpoints.save_checkpoint(path, {**description, **change})
    code = prediction_for_one.main(["--model", str(path), str(folder / "image.png")])
    line = assert_one_sentence_exit_2(code, capsys.readouterr().err, message)
    assert len(line) < 400
