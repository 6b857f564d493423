"""Whether a sweep's best trial stands out from noise: its student against every other complete trial's (the
user's own settings, tried first, among them), image by image on the validation split.

Each complete trial keeps which validation images its chosen epoch classified right (CORRECT_ATTR, in the
split's order). The best is compared with each other by McNemar's exact test; Holm's step-down corrects the
family of comparisons, and the trials it leaves unseparated from the best are "tied with the best". The user's
settings are the one comparison asked in advance, so its verdict is the uncorrected p; when it is not
significant, the warning says how many validation images the same rates of disagreement would need.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from core import paired_tests, records

SIGNIFICANCE = 0.05  # the level of every test here
CORRECT_ATTR = "val_correct"  # a complete trial's user attribute: "0110..." (1: that validation image right)
USER_ATTR = "user_settings"  # the user attribute of the trial enqueued with the user's settings (a retry keeps it)
SIZE_STEP = 1.02  # the validation sizes tried grow by this factor, so a size is found within 2%
MAX_SIZE_FACTOR = 10**6  # beyond this many times the validation split, a difference is called unresolvable


def resolving_size(best_only: int, other_only: int, images: int) -> int | None:
    """The validation size at which the same rates of disagreement would give McNemar p < SIGNIFICANCE (within
    SIZE_STEP); None when the two are right equally often (no size resolves a zero difference)."""
    if best_only == other_only:
        return None
    size = float(images)
    while size <= images * MAX_SIZE_FACTOR:
        scale = size / images
        if paired_tests.mcnemar_p(round(best_only * scale), round(other_only * scale)) < SIGNIFICANCE:
            return math.ceil(size)
        size *= SIZE_STEP
    return None


def _discordant(best: str, other: str) -> tuple[int, int]:
    best_right, other_right = (np.frombuffer(text.encode(), np.uint8) == ord("1") for text in (best, other))
    return int((best_right & ~other_right).sum()), int((other_right & ~best_right).sum())


def comparisons(trials: list[FrozenTrial], best: FrozenTrial) -> dict[str, Any]:
    """The SweepRecord fields on noise: the validation size, the user's trial and settings, the best against each
    other complete trial (Holm-corrected over them) and the trials tied with the best (itself included)."""
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE and CORRECT_ATTR in trial.user_attrs]
    user = next((trial for trial in complete if trial.user_attrs.get(USER_ATTR)), None)
    fields: dict[str, Any] = {"user_trial": None if user is None else user.number}
    if CORRECT_ATTR not in best.user_attrs:
        return fields
    best_correct = best.user_attrs[CORRECT_ATTR]
    others = [trial for trial in complete if trial.number != best.number
              and len(trial.user_attrs[CORRECT_ATTR]) == len(best_correct)]
    counts = [_discordant(best_correct, trial.user_attrs[CORRECT_ATTR]) for trial in others]
    raw = [paired_tests.mcnemar_p(*pair) for pair in counts]
    found = [records.TrialComparison(trial=trial.number, best_only=pair[0], other_only=pair[1], p=p, p_holm=adjusted)
             for trial, pair, p, adjusted in zip(others, counts, raw, paired_tests.holm(raw), strict=True)]
    tied = [best.number] + [item.trial for item in found if item.p_holm >= SIGNIFICANCE]
    return {**fields, "val_images": len(best_correct), "comparisons": found, "tied_with_best": sorted(tied)}
