"""Paired tests of two classifiers on the same images, shared by the run's verdicts and comparisons
(results/) and a sweep's trials (sweep/): which images a model got right, McNemar's exact test of two models'
discordant images, and Holm's step-down correction over a family of tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

import utils


def correct_flags(logits: torch.Tensor, labels: torch.Tensor) -> str:
    """Per-sample top-1 correctness in sample order, one character each ('1' right, '0' wrong): compact in JSON and
    in a study's attributes. The prediction is `utils.predicted_classes`', the rule of every figure."""
    return "".join("1" if right else "0" for right in (utils.predicted_classes(logits) == labels).tolist())


def parse_correct_flags(flags: str) -> np.ndarray:
    """The boolean array of a `correct_flags` string."""
    return np.frombuffer(flags.encode("ascii"), dtype=np.uint8) == ord("1")


def mcnemar_p(first_only: int, second_only: int) -> float:
    """McNemar's exact two-sided p from the discordant counts (images only the first model got right, only the
    second): under "equally accurate" each goes either way with probability 1/2, so it is scipy's exact binomial
    test of one count of their sum; 1 when there is none."""
    from scipy.stats import binomtest

    discordant = first_only + second_only
    return 1.0 if discordant == 0 else float(binomtest(second_only, discordant, 0.5).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    The i-th smallest of m p-values is multiplied by m - i + 1 (i from 1), capped at 1, and made no smaller
    than the adjusted value before it: a test rejects when its adjusted p is below the level, which keeps
    the chance of any false rejection in the whole family below the level.
    """
    count, adjusted, running = len(p_values), [0.0] * len(p_values), 0.0
    for rank, index in enumerate(sorted(range(count), key=lambda at: p_values[at])):
        running = max(running, min(1.0, (count - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted
