"""Learning-rate schedules (core.schedules) against the references' step and cosine rates."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import optimizer

from core import schedules

# ---------------------------------------------------------------- schedules


def rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The learning rate of each optimizer step, then the one after the last."""
    seen = []
    for _ in range(steps):
        seen.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return seen + [scheduler.optimizer.param_groups[0]["lr"]]


def test_step_and_cosine_change_the_rate_per_epoch_as_the_references():
    # 6 epochs of 3 steps; milestones 2 and 4 (RepDistiller's `epoch > milestone`); one warm-up epoch.
    step = rates(schedules.make_scheduler(optimizer(), 0.05, 6, 3, "step", [2, 4], 0.1, 1), 18)
    per_epoch = [0.025, 0.05, 0.005, 0.005, 0.0005, 0.0005]
    assert step[:-1] == pytest.approx([rate for rate in per_epoch for _ in range(3)])
    cosine = rates(schedules.make_scheduler(optimizer(), 0.05, 4, 2, "cosine"), 8)
    assert cosine[::2] == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(5)], abs=1e-12)
    assert cosine[-1] == pytest.approx(0, abs=1e-12), "down to 0 where the run ends"
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer(), max_lr=0.05, total_steps=18, pct_start=0.25)
    assert rates(schedules.make_scheduler(optimizer(), 0.05, 6, 3), 17) == rates(reference, 17), "default unchanged"
