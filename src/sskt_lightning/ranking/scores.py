"""LEEP, NCE and LogME: how well a source's outputs on a target's labelled images predict their
labels, computed in float64 from arrays (``n`` images, target labels ``y`` in ``[0, C)``).

* :func:`leep` (Nguyen et al., ICML 2020) from the source's softmax ``theta`` (n x Z, over its own
  Z classes): ``P(y, z) = (1/n) sum_{i: y_i = y} theta_iz``, ``P(y | z) = P(y, z) / sum_y' P(y', z)``,
  ``LEEP = (1/n) sum_i log sum_z P(y_i | z) theta_iz`` (<= 0; higher is better).
* :func:`nce` (Tran et al., ICCV 2019): ``-H(Y | Z)`` with ``Z`` the source's argmax class, from the
  empirical joint counts (<= 0; 0 when Z determines Y).
* :func:`logme` (You et al., ICML 2021): for each one-hot target column ``t`` a Bayesian linear
  model ``t = F w + e`` on the penultimate features ``F`` (n x D), ``w ~ N(0, 1/alpha I)``,
  ``e ~ N(0, 1/beta I)``; its log evidence, maximised over alpha and beta by MacKay's fixed-point
  iteration, divided by n and averaged over the C columns (higher is better). ``log |A|`` sums
  all D eigenvalues of ``A = alpha I + beta F^T F`` (the null directions of F included), the
  evidence as the paper writes it.
* :func:`bootstrap_interval`: a seeded bootstrap interval over images resampled with replacement
  (each resample recomputes the whole score, its joint table or its LogME fit included): the
  spread of the resampled scores placed around the estimate (see there why not the raw percentiles).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

FLOOR = 1e-12          # LogME: smallest squared norm / residual in the fixed-point updates (a perfect
                       # fit would send alpha or beta to infinity)


def _labels(labels, n: int | None = None, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    y = np.asarray(labels)
    if y.ndim != 1 or (n is not None and len(y) != n):
        raise ValueError(f"labels must be a vector of {n if n is not None else 'n'} class ids, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise ValueError("labels must be >= 0")
    c = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if len(y) else 0)
    if len(y) and y.max() >= c:
        raise ValueError(f"a label {int(y.max())} >= num_classes={c}")
    return y, c


def _weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be n non-negative numbers, not all zero")
    return w


def leep(probs, labels, num_classes: int | None = None, weights=None) -> float:
    """LEEP of a source's class probabilities ``probs`` (n x Z, rows sum to 1) for ``labels``;
    ``weights``: how many times each image counts (a bootstrap resample), default once each."""
    theta = np.asarray(probs, dtype=np.float64)
    if theta.ndim != 2:
        raise ValueError(f"probs must be n x Z, got shape {theta.shape}")
    y, c = _labels(labels, len(theta), num_classes)
    w = _weights(weights, len(theta))
    onehot = np.zeros((len(y), c))
    onehot[np.arange(len(y)), y] = 1.0
    joint = (onehot * w[:, None]).T @ theta / w.sum()              # C x Z: P(y, z)
    pz = joint.sum(0)
    cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)   # P(y | z)
    eep = (theta @ cond.T)[np.arange(len(y)), y]                   # sum_z P(y_i | z) theta_iz
    with np.errstate(divide="ignore"):
        return float(np.dot(w, np.log(eep)) / w.sum())


def nce(source_labels, labels, num_classes: int | None = None, weights=None) -> float:
    """NCE = -H(Y | Z) of the source's predicted classes ``source_labels`` (n ints, its argmax)."""
    z = np.asarray(source_labels).astype(np.int64)
    y, c = _labels(labels, len(z), num_classes)
    w = _weights(weights, len(z))
    zs, zi = np.unique(z, return_inverse=True)
    counts = np.zeros((c, len(zs)))
    np.add.at(counts, (y, zi), w)
    joint = counts / counts.sum()
    pz = joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log((joint / pz)[nz])))


def _spectrum(f: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sigma, x, outside)``: the non-zero eigenvalues of ``F^T F`` (k), the targets' coordinates
    on the matching left singular vectors (k x C) and each target's squared norm outside them (C)."""
    n, d = f.shape
    if n > d:
        sigma, v = np.linalg.eigh(f.T @ f)
        proj = v.T @ (f.T @ t)                       # s_i x_i
    else:
        sigma, u = np.linalg.eigh(f @ f.T)
        proj = u.T @ t                               # x_i
    sigma = np.clip(sigma, 0.0, None)
    keep = sigma > (sigma.max() if sigma.size else 0.0) * max(n, d) * np.finfo(np.float64).eps
    sigma = sigma[keep]
    x = proj[keep] / np.sqrt(sigma)[:, None] if n > d else proj[keep]
    outside = np.clip((t * t).sum(0) - (x * x).sum(0), 0.0, None)
    return sigma, x, outside


def _terms(sigma, x, outside, alpha, beta):
    """``(gamma, |m|^2, |F m - t|^2)`` at (alpha, beta) per target column."""
    ratio = alpha / beta
    s, xx = sigma[:, None], (x * x)
    gamma = (s / (s + ratio)).sum(0)
    m2 = (s * xx / (s + ratio) ** 2).sum(0)
    res2 = (xx * (ratio / (s + ratio)) ** 2).sum(0) + outside
    return gamma, m2, res2


