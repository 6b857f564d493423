"""A sweep's best trial against noise (sweep.noise): McNemar per trial pair, Holm's correction, the tied group
and the validation size a difference would need."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from scipy.stats import binomtest

from sweep import noise


def complete_trial(number: int, value: float, correct: str, user: bool = False) -> optuna.trial.FrozenTrial:
    attrs = {noise.CORRECT_ATTR: correct, **({noise.USER_ATTR: True} if user else {})}
    trial = optuna.trial.create_trial(value=value, params={"alpha": 0.5},
                                      distributions={"alpha": FloatDistribution(0.1, 0.9)}, user_attrs=attrs)
    trial.number = number
    return trial


def test_the_best_is_compared_with_each_trial_image_by_image():
    best = complete_trial(2, 0.8, "1111111100")
    user = complete_trial(0, 0.6, "1111110000", user=True)  # the best alone right on 2 images, the user on none
    same = complete_trial(1, 0.8, "1111111100")
    worse = complete_trial(3, 0.0, "0000000000")
    found = noise.comparisons([user, same, best, worse], best)
    assert found["user_trial"] == 0 and found["val_images"] == 10
    by_trial = {item.trial: item for item in found["comparisons"]}
    assert (by_trial[0].best_only, by_trial[0].other_only) == (2, 0)
    assert by_trial[0].p == pytest.approx(binomtest(2, 2, 0.5).pvalue)
    assert by_trial[1].p == 1.0
    assert by_trial[3].p == pytest.approx(binomtest(8, 8, 0.5).pvalue)  # 0.0078: holm 3 * 0.0078 < 0.05
    assert by_trial[3].p_holm == pytest.approx(3 * by_trial[3].p)
    assert found["tied_with_best"] == [0, 1, 2]


def test_identical_trials_are_all_tied():
    trials = [complete_trial(n, 0.5, "1010101010") for n in range(4)]
    assert noise.comparisons(trials, trials[0])["tied_with_best"] == [0, 1, 2, 3]


def test_the_resolving_size_makes_the_same_rates_significant():
    size = noise.resolving_size(5, 2, 200)  # p = 0.45 on 200 images
    assert size is not None and size > 200
    scale = size / 200
    assert binomtest(round(5 * scale), round(5 * scale) + round(2 * scale), 0.5).pvalue < 0.05
    smaller = size / noise.SIZE_STEP ** 2 / 200
    assert binomtest(round(5 * smaller), round(5 * smaller) + round(2 * smaller), 0.5).pvalue >= 0.05
    assert noise.resolving_size(3, 3, 200) is None
