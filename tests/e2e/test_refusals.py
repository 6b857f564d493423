"""Settings and files a run refuses through experiment.main: one sentence, exit 2, no run directory."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_batches import SMALL, damage, write_cifar
from conftest import PASSWORD, RESUME_FLAGS, ROOT, SWEEP_FLAGS, assert_one_sentence_exit_2

import experiment
import KD_engine
from training import checkpoints

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--alpha", "1.5"], "--alpha must be between 0 and 1"),
    (["--student-epochs", "0"], "--student-epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--teacher-model", "NoSuchNet"], "Unknown model 'NoSuchNet'"),
    (["--data-dir", "/no/such/folder"], "does not exist"),
    (["--teacher-checkpoint", "/no/such.pth"], "is not a file"),
    (["--cache-teacher-logits"], "--cache-teacher-logits needs a deterministic training view"),
    (["--image-size", "16"], "VGG16 cannot take 16x16 images"),
    (["--image-size", "4096"], "--image-size must be between 8 and 1024"),
    (["--teacher-epochs", "-1"], "--teacher-epochs must be at least 0"),
    (["--student-lr", "0"], "--student-lr must be > 0"),
    (["--teacher-lr", "-1"], "--teacher-lr must be > 0"),
    (["--val-fraction", "1"], "--val-fraction must be between 0 and 1"),
    (["--test-fraction", "0"], "--test-fraction must be between 0 and 1"),
    (["--max-per-class", "0"], "--max-per-class must be at least 1"),
    (["--augment", "trivialaugment", "--crop-padding", "0", "--hflip", "off", "--cache-teacher-logits"],
     "--cache-teacher-logits needs a deterministic training view"),
    (["--kd-methods", "kd,bogus"],
     "--kd-methods: 'bogus' is not a method; it must list distinct methods of " + ", ".join(KD_engine.method_names())),
    (["--kd-methods", "kd,kd"], "--kd-methods must list distinct methods"),
    (["--kd-methods", "kd,fitnet", "--alpha", "0"], "fitnet at alpha 0 needs an explicit --beta"),
    (["--kd-methods", "at", "--beta", "-0.1"], "--beta must be >= 0"),
    (["--kd-methods", "at", "--feature-layers", "features.99:layer3"],
     "--feature-layers: VGG has no layer 'features.99'"),
    (["--kd-methods", "fitnet", "--feature-layers", "features.22"], "--feature-layers:"),
    (["--kd-methods", "fitnet", "--feature-layers", "features.5:layer4"],
     "cannot regress a student map of 4x4 onto a teacher map of 32x32"),
    (["--kd-methods", "at", "--teacher-model", "mobilenet_v3_small", "--image-size", "64"],
     "--kd-methods at: No feature stages are known for MobileNetV3"),
    (["--kd-methods", "dkd", "--dkd-beta", "-1"], "--dkd-beta must be >= 0 (got -1.0)."),
    (["--kd-methods", "dkd_ls", "--dkd-warmup-epochs", "-2"], "--dkd-warmup-epochs must be >= 0 (got -2)."),
    (["--kd-methods", "dist", "--dist-weight", "-1"], "--dist-weight must be >= 0"),
    (["--kd-methods", "kd_ls", "--ls-temperature", "0"], "--ls-temperature must be > 0 (got 0.0)."),
    (["--kd-methods", "dist_ls", "--ls-weight", "-1"], "--ls-weight must be >= 0 (got -1.0)."),
    (["--kd-methods", "reviewkd", "--reviewkd-warmup-epochs", "-1"], "--reviewkd-warmup-epochs must be >= 0"),
    (["--kd-methods", "reviewkd", "--teacher-model", "mobilenet_v3_small", "--image-size", "64"],
     "--kd-methods reviewkd: No feature stages are known"),
    (["--seeds", "0,x"], "--seeds must be distinct integers"),
    (["--seeds", "1,1"], "--seeds must be distinct integers"),
])
def test_bad_settings_exit_2_with_one_sentence(flags, message, capsys, tmp_path):
    code = experiment.main([*flags, "--output-dir", str(tmp_path / "run")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, message)


def test_a_model_that_cannot_take_the_size_is_one_sentence(capsys, tmp_path):
    code = experiment.main(["--teacher-model", "vit_b_16", "--image-size", "64", "--output-dir", str(tmp_path / "run")])
    line = assert_one_sentence_exit_2(code, capsys.readouterr().err)
    assert line.startswith("error: vit_b_16 cannot take 64x64 images (Wrong image height!")
    assert not (tmp_path / "run").exists()


ROWS = 10**7  # rows of a zero-stride file: 143 GiB once copied


class ZeroStride:
    """Pickles as `numpy.ndarray(shape, dtype, <one item of bytes>, 0, <zero strides>)`: one item posing as many."""

    def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)

    def __reduce__(self):
        return np.ndarray, (self.shape, self.dtype, b"\x80" * self.dtype.itemsize, 0, (0,) * len(self.shape))


def bytearray_bomb() -> bytes:
    """57 bytes or so that ask `builtins.bytearray` for 2 GiB of zeros."""
    return b"\x80\x02}X\x04\x00\x00\x00datacbuiltins\nbytearray\n\x8a\x05\x00\x00\x00\x80\x00\x85Rs."


def zero_strides() -> bytes:
    return pickle.dumps({"data": ZeroStride((ROWS, 3072), "u1"), "labels": ZeroStride((ROWS,), "i8")}, protocol=2)


def deep_key(depth: int = 200_000) -> bytes:
    """A dict whose key is a tuple nested `depth` deep (hashing it overflows the C stack)."""
    return b"\x80\x02}" + b")" + b"\x85" * depth + b"K\x00s."


def growing_codec() -> bytes:
    """`_codecs.encode` applied to its own output 25 times with a codec that doubles its input: 64 bytes to 2 GiB
    (nested within the bound on nesting)."""
    nested = b"C\x40" + b"x" * 64
    for _ in range(25):
        nested = b"c_codecs\nencode\n(" + nested + b"X\t\x00\x00\x00hex_codectR"
    return b"\x80\x02}X\x04\x00\x00\x00data" + nested + b"s."


def huge_key() -> bytes:
    return pickle.dumps({"k" * 20_000_000: 0, "labels": []}, protocol=4)


CRAFTED = {
    "bytearray bomb": (bytearray_bomb, "it calls bytearray with something other than the text it holds"),
    "zero strides": (zero_strides, "it calls numpy.ndarray directly"),
    "deep nesting": (deep_key, "its objects nest more than 64 levels deep"),
    "growing codec": (growing_codec, "it calls encode with something other than the text it holds"),
    "huge key": (huge_key, "has no 'data' entry (it holds kkkkk"),
}


def crafted_folder(root: Path, case: str) -> Path:
    """A CIFAR-10 folder under `root` whose second training batch is the crafted file `case`."""
    write_cifar(root / "cifar-10-batches-py", 10, ["a", "b", "c"], 4, 3)
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(CRAFTED[case][0]())
    return root


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_cifar_file_is_refused_in_one_short_sentence(tmp_path, capsys, case):
    folder = crafted_folder(tmp_path / "data", case)
    code = experiment.main(["--data-dir", str(folder), "--output-dir", str(tmp_path / "run"), *SMALL])
    line = assert_one_sentence_exit_2(code, capsys.readouterr().err, "data_batch_2", CRAFTED[case][1])
    assert len(line) < 400, line
    assert not (tmp_path / "run").exists()


# Run in a child: import the program, then allow 1 GiB of address space beyond what the imports mapped (torch's
# libraries alone map several GB of address space, most never touched), and read each crafted folder.
PROBE = """
import contextlib, io, json, resource, sys
import experiment
mapped = int(next(line for line in open('/proc/self/status') if line.startswith('VmSize')).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, resource.RLIM_INFINITY))
found = {}
for case, folder, run in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = experiment.main(['--data-dir', folder, '--output-dir', run, *sys.argv[2:]])
    found[case] = [code, err.getvalue()]
