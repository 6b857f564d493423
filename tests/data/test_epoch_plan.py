"""Moving batches to the device (data.epoch_plan)."""

from __future__ import annotations

import torch
from conftest import CPU

from data import epoch_plan


def test_to_device_leaves_cpu_tensors_as_they_are():
    index = torch.arange(5)
    assert epoch_plan.to_device(index, CPU) is index
