"""Every method through the whole pipeline on tiny data: a folder for each method and seed, the summary's mean
and spread over seeds, the literature's networks, and the newer methods (dist, dkd_ls, reviewkd), which train at
the weights config.json records (each epoch's loss is its parts so weighted) and report their predictions' top-1,
and each method at its reference's loss under --loss-weights reference."""

from __future__ import annotations

import statistics

import pytest
from cifar_batches import write_cifar
from conftest import SMALL_MODELS, TINY_FLAGS

import experiment
import utils
from core import paired_tests
from results import significance
from training import checkpoints

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def methods_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("methods") / "run"
    flags = [*TINY_FLAGS, *SMALL_MODELS, "--teacher-epochs", "1", "--student-epochs", "1"]
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            *flags, "--kd-methods", "kd,at", "--seeds", "3,4"])
    assert code == 0
    return run_dir


def test_every_method_and_seed_has_its_folder(methods_run):
    assert not (methods_run / "teacher" / "seed_4").exists(), "the teacher is trained once"
    for role in ("student_baseline", "student_kd", "student_at"):
        for folder in (methods_run / role, methods_run / role / "seed_4"):
            for name in ("best_model.pth", "results.json", "history.json", "confusion_matrix_test.png"):
                assert (folder / name).is_file(), folder / name
            assert checkpoints.load_checkpoint(folder / "best_model.pth")["config"]["kd_methods"] == "kd,at"
    assert not list(methods_run.glob("student_fitnet*")) and not list(methods_run.glob("student_dkd*"))


def test_summary_reports_mean_and_std_over_seeds(methods_run):
    summary = utils.read_json(methods_run / "summary.json")
    assert summary["seeds"] == [3, 4]
    top1 = {role: [utils.read_json(folder / "results.json")["test"]["top1"]
                   for folder in (methods_run / role, methods_run / role / "seed_4")]
            for role in ("student_baseline", "student_kd", "student_at")}
    for role, values in top1.items():
        row = summary[role]
        assert row["test"]["top1"] == values[0], "the per-model row is the first seed's"
        assert row["test_top1_by_seed"] == {"3": values[0], "4": values[1]}
        assert row["test_top1_mean"] == pytest.approx(statistics.mean(values))
        assert row["test_top1_std"] == pytest.approx(statistics.stdev(values))
        if role == "student_baseline":
            assert "gain_top1_mean" not in row and "mcnemar_p" not in row
            continue
        gains = [value - base for value, base in zip(values, top1["student_baseline"], strict=True)]
        assert row["gain_top1_mean"] == pytest.approx(statistics.mean(gains))
        assert row["gain_top1_std"] == pytest.approx(statistics.stdev(gains))
        if row["gain_top1_test"] == "mcnemar_every_seed":  # the same gain in both seeds: no spread, no interval
            assert gains[0] == pytest.approx(gains[1]) and "gain_top1_ci95" not in row
            assert row["gain_significant"] == (row["gain_top1_p"] < significance.SIGNIFICANCE_LEVEL)
        else:
            interval = significance.paired_gain_interval(gains)
            assert (row["gain_top1_ci95"] == pytest.approx(interval["ci"])
                    and row["gain_top1_p"] == pytest.approx(interval["p"]))
            assert row["gain_significant"] == (interval["ci"][0] > 0 or interval["ci"][1] < 0)
        # McNemar per seed, from the per-image correctness each model's results.json keeps
        p_by_seed = {}
        for seed, suffix in (("3", ()), ("4", ("seed_4",))):
            correct = [paired_tests.parse_correct_flags(
                           utils.read_json(methods_run.joinpath(name, *suffix, "results.json"))["test_correct"])
                       for name in ("student_baseline", role)]
            assert len(correct[0]) == summary["dataset"]["sizes"]["test"]
            p_by_seed[seed] = significance.mcnemar_exact(*correct)["p"]
        assert row["mcnemar_p_by_seed"] == p_by_seed and row["mcnemar_p"] == p_by_seed["3"]
    assert "test_top1_mean" not in summary["teacher"]
    assert isinstance(summary["warnings"], list)
    # the headline gain is pooled over the seeds first, the per-seed ones kept beside
    assert summary["kd_gain_top1"] == pytest.approx(summary["student_kd"]["gain_top1_mean"])
    assert summary["kd_gain_top1_by_seed"]["3"] == pytest.approx(top1["student_kd"][0] - top1["student_baseline"][0])
    assert summary["kd_gain_significant"] is summary["student_kd"]["gain_significant"]
    table = (methods_run / "comparison.txt").read_text()
    assert ("top1 mean+-std" in table and "student_at" in table and "Distillation (at)" in table
            and "gain 95% interval" in table)
    assert "significant: the 95% Student-t interval of the per-seed paired gains excludes zero" in table
    # Each gain sentence leads with the verdict over seeds, then the first seed's own McNemar test.
    assert table.count("; seed 3 alone ") == 2 and table.count(" by the exact McNemar test: ") == 2
    assert "Every seed (gain: over the baseline of the same seed" in table
    report = (methods_run / "report.html").read_text()
    assert "student_at" in report


