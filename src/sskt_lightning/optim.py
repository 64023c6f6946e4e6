"""Optimizer and schedule helpers referenced from ``conf/optim/*.yaml``."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def multistep_by_fraction(optimizer: torch.optim.Optimizer, max_epochs: int,
                          fractions: Sequence[float] = (0.3, 0.6, 0.8), gamma: float = 0.2):
    """Multiply the learning rate by ``gamma`` at each fraction of ``max_epochs`` (stepped per epoch).

    The reference schedule (decay at 60/120/160 of 200 epochs, factor 0.2) is fractions
    (0.3, 0.6, 0.8), so shortened runs keep the same shape. A LambdaLR keeps the checkpoint's
    scheduler state plain (readable with ``torch.load(weights_only=True)``).
    """
    milestones = sorted(max(1, round(f * max_epochs)) for f in fractions)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: gamma ** sum(epoch >= m for m in milestones))


def step_decay(optimizer: torch.optim.Optimizer, step_size: int = 50, gamma: float = 0.5):
    """MAXL's reference schedule: multiply by ``gamma`` every ``step_size`` epochs."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: gamma ** (epoch // step_size))
