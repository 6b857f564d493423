"""prediction_for_one.py on a checkpoint produced by the tiny end-to-end run."""

import json
import subprocess
import sys
from pathlib import Path

import prediction_for_one
from conftest import ROOT


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
    code = prediction_for_one.main(["--model_path", str(tiny_run / "teacher" / "best_model.pth"),
                                    "--top-k", "10", *_images(tiny_data, 1)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("%") == 3  # three classes, although ten were asked for
    assert "1. " in out and "circle" in out


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
        assert result.returncode == 2
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
