"""CIFAR files in torchvision's Python format (data.cifar_files): read as they are, and crafted or oversized
pickles refused before they can run code or fill memory."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from cifar_batches import damage, write_cifar

import data_setup
from core import errors
from core.errors import DataError
from data import cifar_files


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


def test_cifar_files_are_read_as_they_are(tmp_path):
    names = ["truck", "airplane", "cat"]  # not sorted: the metadata's order is the class order
    files = write_cifar(tmp_path / "cifar-10-batches-py", 10, names, 4, 3)
    data = data_setup.load_splits(data_setup.DataDescription(data_dir=str(tmp_path), image_size=32, val_fraction=0.25,
                                                             seed=0))  # the folder holding one
    assert data.class_names == names
    assert (len(data.train), len(data.val), len(data.test)) == (45, 15, 9)
    assert data.carving["class_counts"]["val"] == {"truck": 5, "airplane": 5, "cat": 5}
    test_data, test_labels = files["test_batch"]
    assert data.test.images.dtype == torch.uint8
    assert torch.equal(data.test.images, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    assert data.test.labels.tolist() == test_labels
    pool = np.concatenate([files[f"data_batch_{index}"][0] for index in range(1, 6)]).reshape(-1, 3, 32, 32)
    seen = {bytes(image) for image in pool}
    assert all(bytes(image.numpy()) in seen for image in torch.cat([data.train.images, data.val.images]))
    assert data.carving["layout"] == "torchvision's CIFAR-10 Python format"
    assert data.carving["test"].endswith("test_batch")

    write_cifar(tmp_path / "re-packed", 100, ["b", "a"], 6, 2)  # another folder name: known by its files
    data = data_setup.load_splits(data_setup.DataDescription(data_dir=str(tmp_path / "re-packed"), image_size=16,
                                                             val_fraction=0.25, seed=0))
    assert data.class_names == ["b", "a"] and (len(data.train), len(data.val), len(data.test)) == (9, 3, 4)
    assert data.test.images.shape == (4, 3, 16, 16), "resized to --image-size"


def test_the_crafted_pickle_does_run_code_when_loaded_plainly(tmp_path, monkeypatch):
    """What the refusal above protects from: the same folder, read by our reader with `os.system` on its list of
    admitted callables, runs the command; so the list, and nothing else, is what refuses it."""
    write_cifar(tmp_path / "data" / "cifar-10-batches-py", 10, ["a", "b", "c"], 4, 3)
    damage(tmp_path / "data", "crafted")
    monkeypatch.setattr(cifar_files, "ADMITTED", {*cifar_files.ADMITTED, (os.system.__module__, "system")})
    with pytest.raises(DataError):  # the command's exit status is no CIFAR data
        cifar_files.read(cifar_files.CIFAR10, tmp_path / "data" / "cifar-10-batches-py")
    assert (tmp_path / "data" / "marker").exists()
