"""The zero-spread verdict (every seed gained the same number of test images) is as weak as its weakest seed:
the largest of the per-seed McNemar p-values decides, not the smallest."""

from __future__ import annotations

import numpy as np
from conftest import model_row

from core import records
from results import significance


def test_the_zero_spread_verdict_takes_the_largest_mcnemar_p():
    images = np.arange(100)
    baseline = {0: images < 50, 1: images < 50}
    # Both seeds gain 10 images; seed 0 with 10 discordant images (all its way), seed 1 with 50 (30 against 20).
    distilled = {0: images < 60, 1: (images >= 20) & (images < 80)}
    rows = {seed: model_row(float(correct.mean())) for seed, correct in distilled.items()}
    baseline_rows = {seed: model_row(float(correct.mean())) for seed, correct in baseline.items()}
    stats = significance.gain_statistics(rows, baseline_rows, distilled, baseline)
    p = {seed: significance.mcnemar_exact(baseline[seed], distilled[seed])["p"] for seed in (0, 1)}
    assert p[0] < significance.SIGNIFICANCE_LEVEL < p[1]
    assert stats["gain_top1_test"] == records.ZERO_SPREAD_TEST
    assert stats["gain_top1_p"] == p[1] and stats["gain_significant"] is False
