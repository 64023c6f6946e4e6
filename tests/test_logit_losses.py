"""DIST and logit-standardised KD (losses.dist_loss, losses.lskd_loss) against values computed by hand
(plain Python loops, float64), DIST's dependence on the batch, LS-KD's invariance to a shift and scale
of the logits, both as SSKT aux losses and KD losses, and the soft-label cache's top-k layout refused
for LS-KD (it needs the raw logits)."""
import math
from types import SimpleNamespace

import pytest
import torch

from sskt_lightning.cache.store import Layout
from sskt_lightning.errors import ConfigError
from sskt_lightning.losses import AUX_LOSSES, KD_LOSSES, dist_loss, kd_loss, kl_divergence, lskd_loss, sskt_loss
from sskt_lightning.methods.kd import KD
from sskt_lightning.methods.sskt import SSKT

F64, REL = torch.float64, 1e-12   # float64 eps 2.2e-16: the formula, not the CPU's exp/log kernels
S = [[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, -2.0], [1.5, -0.5, 0.3, 0.0]]
T_ = [[1.0, 0.5, 0.0, 0.2], [0.0, 0.0, 3.0, -1.0], [-1.0, 2.0, 0.5, 0.1]]


# ---------------------------------------------------------------------------- by hand
def softmax(row, T=1.0):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def pearson(a, b, eps=1e-8):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (na * nb + eps)


def dist_by_hand(s, t, T, beta=1.0, gamma=1.0):
    ps, pt = [softmax(r, T) for r in s], [softmax(r, T) for r in t]
    B, K = len(ps), len(ps[0])
    inter = 1 - sum(pearson(ps[b], pt[b]) for b in range(B)) / B
    intra = 1 - sum(pearson([ps[b][k] for b in range(B)], [pt[b][k] for b in range(B)]) for k in range(K)) / K
    return T * T * (beta * inter + gamma * intra)


def zscore(row, eps=1e-7):
    m = sum(row) / len(row)
    sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))   # Bessel's correction
    return [(v - m) / (eps + sd) for v in row]


def kl_by_hand(s, t, T):
    total = 0.0
    for a, b in zip(s, t):
        p, q = softmax(a, T), softmax(b, T)
        total += sum(q[k] * (math.log(q[k]) - math.log(p[k])) for k in range(len(q)))
    return T * T * total / len(s)


def lskd_by_hand(s, t, T):
    return kl_by_hand([zscore(r) for r in s], [zscore(r) for r in t], T)


def tensor(rows):
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------------------- DIST
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dist_matches_the_hand_computation(T):
    assert dist_loss(tensor(S), tensor(T_), T).item() == pytest.approx(dist_by_hand(S, T_, T), rel=REL)
    # beta and gamma weigh the inter- and intra-class terms
    assert dist_loss(tensor(S), tensor(T_), T, beta=2.0, gamma=0.5).item() == pytest.approx(
        dist_by_hand(S, T_, T, 2.0, 0.5), rel=REL)


def test_dist_depends_on_the_batch():
    """The intra-class term ranks each class over the batch: the same first two samples give another
    loss (and another gradient on sample 0) when the third sample changes."""
    other = [*T_[:2], [3.0, -2.0, 0.0, 1.0]]
    one, two = dist_loss(tensor(S), tensor(T_), 2.0), dist_loss(tensor(S), tensor(other), 2.0)
    assert one.item() == pytest.approx(dist_by_hand(S, T_, 2.0), rel=REL)
    assert two.item() == pytest.approx(dist_by_hand(S, other, 2.0), rel=REL)
    grads = []
    for t in (T_, other):
        s = tensor(S).requires_grad_()
        dist_loss(s, tensor(t), 2.0).backward()
        grads.append(s.grad[0].clone())
    assert not torch.allclose(grads[0], grads[1], rtol=1e-6, atol=0)
    # not a mean of per-sample losses: the whole batch differs from the size-weighted mean of its halves
    halves = (2 * dist_loss(tensor(S[:2]), tensor(T_[:2]), 2.0) + dist_loss(tensor(S[2:]).repeat(2, 1),
              tensor(T_[2:]).repeat(2, 1), 2.0)) / 3
    assert abs(one.item() - halves.item()) > 1e-3


def test_dist_is_zero_for_identical_distributions_but_for_its_eps():
    """rho = 1 - eps / (|a| |b| + eps) for a = b: the centred softened rows here have norms ~0.1, so
    the eps of 1e-8 leaves ~1e-5 (the hand computation keeps the same eps)."""
    got = dist_loss(tensor(S), tensor(S), 3.0).item()
    assert got == pytest.approx(dist_by_hand(S, S, 3.0), rel=1e-9) and 0 < got < 1e-4


# ---------------------------------------------------------------------------- LS-KD
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_lskd_matches_the_hand_computation(T):
    assert lskd_loss(tensor(S), tensor(T_), T).item() == pytest.approx(lskd_by_hand(S, T_, T), rel=REL)


