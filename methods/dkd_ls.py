"""DKD on standardized logits (logit standardization, Sun et al., CVPR 2024): the DKD terms compare both models'
z-scored logits at the base temperature, with the reference's weights, ls_weight times dkd_alpha and dkd_beta."""

from __future__ import annotations

import torch

from methods import dkd, kd_ls
from methods.base import register


@register
class DKDLS(dkd.DKD):
    """`DKD` with both models' logits z-scored (`kd_ls.standardize`) before the DKD terms; CE sees the raw logits."""

    name = "dkd_ls"
    year = 2024
    citation = "Sun et al., CVPR 2024; logit-standardization-KD mdistiller/distillers/DKD.py"
    settings = {**dkd.SETTINGS, **kd_ls.SETTINGS}
    # its README's DKD command: mdistiller's per-pair config with --kd-weight 9, multiplying DKD.ALPHA and DKD.BETA
    reference_scale = 9.0
    reference_weights = {"ce": 1.0, "tckd": 9.0, "nckd": 9.0 * dkd.DEFAULT_BETA}

    @property
    def scale(self) -> float:  # type: ignore[override]
        return self.config.ls_weight

    def term_temperature(self) -> float:
        return self.config.ls_temperature

    def compared_logits(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return kd_ls.standardize(student_logits), kd_ls.standardize(teacher_logits)
