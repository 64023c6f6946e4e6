"""SSKT: frozen sources label each target image with their own class distribution; the target
predicts it through one auxiliary head per source, next to its own task.

    L = L_task(z, y) + alpha * sum_s L_aux(a_s, t_s)           (formula: losses.sskt_loss)

With ``unlabeled=True`` the batch is ``{"labeled": (x, y, idx, view), "unlabeled": (x_u, idx_u,
view_u)}``: the auxiliary loss runs on both streams, the task loss only on the labeled images (the
unlabeled stream carries no labels at all). The sources label both streams through the one seam,
``module.sources`` (with ``cache`` on, from the soft-label cache: :mod:`sskt_lightning.cache`).
"""
from __future__ import annotations

import torch
from torch import nn

from sskt_lightning.errors import ConfigError
from sskt_lightning.heads import TM_WIDTHS, build_head
from sskt_lightning.losses import AUX_LOSSES, aux_kl, sskt_loss
from sskt_lightning.methods.base import TEMPERATURE_HINT, Method, check_positive, check_range
from sskt_lightning.methods.source_cache import SourceCacheOptions


class SSKT(SourceCacheOptions, Method):
    name = "sskt"
    needs_sources = True
    accepts_unlabeled = True

    def __init__(self, alpha: float = 0.1, temperature: float = 3.0, aux_loss: str = "ce",
                 aux_head: str = "transfer_module", source_bn: str = "eval",
                 tm_out: int | None = None, tm_mid: int | None = None, unlabeled: bool = False,
                 tm_width: str = "auto", tm_bias: bool = False,
                 cache: str = "off", cache_budget_gb: float = 16.0, cache_topk: int | None = None):
        super().__init__()
        self.alpha = check_range("alpha", alpha, 0.0, valid=">= 0")
        self.temperature = check_positive("temperature", temperature, TEMPERATURE_HINT)
        self.init_cache(cache, cache_budget_gb, cache_topk, source_bn)
        if aux_loss not in AUX_LOSSES:
            raise ConfigError(f"method.aux_loss={aux_loss!r}; choose one of {sorted(AUX_LOSSES)}.")
        if aux_head not in ("linear", "transfer_module"):
            raise ConfigError(f"method.aux_head={aux_head!r}; choose 'linear' or 'transfer_module'.")
        self.aux_loss = aux_loss
        self.aux_head, self.source_bn, self.unlabeled = aux_head, source_bn, bool(unlabeled)
        self.tm_out, self.tm_mid = tm_out, tm_mid
        if tm_width not in TM_WIDTHS:
            raise ConfigError(f"method.tm_width={tm_width!r}; choose one of {list(TM_WIDTHS)}.")
        self.tm_width, self.tm_bias = tm_width, bool(tm_bias)
        self.tap_pooled = aux_head == "linear"
        self.tap_stages = aux_head == "transfer_module"
        self.heads = nn.ModuleList()

    @classmethod
    def describe_term(cls, key):
        return f"SSKT's auxiliary loss of source {key[4:]!r}" if key.startswith("aux_") else None

    def setup(self, module):
        if len(module.sources) == 0:
            raise ConfigError("method=sskt needs at least one source: e.g. source=[imagenet_resnet50] "
                              "or source=[imagenet_resnet50,places365_resnet50].")
        for k in module.sources.num_classes:
            self.heads.append(build_head(self.aux_head, module.target, k, self.tm_out, self.tm_mid,
                                         self.tm_width, self.tm_bias))

    def training_step(self, module, batch):
        stream = "labeled"
        if isinstance(batch, dict):
            x, y, idx, view = batch["labeled"]
            if "unlabeled" in batch:
                xu, idxu, viewu = batch["unlabeled"]
                stream = [("labeled", len(x)), ("unlabeled", len(xu))]
                x, idx, view = torch.cat([x, xu]), torch.cat([idx, idxu]), torch.cat([view, viewu])
        elif self.unlabeled:
            raise ConfigError("method.unlabeled=true needs data.unlabeled=true (a second, unlabeled stream).")
        else:
            x, y, idx, view = batch
        n = y.shape[0]
        out = module.target(x)
        task = module.task_loss(out.logits[:n], y)
        targets = module.sources(x, idx, view, stream)
        aux = [head(out) for head in self.heads]
        loss, terms = sskt_loss(task, aux, targets, self.alpha, self.aux_loss, self.temperature)
        parts = {"loss": loss, "task_loss": task}
        parts.update({f"aux_{key}": t for key, t in zip(module.sources.sources, terms)})
        # the part of each aux term that can reach zero: T^2 KL(source || head); 0 = head reproduces the source
        parts.update({f"aux_kl_{key}": aux_kl(a, t, self.temperature)
                      for key, a, t in zip(module.sources.sources, aux, targets)})
        module.log_train(parts, out.logits[:n], y)
        return loss

    @property
    def cache_temperature(self) -> float:
        return 1.0 if self.aux_loss == "focal" else self.temperature     # focal: softmax at T = 1

    def describe(self):
        return {"alpha": self.alpha, "temperature": self.temperature, "aux_loss": self.aux_loss,
                "aux_head": self.aux_head, "source_bn": self.source_bn, "unlabeled": self.unlabeled,
                "tm_width": self.tm_width, "tm_bias": self.tm_bias, **self.describe_cache()}