def test_feature_method_logs_its_feature_term(methods_run):
    history = utils.read_json(methods_run / "student_at" / "history.json")["epochs"]
    assert {"ce", "kd", "at"} <= history[0]["train"].keys()
    config = utils.read_json(methods_run / "config.json")
    assert config["beta"] is None and config["resolved"]["feature_weights"] == {"at": 500.0}


def test_literature_networks_distill_end_to_end(tiny_data, tmp_path):
    run_dir = tmp_path / "zoo"
    flags = [*TINY_FLAGS, "--teacher-epochs", "1", "--student-epochs", "2", "--teacher-model", "resnet20",
             "--student-model", "resnet8", "--kd-methods", "fitnet,dkd", "--alpha", "1"]
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            *flags])
    assert code == 0
    summary = utils.read_json(run_dir / "summary.json")
    assert summary["teacher"]["arch"] == "resnet20" and summary["student_fitnet"]["arch"] == "resnet8"
    assert summary["student_fitnet"]["params"] < summary["teacher"]["params"]
    assert summary["student_fitnet"]["flops_per_image"] < summary["teacher"]["flops_per_image"]
    assert utils.read_json(run_dir / "config.json")["resolved"]["feature_weights"] == {"fitnet": 100.0}
    fitnet = utils.read_json(run_dir / "student_fitnet" / "history.json")["epochs"]
    assert all(e["train"]["loss"] == pytest.approx(e["train"]["ce"] + 100 * e["train"]["feature"], rel=1e-5)
               for e in fitnet)
    dkd = utils.read_json(run_dir / "student_dkd" / "history.json")["epochs"]
    assert all(0 < e["train"]["warmup"] <= 1 for e in dkd)
    assert "warmup=" in (run_dir / "student_dkd" / "training_metrics.txt").read_text()


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


def test_reference_loss_weights_train_each_method_at_its_references_loss(tiny_data, tmp_path):
    run_dir = tmp_path / "reference"
    flags = [*TINY_FLAGS, *SMALL_MODELS, "--teacher-epochs", "1", "--student-epochs", "1", "--alpha", "0.3",
             "--loss-weights", "reference", "--kd-methods", "kd,dist,reviewkd", "--reviewkd-warmup-epochs", "0"]
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            *flags])
    assert code == 0
    weights = utils.read_json(run_dir / "config.json")["resolved"]["reference_weights"]
    assert weights == {"kd": {"ce": 0.1, "kd": 0.9}, "dist": {"ce": 1.0, "dist": 2.0},
                       "reviewkd": {"ce": 1.0, "kd": 0.0, "hcl": 5.0}}, "--alpha 0.3 is not used"
    for method, by_part in weights.items():
        parts = utils.read_json(run_dir / f"student_{method}" / "history.json")["epochs"][0]["train"]
        mixed = sum(weight * parts[part] for part, weight in by_part.items())
        assert parts["loss"] == pytest.approx(mixed, rel=1e-5), method


