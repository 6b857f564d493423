"""The newer methods (dist, dkd_ls, reviewkd) through the whole pipeline on tiny data: they train at the weights
config.json records (each epoch's loss is its parts so weighted), and their reported accuracy is their predictions'."""

import pytest
from conftest import TINY_FLAGS

import experiment
import utils

pytestmark = pytest.mark.e2e


def test_new_methods_run_end_to_end(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    flags = [*TINY_FLAGS, "--teacher-epochs", "1", "--student-epochs", "1", "--teacher-model", "resnet14",
             "--student-model", "resnet8", "--kd-methods", "dist,dkd_ls,reviewkd",
             "--dkd-warmup-epochs", "0", "--reviewkd-warmup-epochs", "0"]  # constant weights: the means add up
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            *flags])
    assert code == 0
    summary = utils.read_json(run_dir / "summary.json")
    assert {"student_dist", "student_dkd_ls", "student_reviewkd"} <= summary.keys()
    resolved = utils.read_json(run_dir / "config.json")["resolved"]
    assert resolved["dkd_beta"] == 8.0 and resolved["feature_weights"] == {"reviewkd": 2.5}
    assert resolved["logit_weights"] == {"dist": {"dist": 2.0}, "dkd_ls": {"tckd": 9.0, "nckd": 72.0}}
    parts = {method: utils.read_json(run_dir / f"student_{method}" / "history.json")["epochs"][0]["train"]
             for method in ("dist", "dkd_ls", "reviewkd")}
    # Loss parts are per-sample means over the epoch, so a loss made of them with constant weights is their mix.
    expected = {"dist": 0.5 * parts["dist"]["ce"] + 0.5 * 2.0 * parts["dist"]["dist"],
                "dkd_ls": 0.5 * parts["dkd_ls"]["ce"] + 0.5 * (9.0 * parts["dkd_ls"]["tckd"]
                                                              + 72.0 * parts["dkd_ls"]["nckd"]),
                "reviewkd": 0.5 * parts["reviewkd"]["ce"] + 0.5 * parts["reviewkd"]["kd"]
                + 2.5 * parts["reviewkd"]["hcl"]}
    for method, loss in expected.items():
        assert parts[method]["loss"] == pytest.approx(loss, rel=1e-5), method
        assert min(parts[method][name] for name in parts[method] if name in ("ce", "dist", "tckd", "nckd", "hcl")) > 0
    for method in ("dist", "dkd_ls", "reviewkd"):
        results = utils.read_json(run_dir / f"student_{method}" / "results.json")
        flags = results["test_correct"]
        assert summary[f"student_{method}"]["test"]["top1"] == pytest.approx(flags.count("1") / len(flags))
