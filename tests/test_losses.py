"""Loss values against numbers computed by hand (the formulas of docs/methods.md)."""
import math

import pytest
import torch

from sskt_lightning.losses import (AUX_LOSSES, focal, kd_loss, kl_divergence, kl_divergence_reference,
                                   soft_cross_entropy, sskt_loss, task_loss)

# float64, compared at rel 1e-12: the losses are dtype-generic, and float64 makes the comparison with the
# math-module values machine-independent (float32 exp/log kernels round differently on AVX2/AVX-512 CPUs).
F64 = torch.float64
REL = 1e-12   # float64 eps is 2.2e-16; a few dozen roundings, no large cancellation in these sums
A = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=F64)   # student logits, B=2, K=3
T_ = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]], dtype=F64)   # source/teacher logits


def softmax(row, temp=1.0):
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def by_hand(fn_row, temp):
    return sum(fn_row(a, t, temp) for a, t in zip(A.tolist(), T_.tolist())) / 2


def ce_row(a, t, temp):
    p, q = softmax(a, temp), softmax(t, temp)
    return temp**2 * -sum(qk * math.log(pk) for pk, qk in zip(p, q))


def kl_row(a, t, temp):
    p, q = softmax(a, temp), softmax(t, temp)
    return temp**2 * sum(qk * (math.log(qk) - math.log(pk)) for pk, qk in zip(p, q))


def focal_row(a, t, _temp):
    p, q = softmax(a), softmax(t)
    return -sum(qk * (1 - pk) ** 2 * math.log(pk) for pk, qk in zip(p, q))


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_soft_cross_entropy_matches_hand_computation(temp):
    assert soft_cross_entropy(A, T_, temp).item() == pytest.approx(by_hand(ce_row, temp), rel=REL)


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_kd_is_batch_mean_kl_summed_over_classes(temp):
    assert kl_divergence(A, T_, temp).item() == pytest.approx(by_hand(kl_row, temp), rel=REL)


def test_kd_reference_is_k_times_weaker():
    # the reference code's KLDivLoss(reduction='mean') divides by B*K, not B
    K = A.shape[1]
    assert kl_divergence_reference(A, T_, 3.0).item() == pytest.approx(by_hand(kl_row, 3.0) / K, rel=REL)


def test_focal_matches_hand_computation_and_ignores_temperature():
    assert focal(A, T_).item() == pytest.approx(by_hand(focal_row, 1.0), rel=REL)
    assert focal(A, T_, T=3.0).item() == pytest.approx(focal(A, T_).item(), rel=REL)


def test_focal_is_finite_on_extreme_logits():
    big = torch.tensor([[1000.0, -1000.0, 0.0]])
    assert torch.isfinite(focal(big, -big))


def test_sskt_loss_combines_task_and_alpha_weighted_aux_terms():
    y = torch.tensor([0, 1])
    task = task_loss(A, y)
    expected_task = (-math.log(softmax(A[0].tolist())[0]) - math.log(softmax(A[1].tolist())[1])) / 2
    assert task.item() == pytest.approx(expected_task, rel=REL)
    total, terms = sskt_loss(task, [A, A * 2], [T_, T_], alpha=0.5, aux_loss="ce", T=3.0)
    aux1 = by_hand(ce_row, 3.0)
    aux2 = soft_cross_entropy(A * 2, T_, 3.0).item()
    assert [t.item() for t in terms] == pytest.approx([aux1, aux2], rel=REL)
    assert total.item() == pytest.approx(expected_task + 0.5 * (aux1 + aux2), rel=REL)


def test_sskt_loss_sends_no_gradient_into_the_source_logits():
    a = A.clone().requires_grad_(True)
    t = T_.clone().requires_grad_(True)
    total, _ = sskt_loss(torch.tensor(0.0), [a], [t], alpha=1.0, aux_loss="kd", T=2.0)
    total.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_loss_mixes_ce_and_kl():
    y = torch.tensor([0, 1])
    expected = 0.1 * task_loss(A, y).item() + 0.9 * by_hand(kl_row, 4.0)
    assert kd_loss(A, T_, y, alpha=0.9, T=4.0).item() == pytest.approx(expected, rel=REL)


def test_multilabel_task_loss_is_bce():
    y = torch.tensor([[1, 0, 1], [0, 0, 1]])
    p = torch.sigmoid(A)
    expected = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert task_loss(A, y, multi_label=True).item() == pytest.approx(expected.item(), rel=REL)


def test_every_aux_loss_is_zero_gradient_at_the_target_distribution():
    # the student matching the source exactly is a stationary point of ce and kd
    for name in ("ce", "kd", "kd_reference"):
        a = T_.clone().requires_grad_(True)
        AUX_LOSSES[name](a, T_, 2.0).backward()
        assert a.grad.abs().max() < 1e-6, name
