"""DIST on standardized logits (methods/dist_ls.py) against a hand transcription."""

import pytest
import torch.nn.functional as F
from conftest import LABELS3, STUDENT3, TEACHER3, hand_dist, hand_standardize, logit_method_outputs, method_setup
from torch import nn

from methods import dist_ls


def test_dist_ls_is_dist_of_the_z_scores_at_the_base_temperature():
    expected = hand_dist(hand_standardize(STUDENT3.tolist()), hand_standardize(TEACHER3.tolist()), 2.0)
    out = logit_method_outputs("dist_ls", ls_temperature=2.0)
    assert out["dist"].item() == pytest.approx(expected, rel=1e-5)
    ce = F.cross_entropy(STUDENT3, LABELS3).item()
    assert out["loss"].item() == pytest.approx(0.5 * ce + 0.5 * 18 * expected, rel=1e-5)


def test_dist_ls_weights():
    method = dist_ls.DISTLS(nn.Identity(), nn.Identity(), method_setup())
    assert method.weights() == {"logit_weights": {"dist_ls": {"dist": 18.0}}}
