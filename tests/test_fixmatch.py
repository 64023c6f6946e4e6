"""FixMatch (method=fixmatch) and SSKT's composition with it (method=sskt method.consistency=fixmatch):
one training step against the loss computed by hand (float64, from the logits of the one forward
over labeled, weak and strong images), no gradient through the weak view's pseudo-labels, the
pseudo-label accuracy diagnostic, the errors, and (through the command line) a few steps of each
policy and of SSKT + FixMatch."""
import csv
import json
from types import SimpleNamespace

import pytest
import torch

from sskt_lightning.errors import ConfigError
from sskt_lightning.losses import task_loss
from sskt_lightning.methods.fixmatch import FixMatch
from sskt_lightning.methods.sskt import SSKT
from sskt_lightning.nets.factory import TappedNet

from method_contract import SMALL_SOURCE
from test_sskt import SOURCE_CLASSES, FixedSources, TinyNet, aux_by_hand, ce, log_softmax

C, N, NU = 3, 4, 6          # classes, labeled, unlabeled images per step
F64 = torch.float64


def batch(seed=1, strong=True):
    g = torch.Generator().manual_seed(seed)
    out = {"labeled": (torch.randn(N, 3, 6, 6, generator=g, dtype=F64), torch.tensor([0, 2, 1, 2]),
                       torch.arange(N), torch.zeros(N, dtype=torch.long)),
           "unlabeled": (torch.randn(NU, 3, 6, 6, generator=g, dtype=F64), torch.tensor([7, 3, 9, 4, 8, 5]),
                         torch.zeros(NU, dtype=torch.long))}
    if strong:
        out["unlabeled_strong"] = out["unlabeled"][0] + 0.5 * torch.randn(NU, 3, 6, 6, generator=g, dtype=F64)
    return out


def tiny_module(method, sources=None, seed=0):
    torch.manual_seed(seed)
    target = TappedNet(TinyNet(C), tap_pooled=True).double().train()
    logged = {}
    module = SimpleNamespace(target=target, sources=sources, multi_label=False, data_info={"num_classes": C},
                             task_loss=lambda z, y: task_loss(z, y),
                             log_train=lambda parts, logits, labels: logged.update(parts))
    method.setup(module)
    method.double()
    return module, logged


def unsup_by_hand(zw, zs, tau):
    """mean_u[1(max softmax(zw) >= tau) * CE(zs, argmax zw)], and the mask."""
    q = log_softmax(zw).exp()
    conf, pseudo = q.max(1)
    mask = (conf >= tau).to(F64)
    nll = -log_softmax(zs)[torch.arange(len(pseudo)), pseudo]
    return (mask * nll).mean(), mask


def test_fixmatch_loss_matches_hand_computation():
    b = batch()
    method = FixMatch(tau=0.5, lambda_u=0.7)
    module, logged = tiny_module(method)
    with torch.no_grad():        # the same forward (same BatchNorm batch), by hand from its logits
        z = module.target(torch.cat([b["labeled"][0], b["unlabeled"][0], b["unlabeled_strong"]])).logits
    tau = z[N:N + NU].softmax(1).max(1).values.median().item()      # half the samples pass
    method = FixMatch(tau=tau, lambda_u=0.7)
    module, logged = tiny_module(method)
    loss = method.training_step(module, b)
    task = ce(z[:N], b["labeled"][1])
    unsup, mask = unsup_by_hand(z[N:N + NU], z[N + NU:], tau)
    assert 0 < mask.sum() < NU
    expected = task + 0.7 * unsup
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert logged["task_loss"].item() == pytest.approx(task.item(), rel=1e-12)
    assert logged["unsup_loss"].item() == pytest.approx(unsup.item(), rel=1e-12)
    assert logged["mask_rate"].item() == pytest.approx(mask.mean().item(), rel=1e-12)
    assert logged["threshold"].item() == pytest.approx(tau, rel=1e-12)
    assert "pseudo_label_acc" not in logged                    # no data module: no labels for the pool


@pytest.mark.parametrize("threshold", ["fixed", "flex", "free", "soft"])
def test_no_gradient_through_the_weak_view_pseudo_labels(threshold):
    """The weak images' logits only make the pseudo-labels and weights (SoftMatch's weights are a
    smooth function of them: they must be detached too). With eval-mode BatchNorm (no batch
    statistics coupling the images of the one forward) the weak images get exactly no gradient;
    the strong ones do."""
    b = batch()
    method = FixMatch(threshold=threshold, tau=0.0)
    module, _ = tiny_module(method)
    module.target.eval()
    xw = b["unlabeled"][0].clone().requires_grad_()
    xs = b["unlabeled_strong"].clone().requires_grad_()
    b["unlabeled"] = (xw, *b["unlabeled"][1:])
    b["unlabeled_strong"] = xs
    method.training_step(module, b).backward()
    assert xs.grad.abs().sum() > 0
    assert xw.grad is None or xw.grad.abs().sum() == 0


