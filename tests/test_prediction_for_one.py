"""prediction_for_one on small untrained models: bad images and checkpoints, descriptions that cannot be used,
escaped class names, and its help."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest
import torch
from conftest import BAD_DESCRIPTIONS, _bad_images, assert_one_sentence_exit_2
from PIL import Image

import prediction_for_one
from core import errors
from training import checkpoints

HOSTILE_NAMES = ["\x1b[2Jcleared", "ok\nerror: fake line", '=HYPERLINK("http://x.example","click")']


def hostile_checkpoint(small_model_files, names: list[str]) -> tuple:
    description, _, folder = small_model_files
    path = folder / f"hostile_{len(names[0])}.pth"
    checkpoints.save_checkpoint(path, {**description, "class_names": names})
    return path, folder / "image.png"


def test_class_names_printed_to_the_console_are_escaped(small_model_files, capsys):
    path, image = hostile_checkpoint(small_model_files, HOSTILE_NAMES)
    assert prediction_for_one.main(["--model", str(path), str(image), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2Jcleared" in out
    assert not any(line.startswith("error:") for line in out.splitlines()) and "ok\\nerror: fake line" in out


@pytest.mark.parametrize("formula", ['=HYPERLINK("http://x.example","click")', "@SUM(A1:A9)", "+1+2", "-2+3"])
def test_a_csv_cell_a_spreadsheet_would_run_is_quoted(small_model_files, tmp_path, formula):
    path, image = hostile_checkpoint(small_model_files, [formula, "\x1b[2Jcleared", "b"])
    target = tmp_path / "predictions.csv"
    assert prediction_for_one.main(["--model", str(path), str(image), "--top-k", "3", "--csv", str(target)]) == 0
    rows = list(csv.reader(io.StringIO(target.read_text())))
    classes = {cell for row in rows[1:] for cell in row[1:-1:2]}
    assert classes == {"'" + formula, "\\x1b[2Jcleared", "b"}, classes


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
def test_a_description_with_unusable_names_std_or_size_is_refused(small_model_files, capsys, change,
                                                                  message):
    description, _, folder = small_model_files
    path = folder / "refused.pth"
    checkpoints.save_checkpoint(path, {**description, **change})
    code = prediction_for_one.main(["--model", str(path), str(folder / "image.png")])
    line = assert_one_sentence_exit_2(code, capsys.readouterr().err, message)
    assert len(line) < 400


def test_each_bad_image_alone_is_one_clear_line_and_exit_1(checkpoint, tmp_path, capsys):
    for image, reason in _bad_images(tmp_path / "bad").items():
        assert prediction_for_one.main(["--model", str(checkpoint), "--json", image]) == 1
        captured = capsys.readouterr()
        assert json.loads(captured.out)[0]["image"] == image
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and image in lines[0] and reason in lines[0]


def test_bad_checkpoints_are_one_clear_line_and_exit_2(checkpoint, good_images, tmp_path, capsys):
    image = good_images[0]
    assert prediction_for_one.main(["--model", str(checkpoint), image]) == 0  # the intact one works
    assert "circle" in capsys.readouterr().out
    data = checkpoint.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    wrong = torch.load(checkpoint, weights_only=True)
    wrong["state_dict"] = {key: value[..., :1] if value.dim() else value for key, value in wrong["state_dict"].items()}
    torch.save(wrong, tmp_path / "wrong shapes.pth")
    (tmp_path / "a folder.pth").mkdir()
    cases = {"missing.pth": "does not exist", "truncated.pth": "damaged, truncated",
             "random.pth": "damaged, truncated", "empty.pth": "damaged, truncated", "foreign.pth": "lacks 'arch'",
             "tensor.pth": "holds a Tensor", "wrong shapes.pth": "weights do not rebuild",
             "a folder.pth": "is a folder"}
    for name, reason in cases.items():
        model = str(tmp_path / name)
        code = prediction_for_one.main(["--model", model, image])
        captured = capsys.readouterr()
        assert captured.out == "", name
        assert_one_sentence_exit_2(code, captured.err, model, reason)


@pytest.mark.parametrize("case", sorted(BAD_DESCRIPTIONS))
def test_a_checkpoint_whose_description_cannot_be_used_is_one_sentence(case, small_model_files, capsys):
    description, _, folder = small_model_files
    change, message = BAD_DESCRIPTIONS[case]
    path = folder / f"{case}.pth"
    checkpoints.save_checkpoint(path, {**description, **change})
    code = prediction_for_one.main(["--model", str(path), str(folder / "image.png")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, f"'{path}' is not a usable model file", message)


def test_num_classes_must_count_the_class_names(small_model_files, capsys):
    description, _, folder = small_model_files
    checkpoints.save_checkpoint(folder / "four.pth", {**description, "num_classes": 4})
    code = prediction_for_one.main(["--model", str(folder / "four.pth"), str(folder / "image.png")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "its 'class_names' holds 3 names, but its "
                                                              "'num_classes' says 4 classes")


def test_an_exported_model_whose_metadata_cannot_be_used_is_one_sentence(small_model_files, capsys):
    import onnx

    from results import deploy

    description, model, folder = small_model_files
    metadata = {key: description[key] for key in ("arch", "class_names", "image_size", "resize", "mean", "std")}
    deploy.export_onnx(model, folder / "model.onnx", 32, metadata)
    assert prediction_for_one.main(["--model", str(folder / "model.onnx"), str(folder / "image.png")]) == 0
    capsys.readouterr()
    for case, (change, message) in BAD_DESCRIPTIONS.items():
        graph = onnx.load(str(folder / "model.onnx"))
        graph.metadata_props[0].value = json.dumps({**metadata, **change})
        path = folder / f"{case}.onnx"
        onnx.save(graph, str(path))
        code = prediction_for_one.main(["--model", str(path), str(folder / "image.png")])
        expected = "but the model gives 3 classes" if case == "fewer class names than outputs" else message
        assert_one_sentence_exit_2(code, capsys.readouterr().err, f"'{path}'", expected)


def test_predict_images_refuses_a_description_that_does_not_fit_the_classifier(small_model_files, monkeypatch,
                                                                                 capsys):
    description, _, folder = small_model_files
    usable = {key: description[key] for key in checkpoints.DESCRIPTION_KEYS}
    image = str(folder / "image.png")
    three_outputs = lambda images: torch.zeros(len(images), 3)  # noqa: E731  (a stub classifier)
    for change, message in (({"class_names": ["circle", "cross"]}, "holds 2 names, but the model gives 3 classes"),
                            BAD_DESCRIPTIONS["a mean of two values"]):
        with pytest.raises(errors.SettingsError, match=re.escape(message)):
            prediction_for_one.predict_images(three_outputs, {**usable, **change}, [image], 3)
        # Through the command line: one sentence and exit 2, never a traceback (prediction ran outside the try).
        monkeypatch.setattr(prediction_for_one, "load_classifier",
                            lambda path, device, change=change: (three_outputs, {**usable, **change}))
        code = prediction_for_one.main(["--model", "stub.pth", image])
        assert_one_sentence_exit_2(code, capsys.readouterr().err, "'stub.pth'", message)


def test_prediction_help_shows_the_top_k_default(capsys):
    with pytest.raises(SystemExit):
        prediction_for_one.main(["--help"])
    assert "how many classes to show per image (default: 3)" in " ".join(capsys.readouterr().out.split())


def test_prediction_fits_images_to_the_square_as_the_checkpoint_says(tmp_path):
    """A wide image, red | green | blue: center-crop sees only its green middle, squash all three."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10, 0] = pixels[:, 10:30, 1] = pixels[:, 30:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    description = {"class_names": ["red", "green", "blue"], "image_size": 8, "mean": [0.0] * 3, "std": [1.0] * 3}
    mean_colour = lambda images: 10 * images.mean(dim=(2, 3))  # noqa: E731  (logits: each channel's mean)
    cropped, = prediction_for_one.predict_images(mean_colour, {**description, "resize": "center-crop"},
                                                 [str(tmp_path / "wide.png")], 3)
    squashed, = prediction_for_one.predict_images(mean_colour, description, [str(tmp_path / "wide.png")], 3)
    assert cropped["top"][0] == {"class": "green", "probability": pytest.approx(1, abs=1e-3)}
    assert squashed["top"][0]["class"] == "green" and squashed["top"][0]["probability"] < 0.9


def test_the_prediction_script_breaks_ties_as_the_reported_figures_do(small_model_files):
    description, _, folder = small_model_files
    usable = {key: description[key] for key in checkpoints.DESCRIPTION_KEYS}
    names = [f"class {index}" for index in range(10)]
    tied = lambda images: torch.zeros(len(images), 10)  # noqa: E731  (every class ties)
    predicted = prediction_for_one.predict_images(tied, {**usable, "class_names": names},
                                                  [str(folder / "image.png")], 3)
    assert [entry["class"] for entry in predicted[0]["top"]] == names[:3]


def test_a_prefix_of_a_prediction_flag_is_not_taken_for_it(capsys):
    with pytest.raises(SystemExit):
        prediction_for_one.command_line_parser().parse_args(["--model", "m.pth", "--top", "2", "image.png"])
    assert "unrecognized arguments: --top" in capsys.readouterr().err
