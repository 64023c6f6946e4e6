"""The pseudo-label policies (methods/pseudo_labels.py) against values computed by hand, in float64:
each policy's weights on fixed batches of probabilities over a few steps (so their running
statistics' updates are checked too), FreeMatch's fairness term, the state round-tripping through
state_dict, and under two gloo processes: the reduced statistics equal the one-process run on the
whole batch, the same on both ranks."""
import math
import pytest
import torch
import torch.multiprocessing as mp

from sskt_lightning.errors import ConfigError
from sskt_lightning.methods.pseudo_labels import (
    THRESHOLDS,
    FlexThreshold,
    FreeThreshold,
    PseudoLabelConsistency,
    SoftWeights,
    build_policy,
)

F64 = torch.float64


def probs(rows):
    return torch.tensor(rows, dtype=F64)


def policy(kind, num_classes=3, tau=0.7, **kw):
    return build_policy(kind, num_classes, tau, **kw).double()


def test_fixed_is_the_indicator_of_max_probability_at_least_tau():
    p = probs([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.3, 0.69, 0.01]])
    pol = policy("fixed")
    assert pol.weights(p).tolist() == [1.0, 0.0, 1.0, 0.0]          # 0.7 >= 0.7 counts
    assert pol.thresholds(p)["threshold"].item() == 0.7
    assert pol.state_dict() == {}


# ------------------------------------------------------------------------------------------ flex
STEPS = [  # (indices, probabilities): C = 3, tau = 0.7
    ([0, 1, 2, 3], [[0.8, 0.1, 0.1], [0.2, 0.75, 0.05], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]),
    ([2, 4, 5, 0], [[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.05, 0.15, 0.8], [0.1, 0.72, 0.18]]),
    ([1, 3, 4, 5], [[0.3, 0.65, 0.05], [0.25, 0.05, 0.7], [0.4, 0.35, 0.25], [0.2, 0.5, 0.3]]),
]


def test_flex_class_thresholds_follow_the_confident_prediction_counts_with_warmup():
    """Memory over 8 indices of which 6 are the unlabeled pool (6 and 7: labelled images, never
    seen). By hand, warm-up on (the unused samples count in the max):
    step 1: beta = 0 -> every threshold 0 -> all count; confident: 0->0, 1->1, 3->2:
            counts [1, 1, 1], unused 6 - 3 = 3 -> beta = [1/3, 1/3, 1/3]
    step 2: thresholds 0.7 * (1/3) / (5/3) = 0.14 -> all count; confident 2->0, 5->2, 0->1:
            memory [1, 1, 0, 2, -, 2]: counts [1, 2, 2], unused 1 -> beta = [1/2, 1, 1]
    step 3: thresholds [0.7 * 0.5 / 1.5, 0.7, 0.7] = [0.2333, 0.7, 0.7]: sample 1 (class 1, 0.65) no,
            3 (class 2, 0.7) yes, 4 (class 0, 0.4) yes, 5 (class 1, 0.5) no."""
    pol = policy("flex")
    pol.size_memory(8, 6)
    got = []
    for idx, rows in STEPS:
        got.append(pol.weights(probs(rows), torch.tensor(idx)).tolist())
        if len(got) == 1:
            assert pol.beta.tolist() == pytest.approx([1 / 3] * 3, abs=1e-15)
            assert pol.thresholds(probs(rows))["threshold"].item() == pytest.approx(0.14, abs=1e-15)
    assert got == [[1.0] * 4, [1.0] * 4, [0.0, 1.0, 1.0, 0.0]]
    assert pol.selected.tolist() == [1, 1, 0, 2, -1, 2, -1, -1]     # step 3: only 3 (again class 2) confident
    assert pol.beta.tolist() == pytest.approx([0.5, 1.0, 1.0], abs=1e-15)
    assert pol.pool_size.item() == 6