def test_missing_stream_or_strong_views_are_clear_errors():
    method = FixMatch()
    module, _ = tiny_module(method)
    with pytest.raises(ConfigError, match="add data.unlabeled=true"):
        method.training_step(module, batch()["labeled"])
    with pytest.raises(ConfigError, match="no strong views"):
        method.training_step(module, batch(strong=False))
    assert FixMatch.strong_views and FixMatch.accepts_unlabeled and FixMatch.requires_unlabeled


def test_fixmatch_setup_refuses_a_run_without_the_unlabeled_stream():
    method = FixMatch()
    module = SimpleNamespace(multi_label=False, data_info={"num_classes": C}, cfg={"data": {"unlabeled": False}})
    with pytest.raises(ConfigError, match="add data.unlabeled=true"):
        method.setup(module)
    with pytest.raises(ConfigError, match="single-label"):
        method.setup(SimpleNamespace(multi_label=True, data_info={"num_classes": C}, cfg={}))


def test_pseudo_label_accuracy_uses_the_pool_labels_of_the_data_module():
    """The unlabeled stream's indices point into the train split: the task's train labels there are
    the pseudo-labels' truth (a diagnostic only); STL-10's unlabeled split has none: not logged."""
    b = batch()
    method = FixMatch(tau=0.0)
    module, logged = tiny_module(method)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])            # task label per train-split image
    dm = SimpleNamespace(unlabeled=True, num_unlabeled=6, task=SimpleNamespace(train_labels=labels),
                         source_streams=lambda: {"unlabeled": ("train", torch.zeros(10, 3, 6, 6))})
    method.attach_data(dm)
    method.training_step(module, b)
    with torch.no_grad():
        z = module.target(torch.cat([b["labeled"][0], b["unlabeled"][0], b["unlabeled_strong"]])).logits
    pseudo = z[N:N + NU].argmax(1)
    expected = (pseudo == labels[b["unlabeled"][1]]).double().mean().item()
    assert logged["pseudo_label_acc"].item() == pytest.approx(expected, rel=1e-12)
    assert logged["mask_correct"].item() == pytest.approx(expected, rel=1e-12)    # tau 0: every sample counts
    split = SimpleNamespace(unlabeled=True, num_unlabeled=5, task=SimpleNamespace(train_labels=labels),
                            source_streams=lambda: {"unlabeled": ("unlabeled", torch.zeros(5, 3, 6, 6))})
    method = FixMatch(tau=0.0)
    module, logged = tiny_module(method)
    method.attach_data(split)
    method.training_step(module, batch())
    assert "pseudo_label_acc" not in logged


# ---------------------------------------------------------------------------- SSKT + FixMatch
def test_sskt_with_consistency_is_sskt_plus_lambda_u_times_the_fixmatch_term():
    alpha, T, lam = 0.3, 2.0, 0.8
    b = batch()
    g = torch.Generator().manual_seed(5)
    sources = FixedSources({k: torch.randn(N + NU, K, generator=g, dtype=F64) * 3
                            for k, K in SOURCE_CLASSES.items()})
    method = SSKT(alpha=alpha, temperature=T, aux_head="linear", unlabeled=True, consistency="fixmatch",
                  tau=0.0, lambda_u=lam)
    assert method.strong_views is True
    module, logged = tiny_module(method, sources)
    loss = method.training_step(module, b)
    assert sources.calls == [[("labeled", N), ("unlabeled", NU)]]    # sources label labeled + weak only
    with torch.no_grad():
        out = module.target(torch.cat([b["labeled"][0], b["unlabeled"][0], b["unlabeled_strong"]]))
        z, pooled = out.logits, out.pooled
        m = N + NU
        task = ce(z[:N], b["labeled"][1])
        aux = sum(aux_by_hand("ce", pooled[:m] @ h.fc.weight.T + h.fc.bias, t, T)   # heads: labeled + weak
                  for t, h in zip(sources.sources.values(), method.heads))
        unsup, mask = unsup_by_hand(z[N:m], z[m:], 0.0)
    assert mask.sum() == NU
    sskt_part = task + alpha * aux
    assert loss.item() == pytest.approx((sskt_part + lam * unsup).item(), rel=1e-12)
    assert logged["unsup_loss"].item() == pytest.approx(unsup.item(), rel=1e-12)
    assert logged["mask_rate"].item() == 1.0


