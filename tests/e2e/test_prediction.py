"""prediction_for_one on the models of a finished run: text, JSON and CSV output, bad images, missing or foreign
model files, and ONNX exports."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, _bad_images, assert_one_sentence_exit_2

import prediction_for_one
from data import decoding
from training import checkpoints

pytestmark = pytest.mark.e2e


def test_prediction_through_onnx_matches_the_checkpoint(tiny_run, tiny_data, capsys):
    images = [str(p) for p in sorted((tiny_data / "test").rglob("*.png"))[::4]]
    outputs = []
    for model in ("best_model.pth", "model.onnx"):
        assert prediction_for_one.main(["--model", str(tiny_run / "student_kd" / model), "--json", *images]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    for from_checkpoint, from_onnx in zip(*outputs, strict=True):
        assert [e["class"] for e in from_checkpoint["top"]] == [e["class"] for e in from_onnx["top"]]
        for a, b in zip(from_checkpoint["top"], from_onnx["top"], strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_mixed_batch_predicts_the_good_images_and_reports_the_bad(checkpoint, good_images, tmp_path):
    bad = _bad_images(tmp_path / "bad ø")
    images = [good_images[0], *bad, good_images[1]]
    result = subprocess.run([sys.executable, str(ROOT / "prediction_for_one.py"), "--model", str(checkpoint),
                             "--json", *images], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    predictions = json.loads(result.stdout)
    assert [p["image"] for p in predictions] == images
    assert "top" in predictions[0] and "top" in predictions[-1]
    for prediction in predictions[1:-1]:
        assert bad[prediction["image"]] in prediction["error"]
    for image in bad:
        assert image in result.stderr
    assert f"{len(bad)} of {len(images)} images could not be read" in result.stderr


def _images(tiny_data: Path, count: int = 3) -> list[str]:
    return [str(next((tiny_data / "test" / name).iterdir())) for name in ("circle", "cross", "stripes")][:count]


def test_json_output_names_classes_from_the_checkpoint(tiny_run, tiny_data, capsys):
    code = prediction_for_one.main(["--model", str(tiny_run / "student_kd" / "best_model.pth"),
                                    "--top-k", "2", "--json", *_images(tiny_data)])
    assert code == 0
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions) == 3
    for prediction in predictions:
        assert len(prediction["top"]) == 2
        assert {entry["class"] for entry in prediction["top"]} <= {"circle", "cross", "stripes"}
        probabilities = [entry["probability"] for entry in prediction["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.000001


def test_text_output_with_model_path_alias_and_top_k_clipped(tiny_run, tiny_data, capsys):
    model_file, image = tiny_run / "teacher" / "best_model.pth", _images(tiny_data, 1)[0]
    # What the teacher says, computed here from the checkpoint: decode, scale, normalize, softmax.
    checkpoint = checkpoints.load_checkpoint(model_file)
    pixels = decoding.decode_image(image, checkpoint["image_size"], checkpoint["resize"]).float() / 255
    mean, std = (torch.tensor(checkpoint[key]).view(3, 1, 1) for key in ("mean", "std"))
    with torch.no_grad():
        probabilities = torch.softmax(checkpoints.load_model(checkpoint)(((pixels - mean) / std)[None]), dim=1)[0]
    ranked = probabilities.argsort(descending=True).tolist()
    code = prediction_for_one.main(["--model_path", str(model_file), "--top-k", "10", image])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("%") == 3  # three classes, although ten were asked for
    assert "1. " in out
    lines = out.splitlines()
    assert lines[0] == image  # the path, then the classes best first with their probabilities
    assert [line.split()[:2] for line in lines[1:]] == [[f"{rank}.", checkpoint["class_names"][index]]
                                                        for rank, index in enumerate(ranked, start=1)]
    assert lines[1].split()[2] == f"{100 * probabilities[ranked[0]].item():.2f}%"


def test_bad_image_is_reported_and_good_ones_still_predicted(tiny_run, tiny_data, tmp_path, capsys):
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    code = prediction_for_one.main(["--model", str(tiny_run / "student_baseline" / "best_model.pth"), "--json",
                                    str(junk), *_images(tiny_data, 1), str(tmp_path / "missing.png")])
    predictions = json.loads(capsys.readouterr().out)
    assert code == 1
    assert "error" in predictions[0] and "top" in predictions[1] and "error" in predictions[2]


def test_missing_or_foreign_model_file_is_a_clear_error(tmp_path, tiny_data):
    not_a_checkpoint = tmp_path / "model.pth"
    not_a_checkpoint.write_bytes(b"garbage")
    for model in (tmp_path / "none.pth", not_a_checkpoint):
        result = subprocess.run([sys.executable, str(ROOT / "prediction_for_one.py"), "--model", str(model),
                                 *_images(tiny_data, 1)], capture_output=True, text=True, cwd=ROOT)
        assert_one_sentence_exit_2(result.returncode, result.stderr, str(model))


def test_folders_are_searched_recursively_and_csv_has_one_row_per_image(tiny_run, tiny_data, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "b" / "sub").mkdir(parents=True)
    (photos / "a").mkdir()
    (photos / ".thumbnails").mkdir()
    for target in (photos / "a" / "x.png", photos / "b" / "sub" / "y.PNG", photos / ".thumbnails" / "t.png",
                   photos / "._x.png"):
        shutil.copy(_images(tiny_data, 1)[0], target)
    (photos / "broken.jpg").write_text("not an image")
    (photos / "notes.txt").write_text("not an image either, and no image extension")
    single = _images(tiny_data, 2)[1]
    table = tmp_path / "out" / "predictions.csv"
    code = prediction_for_one.main(["--model", str(tiny_run / "student_kd" / "best_model.pth"), "--top-k", "2",
                                    "--csv", str(table), single, str(photos)])
    assert code == 1  # one unreadable image; the others are classified
    rows = list(csv.DictReader(table.open(newline="")))
    assert list(rows[0]) == ["image", "class_1", "probability_1", "class_2", "probability_2", "error"]
    assert [row["image"] for row in rows] == [single, str(photos / "broken.jpg"), str(photos / "a" / "x.png"),
                                              str(photos / "b" / "sub" / "y.PNG")]
    assert "not a readable image" in rows[1]["error"] and rows[1]["class_1"] == rows[1]["probability_1"] == ""
    for row in (rows[0], *rows[2:]):
        assert row["error"] == "" and {row["class_1"], row["class_2"]} <= {"circle", "cross", "stripes"}
        assert 1 >= float(row["probability_1"]) >= float(row["probability_2"]) > 0
    assert rows[2]["class_1"] == rows[3]["class_1"]  # the same picture twice
    captured = capsys.readouterr()
    assert captured.out.strip() == f"Wrote 4 rows to {table}: 3 classified, 1 unreadable."
    assert "broken.jpg" in captured.err and not list(table.parent.glob("*.tmp"))
    code = prediction_for_one.main(["--model", str(tiny_run / "student_kd" / "best_model.pth"),
                                    "--csv", str(tmp_path), single])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, f"cannot write --csv '{tmp_path}'")  # a folder stays


def test_folder_without_images_is_one_sentence(tiny_run, tmp_path, capsys):
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden" / "x.png").write_bytes(b"")
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    code = prediction_for_one.main(["--model", str(tiny_run / "teacher" / "best_model.pth"), str(tmp_path / "empty")])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: folder '{tmp_path / 'empty'}' holds no image files (searched recursively")
