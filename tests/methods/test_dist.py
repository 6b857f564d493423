"""DIST (methods/dist.py) against a hand transcription of DIST_KD's formula."""

import pytest
import torch.nn.functional as F
from conftest import LABELS3, STUDENT3, TEACHER3, hand_dist, logit_method_outputs, method_setup
from torch import nn

from methods import dist


def test_dist_matches_the_hand_transcription():
    expected = hand_dist(STUDENT3.tolist(), TEACHER3.tolist(), 4.0)
    assert dist.dist_loss(STUDENT3, TEACHER3, 4.0).item() == pytest.approx(expected, rel=1e-5)
    out = logit_method_outputs("dist", alpha=0.3)
    assert out["dist"].item() == pytest.approx(expected, rel=1e-5)
    ce = F.cross_entropy(STUDENT3, LABELS3).item()
    assert out["loss"].item() == pytest.approx(0.3 * ce + 0.7 * 2.0 * expected, rel=1e-5), "DIST_KD's weight 2"
    assert dist.dist_loss(TEACHER3 * 2 + 1, TEACHER3 * 2 + 1, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_dist_weights():
    method = dist.DIST(nn.Identity(), nn.Identity(), method_setup())
    assert method.weights() == {"logit_weights": {"dist": {"dist": 2.0}}}
