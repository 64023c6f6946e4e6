"""Every loss of the harness, as plain functions of logits (docs/methods.md, "The formulas", writes them out).

Notation: ``a`` student logits (B, K), ``t`` teacher/source logits (B, K), ``T`` temperature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(a: torch.Tensor, t: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``T^2 * mean_b sum_k -softmax(t/T)_k * log_softmax(a/T)_k`` (SSKT's default 'ce')."""
    q = F.softmax(t / T, dim=1)
    return (T * T) * -(q * F.log_softmax(a / T, dim=1)).sum(1).mean()


def kl_divergence(a: torch.Tensor, t: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(a/T))``, summed over classes, averaged over the batch."""
    return (T * T) * F.kl_div(F.log_softmax(a / T, dim=1), F.log_softmax(t / T, dim=1),
                              reduction="batchmean", log_target=True)


def kl_divergence_reference(a: torch.Tensor, t: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """The SSKT reference code's KD loss: ``KLDivLoss()`` with reduction 'mean', i.e. divided by
    B*K rather than B - K times (1000x for ImageNet sources) weaker than :func:`kl_divergence`.
    Kept only to reproduce the paper's CE+KD rows."""
    return (T * T) * F.kl_div(F.log_softmax(a / T, dim=1), F.softmax(t / T, dim=1), reduction="mean")


def focal_from_probs(p: torch.Tensor, q: torch.Tensor, gamma: float = 2.0,
                     log_p: torch.Tensor | None = None) -> torch.Tensor:
    """``-mean_b sum_k q_k (1 - p_k)^gamma log p_k`` for probabilities ``p`` and targets ``q``."""
    log_p = torch.log(p.clamp_min(1e-12)) if log_p is None else log_p
    return -(q * (1 - p).pow(gamma) * log_p).sum(1).mean()


def focal(a: torch.Tensor, t: torch.Tensor, T: float = 1.0, gamma: float = 2.0) -> torch.Tensor:
    """SSKT's 'focal' auxiliary loss, ``p = softmax(a)``, ``q = softmax(t)`` (no temperature)."""
    log_p = F.log_softmax(a, dim=1)
    return focal_from_probs(log_p.exp(), F.softmax(t, dim=1), gamma, log_p=log_p)


AUX_LOSSES = {
    "ce": soft_cross_entropy,
    "kd": kl_divergence,
    "kd_reference": kl_divergence_reference,
    "focal": focal,
}


def task_loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """Cross-entropy for single-label data; BCE-with-logits for multi-label (0/1 float targets)."""
    if multi_label:
        # targets in the logits' dtype, at least float32: float64 logits (the tests' exact reference
        # values) keep float64; half/bfloat16 logits still get float32 targets as before.
        return F.binary_cross_entropy_with_logits(logits, labels.to(torch.promote_types(logits.dtype, torch.float32)))
    return F.cross_entropy(logits, labels)


def sskt_loss(task: torch.Tensor, aux_logits: list[torch.Tensor], source_logits: list[torch.Tensor],
              alpha: float, aux_loss: str = "ce", T: float = 3.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``L = L_task + alpha * sum_s L_aux(a_s, t_s)``; returns the total and each source's term."""
    fn = AUX_LOSSES[aux_loss]
    terms = [fn(a, t.detach(), T) for a, t in zip(aux_logits, source_logits, strict=True)]
    total = task + alpha * torch.stack(terms).sum() if terms else task
    return total, terms


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
            T: float, multi_label: bool = False) -> torch.Tensor:
    """Hinton KD: ``(1 - alpha) * CE(z, y) + alpha * T^2 * KL(softmax_T(z_t) || softmax_T(z))``
    (BCE as the task term for multi-label data; the distillation term is the same)."""
    return ((1 - alpha) * task_loss(student, labels, multi_label)
            + alpha * kl_divergence(student, teacher.detach(), T))


def dml_loss(logits: torch.Tensor, others: list[torch.Tensor], labels: torch.Tensor,
             T: float = 1.0, multi_label: bool = False, kl_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DML, peer k: ``L_task(z_k, y) + w * mean_{l != k} T^2 KL(softmax_T(z_l) || softmax_T(z_k))``,
    the partners' logits ``others`` detached, ``w = kl_weight`` (1 in the paper; DML's ``kl_warmup``
    ramps it from 0); returns the total and the (unweighted) mimicry (KL) term."""
    kl = torch.stack([kl_divergence(logits, z.detach(), T) for z in others]).mean()
    return task_loss(logits, labels, multi_label) + kl_weight * kl, kl


def aux_kl(aux_logits: torch.Tensor, source_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """The part of SSKT's soft cross-entropy that can reach zero, for logging:
    ``T^2 * KL(softmax_T(t) || softmax_T(a)) = soft_cross_entropy(a, t, T) - T^2 * H(softmax_T(t))``
    (no gradient). Zero when the auxiliary head reproduces the source's distribution."""
    with torch.no_grad():   # half/bfloat16 logits upcast to float32; float64 stays float64
        up = torch.promote_types(aux_logits.dtype, torch.float32)
        return kl_divergence(aux_logits.detach().to(up), source_logits.detach().to(up), T)
