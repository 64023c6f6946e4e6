"""Pseudo-label policies and FixMatch's consistency term, shared by ``method=fixmatch`` and SSKT's
``consistency=fixmatch`` (one component both hold; docs/methods.md, "The FixMatch family").

    L_u = lambda_u * mean_u[ w_u * CE(f(strong x_u), argmax q_u) ]  (+ FreeMatch's fairness term)

``q_u = softmax(f(weak x_u))`` without gradient; ``w_u`` comes from the policy (``threshold``):

* ``fixed`` (FixMatch): ``w = 1[max q >= tau]``.
* ``flex`` (FlexMatch): ``w = 1[max q >= tau * beta_c / (2 - beta_c)]``, ``c = argmax q``;
  ``beta_c = sigma_c / max(sigma)``, ``sigma_c`` = the number of unlabeled samples whose latest
  confident (``max q >= tau``) prediction was ``c``. With ``flex_warmup`` (FlexMatch's threshold
  warm-up) the unused samples count as one more class in the max, so thresholds rise slowly while
  most of the pool is still unseen. The mask uses the betas from before the batch; then the
  batch's confident predictions are written into the per-sample memory (indexed by the unlabeled
  sample index ``idxu``) and the betas recomputed, as microsoft/Semi-supervised-learning does.
* ``free`` (FreeMatch): EMAs (decay ``threshold_ema``) of the batch's mean max-probability
  ``tau_t``, of its mean probability vector ``p~`` and of its pseudo-label histogram ``h~``, all
  starting at ``1/C``, updated with the batch first; ``w = 1[max q >= tau_t * p~_c / max(p~)]``.
  Its class-fairness term ``fairness_weight * sum_c pbar_c log(qbar_c)`` (``pbar``: ``p~ / h~``
  normalised; ``qbar``: the masked strong-view mean probability over its own histogram,
  normalised) is added to the loss.
* ``soft`` (SoftMatch): EMAs of the mean ``mu_t`` and unbiased variance ``sigma_t^2`` of the batch's
  max-probability (start ``1/C`` and ``1``), updated with the batch first;
  ``w = exp(-min(max q - mu_t, 0)^2 / (2 sigma_t^2 / 4))``.

The policies' running statistics are buffers: saved in every checkpoint, restored on resume. Under
DDP the batch statistics (sums and counts; FlexMatch's confident predictions) are reduced over
processes before the update, with the same collectives in the same order on every rank, so every
rank holds the same state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sskt_lightning.errors import ConfigError

THRESHOLDS = ("fixed", "flex", "free", "soft")
# the running statistics are kept in float64 (an EMA at decay 0.999 over many steps; a few bytes):
# a module moved to the device keeps them so, whatever the training precision of the networks
STATE = torch.float64


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes (itself in one process)."""
    if _world() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Every process's ``t`` (1-D, lengths may differ) concatenated in rank order."""
    world = _world()
    if world == 1:
        return t
    n = torch.tensor([t.numel()], device=t.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=t.dtype, device=t.device)
    padded[:t.numel()] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


