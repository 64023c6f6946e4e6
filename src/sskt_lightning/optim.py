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


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.05,
                  min_lr_ratio: float = 0.0):
    """Linear warm-up from ~0 to the base lr, then cosine decay to ``min_lr_ratio`` x base lr.

    Stepped once per training step (``optim.interval: step``): ``total_steps`` is the run's number
    of training batches (filled in by the module from the trainer); ``warmup`` is a fraction of it
    (< 1) or a number of steps (>= 1). Step ``s`` (0-based) gets factor ``(s + 1) / W`` during the
    warm-up ``s < W``, then ``min + (1 - min) * (1 + cos(pi * (s - W) / (total - W))) / 2``.
    """
    import math

    total = int(total_steps)
    if total < 1:
        raise ValueError(f"warmup_cosine needs total_steps >= 1, got {total_steps}")
    w = int(round(warmup * total)) if 0 <= warmup < 1 else int(warmup)
    w = min(max(w, 0), total)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        progress = min(1.0, (step - w) / max(1, total - w))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


INTERVALS = ("epoch", "step")


def build_optimizer(optim_cfg, params, trainer=None, **scheduler_kwargs):
    """``optim.optimizer`` over ``params`` and, when configured, ``optim.scheduler`` with its interval.

    ``optim.interval``: ``epoch`` (default: the scheduler steps once per epoch) or ``step`` (once per
    training step, every method - the manual-optimization ones step it in
    :meth:`Method.on_train_batch_end`). A step-based scheduler gets ``total_steps``, the run's number
    of training batches (``trainer.estimated_stepping_batches``).
    Returns the optimizer, or Lightning's ``{"optimizer", "lr_scheduler": {...}}`` dict.
    """
    from hydra.utils import instantiate

    from sskt_lightning.errors import ConfigError

    optimizer = instantiate(optim_cfg.optimizer)(params=list(params))
    if optim_cfg.get("scheduler") is None:
        return optimizer
    interval = str(optim_cfg.get("interval") or "epoch")
    if interval not in INTERVALS:
        raise ConfigError(f"optim.interval={interval!r}; choose one of {list(INTERVALS)}.")
    kwargs = dict(scheduler_kwargs)
    if interval == "step":
        if trainer is None:
            raise ConfigError("optim.interval=step needs the trainer to count the training steps: build the "
                              "optimizers from Lightning's configure_optimizers.")
        total = trainer.estimated_stepping_batches
        if total is None or total == float("inf") or total < 1:
            raise ConfigError("optim.interval=step needs a finite training length (trainer.max_epochs or "
                              "trainer.max_steps) to place its schedule.")
        kwargs["total_steps"] = int(total)
    scheduler = instantiate(optim_cfg.scheduler)(optimizer=optimizer, **kwargs)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
