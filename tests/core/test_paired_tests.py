import pytest
import torch

from core import paired_tests


def test_holm_matches_hand_computed_step_down():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to 0.06 (step-down)
    assert paired_tests.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert paired_tests.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert paired_tests.holm([0.02]) == [0.02]


def test_holm_is_neither_bonferroni_nor_uncorrected():
    p = [0.01, 0.02, 0.03]
    holm = paired_tests.holm(p)
    assert holm == pytest.approx([0.03, 0.04, 0.04])
    assert holm != pytest.approx([3 * value for value in p]) and holm != pytest.approx(p)


@pytest.mark.parametrize(("first_only", "second_only", "expected"), [(0, 0, 1.0), (0, 5, 0.0625), (6, 1, 0.125)])
def test_mcnemar_p_is_the_exact_two_sided_binomial_of_the_discordant_images(first_only, second_only, expected):
    assert paired_tests.mcnemar_p(first_only, second_only) == pytest.approx(expected, rel=1e-9)
    assert paired_tests.mcnemar_p(second_only, first_only) == pytest.approx(expected, rel=1e-9)


def test_correct_flags_follow_the_one_prediction_rule_and_round_trip():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 1.0]])  # the last row ties: class 0
    flags = paired_tests.correct_flags(logits, torch.tensor([0, 0, 0, 0]))
    assert flags == "1011"
    assert paired_tests.parse_correct_flags(flags).tolist() == [True, False, True, True]
