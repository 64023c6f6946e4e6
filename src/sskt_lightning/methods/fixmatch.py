"""FixMatch (Sohn et al., NeurIPS 2020) and its adaptive-threshold successors (FlexMatch, FreeMatch,
SoftMatch: ``threshold``), on the same unlabeled images SSKT sees.

    L = CE(f(weak x_l), y) + lambda_u * mean_u[ w_u * CE(f(strong x_u), argmax q_u) ]

``q_u = softmax(f(weak x_u))`` without gradient, ``w_u`` from the pseudo-label policy
(:mod:`sskt_lightning.methods.pseudo_labels`, the component SSKT's ``consistency=fixmatch`` holds
too). One forward over the labeled, weak-unlabeled and strong-unlabeled images together, as the
reference implementations do (so BatchNorm's batch statistics span all three). The batch is
``{"labeled": (x, y, idx, view), "unlabeled": (x_u, idx_u, view_u), "unlabeled_strong": x_s}``:
the harness builds the strong views because the class says ``strong_views``.
"""
from __future__ import annotations

import torch

from sskt_lightning.errors import ConfigError
from sskt_lightning.methods.base import Method
from sskt_lightning.methods.pseudo_labels import NEEDS_STREAM, PseudoLabelConsistency, unlabeled_parts


class FixMatch(Method):
    name = "fixmatch"
    accepts_unlabeled = True
    requires_unlabeled = True
    strong_views = True
    loss_terms = {"task_loss": "the labeled images' cross-entropy", **PseudoLabelConsistency.terms}

    def __init__(self, threshold: str = "fixed", tau: float = 0.95, lambda_u: float = 1.0,
                 threshold_ema: float = 0.999, fairness_weight: float = 0.01, flex_warmup: bool = True):
        super().__init__()
        self.consistency = PseudoLabelConsistency(threshold, tau, lambda_u, threshold_ema, fairness_weight,
                                                  flex_warmup)

    def setup(self, module):
        if module.multi_label:
            raise ConfigError("method=fixmatch needs single-label data: its pseudo-labels are one class per image.")
        data = (module.cfg.get("data") or {}) if hasattr(module, "cfg") else {}
        if data and not data.get("unlabeled", False):
            raise ConfigError(NEEDS_STREAM)
        self.consistency.setup(int(module.data_info["num_classes"]))

    def attach_data(self, datamodule):
        self.consistency.attach_data(datamodule)

    def training_step(self, module, batch):
        xu, idxu, xs = unlabeled_parts(batch, "fixmatch")
        x, y, _, _ = batch["labeled"]
        n, nu = len(x), len(xu)
        logits = module.target(torch.cat([x, xu, xs])).logits
        task = module.task_loss(logits[:n], y)
        unsup, parts = self.consistency(logits[n:n + nu], logits[n + nu:], idxu)
        loss = task + unsup
        module.log_train({"loss": loss, "task_loss": task, **parts}, logits[:n], y)
        return loss

    def describe(self):
        return self.consistency.describe()