class PseudoLabelPolicy(nn.Module):
    """Asked once per step for the per-sample weights of the weak-view probabilities ``probs``
    (B_u x C, no gradient); updates its running statistics from the batch as it goes."""

    name = "base"

    def __init__(self, num_classes: int, tau: float):
        super().__init__()
        self.num_classes, self.tau = int(num_classes), float(tau)

    def _apply(self, fn, recurse=True):
        """Moves to a device as any module, but the float64 state stays float64 through a dtype
        conversion of the whole module (``trainer.precision=16-true`` / ``bf16-true`` casts every
        floating buffer): an EMA at decay 0.999 would stall in half precision."""
        kept = {k: b for k, b in self._buffers.items() if b is not None and b.dtype == STATE}
        super()._apply(fn, recurse)
        for key, before in kept.items():
            after = self._buffers[key]
            if after.dtype != STATE:
                self._buffers[key] = before.to(after.device)
        return self

    @torch.no_grad()
    def weights(self, probs: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def extra_loss(self, logits_strong: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """A term the policy adds to the loss (FreeMatch's fairness), or None."""
        return None

    def thresholds(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """What to log of the current state (``threshold``: the mean class threshold), as tensors
        on ``like``'s device."""
        return {"threshold": torch.full((), self.tau, dtype=like.dtype, device=like.device)}

    def size_memory(self, length: int, pool: int) -> None:
        """Per-sample memory (FlexMatch's only): indices in ``[0, length)``, ``pool`` of them used."""


class FixedThreshold(PseudoLabelPolicy):
    name = "fixed"

    @torch.no_grad()
    def weights(self, probs, idx=None):
        return (probs.max(1).values >= self.tau).to(probs.dtype)


class FlexThreshold(PseudoLabelPolicy):
    """FlexMatch's curriculum. ``selected[i]``: the class of unlabeled sample ``i``'s latest
    confident prediction, -1 if it never had one. The memory spans the array the unlabeled indices
    point into (the train split for a ``data.labels_per_class`` pool, the unlabeled split for
    STL-10), sized from the data module (``Method.attach_data``: the command line calls it before a
    resume is checked, a user's own Trainer at fit start; :meth:`size_memory`); indices
    outside the pool stay -1 and are not counted as unused: ``pool_size`` is the pool's size.
    Without a data module (a hand-built batch) it grows to the largest index seen + 1."""

    name = "flex"

    def __init__(self, num_classes, tau, warmup: bool = True):
        super().__init__(num_classes, tau)
        self.warmup = bool(warmup)
        self.register_buffer("selected", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("pool_size", torch.zeros((), dtype=torch.int64))
        self.register_buffer("beta", torch.zeros(self.num_classes, dtype=STATE))

    def size_memory(self, length, pool):
        if self.selected.numel() == 0:          # a resumed run keeps its restored memory
            self.selected = torch.full((int(length),), -1, dtype=torch.int64, device=self.beta.device)
            self.pool_size.fill_(int(pool))
        elif self.selected.numel() != length or int(self.pool_size) != pool:
            raise ConfigError(f"method.threshold=flex: the restored per-sample memory covers {self.selected.numel()} "
                              f"indices ({int(self.pool_size)} unlabeled), this run's unlabeled stream "
                              f"{length} ({pool}): resume with the data settings of the checkpoint.")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "selected")
        if stored is not None and stored.shape != self.selected.shape:    # not sized yet (a user's Trainer restores before fit start)
            self.selected = torch.empty_like(stored, device=self.selected.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def class_thresholds(self) -> torch.Tensor:
        return self.tau * self.beta / (2 - self.beta)

    @torch.no_grad()
    def weights(self, probs, idx=None):
        if idx is None:
            raise ValueError("method.threshold=flex needs the unlabeled samples' indices")
        conf, pred = probs.max(1)
        w = (conf >= self.tau * self.beta[pred] / (2 - self.beta[pred])).to(probs.dtype)
        # the batch's confident predictions (every process's), into the memory
        chosen = torch.where(conf >= self.tau, pred, torch.full_like(pred, -1))
        all_idx, all_chosen = _gather(idx.to(torch.int64)), _gather(chosen)
        need = int(all_idx.max()) + 1 if all_idx.numel() else 0
        if need > self.selected.numel():         # no data module said the size: grow to the largest index
            grown = torch.full((need,), -1, dtype=torch.int64, device=self.selected.device)
            grown[:self.selected.numel()] = self.selected
            self.pool_size.fill_(int(self.pool_size) + need - self.selected.numel())
            self.selected = grown
        keep = all_chosen >= 0
        self.selected[all_idx[keep]] = all_chosen[keep]
        counts = torch.bincount(self.selected[self.selected >= 0], minlength=self.num_classes)[:self.num_classes]
        unused = self.pool_size - counts.sum()
        largest = torch.maximum(counts.max(), unused)
        if largest < self.pool_size:              # not every sample in one bin (e.g. all unused)
            denom = largest if self.warmup else counts.max()
            self.beta.copy_(counts.to(self.beta.dtype) / denom.to(self.beta.dtype))
        return w

    def thresholds(self, like):
        return {"threshold": self.class_thresholds().mean().to(like.dtype)}


class FreeThreshold(PseudoLabelPolicy):
    """FreeMatch's self-adaptive threshold and its class-fairness term."""

    name = "free"

    def __init__(self, num_classes, tau, momentum: float = 0.999, fairness_weight: float = 0.01):
        super().__init__(num_classes, tau)
        self.momentum, self.fairness_weight = float(momentum), float(fairness_weight)
        c = self.num_classes
        self.register_buffer("tau_t", torch.tensor(1.0 / c, dtype=STATE))
        self.register_buffer("p_model", torch.full((c,), 1.0 / c, dtype=STATE))
        self.register_buffer("label_hist", torch.full((c,), 1.0 / c, dtype=STATE))

    def class_thresholds(self) -> torch.Tensor:
        return self.tau_t * self.p_model / self.p_model.max()

    @torch.no_grad()
    def weights(self, probs, idx=None):
        conf, pred = probs.max(1)
        c, dtype = self.num_classes, self.p_model.dtype
        stats = torch.cat([conf.sum().reshape(1), probs.sum(0),
                           torch.bincount(pred, minlength=c)[:c].to(probs.dtype),
                           torch.tensor([len(probs)], dtype=probs.dtype, device=probs.device)]).to(dtype)
        stats = _sum_over_processes(stats)
        n, m = stats[-1], self.momentum
        self.tau_t.mul_(m).add_((1 - m) * stats[0] / n)
        self.p_model.mul_(m).add_((1 - m) * stats[1:1 + c] / n)
        self.label_hist.mul_(m).add_((1 - m) * stats[1 + c:1 + 2 * c] / n)
        return (conf >= self.class_thresholds()[pred]).to(probs.dtype)

    def extra_loss(self, logits_strong, weights):
        mask = weights > 0
        if self.fairness_weight == 0:
            return None
        if not bool(mask.any()):
            return logits_strong.sum() * 0.0
        p = F.softmax(logits_strong[mask], dim=1)
        c = self.num_classes
        hist = torch.bincount(p.argmax(1), minlength=c)[:c].to(p.dtype)
        hist = hist / hist.sum()

        def inverse(t):               # 1 / t with 0 where t = 0 (no sample of that class)
            return torch.where(t > 0, 1.0 / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))

        target = self.p_model.to(p.dtype) * inverse(self.label_hist.to(p.dtype))
        target = (target / target.sum()).detach()
        mean = p.mean(0) * inverse(hist).detach()
        mean = mean / mean.sum()
        return self.fairness_weight * (target * torch.log(mean + 1e-12)).sum()

    def thresholds(self, like):
        return {"threshold": self.class_thresholds().mean().to(like.dtype), "tau_t": self.tau_t.to(like.dtype)}


class SoftWeights(PseudoLabelPolicy):
    """SoftMatch's truncated Gaussian weight (n_sigma = 2, as the paper and semilearn)."""

    name = "soft"

    def __init__(self, num_classes, tau, momentum: float = 0.999):
        super().__init__(num_classes, tau)
        self.momentum = float(momentum)
        self.register_buffer("mu_t", torch.tensor(1.0 / self.num_classes, dtype=STATE))
        self.register_buffer("var_t", torch.tensor(1.0, dtype=STATE))

    @torch.no_grad()
    def weights(self, probs, idx=None):
        conf = probs.max(1).values
        dtype, m = self.mu_t.dtype, self.momentum
        s = _sum_over_processes(torch.stack([conf.sum(), torch.tensor(float(len(conf)), dtype=conf.dtype,
                                                                        device=conf.device)]).to(dtype))
        n, mean = s[1], s[0] / s[1]
        ss = _sum_over_processes(((conf.to(dtype) - mean) ** 2).sum().reshape(1))[0]
        self.mu_t.mul_(m).add_((1 - m) * mean)
        if n > 1:                     # the unbiased variance of one sample is undefined: keep the EMA
            self.var_t.mul_(m).add_((1 - m) * ss / (n - 1))
        return torch.exp(-(torch.clamp(conf - self.mu_t.to(conf.dtype), max=0.0) ** 2)
                         / (2 * self.var_t.to(conf.dtype) / 4))

    def thresholds(self, like):
        return {"threshold": self.mu_t.to(like.dtype), "soft_var": self.var_t.to(like.dtype)}


def check_threshold_options(threshold, tau, lambda_u, threshold_ema, fairness_weight, flex_warmup) -> None:
    """A :class:`ConfigError` naming ``method.<option>`` for a bad value of the family's options."""
    from sskt_lightning.methods.base import check_range

    if threshold not in THRESHOLDS:
        raise ConfigError(f"method.threshold={threshold!r}; choose one of {list(THRESHOLDS)} (FixMatch's fixed "
                          "threshold, FlexMatch's class-wise curriculum, FreeMatch's self-adaptive one, "
                          "SoftMatch's soft weights).")
    check_range("tau", tau, 0.0, 1.0, "[0, 1] (a confidence: pseudo-labels count where max softmax >= tau)")
    check_range("lambda_u", lambda_u, 0.0, valid=">= 0 (the weight of the pseudo-label term)")
    check_range("threshold_ema", threshold_ema, 0.0, 1.0,
                "[0, 1) (the decay of the free/soft policies' running statistics; 0.999 in the papers)")
    if threshold_ema == 1:
        raise ConfigError("method.threshold_ema=1: must lie in [0, 1) (1 would never update the statistics).")
    check_range("fairness_weight", fairness_weight, 0.0, valid=">= 0 (FreeMatch's class-fairness term; 0.01 "
                "in the paper, 0.001 for CIFAR-10 at 4 labels per class)")
    if not isinstance(flex_warmup, bool):
        raise ConfigError(f"method.flex_warmup={flex_warmup!r}: must be true or false.")


def build_policy(threshold: str, num_classes: int, tau: float, threshold_ema: float = 0.999,
                 fairness_weight: float = 0.01, flex_warmup: bool = True) -> PseudoLabelPolicy:
    if threshold == "fixed":
        return FixedThreshold(num_classes, tau)
    if threshold == "flex":
        return FlexThreshold(num_classes, tau, flex_warmup)
    if threshold == "free":
        return FreeThreshold(num_classes, tau, threshold_ema, fairness_weight)
    if threshold == "soft":
        return SoftWeights(num_classes, tau, threshold_ema)
    raise ConfigError(f"method.threshold={threshold!r}; choose one of {list(THRESHOLDS)}.")


NEEDS_STREAM = ("method=fixmatch trains on an unlabeled stream: add data.unlabeled=true (with "
                "data.labels_per_class=<n>, the rest of the training images become unlabeled, or a "
                "dataset with an unlabeled split such as STL-10).")


def unlabeled_parts(batch, who: str):
    """``(x_u, idx_u, x_strong)`` of a two-stream batch with strong views, or a ConfigError."""
    if not isinstance(batch, dict) or "unlabeled" not in batch:
        raise ConfigError(NEEDS_STREAM if who == "fixmatch" else
                          f"{who} needs data.unlabeled=true (a second, unlabeled stream).")
    if "unlabeled_strong" not in batch:
        raise ConfigError(f"{who}: the batch has no strong views ('unlabeled_strong'); the harness builds "
                          "them for a method whose strong_views is true, before the first training batch.")
    xu, idxu, _ = batch["unlabeled"]
    return xu, idxu, batch["unlabeled_strong"]


class PseudoLabelConsistency(nn.Module):
    """FixMatch's pseudo-label term on the unlabeled stream, with a policy for the weights: the one
    component that ``method=fixmatch`` and ``method=sskt method.consistency=fixmatch`` hold.

    Options are checked at construction (cheap); :meth:`setup` builds the policy once the class
    count is known, :meth:`attach_data` reads what the data module knows (the unlabeled pool's
    size for FlexMatch's memory, the pool's labels for the pseudo-label accuracy diagnostic)."""

    terms = {"unsup_loss": "the pseudo-label (FixMatch) term, before lambda_u",
             "fairness_loss": "FreeMatch's class-fairness term, before fairness_weight",
             "mask_rate": "the mean pseudo-label weight (the fraction of unlabeled samples that count)",
             "threshold": "the pseudo-label threshold (mean class threshold; SoftMatch: mu_t)",
             "tau_t": "FreeMatch's global threshold", "soft_var": "SoftMatch's variance EMA",
             "pseudo_label_acc": "the pseudo-labels' accuracy on the unlabeled stream (diagnostic)",
             "mask_correct": "the fraction of unlabeled samples both counted and correctly pseudo-labelled"}

    def __init__(self, threshold: str = "fixed", tau: float = 0.95, lambda_u: float = 1.0,
                 threshold_ema: float = 0.999, fairness_weight: float = 0.01, flex_warmup: bool = True):
        super().__init__()
        check_threshold_options(threshold, tau, lambda_u, threshold_ema, fairness_weight, flex_warmup)
        self.threshold, self.tau, self.lambda_u = threshold, float(tau), float(lambda_u)
        self.threshold_ema, self.fairness_weight, self.flex_warmup = (float(threshold_ema), float(fairness_weight),
                                                                      flex_warmup)
        self.policy: PseudoLabelPolicy | None = None
        self.pool_labels: torch.Tensor | None = None   # task label per unlabeled index (-1: dropped); None: unknown

    def setup(self, num_classes: int) -> None:
        self.policy = build_policy(self.threshold, num_classes, self.tau, self.threshold_ema,
                                   self.fairness_weight, self.flex_warmup)

    def attach_data(self, datamodule) -> None:
        """Size FlexMatch's memory from the data module's unlabeled stream and look up the pool's
        labels (where the stream is a pool of the train split; STL-10's unlabeled split has none)."""
        if datamodule is None or not getattr(datamodule, "unlabeled", False) or not hasattr(datamodule, "source_streams"):
            return
        split, images = datamodule.source_streams()["unlabeled"]
        self.policy.size_memory(len(images), int(datamodule.num_unlabeled))
        labels = datamodule.task.train_labels if split == "train" else None
        self.pool_labels = labels if labels is not None and labels.ndim == 1 else None

    def forward(self, logits_weak: torch.Tensor, logits_strong: torch.Tensor,
                idx: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(lambda_u * L_u + the policy's extra term, parts to log)``."""
        with torch.no_grad():
            up = torch.promote_types(logits_weak.dtype, torch.float32)
            probs = F.softmax(logits_weak.detach().to(up), dim=1)
            pseudo = probs.argmax(1)
            w = self.policy.weights(probs, idx)
        ce = F.cross_entropy(logits_strong, pseudo, reduction="none")
        unsup = (w.to(ce.dtype) * ce).mean()
        loss = self.lambda_u * unsup
        parts = {"unsup_loss": unsup, "mask_rate": w.mean()}
        extra = self.policy.extra_loss(logits_strong, w)
        if extra is not None:
            loss = loss + extra
            parts["fairness_loss"] = extra.detach() / self.fairness_weight
        parts.update(self.policy.thresholds(w))
        if self.pool_labels is not None and idx is not None:
            with torch.no_grad():
                if self.pool_labels.device != idx.device:
                    self.pool_labels = self.pool_labels.to(idx.device)
                labels = self.pool_labels[idx]
                correct = (pseudo == labels).to(w.dtype)
                parts["pseudo_label_acc"] = correct.mean()
                parts["mask_correct"] = (w * correct).mean()
        return loss, parts

    def describe(self) -> dict:
        out = {"threshold": self.threshold, "tau": self.tau, "lambda_u": self.lambda_u}
        if self.threshold in ("free", "soft"):
            out["threshold_ema"] = self.threshold_ema
        if self.threshold == "free":
            out["fairness_weight"] = self.fairness_weight
        if self.threshold == "flex":
            out["flex_warmup"] = self.flex_warmup
        return out
