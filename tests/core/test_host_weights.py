"""Weight snapshots on the host (core.host_weights): buffers reused, the best kept, refills awaited."""

from __future__ import annotations

import torch
from conftest import _same
from torch import nn

from core import host_weights


def test_weight_snapshots_reuse_their_buffers_keep_the_best_and_wait_before_refilling():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    events = []
    weights = host_weights.WeightSnapshots(before_refill=lambda: events.append("waited"))
    best = weights.take_best(model)
    assert events == ["waited"] and all(v.is_contiguous() for v in best.values())
    first_best = {k: v.clone() for k, v in best.items()}
    with torch.no_grad():
        model[0].weight.add_(1)
    latest = weights.take(model)
    assert _same(weights.best, first_best), "a later epoch's copy must not overwrite the best weights"
    assert torch.equal(latest["0.weight"], model[0].weight)
    again = weights.take(model)  # the same buffers, refilled: no new host memory every epoch
    assert again["0.weight"].data_ptr() == latest["0.weight"].data_ptr()
    assert weights.take_best(model)["0.weight"].data_ptr() == latest["0.weight"].data_ptr()
    assert weights.take(model)["0.weight"].data_ptr() == best["0.weight"].data_ptr()  # the old best's buffers
    assert events == ["waited"] * 5
