"""Export to ONNX with its parity check, prediction through the ONNX file, and torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_image_folder

import model_builder
import prediction_for_one
import utils
from results import deploy


def test_onnx_export_parity_on_a_tiny_model(tmp_path):
    torch.manual_seed(0)
    model = model_builder.build_model("ResNet18", 3, 16).eval()
    path = tmp_path / "tiny.onnx"
    deploy.export_onnx(model, path, 16, {"class_names": ["a", "b", "c"]})
    images = torch.randn(7, 3, 16, 16)  # another batch size than the export example: dynamic batch
    assert deploy.onnx_parity(model, path, images) <= 1e-4
    assert deploy.onnx_metadata(deploy.onnx_session(path))["class_names"] == ["a", "b", "c"]
    with torch.no_grad():
        model.fc.bias += 1.0  # the check must notice a model that no longer matches its export
    assert deploy.onnx_parity(model, path, images) > 0.5


def test_run_exports_every_model_and_records_the_check(tiny_run):
    summary = utils.read_json(tiny_run / "summary.json")
    for role in ("teacher", "student_baseline", "student_kd"):
        export = summary[role]["export"]
        assert (tiny_run / export["onnx"]).is_file() and export["onnx"] == f"{role}/model.onnx"
        assert export["passed"] and export["max_abs_diff"] <= export["tolerance"] == 1e-4
        assert export["checked_images"] > 0


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


def _run(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_torchrun_two_processes_match_one_process(tmp_path):
    """DDP on CPU (gloo): per-process batch 8 on 2 ranks against one process with batch 16.

    Tolerance: the two runs see the same global batches but differ through batch-norm
    statistics (per rank on CPU, where SyncBatchNorm is unavailable), dropout masks and
    floating-point order, so test top-1 may differ by at most 3 of the 30 test images.
    """
    data = make_image_folder(tmp_path / "data", {"train": 30, "test": 10}, seed=1)
    # A deterministic view, so the teacher's logits can be cached: on two ranks they are gathered
    # from contiguous shards and must land on the right images.
    flags = ["--data-dir", str(data), "--val-fraction", "0.2", "--crop-padding", "0", "--hflip", "off",
             "--cache-teacher-logits",
             "--teacher-epochs", "4", "--student-epochs", "4", "--image-size", "32", "--seed", "0", "--device", "cpu"]
    distributed = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "experiment.py", *flags, "--batch-size", "8", "--output-dir", str(tmp_path / "ddp" / "run")])
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    single = _run([sys.executable, "experiment.py", *flags, "--batch-size", "16",
                   "--output-dir", str(tmp_path / "single" / "run")])
    assert single.returncode == 0, single.stderr[-3000:]
    assert distributed.stdout.count("Run directory:") == 1  # rank 0 alone prints
    with open(tmp_path / "ddp" / "experiments.csv", encoding="utf-8") as ledger:
        assert len(ledger.read().splitlines()) == 2  # header + one row: rank 0 alone writes
    config = utils.read_json(tmp_path / "ddp" / "run" / "config.json")
    assert config["resolved"]["processes"] == 2
    ddp_summary = utils.read_json(tmp_path / "ddp" / "run" / "summary.json")
    single_summary = utils.read_json(tmp_path / "single" / "run" / "summary.json")
    assert ddp_summary["dataset"]["sizes"] == single_summary["dataset"]["sizes"]
    for role in ("teacher", "student_baseline", "student_kd"):
        print(role, ddp_summary[role]["test"]["top1"], single_summary[role]["test"]["top1"])
        assert abs(ddp_summary[role]["test"]["top1"] - single_summary[role]["test"]["top1"]) <= 3 / 30 + 1e-6, role
        assert ddp_summary[role]["test"]["top1"] >= 0.6, role