@pytest.mark.parametrize("data", ["digits", "image_folder", "cifar_files"])
def test_crd_trains_on_the_bundled_digits_an_image_folder_and_cifar_files(data, tiny_data, tmp_path, capsys):
    """CRD's memory bank has a row per training image, whose indices come from the loader on every source;
    each epoch's loss is its parts at the weights config.json records."""
    run_dir = tmp_path / "run"
    if data == "cifar_files":
        write_cifar(tmp_path / "cifar", 100, ["a", "b", "c"], 8, 3)
    source = {"digits": ["--max-per-class", "4", "--image-size", "16"], "image_folder": ["--data-dir", str(tiny_data)],
              "cifar_files": ["--data-dir", str(tmp_path / "cifar"), "--image-size", "16"]}[data]
    flags = [*TINY_FLAGS, "--teacher-epochs", "1", "--student-epochs", "2", "--teacher-model", "resnet8",
             "--student-model", "resnet8", "--kd-methods", "crd", "--val-fraction", "0.25"]
    assert experiment.main(["--output-dir", str(run_dir), *flags, *source]) == 0
    summary = utils.read_json(run_dir / "summary.json")
    train_images = summary["dataset"]["sizes"]["train"]
    classes = len(summary["dataset"]["class_names"])
    out = capsys.readouterr().out
    largest = summary["dataset"]["images_per_class"]["train"]["max"]
    assert (f"[crd] memory bank of 2 x {train_images} x 128 float32 embeddings" in out
            and f"{train_images - largest} negatives per image (the images outside the largest class" in out)
    assert utils.read_json(run_dir / "config.json")["resolved"]["feature_weights"] == {"crd": 0.4}
    epochs = utils.read_json(run_dir / "student_crd" / "history.json")["epochs"]
    for epoch in epochs:
        parts = epoch["train"]
        assert parts["crd"] > 0 and parts["loss"] == pytest.approx(
            0.5 * parts["ce"] + 0.5 * parts["kd"] + 0.4 * parts["crd"], rel=1e-5)
    assert classes == (10 if data == "digits" else 3)
    assert summary["dataset"]["carving"]["layout"].startswith("torchvision's") == (data == "cifar_files")


RELATIONAL_WEIGHTS = {"sp": 3000.0, "cc": 0.02, "vid": 1.0, "rkd": 1.0, "pkt": 30000.0, "nst": 50.0}  # RepDistiller -b


def test_relational_methods_train_end_to_end_at_the_references_weights(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    flags = [*TINY_FLAGS, *SMALL_MODELS, "--teacher-epochs", "1", "--student-epochs", "1", "--image-size", "16",
             "--kd-methods", ",".join(RELATIONAL_WEIGHTS)]
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            *flags])
    assert code == 0
    weights = {method: 0.5 * weight for method, weight in RELATIONAL_WEIGHTS.items()}  # beta = -b x alpha 0.5
    assert utils.read_json(run_dir / "config.json")["resolved"]["feature_weights"] == pytest.approx(weights)
    for method, weight in weights.items():
        train = utils.read_json(run_dir / f"student_{method}" / "history.json")["epochs"][0]["train"]
        assert train[method] > 0, method
        expected = 0.5 * train["ce"] + 0.5 * train["kd"] + weight * train[method]
        assert train["loss"] == pytest.approx(expected, rel=1e-5), method
        assert (run_dir / f"student_{method}" / "best_model.pth").is_file()


def test_two_stage_methods_run_end_to_end_with_their_initialization_stage(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    flags = [*TINY_FLAGS, "--teacher-epochs", "1", "--student-epochs", "1", "--teacher-model", "resnet14",
             "--student-model", "resnet8", "--image-size", "16", "--kd-methods", "ab,ft,fsp", "--init-epochs", "1"]
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--val-fraction", "0.25",
                            *flags])
    assert code == 0
    printed = capsys.readouterr().out
    summary = utils.read_json(run_dir / "summary.json")
    resolved = utils.read_json(run_dir / "config.json")["resolved"]
    assert resolved["init_stages"] == {method: {"epochs": 1} for method in ("ab", "ft", "fsp")}
    assert resolved["feature_weights"] == {"ft": 100.0}
    for method in ("ab", "ft", "fsp"):
        assert f"[student_{method}] initialization stage epoch 1/1" in printed
        stage = checkpoints.load_checkpoint(run_dir / f"student_{method}" / "init_stage.pth")
        assert len(stage["losses"]) == 1 and stage["trains"]
        assert 0 <= summary[f"student_{method}"]["test"]["top1"] <= 1
    ft = utils.read_json(run_dir / "student_ft" / "history.json")["epochs"][0]["train"]
    assert ft["loss"] == pytest.approx(0.5 * ft["ce"] + 0.5 * ft["kd"] + 100.0 * ft["ft"], rel=1e-5)
    ab = utils.read_json(run_dir / "student_ab" / "history.json")["epochs"][0]["train"]
    assert set(ab) >= {"ce", "kd"} and "ab" not in ab