def test_flex_without_warmup_divides_by_the_largest_class_count():
    """warm-up off: step 1 beta = [1, 1, 1] -> thresholds 0.7: samples 2 (0.9), 5 (0.8), 0 (0.72) of
    step 2 count, 4 (0.6) does not."""
    pol = policy("flex", flex_warmup=False)
    pol.size_memory(8, 6)
    got = [pol.weights(probs(rows), torch.tensor(idx)).tolist() for idx, rows in STEPS[:2]]
    assert got == [[1.0] * 4, [1.0, 0.0, 1.0, 1.0]]
    assert pol.beta.tolist() == pytest.approx([0.5, 1.0, 1.0], abs=1e-15)


def test_flex_without_a_data_module_grows_its_memory_to_the_largest_index():
    pol = policy("flex")
    pol.weights(probs(STEPS[0][1]), torch.tensor(STEPS[0][0]))
    assert pol.selected.tolist() == [0, 1, -1, 2] and pol.pool_size.item() == 4
    # counts [1, 1, 1], unused 1: beta = 1 / max(1, 1)
    assert pol.beta.tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------ free
FREE_BATCHES = [
    [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.4, 0.35, 0.25]],
    [[0.9, 0.05, 0.05], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6], [0.34, 0.33, 0.33]],
    [[0.5, 0.25, 0.25], [0.1, 0.85, 0.05], [0.45, 0.1, 0.45], [0.2, 0.3, 0.5]],
]


def test_free_global_and_class_thresholds_are_emas_updated_before_masking():
    m, C = 0.9, 3
    pol = policy("free", threshold_ema=m)
    tau, p_model, hist = 1 / C, [1 / C] * C, [1 / C] * C            # FreeMatch starts every EMA at 1/C
    for rows in FREE_BATCHES:
        n = len(rows)
        conf = [max(r) for r in rows]
        pred = [r.index(max(r)) for r in rows]
        tau = m * tau + (1 - m) * sum(conf) / n
        p_model = [m * p_model[c] + (1 - m) * sum(r[c] for r in rows) / n for c in range(C)]
        hist = [m * hist[c] + (1 - m) * pred.count(c) / n for c in range(C)]
        thresholds = [tau * p_model[c] / max(p_model) for c in range(C)]
        expected = [1.0 if conf[i] >= thresholds[pred[i]] else 0.0 for i in range(n)]
        assert pol.weights(probs(rows)).tolist() == expected
        assert pol.tau_t.item() == pytest.approx(tau, rel=1e-13)
        assert pol.p_model.tolist() == pytest.approx(p_model, rel=1e-13)
        assert pol.label_hist.tolist() == pytest.approx(hist, rel=1e-13)
        logged = pol.thresholds(probs(rows))
        assert logged["threshold"].item() == pytest.approx(sum(thresholds) / C, rel=1e-13)
        assert logged["tau_t"].item() == pytest.approx(tau, rel=1e-13)
    assert expected == [1.0, 1.0, 1.0, 1.0]
    # a batch of low confidence after those: thresholds ~0.45 * p~_c / max p~ drop the unsure samples
    low = [[0.34, 0.33, 0.33], [0.9, 0.05, 0.05]]
    assert pol.weights(probs(low)).tolist() == [0.0, 1.0]


