"""DKD on standardized logits (methods/dkd_ls.py) against a hand transcription of the reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS3, STUDENT3, TEACHER3, hand_dkd, hand_standardize, logit_method_outputs, method_setup
from torch import nn

from methods import dkd_ls


def test_dkd_ls_multiplies_dkd_weights_by_nine_after_the_z_score():
    z_s, z_t = (torch.tensor(hand_standardize(x.tolist())) for x in (STUDENT3, TEACHER3))
    tckd, nckd = hand_dkd(z_s, z_t, LABELS3, 2.0)
    out = logit_method_outputs("dkd_ls", dkd_beta=2.0, dkd_warmup_epochs=0)
    assert (out["tckd"].item(), out["nckd"].item()) == pytest.approx((tckd, nckd), rel=1e-5)
    ce = F.cross_entropy(STUDENT3, LABELS3).item()
    assert out["loss"].item() == pytest.approx(0.5 * ce + 0.5 * (9 * tckd + 18 * nckd), rel=1e-5)


def test_dkd_ls_weights():
    method = dkd_ls.DKDLS(nn.Identity(), nn.Identity(), method_setup(dkd_beta=8.0))
    assert method.weights() == {"dkd_beta": 8.0, "logit_weights": {"dkd_ls": {"tckd": 9.0, "nckd": 72.0}}}
