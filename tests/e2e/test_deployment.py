"""Deployment through whole runs: ONNX exports of a finished run, torchrun against one process, and what a CPU
run imports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, collapsed_run, make_image_folder

import model_builder
import utils
from results import deploy, significance
from training import checkpoints

pytestmark = pytest.mark.e2e


def test_onnx_export_parity_on_a_tiny_model(tmp_path):
    torch.manual_seed(0)
    model = model_builder.build_model("ResNet18", 3, 16).eval()
    path = tmp_path / "tiny.onnx"
    deploy.export_onnx(model, path, 16, {"class_names": ["a", "b", "c"]})
    images = torch.randn(7, 3, 16, 16)  # another batch size than the export example: dynamic batch
    assert deploy.onnx_parity(model, path, [images])["max_abs_diff"] <= 1e-4
    assert deploy.onnx_metadata(deploy.onnx_session(path))["class_names"] == ["a", "b", "c"]
    with torch.no_grad():
        model.fc.bias += 1.0  # the check must notice a model that no longer matches its export
    assert deploy.onnx_parity(model, path, [images])["max_abs_diff"] > 0.5


@pytest.mark.long
def test_run_exports_every_model_and_records_the_check(tiny_run):
    summary = utils.read_json(tiny_run / "summary.json")
    for role in ("teacher", "student_baseline", "student_kd"):
        export = summary[role]["export"]
        assert (tiny_run / export["onnx"]).is_file() and export["onnx"] == f"{role}/model.onnx"
        assert export["passed"] and export["max_abs_diff"] <= export["tolerance"] == 1e-4
        assert export["checked_images"] == summary["dataset"]["sizes"]["test"] and export["checked_split"] == "test"
        assert export["differing_predictions"] == 0


def _run(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.long
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


def test_a_zoo_checkpoint_is_rebuilt_by_its_arch_and_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    model = model_builder.build_model("shufflenetv2", 3, 32).eval()
    checkpoint = {"arch": "shufflenetv2", "num_classes": 3, "class_names": ["a", "b", "c"], "image_size": 32,
                  "mean": [0.5] * 3, "std": [0.25] * 3, "epoch": 1, "state_dict": model.state_dict()}
    checkpoints.save_checkpoint(tmp_path / "best_model.pth", checkpoint)
    rebuilt = checkpoints.load_model(checkpoints.load_checkpoint(tmp_path / "best_model.pth"))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))
    deploy.export_onnx(model, tmp_path / "model.onnx", 32, {"class_names": ["a", "b", "c"]})
    assert deploy.onnx_parity(model, tmp_path / "model.onnx", [images])["max_abs_diff"] <= 1e-4


def test_a_student_costlier_than_torchvisions_model_of_its_size_is_named():
    peer = deploy.peer_flops("resnet8x4", 2, 128)
    assert peer["peer"] == "shufflenet_v2_x1_0"
    assert peer["flops_per_image"] > 5e9 > 1e8 > peer["peer_flops_per_image"]
    assert deploy.peer_flops("resnet8x4", 2, 64) is None, "up to 64 px the literature's networks are the fair choice"
    assert deploy.peer_flops("mobilenet_v3_small", 2, 128) is None
    summary, histories = collapsed_run(share=0.6, top1=0.8)
    summary.models["student_baseline"].flops_peer = peer
    warning = significance.sanity_warnings(summary, histories)[0]
    assert warning.startswith("At 128 px the student resnet8x4 needs 5.67 GFLOPs an image, more than torchvision's "
                              "shufflenet_v2_x1_0 of about its size")


# ---------------------------------------------------------------- 23.9: small things


def test_a_cpu_run_does_not_import_what_warns_of_a_missing_cuda_runtime():
    code = ("import sys, torch; from results import deploy; from torch import nn; "
            "deploy.measure_speeds({'m': nn.Conv2d(3, 2, 3)}, 8, torch.device('cpu'), None, 'm', batch=2, rounds=1, "
            "min_run_time=0.001); print('torch.utils.cpp_extension' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False", result.stderr