def log_evidence(sigma, x, outside, alpha, beta, n: int, d: int) -> np.ndarray:
    """The log evidence of each target column at (alpha, beta), divided by n:
    ``d/2 log alpha + n/2 log beta - 1/2 log|A| - beta/2 |F m - t|^2 - alpha/2 |m|^2 - n/2 log 2 pi``
    with ``log|A| = sum_{i<=k} log(alpha + beta s_i) + (d - k) log alpha`` (k non-zero eigenvalues
    s_i of F^T F): the ``d - k`` null directions' ``log alpha`` cancel against ``d/2 log alpha``, so
    it is computed as ``k/2 log alpha`` (finite for features that are all zero, where alpha -> 0)."""
    _, m2, res2 = _terms(sigma, x, outside, alpha, beta)
    k = len(sigma)
    with np.errstate(divide="ignore"):
        log_alpha = np.log(alpha) * k if k else np.zeros_like(alpha)
    logdet_k = np.log(alpha + beta * sigma[:, None]).sum(0)
    ev = (log_alpha / 2 + n / 2 * np.log(beta) - logdet_k / 2 - beta / 2 * res2 - alpha / 2 * m2
          - n / 2 * math.log(2 * math.pi))
    return ev / n


def logme_fit(features, labels, num_classes: int | None = None, tol: float = 1e-8,
              evidence_tol: float = 1e-10, max_iter: int = 300) -> dict:
    """LogME's fit: ``{"score", "evidence" (C,), "alpha" (C,), "beta" (C,), "iterations"}``.

    alpha and beta start at 1 and follow MacKay's updates ``alpha = gamma / |m|^2``,
    ``beta = (n - gamma) / |F m - t|^2`` (``gamma = sum_i beta s_i / (alpha + beta s_i)``) until,
    for every column, alpha / beta changes by less than ``tol`` (relative) or the evidence by less
    than ``evidence_tol``. With no more images than feature dimensions a column can be fitted
    exactly: beta then grows without bound while the evidence converges to its supremum, which is
    what the score takes."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be n x D, got shape {f.shape}")
    y, c = _labels(labels, len(f), num_classes)
    n, d = f.shape
    t = np.zeros((n, c))
    t[np.arange(n), y] = 1.0
    sigma, x, outside = _spectrum(f, t)
    alpha, beta = np.ones(c), np.ones(c)
    evidence = log_evidence(sigma, x, outside, alpha, beta, n, d)
    for it in range(1, max_iter + 1):
        gamma, m2, res2 = _terms(sigma, x, outside, alpha, beta)
        new_alpha = gamma / np.maximum(m2, FLOOR)
        new_beta = (n - gamma) / np.maximum(res2, FLOOR)
        old_ratio = alpha / beta
        change = np.abs(new_alpha / new_beta - old_ratio) / np.maximum(old_ratio, np.finfo(np.float64).tiny)
        alpha, beta = new_alpha, new_beta
        new_evidence = log_evidence(sigma, x, outside, alpha, beta, n, d)
        settled = (change < tol) | (np.abs(new_evidence - evidence) < evidence_tol)
        evidence = new_evidence
        if np.all(settled):
            break
    return {"score": float(evidence.mean()), "evidence": evidence, "alpha": alpha, "beta": beta,
            "iterations": it}


def logme(features, labels, num_classes: int | None = None) -> float:
    """LogME of penultimate ``features`` (n x D) for ``labels`` (see the module docstring)."""
    return logme_fit(features, labels, num_classes)["score"]


def bootstrap_values(score: Callable[[np.ndarray], float], n: int, resamples: int, seed: int) -> np.ndarray:
    """``score(idx)`` for ``resamples`` resamples ``idx`` of ``range(n)`` with replacement (numpy's
    generator seeded by ``seed``), the non-finite ones left out (raises when all are)."""
    rng = np.random.default_rng(seed)
    values = np.array([score(rng.integers(0, n, n)) for _ in range(resamples)], dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        raise ArithmeticError("no bootstrap resample gave a finite score")
    return values


def bootstrap_interval(score: Callable[[np.ndarray], float], n: int, resamples: int, seed: int,
                       level: float = 0.95, estimate: float | None = None) -> dict | None:
    """The score's variability over images: ``{"low", "high", "shift"}``, or None for ``resamples=0``.

    The ``level`` percentile range of the resampled scores (:func:`bootstrap_values`), placed around
    the estimate ``score(all images)``: ``low = est + q_lo - q_50``, ``high = est + q_hi - q_50``.
    ``shift = q_50 - est`` is reported, not applied: these are plug-in scores, fitted (LEEP's and
    NCE's joint table, LogME's evidence) on the images they score, and a resample's duplicated
    images move them systematically (a few 1e-3 for LEEP on 2000 images with a 1000-class source,
    more than the spread), so the raw percentiles can miss the estimate altogether."""
    if resamples <= 0:
        return None
    values = bootstrap_values(score, n, resamples, seed)
    estimate = float(score(np.arange(n))) if estimate is None else float(estimate)
    tail = (1 - level) / 2 * 100
    lo, mid, hi = np.percentile(values, [tail, 50, 100 - tail])
    return {"low": estimate + float(lo - mid), "high": estimate + float(hi - mid), "shift": float(mid - estimate)}
