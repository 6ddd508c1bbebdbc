"""Learning-rate schedule: linear warmup from 0 to the peak, then a cosine down to `min_lr` at `max_steps`."""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, peak_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Returns the multiplier of `peak_lr` for optimizer step `step` (0-based: the factor used by update step+1)."""
    if peak_lr <= 0:
        return 0.0
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    floor = min_lr / peak_lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, peak_lr: float, min_lr: float, warmup_steps: int,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Returns a LambdaLR over every parameter group of `optimizer` (each group's initial lr is the peak)."""
    if min_lr > peak_lr:
        raise ValueError(f"train.min_lr ({min_lr}) is above train.lr ({peak_lr})")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, peak_lr, min_lr, warmup_steps, max_steps))


def move_to_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Sets `scheduler` (and its optimizer's learning rates) to where it is after `step` optimizer steps.

    On resume the LR is recomputed from the step and the current config rather than copied from the checkpoint, so
    a resumed run with a changed train.max_steps or train.lr follows the schedule that config describes.
    """
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