def test_lskd_is_invariant_to_a_shift_and_scale_of_the_logits():
    """Each row's own shift and positive scale, teacher and student alike, leave LS-KD unchanged (up to
    the formula's 1e-7 in the z-score's denominator, ~1e-7 relative for these rows' std ~1) and change
    the plain KL."""
    shift = torch.tensor([[5.0], [-3.0], [0.25]], dtype=F64)
    scale = torch.tensor([[3.0], [0.5], [7.0]], dtype=F64)
    base = lskd_loss(tensor(S), tensor(T_), 2.0).item()
    moved_t = tensor(T_) * scale + shift
    moved_s = tensor(S) * scale.flip(0) - shift
    assert lskd_loss(tensor(S), moved_t, 2.0).item() == pytest.approx(base, rel=1e-6)
    assert lskd_loss(moved_s, moved_t, 2.0).item() == pytest.approx(base, rel=1e-6)
    assert kl_divergence(tensor(S), moved_t, 2.0).item() != pytest.approx(
        kl_divergence(tensor(S), tensor(T_), 2.0).item(), rel=1e-3)


# ---------------------------------------------------------------------------- as SSKT aux losses and KD losses
@pytest.mark.parametrize("name,by_hand", [("dist", dist_by_hand), ("lskd", lskd_by_hand)])
def test_sskt_aux_loss_choices(name, by_hand):
    SSKT(aux_loss=name)   # accepted by the constructor
    assert name in AUX_LOSSES
    task = torch.tensor(0.5, dtype=F64)
    total, (term,) = sskt_loss(task, [tensor(S)], [tensor(T_)], alpha=0.1, aux_loss=name, T=3.0)
    assert term.item() == pytest.approx(by_hand(S, T_, 3.0), rel=REL)
    assert total.item() == pytest.approx(0.5 + 0.1 * by_hand(S, T_, 3.0), rel=REL)


@pytest.mark.parametrize("name,by_hand", [("kd", kl_by_hand), ("dist", dist_by_hand), ("lskd", lskd_by_hand)])
def test_kd_loss_choices(name, by_hand):
    assert set(KD_LOSSES) == {"kd", "dist", "lskd"}
    y = torch.tensor([0, 2, 1])
    ce = sum(-math.log(softmax(r)[c]) for r, c in zip(S, (0, 2, 1))) / 3
    got = kd_loss(tensor(S), tensor(T_), y, alpha=0.7, T=4.0, loss=name).item()
    assert got == pytest.approx(0.3 * ce + 0.7 * by_hand(S, T_, 4.0), rel=REL)
    assert KD(loss=name).describe()["loss"] == name


def test_unknown_kd_loss_is_refused():
    with pytest.raises(ConfigError, match=r"method.loss='dst'.*kd.*dist.*lskd"):
        KD(loss="dst")


# ---------------------------------------------------------------------------- the cache and LS-KD
def _module_with_stores(*layouts):
    detached = []
    bank = SimpleNamespace(_stores={"labeled": [SimpleNamespace(layout=lay) for lay in layouts]},
                           detach_cache=lambda: detached.append(True))
    return SimpleNamespace(sources=bank), detached


@pytest.mark.parametrize("method", [SSKT(aux_loss="lskd"), KD(loss="lskd")])
def test_a_top_k_cache_is_refused_for_lskd(method):
    module, detached = _module_with_stores(Layout("topk", 100, 10))
    with pytest.raises(ConfigError, match=r"lskd z-scores the sources' raw logits.*top 10.*method.cache=off"):
        method._check_raw_logits(module)
    assert detached == [True]     # the stores are closed before the error
    module, detached = _module_with_stores(Layout("fp16", 100))
    method._check_raw_logits(module)        # every logit kept: fine
    assert detached == []


@pytest.mark.parametrize("method", [SSKT(aux_loss="dist"), SSKT(aux_loss="ce"), KD(loss="dist"), KD()])
def test_a_top_k_cache_serves_the_softmax_losses(method):
    module, detached = _module_with_stores(Layout("topk", 100, 10))
    method._check_raw_logits(module)
    assert detached == []


@pytest.mark.parametrize("name,by_hand", [("dist", dist_by_hand), ("lskd", lskd_by_hand)])
def test_sskt_training_step_with_the_new_aux_losses(name, by_hand):
    """SSKT's step with aux_loss=dist / lskd: the task term plus alpha times each source's term, by
    hand from the linear heads' outputs (test_sskt's tiny float64 SSKT)."""
    from test_sskt import tiny_sskt
    alpha, T = 0.3, 2.0
    method, module, logged, batch = tiny_sskt(name, alpha, T)
    loss = method.training_step(module, batch)
    with torch.no_grad():
        out = module.target(batch[0])
        task = torch.nn.functional.cross_entropy(out.logits, batch[1]).item()
        terms = {}
        for (key, t), head in zip(module.sources.sources.items(), method.heads):
            a = out.pooled @ head.fc.weight.T + head.fc.bias
            terms[key] = by_hand(a.tolist(), t.tolist(), T)
    assert loss.item() == pytest.approx(task + alpha * sum(terms.values()), rel=REL)
    for key, term in terms.items():
        assert logged[f"aux_{key}"].item() == pytest.approx(term, rel=REL)
