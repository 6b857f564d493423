"""Logit standardization (methods/kd_ls.py): the z-score and kd_ls against hand transcriptions of the reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS3, STUDENT3, TEACHER3, hand_kd, hand_standardize, logit_method_outputs, method_setup
from torch import nn

from methods import kd_ls


def test_standardize_is_the_references_z_score():
    expected = [value for row in hand_standardize(STUDENT3.tolist()) for value in row]
    assert kd_ls.standardize(STUDENT3).flatten().tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="two classes"):
        kd_ls.standardize(torch.ones(2, 1))


def test_kd_ls_is_ce_plus_the_references_ninety_times_standardized_kd():
    z_s, z_t = (torch.tensor(hand_standardize(x.tolist())) for x in (STUDENT3, TEACHER3))
    expected_kd = hand_kd(z_s, z_t, 2.0)
    ce = F.cross_entropy(STUDENT3, LABELS3).item()
    out = logit_method_outputs("kd_ls")
    assert out["kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6), "CE sees the raw logits"
    # At alpha 0.5: 0.5 CE + 45 KD, the reference's 0.1 CE + 9 KD times 5.
    assert out["loss"].item() == pytest.approx(0.5 * ce + 0.5 * 90 * expected_kd, rel=1e-5)
    assert out["loss"].item() == pytest.approx(5 * (0.1 * ce + 9 * expected_kd), rel=1e-5)


def test_kd_ls_weights():
    method = kd_ls.KDLS(nn.Identity(), nn.Identity(), method_setup())
    assert method.weights() == {"logit_weights": {"kd_ls": {"kd": pytest.approx(90.0)}}}