def test_sskt_consistency_options_are_checked():
    with pytest.raises(ConfigError, match="method.consistency=fixmatch needs the unlabeled stream: add "
                                          "method.unlabeled=true data.unlabeled=true"):
        SSKT(consistency="fixmatch")
    with pytest.raises(ConfigError, match=r"method.consistency='mixmatch'; choose one of \['none', 'fixmatch'\]"):
        SSKT(consistency="mixmatch")
    with pytest.raises(ConfigError, match=r"method.tau=2: must lie in \[0, 1\]"):
        SSKT(tau=2)
    assert not getattr(SSKT(), "strong_views", False)               # off by default
    assert SSKT(unlabeled=True, consistency="fixmatch").describe()["threshold"] == "fixed"


# ---------------------------------------------------------------------------- through the command line
UNLABELED = ["data.unlabeled=true", "data.labels_per_class=4"]
SSKT_FIXMATCH = ["method=sskt", "method.unlabeled=true", "method.consistency=fixmatch", *SMALL_SOURCE]


@pytest.mark.slow
def test_each_policy_runs_a_few_steps_in_one_multirun(tmp_path, cifar_dir):
    from test_multirun import multirun
    sweep, _ = multirun(tmp_path, cifar_dir, "data.val_size=16", "method=fixmatch", *UNLABELED,
                        "method.threshold=fixed,flex,free,soft")
    results = [json.loads((sweep / str(n) / "results.json").read_text()) for n in range(4)]
    assert [(r["status"], r["method"], r["method_settings"]["threshold"]) for r in results] == [
        ("ok", "fixmatch", t) for t in ("fixed", "flex", "free", "soft")]
    for n, keys in enumerate([[], ["selected", "pool_size", "beta"], ["tau_t", "p_model", "label_hist"],
                              ["mu_t", "var_t"]]):
        state = torch.load(sweep / str(n) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        assert sorted(k for k in state if ".policy." in k) == sorted(f"method.consistency.policy.{k}" for k in keys)
        if keys:
            assert all(state[f"method.consistency.policy.{k}"].dtype in (torch.float64, torch.int64) for k in keys)
        with open(sweep / str(n) / "csv" / "metrics.csv", newline="") as f:
            logged = set(next(csv.reader(f)))
        assert {"train/unsup_loss_epoch", "train/mask_rate_epoch", "train/threshold_epoch",
                "train/pseudo_label_acc_epoch"} <= logged


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_sskt_with_fixmatch_runs_from_the_command_line(tmp_path, cifar_dir):
    from method_contract import check_trains_and_checkpoints
    results = check_trains_and_checkpoints("sskt", cifar_dir, tmp_path, [*SSKT_FIXMATCH[1:3], "method.threshold=free",
                                                                        *UNLABELED])
    assert results["method_settings"]["consistency"] == "fixmatch"
    assert results["method_settings"]["threshold"] == "free"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize("overrides", [["method=fixmatch", "method.threshold=flex", *UNLABELED],
                                       [*SSKT_FIXMATCH, "method.threshold=soft", *UNLABELED]],
                         ids=["fixmatch_flex", "sskt_fixmatch_soft"])
def test_sigkill_then_resume_with_strong_views_equals_the_uninterrupted_run(tmp_path, cifar_dir, overrides):
    """As the method contract's resume check (tests/test_method_contract.py), with the policies
    whose state is a per-sample memory (FlexMatch) and EMAs (SoftMatch), strong views on."""
    from test_resume import assert_resume_equals_uninterrupted
    weights = assert_resume_equals_uninterrupted(tmp_path, cifar_dir, overrides)
    assert any(".policy." in k for k in weights)       # the policy's state is checkpointed and compared


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_under_ddp_the_adaptive_policies_keep_the_ranks_in_step(tmp_path, cifar_dir):
    """Two gloo processes, FreeMatch's statistics all-reduced every step: the run ends, both ranks'
    weights and every collective agree (tests/test_defaults.py's checks)."""
    from test_defaults import train
    digest = "+callbacks.digest._target_=sskt_lightning.callbacks.WeightsDigest"
    train(tmp_path / "ddp", cifar_dir, ["trainer=ddp_cpu", digest, "method=fixmatch", "method.threshold=free",
                                        *UNLABELED], trace=tmp_path / "trace")
    digests = [json.loads((tmp_path / "ddp" / f"weights_digest_rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["parameters"] == digests[1]["parameters"]
    assert digests[0]["buffers"] == digests[1]["buffers"]
    ranks = [(tmp_path / "trace" / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert ranks[0] and ranks[0] == ranks[1]
    # FreeMatch's statistics (sum of max-probabilities, 10 class sums, 10 histogram counts, the count):
    # one float64 all-reduce per training step (trainer.limit_train_batches=3)
    assert ranks[0].count("all_reduce (22,):torch.float64") == 3