def test_free_fairness_term_by_hand():
    """sum_c pbar_c log(qbar_c): pbar = normalise(p~ / h~), qbar = normalise(mean over the masked
    strong-view probabilities / their argmax histogram); a class no masked sample predicts gets
    0 (1 / 0 replaced by 0), as FreeMatch's code does."""
    pol = policy("free", fairness_weight=0.25)
    pol.p_model.copy_(torch.tensor([0.5, 0.3, 0.2], dtype=F64))
    pol.label_hist.copy_(torch.tensor([0.4, 0.4, 0.2], dtype=F64))
    z = torch.tensor([[2.0, 0.1, -1.0], [0.3, 1.5, 0.2], [3.0, -2.0, 0.0], [0.0, 0.0, 5.0]], dtype=F64,
                     requires_grad=True)
    w = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=F64)               # the last sample is not masked
    got = pol.extra_loss(z, w)

    rows = [[math.exp(v) for v in r] for r in z.detach().tolist()[:3]]
    p = [[v / sum(r) for v in r] for r in rows]
    preds = [r.index(max(r)) for r in p]                             # [0, 1, 0]
    hist = [preds.count(c) / 3 for c in range(3)]                    # [2/3, 1/3, 0]
    mean = [sum(r[c] for r in p) / 3 for c in range(3)]
    scaled = [mean[c] / hist[c] if hist[c] > 0 else 0.0 for c in range(3)]
    qbar = [s / sum(scaled) for s in scaled]
    target = [0.5 / 0.4, 0.3 / 0.4, 0.2 / 0.2]
    pbar = [t / sum(target) for t in target]
    expected = 0.25 * sum(pbar[c] * math.log(qbar[c] + 1e-12) for c in range(3))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got.backward()
    assert z.grad[3].abs().sum() == 0 and z.grad[:3].abs().sum() > 0  # only the masked samples
    assert pol.extra_loss(z, torch.zeros(4, dtype=F64)).item() == 0.0   # none masked: no term
    assert policy("free", fairness_weight=0.0).extra_loss(z, w) is None


# ------------------------------------------------------------------------------------------ soft
def test_soft_weights_are_a_truncated_gaussian_of_the_ema_mean_and_variance():
    m, C = 0.2, 3                                                     # a fast EMA: the weights move
    pol = policy("soft", threshold_ema=m)
    seen = []
    mu, var = 1 / C, 1.0                                              # SoftMatch's initial values
    for rows in FREE_BATCHES:
        conf = [max(r) for r in rows]
        n = len(conf)
        mean = sum(conf) / n
        mu = m * mu + (1 - m) * mean
        var = m * var + (1 - m) * sum((c - mean) ** 2 for c in conf) / (n - 1)    # unbiased
        expected = [math.exp(-(min(c - mu, 0.0) ** 2) / (2 * var / 4)) for c in conf]
        assert pol.weights(probs(rows)).tolist() == pytest.approx(expected, rel=1e-12)
        assert pol.mu_t.item() == pytest.approx(mu, rel=1e-13)
        assert pol.var_t.item() == pytest.approx(var, rel=1e-13)
        assert pol.thresholds(probs(rows))["threshold"].item() == pytest.approx(mu, rel=1e-13)
        seen += expected
    assert max(seen) == 1.0 and min(seen) < 0.5                      # above mu: 1; below: less


# ------------------------------------------------------------------------------------------ checks, state
@pytest.mark.parametrize("option,value,message", [
    ("threshold", "hard", r"method.threshold='hard'; choose one of \['fixed', 'flex', 'free', 'soft'\]"),
    ("tau", 1.5, r"method.tau=1.5: must lie in \[0, 1\]"),
    ("lambda_u", -1.0, r"method.lambda_u=-1.0: must lie in >= 0"),
    ("threshold_ema", 1.0, r"method.threshold_ema=1"),
    ("fairness_weight", -0.1, r"method.fairness_weight=-0.1"),
    ("flex_warmup", "yes", r"method.flex_warmup='yes': must be true or false"),
])
def test_bad_values_are_refused_naming_the_option(option, value, message):
    with pytest.raises(ConfigError, match=message):
        PseudoLabelConsistency(**{option: value})


def _batches(seed, steps, C=4, B=6, pool=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, C, generator=g, dtype=F64) * 3, torch.randn(B, C, generator=g, dtype=F64),
             torch.randperm(pool, generator=g)[:B]) for _ in range(steps)]


