"""Crafted CIFAR files that ask for memory rather than code: a bytearray of a size, arrays with zero strides, a
codec that grows its input, objects nested past the C stack, a key of megabytes. Each is refused in one short
sentence before it allocates, also under a 1 GB limit on the address space; and the reader admits exactly the
callables it lists, checks labels and keeps to the memory budget."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_one_sentence_exit_2
from test_reproduce import SMALL, write_cifar

import experiment
from core import errors
from data import cifar_files

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
found['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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


def test_a_file_over_the_memory_budget_is_not_read(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 10, ["a", "b", "c"], 4, 3)
    with pytest.raises(errors.DataError, match="data_batch_1' is larger than --memory-budget-mb 0.01"):
        cifar_files.read(cifar_files.CIFAR10, folder, 32, memory_budget_mb=0.01)
    with pytest.raises(errors.DataError, match=r"images at 64 px take \d+ MiB, over --memory-budget-mb 0.1"):
        cifar_files.read(cifar_files.CIFAR10, folder, 64, memory_budget_mb=0.1)  # 12 images a file: 0.14 MiB


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("builtins", "getattr"), ("numpy", "load"),
                                          ("numpy", "frombuffer"), ("_codecs", "decode"), ("__builtin__", "open")])
def test_only_the_listed_callables_are_admitted(tmp_path, module, name):
    """Neighbours of the admitted names, in the same modules, are refused when named, before anything is called."""
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 10, ["a", "b", "c"], 4, 3)
    (folder / "data_batch_3").write_bytes(f"\x80\x02}}X\x04\x00\x00\x00datac{module}\n{name}\ns.".encode("latin1"))
    with pytest.raises(errors.DataError, match=f"data_batch_3': UnpicklingError: it asks for {module}.{name}, which"):
        cifar_files.read(cifar_files.CIFAR10, folder)


@pytest.mark.parametrize("bad_label", [3, -1])
def test_labels_outside_the_class_list_are_refused(tmp_path, bad_label):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 10, ["a", "b", "c"], 4, 3)
    data = np.zeros((2, 3072), np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": [0, bad_label]}))
    with pytest.raises(errors.DataError, match="test_batch' is not in torchvision's format: its labels are not all "
                                               "class indices 0 to 2"):
        cifar_files.read(cifar_files.CIFAR10, folder)
