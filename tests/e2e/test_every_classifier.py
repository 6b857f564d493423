"""Every torchvision classifier is checked at two sizes without a traceback (slow, not a whole run: about 50 s)."""

from __future__ import annotations

import pytest
from torchvision import models

import model_builder

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("size", [32, 224])
def test_every_torchvision_classifier_is_checked_without_a_traceback(size):
    refused = []
    for name in models.list_models(module=models):
        try:
            model_builder.check_input_size(name, size)
        except ValueError as error:  # the one kind of refusal the pipeline turns into a sentence
            assert "\n" not in str(error)
            refused.append(name)
    assert ("vit_b_16" in refused) == (size != 224)
    assert "resnet18" not in refused  # its small-image variant up to 64 px
    assert ("regnet_y_400mf" in refused) == (size == 32)  # 32-fold smaller: a 1x1 last feature map at 32 px
