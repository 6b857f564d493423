"""Learning-rate schedules: the one-cycle default, and the KD papers' step and cosine schedules.

- "onecycle" (the default): torch's OneCycleLR over all optimizer steps, its rate changing every step.
- "step": the rate times `decay` once per milestone passed. As RepDistiller's and mdistiller's
  `adjust_learning_rate`, set at the start of every epoch: epoch e (from 1) trains at
  lr * decay ** (number of milestones m with e > m), so with milestones 150, 180, 210 epoch 151 is
  the first at a tenth of the rate.
- "cosine": half a cosine from the peak down to 0, also per epoch (as torchvision's reference
  scripts step CosineAnnealingLR): epoch e trains at lr * (1 + cos(pi * (e - 1 - W) / (E - W))) / 2
  after W warm-up epochs of E, so the curve reaches 0 where the run ends.
- warm-up (step and cosine): epoch e <= W trains at lr * e / (W + 1), climbing in equal steps to the
  peak, which the first epoch after the warm-up reaches.

Every schedule is a torch scheduler stepped once per optimizer step (engine's loop does that): the
per-epoch ones are a LambdaLR whose factor depends on the epoch the step belongs to, so the rate is
constant within an epoch. Its state (the step count) travels in the resume state, so a resumed run
continues the schedule where it stopped.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("onecycle", "step", "cosine")


def parse_milestones(text: str | None) -> list[int]:
    """The epochs after which a step schedule decays ("150,180,210"), positive and increasing (ValueError if not)."""
    try:
        milestones = [int(part) for part in (text or "").split(",") if part.strip()]
    except ValueError:
        milestones = []
    if not milestones or min(milestones) < 1 or milestones != sorted(set(milestones)):
        raise ValueError(f"--milestones must be increasing positive epochs separated by commas, such as 150,180,210 "
                         f"(got '{text}').")
    return milestones


def checked_milestones(
    schedule: str, milestones: str | None, warmup_epochs: int, trained_epochs: dict[str, int],
) -> list[int]:
    """The milestones of a step schedule (none for the others), after checking that they and the warm-up belong
    to the schedule and fall inside the training of every model that trains (`trained_epochs`: its epochs by
    who it is, "the teacher", "each student"). ValueError with one sentence if not."""
    if schedule == "onecycle" and (milestones is not None or warmup_epochs):
        raise ValueError("--milestones and --warmup-epochs belong to --lr-schedule step or cosine; onecycle has its "
                         "own warm-up.")
    if schedule != "step" and milestones is not None:
        raise ValueError(f"--milestones belong to --lr-schedule step, not {schedule}.")
    if schedule == "step" and milestones is None:
        raise ValueError("--lr-schedule step needs --milestones, the epochs after which the rate decays (the "
                         "references: 150,180,210 of 240 epochs).")
    chosen = parse_milestones(milestones) if schedule == "step" else []
    last = max(chosen, default=0)
    for who, epochs in trained_epochs.items():
        if last >= epochs or warmup_epochs >= epochs:
            setting = f"--milestones {milestones}" if last >= epochs else f"--warmup-epochs {warmup_epochs}"
            raise ValueError(f"{setting} does not fit the {epochs} epochs {who} trains: milestones and warm-up count "
                             "the epochs of every model trained, so scale them to its epochs.")
    return chosen


def epoch_factor(
    schedule: str, epoch: int, epochs: int, milestones: list[int], decay: float, warmup_epochs: int,
) -> float:
    """The share of the peak rate that epoch `epoch` (from 1) of `epochs` trains at, under "step" or "cosine"."""
    if epoch <= warmup_epochs:
        return epoch / (warmup_epochs + 1)
    if schedule == "step":
        return decay ** sum(epoch > milestone for milestone in milestones)
    return (1 + math.cos(math.pi * (epoch - 1 - warmup_epochs) / (epochs - warmup_epochs))) / 2


def make_scheduler(
    optimizer: torch.optim.Optimizer, lr: float, epochs: int, steps_per_epoch: int, schedule: str = "onecycle",
    milestones: list[int] | None = None, decay: float = 0.1, warmup_epochs: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of one model's training: `epochs` epochs of `steps_per_epoch` optimizer steps at peak `lr`."""
    if schedule == "onecycle":
        steps = epochs * steps_per_epoch
        # OneCycleLR divides by its phase lengths: very short runs (a few steps) need a longer warm-up share.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=max(steps, 4), pct_start=0.25 if steps >= 8 else 0.5
        )
    chosen = list(milestones or [])

    def factor(step: int) -> float:
        return epoch_factor(schedule, step // steps_per_epoch + 1, epochs, chosen, decay, warmup_epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