# VmHWM is this program's own peak: ru_maxrss would also count the parent's size at the fork (kept over exec).
status = open('/proc/self/status').read().splitlines()
found['peak_rss_mb'] = int(next(line for line in status if line.startswith('VmHWM')).split()[1]) / 1024
print(json.dumps(found))
"""


def test_crafted_cifar_files_are_refused_within_1_gb(tmp_path):
    cases = [(case, str(crafted_folder(tmp_path / case.replace(" ", "_"), case)), str(tmp_path / f"run_{index}"))
             for index, case in enumerate(sorted(CRAFTED))]
    child = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases), *SMALL], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    found = json.loads(child.stdout.splitlines()[-1])
    print(f"peak RSS {found['peak_rss_mb']:.0f} MB")  # the must-show figure, seen with pytest -s
    assert found.pop("peak_rss_mb") < 1024
    for case, (code, err) in found.items():
        assert_one_sentence_exit_2(code, err, CRAFTED[case][1])


@pytest.mark.parametrize("name", ["..", ".", ".hidden"])
def test_a_study_name_is_a_plain_name(tiny_data, tmp_path, capsys, name, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory is runs/<study name>
    code = experiment.main(["--data-dir", str(tiny_data), *SWEEP_FLAGS, "--study-storage", "study.journal",
                            "--study-name", name])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "--study-name must be letters, digits")
    assert list(tmp_path.iterdir()) == []


def test_list_layers_prints_names_shapes_and_stages(capsys):
    assert experiment.main(["--list-layers", "resnet8x4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet8x4 at 32x32 px")
    assert any(line.split() == ["layer2", "Sequential", "128", "x", "16", "x", "16", "stage", "2"] for line in lines)
    assert experiment.main(["--list-layers", "resnet8x4", "--image-size", "64"]) == 0
    listed = capsys.readouterr().out
    assert "128 x 32 x 32  stage 2" in listed and "256 x 1 x 1  pooled feature" in listed
    assert any(line.split()[:2] == ["fc", "Linear"] and line.endswith("classifier (its input: the embedding)")
               for line in listed.splitlines())


def test_list_layers_of_an_unknown_model_is_one_sentence(capsys):
    code = experiment.main(["--list-layers", "NoSuchNet"])
    captured = capsys.readouterr()
    assert assert_one_sentence_exit_2(code, captured.err).startswith("error: Unknown model 'NoSuchNet'")
    assert captured.out == ""


def test_report_only_needs_a_finished_run(tmp_path, capsys):
    code = experiment.main(["--report-only", str(tmp_path)])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "not a finished run directory")


def test_missing_tensorboard_is_a_clear_error(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    code = experiment.main(["--tensorboard", "--output-dir", str(tmp_path / "run")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "pip install tensorboard")


@pytest.mark.parametrize("case, expected", [
    ("truncated", "Cannot read the CIFAR-10 file"),
    ("crafted", "system, which no CIFAR file holds; nothing was run"),
    ("missing test", "lacks test_batch: torchvision's CIFAR-10 Python format holds"),
    ("wrong layout", "is not in torchvision's format: its 'data' is uint8 (12, 1024)"),
    ("neither", "nor torchvision's CIFAR-10 / CIFAR-100 Python files"),
])
def test_bad_cifar_files_are_one_sentence_and_leave_no_run_directory(tmp_path, capsys, case, expected):
    write_cifar(tmp_path / "data" / "cifar-10-batches-py", 10, ["a", "b", "c"], 4, 3)
    damage(tmp_path / "data", case)
    code = experiment.main(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), *SMALL])
    error = capsys.readouterr().err
    assert code == 2 and expected in error, error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "data" / "marker").exists(), "the crafted pickle ran nothing"


def test_resume_refuses_what_it_cannot_continue(tiny_run, tmp_path, capsys):
    code = experiment.main(["--resume", str(tmp_path)])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "not a run directory")
    code = experiment.main(["--resume", str(tiny_run), "--alpha", "0.3"])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "leave out --alpha")
    assert experiment.main(["--resume", str(tiny_run)]) == 0
    assert "already finished" in capsys.readouterr().out
    code = experiment.main(["--output-dir", str(tiny_run)])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, f"--resume {tiny_run}")


class RunsCode:
    """Unpickling this runs os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_refused_without_running_its_code(tiny_data, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "teacher.pth"
    torch.save({"arch": "vgg16_bn", "state_dict": {}, "payload": RunsCode(marker)}, checkpoint)
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.load_checkpoint(checkpoint)
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "run"), *RESUME_FLAGS,
                            "--teacher-checkpoint", str(checkpoint)])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "Cannot read teacher checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("name, text, message", [
    ("s.yaml", "teacher_epoch: 3\n", "unknown setting 'teacher_epoch' (the closest valid one is 'teacher_epochs')"),
    ("s.yaml", "temprature: 3\n", "unknown setting 'temprature' (the closest valid one is 'temperature')"),
    ("s.yaml", "student_epochs: ten\n", "student_epochs must be an integer (got 'ten')"),
    ("s.yaml", "student_epochs: 2.5\n", "student_epochs must be an integer (got 2.5)"),
    ("s.json", '{"alpha": "high"}', "alpha must be a number (got 'high')"),
    ("s.json", '{"alpha": true}', "alpha must be a number (got True)"),
    ("s.yaml", "compile: sometimes\n", "compile must be one of auto, on, off (got 'sometimes')"),
    ("s.yaml", "optimizer: adam\n", "optimizer must be one of adamw, sgd (got 'adam')"),
    ("s.yaml", "teacher_epochs: null\n", "teacher_epochs must have a value"),
    ("s.yaml", "- 1\n- 2\n", "must hold a mapping of setting names to values, not a list"),
    ("s.yaml", "alpha: [\n", "is not valid YAML"),
    ("s.json", "{", "is not valid JSON"),
    ("s.yaml", "resume: runs/x\n", "unknown setting 'resume'"),
])
def test_bad_config_files_exit_2_with_one_sentence(name, text, message, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(text)
    code = experiment.main(["--config", str(path), "--output-dir", str(tmp_path / "run")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, str(path), message)
    assert not (tmp_path / "run").exists()


def test_a_missing_config_file_and_config_with_resume_are_refused(tmp_path, capsys):
    code = experiment.main(["--config", str(tmp_path / "none.yaml")])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "Cannot read settings file")
    (tmp_path / "s.yaml").write_text("alpha: 0.3\n")
    code = experiment.main(["--config", str(tmp_path / "s.yaml"), "--resume", str(tmp_path)])
    assert_one_sentence_exit_2(code, capsys.readouterr().err, "leave out --config")


BAD_INPUTS = [
    (["--sweep", "temperature=1:10:cubic"], "is not a range"),
    (["--sweep", "temperature"], "is not name=range"),
    (["--sweep", "temperature=1:10,temperature=2:3"], "names temperature twice"),
    (["--sweep", "temprature=1:10"], "the closest searchable one is 'temperature'"),
    (["--sweep", "optimizer=adamw|sgd"], "optimizer is not a numeric setting"),
    (["--sweep", "teacher_lr=0.01:0.1"], "the teacher is trained once"),
    (["--sweep", "seed=0:5"], "draws the data splits"),
    (["--sweep", "alpha=0.9:0.1"], "the range is empty"),
    (["--sweep", "batch_size=8.5:16"], "is not an integer"),
    (["--sweep", "temperature=0:10:log"], "a log range must start above 0"),
    (["--sweep", "alpha=0.5:2"], "--alpha must be between 0 and 1 (got 2.0)"),
    (["--sweep", "method=kd|nope"], "'nope' is not a method"),
    (["--sweep", "alpha=0.1:0.9", "--kd-methods", "kd,dkd"], "give one method in --kd-methods"),
    (["--sweep", "alpha=0.1:0.9", "--trials", "0"], "--trials must be at least 1"),
    (["--study-storage", "x.journal", "--study-name", "s"], "give --sweep too"),
    (["--sweep", "alpha=0.1:0.9", "--study-storage", "x.journal"], "--study-storage needs --study-name"),
    (["--sweep", "alpha=0.1:0.9", "--study-storage", "sqlite:////no/such/folder/s.db", "--study-name", "s"],
     "Cannot open the study storage sqlite:////no/such/folder/s.db"),
    (["--sweep", "alpha=0.1:0.9", "--study-storage", "/no/such/folder/s.journal", "--study-name", "s"],
     "Cannot open the study storage /no/such/folder/s.journal"),
    (["--sweep", "alpha=0.1:0.9", "--study-storage", f"postgresql://kd:{PASSWORD}@127.0.0.1:1/kd",
      "--study-name", "s"], "Cannot open the study storage postgresql://kd:***@127.0.0.1:1/kd"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_INPUTS)
def test_bad_input_is_one_sentence_exit_2_and_no_run_directory(flags, message, capsys, tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    code = experiment.main(["--data-dir", str(tiny_data), "--output-dir", str(run_dir), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and PASSWORD not in err
    assert not run_dir.exists()
