"""Scratch: the target trained on its own task only, the baseline every table starts with."""
from __future__ import annotations

from sskt_lightning.methods.base import Method, split_batch


class Scratch(Method):
    name = "scratch"

    def training_step(self, module, batch):
        x, y, *_ = split_batch(batch)
        logits = module.target(x).logits
        loss = module.task_loss(logits, y)
        module.log_train({"loss": loss}, logits, y)
        return loss
