"""SSKT: frozen sources label each target image with their own class distribution; the target
predicts it through one auxiliary head per source, next to its own task.

    L = L_task(z, y) + alpha * sum_s L_aux(a_s, t_s)           (formula: losses.sskt_loss)

With ``unlabeled=True`` the batch is ``{"labeled": (x, y, idx, view), "unlabeled": (x_u, idx_u,
view_u)}``: the auxiliary loss runs on both streams, the task loss only on the labeled images (the
unlabeled stream carries no labels at all). The sources label both streams through the one seam,
``module.sources`` (with ``cache`` on, from the soft-label cache: :mod:`sskt_lightning.cache`).

``consistency="fixmatch"`` adds FixMatch's pseudo-label term on the unlabeled stream (the component
:class:`~sskt_lightning.methods.pseudo_labels.PseudoLabelConsistency` that ``method=fixmatch``
holds, with its ``threshold`` policy): ``L += lambda_u * mean_u[w_u * CE(f(strong x_u), argmax
q_u)]``. The strong views join the target's one forward and feed only this term; the auxiliary
heads and the sources see the labeled and weak unlabeled images as without it.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from sskt_lightning.errors import ConfigError
from sskt_lightning.heads import TM_WIDTHS, build_head
from sskt_lightning.losses import AUX_LOSSES, aux_kl, sskt_loss
from sskt_lightning.methods.base import TEMPERATURE_HINT, Method, check_positive, check_range
from sskt_lightning.methods.pseudo_labels import PseudoLabelConsistency, unlabeled_parts
from sskt_lightning.methods.source_cache import SourceCacheOptions

CONSISTENCIES = ("none", "fixmatch")


class SSKT(SourceCacheOptions, Method):
    name = "sskt"
    needs_sources = True
    accepts_unlabeled = True

    def __init__(self, alpha: float = 0.1, temperature: float = 3.0, aux_loss: str = "ce",
                 aux_head: str = "transfer_module", source_bn: str = "eval",
                 tm_out: int | None = None, tm_mid: int | None = None, unlabeled: bool = False,
                 tm_width: str = "auto", tm_bias: bool = False,
                 cache: str = "off", cache_budget_gb: float = 16.0, cache_topk: int | None = None,
                 consistency: str = "none", threshold: str = "fixed", tau: float = 0.95, lambda_u: float = 1.0,
                 threshold_ema: float = 0.999, fairness_weight: float = 0.01, flex_warmup: bool = True):
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
        if consistency not in CONSISTENCIES:
            raise ConfigError(f"method.consistency={consistency!r}; choose one of {list(CONSISTENCIES)} "
                              "(fixmatch: add FixMatch's pseudo-label term on the unlabeled stream).")
        # built (and its options checked) either way, so a bad threshold/tau is refused even when off
        fixmatch = PseudoLabelConsistency(threshold, tau, lambda_u, threshold_ema, fairness_weight, flex_warmup)
        self.consistency_name = consistency
        self.consistency = fixmatch if consistency == "fixmatch" else None
        if self.consistency is not None:
            if not self.unlabeled:
                raise ConfigError("method.consistency=fixmatch needs the unlabeled stream: add "
                                  "method.unlabeled=true data.unlabeled=true.")
            self.strong_views = True      # the harness builds batch["unlabeled_strong"]

    @classmethod
    def describe_term(cls, key):
        if key.startswith("aux_"):
            return f"SSKT's auxiliary loss of source {key[4:]!r}"
        return PseudoLabelConsistency.terms.get(key)

    def setup(self, module):
        if len(module.sources) == 0:
            raise ConfigError("method=sskt needs at least one source: e.g. source=[imagenet_resnet50] "
                              "or source=[imagenet_resnet50,places365_resnet50].")
        for k in module.sources.num_classes:
            self.heads.append(build_head(self.aux_head, module.target, k, self.tm_out, self.tm_mid,
                                         self.tm_width, self.tm_bias))
        if self.consistency is not None:
            if module.multi_label:
                raise ConfigError("method.consistency=fixmatch needs single-label data (one pseudo-label per image).")
            data = (module.cfg.get("data") or {}) if hasattr(module, "cfg") else {}
            if data and not data.get("unlabeled", False):
                raise ConfigError("method.consistency=fixmatch needs the unlabeled stream: add data.unlabeled=true.")
            self.consistency.setup(int(module.data_info["num_classes"]))

    def attach_data(self, datamodule):
        if self.consistency is not None:
            self.consistency.attach_data(datamodule)

    def training_step(self, module, batch):
        stream, strong = "labeled", None
        if self.consistency is not None:
            _, idxu, strong = unlabeled_parts(batch, "method.consistency=fixmatch")
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
        n, m = y.shape[0], x.shape[0]
        if strong is None:
            out = module.target(x)
        else:     # one forward over labeled, weak and strong unlabeled; heads see the first two only
            full = module.target(torch.cat([x, strong]))
            out = dataclasses.replace(full, logits=full.logits[:m],
                                      pooled=None if full.pooled is None else full.pooled[:m],
                                      stages=None if full.stages is None else [s[:m] for s in full.stages])
        task = module.task_loss(out.logits[:n], y)
        targets = module.sources(x, idx, view, stream)
        aux = [head(out) for head in self.heads]
        loss, terms = sskt_loss(task, aux, targets, self.alpha, self.aux_loss, self.temperature)
        consistency = {}
        if strong is not None:
            unsup, consistency = self.consistency(full.logits[n:m], full.logits[m:], idxu)
            loss = loss + unsup
        parts = {"loss": loss, "task_loss": task, **consistency}
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
                "tm_width": self.tm_width, "tm_bias": self.tm_bias, **self.describe_cache(),
                **({"consistency": self.consistency_name, **self.consistency.describe()}
                   if self.consistency is not None else {})}
