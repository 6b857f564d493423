"""The newer methods (dist, dkd_ls, reviewkd) through the whole pipeline on tiny data: they train, and
config.json records the weights they resolved."""

import pytest
from conftest import TINY_FLAGS

import experiment
import utils

pytestmark = pytest.mark.e2e


def test_new_methods_run_end_to_end(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    flags = [*TINY_FLAGS, "--teacher-epochs", "1", "--student-epochs", "1", "--teacher-model", "resnet14",
             "--student-model", "resnet8", "--kd-methods", "dist,dkd_ls,reviewkd"]
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            *flags])
    assert code == 0
    summary = utils.read_json(run_dir / "summary.json")
    assert {"student_dist", "student_dkd_ls", "student_reviewkd"} <= summary.keys()
    resolved = utils.read_json(run_dir / "config.json")["resolved"]
    assert resolved["dkd_beta"] == 8.0 and resolved["feature_weights"] == {"reviewkd": 2.5}
    assert resolved["logit_weights"] == {"dist": {"dist": 2.0}, "dkd_ls": {"tckd": 9.0, "nckd": 72.0}}
    parts = {method: utils.read_json(run_dir / f"student_{method}" / "history.json")["epochs"][0]["train"]
             for method in ("dist", "reviewkd")}
    assert {"ce", "dist"} <= parts["dist"].keys() and {"ce", "kd", "hcl", "warmup"} <= parts["reviewkd"].keys()
