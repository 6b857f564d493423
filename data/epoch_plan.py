"""A training loader's epoch, planned at its start: the random draws of the whole epoch (order, crop
offsets, flips) made at once on the CPU and copied to the device in one transfer, laid out so that
a batch's crop and flip are one gather from the images kept on the device.

Drawing per batch instead costs a few small host-to-device copies and about ten kernels a step
(offsets, index grids, padding, the flip's second image); here a step's share is one gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`. To a GPU through pinned memory without blocking: a copy from ordinary
    memory makes the host wait for every queued kernel."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def padded_channels_last(images: torch.Tensor, pad: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) as (N, H + 2 pad, W + 2 pad, C), framed by `pad` zero pixels: what
    `crop_and_flip` gathers from."""
    return F.pad(images, (pad, pad, pad, pad)).permute(0, 2, 3, 1).contiguous()


def crop_and_flip(pixels: torch.Tensor, samples: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """One gather: image `samples[i]` of `pixels` (`padded_channels_last`), rows `rows[i]` and columns
    `cols[i]` of its padded frame (a crop's window, its columns reversed for a flip), as a (B, C, H, W)
    batch in channels_last memory."""
    return pixels[samples[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@dataclass
class EpochPlan:
    """A training epoch on the device: the samples in order, their labels (and cached teacher logits),
    and each one's crop window and flip as the rows and columns of its padded frame (`crop_and_flip`)."""

    order: torch.Tensor  # the samples again, on the CPU (streaming reads the files in this order)
    samples: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None


def draw(
    order: torch.Tensor, pad: int, hflip: bool, size: int, generator: torch.Generator, device: torch.device,
    labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
) -> EpochPlan:
    """The plan of an epoch of `order` (sample indices, on the CPU): crop offsets in [0, 2 pad] (with a
    pad) and flips (with `hflip`) drawn from `generator` in that order, nothing else; `labels` and
    `teacher_logits` (one row per sample, on `device`) taken in the epoch's order."""
    count = len(order)
    drawn = [order[None]]
    if pad:
        drawn.append(torch.randint(0, 2 * pad + 1, (2, count), generator=generator))
    if hflip:
        drawn.append((torch.rand(count, generator=generator) < 0.5).long()[None])
    plan = to_device(torch.cat(drawn), device)
    samples, positions = plan[0], torch.arange(size, device=device)
    rows, cols = positions.expand(count, size), positions.expand(count, size)
    if hflip:  # a flipped image's column x is its window's column size - 1 - x
        cols = torch.where(plan[-1][:, None].bool(), positions.flip(0), positions)
    if pad:  # the window's offset in the padded frame
        rows, cols = rows + plan[1][:, None], cols + plan[2][:, None]
    return EpochPlan(order, samples, rows, cols, labels[samples],
                     None if teacher_logits is None else teacher_logits[samples])
