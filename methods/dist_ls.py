"""DIST on standardized logits (logit standardization, Sun et al. 2024, applied to DIST; no published setting:
the reference's rule for DKD, ls_weight times DIST's weight, at the base temperature)."""

from __future__ import annotations

from methods import dist, kd_ls
from methods.base import register


@register
class DISTLS(dist.DIST):
    """DIST with both models' logits z-scored before the term."""

    name = "dist_ls"
    year = 2024
    citation = "Sun et al., CVPR 2024 (no published DIST setting)"
    settings = {**dist.SETTINGS, **kd_ls.SETTINGS}
    standardized = True
    reference_weights = {"ce": 1.0, "dist": 9.0 * 2.0}  # no published setting: its DKD rule, 9 x DIST's 2, beside CE 1

    def term_weight(self) -> float:
        return self.config.ls_weight * self.config.dist_weight