@pytest.mark.parametrize("kind", THRESHOLDS)
def test_the_policy_state_round_trips_through_state_dict(kind):
    """Three steps, save, load into a fresh component (FlexMatch's memory not yet sized), three more
    steps: the same losses and the same state, bit for bit, as six uninterrupted steps."""
    def fresh():
        c = PseudoLabelConsistency(kind, tau=0.5, threshold_ema=0.9)
        c.setup(4)
        return c.double()

    batches = _batches(0, 6)
    ref = fresh()
    ref_losses = [ref(zw, zs, idx)[0] for zw, zs, idx in batches]
    first = fresh()
    for zw, zs, idx in batches[:3]:
        first(zw, zs, idx)
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = fresh()
    resumed.load_state_dict(saved)
    losses = [resumed(zw, zs, idx)[0] for zw, zs, idx in batches[3:]]
    assert [l.item() for l in losses] == [l.item() for l in ref_losses[3:]]
    a, b = ref.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and (kind == "fixed" or len(a) > 0)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", THRESHOLDS)
def test_no_gradient_reaches_the_weak_view(kind):
    c = PseudoLabelConsistency(kind, tau=0.3)
    c.setup(4)
    c.double()
    (zw, zs, idx), = _batches(1, 1)
    zw, zs = zw.requires_grad_(), zs.requires_grad_()
    loss, _ = c(zw, zs, idx)
    loss.backward()
    assert zw.grad is None
    assert zs.grad is not None and zs.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["flex", "free", "soft"])
def test_the_state_stays_float64_when_the_module_is_cast_to_half_precision(kind):
    pol = build_policy(kind, 3, 0.7)
    before = {k: v.clone() for k, v in pol.state_dict().items()}
    pol.half()
    pol.to(torch.bfloat16)
    after = pol.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert any(v.dtype == F64 for v in after.values())


def test_flex_memory_resizes_when_loaded_and_refuses_another_pool():
    pol = FlexThreshold(3, 0.7)
    pol.size_memory(8, 6)
    pol.selected[2] = 1
    other = FlexThreshold(3, 0.7)
    other.load_state_dict(pol.state_dict())
    assert other.selected.tolist() == pol.selected.tolist()
    other.size_memory(8, 6)                                   # the resumed run's data module agrees: kept
    assert other.selected[2] == 1
    with pytest.raises(ConfigError, match="restored per-sample memory covers 8 indices"):
        other.size_memory(10, 6)


# ------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for kind in THRESHOLDS:
            c = PseudoLabelConsistency(kind, tau=0.5, threshold_ema=0.9)
            c.setup(4)
            c.double()
            c.policy.size_memory(10, 10)
            weights = []
            for zw, zs, idx in _batches(2, 3, B=6):
                part = slice(3 * rank, 3 * rank + 3)                  # rank r: its half of the batch
                probs = torch.softmax(zw[part], 1)
                weights.append(c.policy.weights(probs, idx[part]))
            results[kind] = ({k: v.clone() for k, v in c.state_dict().items()}, torch.cat(weights))
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_two_processes_the_statistics_are_reduced_and_equal_on_every_rank(tmp_path):
    world = 2
    mp.start_processes(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=world,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(world)]
    for kind in THRESHOLDS:
        one = PseudoLabelConsistency(kind, tau=0.5, threshold_ema=0.9)
        one.setup(4)
        one.double()
        one.policy.size_memory(10, 10)
        whole = [one.policy.weights(torch.softmax(zw, 1), idx) for zw, _, idx in _batches(2, 3, B=6)]
        ref = one.state_dict()
        for r, (state, weights) in enumerate(ranks_kind := [rk[kind] for rk in ranks]):
            assert state.keys() == ref.keys()
            for k in ref:     # the same state on both ranks, bit for bit; the one-process value to rounding
                assert torch.equal(state[k], ranks_kind[0][0][k]), (kind, k)
                assert torch.allclose(state[k].double(), ref[k].double(), rtol=1e-12, atol=0), (kind, k)
            mine = torch.cat([w[3 * r:3 * r + 3] for w in whole])
            assert torch.allclose(weights, mine, rtol=1e-12, atol=0), kind
