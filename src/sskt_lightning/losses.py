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


def _pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation along ``dim``: the cosine similarity of the mean-centred vectors (as
    hunto/DIST_KD's ``pearson_correlation``, eps 1e-8 added to the norms' product)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_loss(a: torch.Tensor, t: torch.Tensor, T: float = 1.0, beta: float = 1.0,
              gamma: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022; hunto/DIST_KD): with ``p_s = softmax(a/T)``, ``p_t = softmax(t/T)``,
    ``beta * T^2 * (1 - mean_b rho(p_s[b, :], p_t[b, :])) + gamma * T^2 * (1 - mean_k rho(p_s[:, k], p_t[:, k]))``
    with ``rho`` the Pearson correlation. The first (inter-class) term matches each sample's
    ranking over the classes, the second (intra-class) each class's ranking over the batch: the
    loss depends on which samples share the batch. beta = gamma = 1 (the paper's defaults)."""
    p_s, p_t = F.softmax(a / T, dim=1), F.softmax(t / T, dim=1)
    inter = 1 - _pearson(p_s, p_t, dim=1).mean()
    intra = 1 - _pearson(p_s, p_t, dim=0).mean()
    return (T * T) * (beta * inter + gamma * intra)


def standardize_logits(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each row z-scored: ``(z - mean_k z) / (eps + std_k z)``, std with Bessel's correction
    (``torch.std``), as sunshangquan/logit-standardization-KD's ``normalize``."""
    return (z - z.mean(dim=1, keepdim=True)) / (eps + z.std(dim=1, keepdim=True))


def lskd_loss(a: torch.Tensor, t: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Logit-standardised KD (Sun et al., CVPR 2024): :func:`kl_divergence` of the z-scored logits,
    ``T^2 * KL(softmax(n(t)/T) || softmax(n(a)/T))`` with ``n`` = :func:`standardize_logits`; invariant
    to a per-sample shift and (positive) scale of either side's logits. Needs the raw logits of the
    teacher: a top-k soft-label cache store (which rebuilds a tail for one temperature) cannot
    serve it (:data:`NEEDS_RAW_LOGITS`)."""
    return kl_divergence(standardize_logits(a), standardize_logits(t), T)


AUX_LOSSES = {
    "ce": soft_cross_entropy,
    "kd": kl_divergence,
    "kd_reference": kl_divergence_reference,
    "focal": focal,
    "dist": dist_loss,
    "lskd": lskd_loss,
}
# The losses that read the teacher's logits themselves rather than its softmax at the method's
# temperature: a soft-label cache must hold every logit (fp16 layout), not a top-k rebuild.
NEEDS_RAW_LOGITS = frozenset({"lskd"})
# method=kd's method.loss choices: the distillation term D(student, teacher, T)
KD_LOSSES = {"kd": kl_divergence, "dist": dist_loss, "lskd": lskd_loss}


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
            T: float, multi_label: bool = False, loss: str = "kd") -> torch.Tensor:
    """Hinton KD: ``(1 - alpha) * CE(z, y) + alpha * T^2 * KL(softmax_T(z_t) || softmax_T(z))``
    (BCE as the task term for multi-label data; the distillation term is the same).

    ``loss`` picks the distillation term from :data:`KD_LOSSES` (``kd``: the KL above; ``dist``,
    ``lskd``). ``student``/``teacher`` may hold more rows than ``labels``: the first
    ``len(labels)`` are the labeled images (task term), the distillation term averages over all
    rows (labeled and unlabeled images alike)."""
    n = labels.shape[0]
    return ((1 - alpha) * task_loss(student[:n], labels, multi_label)
            + alpha * KD_LOSSES[loss](student, teacher.detach(), T))


def dml_loss(logits: torch.Tensor, others: list[torch.Tensor], labels: torch.Tensor,
             T: float = 1.0, multi_label: bool = False, kl_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DML, peer k: ``L_task(z_k, y) + w * mean_{l != k} T^2 KL(softmax_T(z_l) || softmax_T(z_k))``,
    the partners' logits ``others`` detached, ``w = kl_weight`` (1 in the paper; DML's ``kl_warmup``
    ramps it from 0); returns the total and the (unweighted) mimicry (KL) term. ``logits`` (and each
    of ``others``) may hold more rows than ``labels``: the first ``len(labels)`` are the labeled
    images (task term), the KL term averages over all rows (labeled and unlabeled images alike)."""
    kl = torch.stack([kl_divergence(logits, z.detach(), T) for z in others]).mean()
    return task_loss(logits[:labels.shape[0]], labels, multi_label) + kl_weight * kl, kl


def aux_kl(aux_logits: torch.Tensor, source_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """The part of SSKT's soft cross-entropy that can reach zero, for logging:
    ``T^2 * KL(softmax_T(t) || softmax_T(a)) = soft_cross_entropy(a, t, T) - T^2 * H(softmax_T(t))``
    (no gradient). Zero when the auxiliary head reproduces the source's distribution."""
    with torch.no_grad():   # half/bfloat16 logits upcast to float32; float64 stays float64
        up = torch.promote_types(aux_logits.dtype, torch.float32)
        return kl_divergence(aux_logits.detach().to(up), source_logits.detach().to(up), T)
