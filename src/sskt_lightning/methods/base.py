"""The method seam: a strategy object that knows its losses, extra networks and optimizers.

:class:`sskt_lightning.module.TransferModule` owns the target, the frozen sources, the metrics and
the logging; it delegates the training step (and, for methods with several optimizers or a meta
step, the optimizer set-up) to its ``method``. A method is an ``nn.Module`` so that the networks it
adds (aux heads, DML peers, the MAXL label generator) move with the module, are checkpointed, and
are seen by DDP.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sskt_lightning.module import TransferModule


def split_batch(batch):
    """``(x, y, index, view)`` from a plain batch, or from the ``labeled`` part of a dict batch
    (``view``: each sample's augmentation view id, see ``ImageDataModule.prepare_batch``)."""
    return batch["labeled"] if isinstance(batch, dict) else batch


class Method(nn.Module):
    name = "base"
    needs_sources = False          # build cfg.source into module.sources
    automatic_optimization = True  # False: the method steps its optimizers via manual_backward
    tap_pooled = False             # target forward also returns the pooled feature
    tap_stages = False             # ... and every stage's output
    no_compiled_target: str | None = None   # why compile.target cannot serve this method (None: it can)

    def setup(self, module: TransferModule) -> None:
        """Build what depends on the target/sources/data (heads, peers). Called once at init."""

    def training_step(self, module: TransferModule, batch) -> torch.Tensor | None:
        raise NotImplementedError

    def configure_optimizers(self, module: TransferModule):
        """Default: one optimizer (``cfg.optim``) over every trainable parameter of the module."""
        return module.default_optimizers(p for p in module.parameters() if p.requires_grad)

    def on_fit_start(self, module: TransferModule) -> None:
        """Before the first training step, with the trainer and its data module at hand."""

    def on_fit_end(self, module: TransferModule) -> None:
        """After training (not after a failure)."""

    def on_train_epoch_end(self, module: TransferModule) -> None:
        """Manual optimization: Lightning does not step schedulers; step the per-epoch ones here."""
        self.step_schedulers(module, "epoch")

    def on_train_batch_end(self, module: TransferModule) -> None:
        """Manual optimization: step the per-step schedulers (``optim.interval: step``) after every
        training step, as Lightning does for automatically optimized methods."""
        self.step_schedulers(module, "step")

    def step_schedulers(self, module: TransferModule, interval: str) -> None:
        """Step every scheduler configured with ``interval`` (manual optimization only: Lightning
        steps them itself otherwise). The interval is the one in the method's
        ``configure_optimizers`` dicts (``{"scheduler": ..., "interval": "step"}``), default epoch."""
        if self.automatic_optimization:
            return
        for config in module.trainer.lr_scheduler_configs:
            if config.interval == interval:
                config.scheduler.step()

    def extra_eval_names(self) -> list[str]:
        """Names of additional networks evaluated beside the target (e.g. DML peers)."""
        return []

    def extra_eval_logits(self, module: TransferModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Their logits on an evaluation batch, keyed by :meth:`extra_eval_names`."""
        return {}

    def describe(self) -> dict:
        """Settings recorded in results.json."""
        return {}

    def optimizer_names(self) -> list[str]:
        """One name per optimizer of :meth:`configure_optimizers`, in order: the key of its logged
        learning rate (``lr/<name>``)."""
        return ["target"]
