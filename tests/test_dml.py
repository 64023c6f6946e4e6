"""DML (method=dml): each peer learns only from its own loss, sequential updates re-predict after
each step (the paper's Algorithm 1), simultaneous ones predict once, one optimizer per peer, and a
two-peer run end to end with the peers evaluated beside the target."""
import csv
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

import sskt_lightning.train as train_mod
from sskt_lightning.compose import compose_config
from sskt_lightning.data.formats import CIFAR10_CLASSES
from sskt_lightning.errors import ConfigError, WeightsError
from sskt_lightning.losses import dml_loss, kl_divergence, task_loss
from sskt_lightning.methods.dml import DML
from sskt_lightning.module import TransferModule
from sskt_lightning.train import run

from small_trainer import small_trainer

SMOKE = ["trainer=smoke", "data.batch_size=8", "data.val_size=16", "data.num_workers=0"]
CIFAR10_INFO = {"name": "cifar10", "num_classes": 10, "in_chans": 3, "image_size": [32, 32],
                "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "multi_label": False,
                "class_names": list(CIFAR10_CLASSES)}
THREE = "method.peers=[{name: resnet20},{name: resnet20}]"   # a cohort of K = 3


def dml_module(tmp_path, *overrides):
    cfg = compose_config(["model=resnet20", "method=dml", "trainer=cpu", "trainer.max_epochs=4",
                          *overrides], tmp_path)
    torch.manual_seed(0)
    return TransferModule(OmegaConf.to_container(cfg, resolve=True), CIFAR10_INFO)


def batches(n_batches=1, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_batches * bs
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10, torch.arange(n))
    return DataLoader(ds, batch_size=bs, shuffle=False)


def fit(module, loader, root, **kwargs):
    trainer = small_trainer(root, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, **kwargs)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def cohort(module):
    return [module.target, *module.method.peers]


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------------- the loss and its gradients
def test_dml_loss_is_ce_plus_mean_kl_to_the_partners():
    # float64 at rel 1e-12 (float64 eps 2.2e-16): machine-independent, unlike float32 kernels at 1e-6
    f64 = torch.float64
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=f64)
    a = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 3.0]], dtype=f64)
    b = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=f64)
    y = torch.tensor([0, 2])
    total, kl = dml_loss(z, [a, b], y)
    expected_kl = (kl_divergence(z, a) + kl_divergence(z, b)) / 2     # 1/(K-1) sum over partners
    assert kl.item() == pytest.approx(expected_kl.item(), rel=1e-12)
    assert total.item() == pytest.approx((task_loss(z, y) + expected_kl).item(), rel=1e-12)
    # one partner, by hand (math module): KL(softmax([0,0,0]) || softmax([2,0,-1])) for row 1 (uniform q = 1/3)
    p = [math.exp(v) / sum(math.exp(u) for u in (2.0, 0.0, -1.0)) for v in (2.0, 0.0, -1.0)]
    by_hand = sum((1 / 3) * (math.log(1 / 3) - math.log(p[k])) for k in range(3))
    assert dml_loss(z[:1], [b[:1]], y[:1])[1].item() == pytest.approx(by_hand, rel=1e-12)


def test_each_peer_gets_gradients_only_from_its_own_loss(tmp_path):
    module = dml_module(tmp_path, THREE)
    method = module.method
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    nets = cohort(module)
    assert len(nets) == 3 and len(method.networks(module)) == 3
    for k in range(3):
        module.zero_grad(set_to_none=True)
        logits = [f(x) for f in method.networks(module)]          # every one with its graph
        loss, _ = method.peer_loss(module, logits[k], [logits[l] for l in range(3) if l != k], y)
        loss.backward()
        for j, net in enumerate(nets):
            grads = [p.grad for p in net.parameters()]
            if j == k:
                assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads), f"peer {j} got gradients from peer {k}'s loss"


# ---------------------------------------------------------------------------- update orders
class Spy:
    """Records every peer_loss call: (own logits, partners' logits) as the method passes them."""

    def __init__(self, method):
        self.calls, self.inner = [], method.peer_loss
        method.peer_loss = self

    def __call__(self, module, logits, others, labels, *rest):
        self.calls.append((logits.detach().clone(), [o.detach().clone() for o in others]))
        return self.inner(module, logits, others, labels, *rest)


def count_forwards(module):
    counts = [0] * len(cohort(module))
    for k, net in enumerate(cohort(module)):
        net.register_forward_hook(lambda m, i, o, k=k: counts.__setitem__(k, counts[k] + 1))
    return counts


def test_sequential_partners_see_predictions_made_after_the_previous_steps(tmp_path):
    module = dml_module(tmp_path)                       # K = 2, update=sequential (default)
    assert module.method.update == "sequential"
    spy, counts = Spy(module.method), count_forwards(module)
    before = [snapshot(n) for n in cohort(module)]
    loader = batches(1)
    fit(module, loader, tmp_path)
    assert counts == [2, 1]          # peer 0 predicted again after its step; peer 1 once
    (z0, partners0), (z1, partners1) = spy.calls
    assert torch.equal(partners0[0], z1)                 # peer 0 sees peer 1's (not yet updated) prediction
    # the re-prediction left no trace in BatchNorm's running statistics: one update per batch
    tracked = [v for k, v in module.target.state_dict().items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 1 for v in tracked)
    x = next(iter(loader))[0]
    module.train()
    with torch.no_grad():
        z0_updated = module.target(x).logits             # peer 0's prediction with its new weights
    assert torch.allclose(partners1[0], z0_updated, atol=1e-5)
    assert not torch.allclose(partners1[0], z0, atol=1e-4)   # ... not the pre-step one
    for net, b in zip(cohort(module), before):
        assert any(not torch.equal(b[k], v) for k, v in net.state_dict().items() if "weight" in k)


def test_sequential_with_three_peers_predicts_2k_minus_1_times(tmp_path):
    module = dml_module(tmp_path, THREE)
    counts = count_forwards(module)
    fit(module, batches(2), tmp_path)
    assert counts == [4, 4, 2]       # per batch: 2, 2, 1


def test_simultaneous_predicts_once_per_peer_and_step(tmp_path):
    module = dml_module(tmp_path, THREE, "method.update=simultaneous")
    spy, counts = Spy(module.method), count_forwards(module)
    before = [snapshot(n) for n in cohort(module)]
    fit(module, batches(2), tmp_path)
    assert counts == [2, 2, 2]       # one forward per peer per step
    for step in range(2):
        calls = spy.calls[3 * step: 3 * step + 3]
        own = [c[0] for c in calls]
        for k, (_, partners) in enumerate(calls):       # everybody saw the same, pre-step logits
            assert all(torch.equal(p, o) for p, o in zip(partners, [own[l] for l in range(3) if l != k]))
    for net, b in zip(cohort(module), before):
        assert any(not torch.equal(b[k], v) for k, v in net.state_dict().items() if "weight" in k)


def test_one_optimizer_and_scheduler_per_peer(tmp_path):
    module = dml_module(tmp_path)
    assert module.automatic_optimization is False
    trainer = fit(module, batches(1), tmp_path)
    assert len(trainer.optimizers) == 2 and len(trainer.lr_scheduler_configs) == 2
    params = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in trainer.optimizers]
    assert params[0] == {id(p) for p in module.target.parameters()}
    assert params[1] == {id(p) for p in module.method.peers[0].parameters()}
    assert all(c.scheduler.last_epoch == 1 for c in trainer.lr_scheduler_configs)   # stepped per epoch


def test_kl_warmup_ramps_the_kl_weight_step_by_step(tmp_path):
    """kl_warmup=1 epoch over 4 batches per epoch: weights 0, 1/4, 2/4, 3/4, then 1 from epoch 2 on."""
    module = dml_module(tmp_path, "method.kl_warmup=1")
    weights = []
    inner = module.method.peer_loss

    def spy(mod, logits, others, labels, kl_weight=1.0):
        weights.append(kl_weight)
        return inner(mod, logits, others, labels, kl_weight)

    module.method.peer_loss = spy
    trainer = small_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=batches(4))
    per_batch = weights[::2]                           # two peers, one weight per batch
    assert weights[1::2] == per_batch
    assert per_batch == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])
    # the weight multiplies the KL term only
    z, a, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    half, kl = dml_loss(z, [a], y, kl_weight=0.5)
    assert half.item() == pytest.approx((task_loss(z, y) + 0.5 * kl).item(), rel=1e-12)   # float64, see above
    assert module.method.describe()["kl_warmup"] == 1.0
    with pytest.raises(ConfigError, match="method.kl_warmup"):
        DML(kl_warmup=-1)


# ---------------------------------------------------------------------------- config
def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="sequential"):
        DML(update="alternate")
    with pytest.raises(ConfigError, match="at least one peer"):
        DML(peers=[])
    with pytest.raises(ConfigError, match="unknown option"):
        DML(peers=[{"name": "resnet20", "lr": 0.1}])


def test_a_peer_can_start_from_weights(tmp_path):
    from sskt_lightning.nets.factory import create_network
    net = create_network("resnet20", 10, 3, image_size=32)
    torch.save(net.state_dict(), tmp_path / "peer.pth")
    module = dml_module(tmp_path, f"method.peers=[{{name: resnet20, weights: '{tmp_path / 'peer.pth'}'}}]")
    peer = module.method.peers[0].state_dict()
    assert all(torch.equal(peer[k], v) for k, v in net.state_dict().items())
    assert module.method.describe()["peers"][0]["model"] == "cifar_resnet20"



def test_a_peer_weights_file_holding_a_tensor_is_a_weights_error(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "peer.pth")
    with pytest.raises(WeightsError, match=r"method.peers\[0\].weights=.*peer.pth holds a single tensor"):
        dml_module(tmp_path, f"method.peers=[{{name: resnet20, weights: '{tmp_path / 'peer.pth'}'}}]")


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_two_peer_run_end_to_end(tmp_path, cifar_dir, monkeypatch):
    initial = []

    class Recording(TransferModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            initial.append(snapshot(self))

    monkeypatch.setattr(train_mod, "TransferModule", Recording)
    cfg = compose_config(["data=cifar10", f"paths.data_dir={cifar_dir}", "model=resnet20", *SMOKE,
                          "method=dml"], tmp_path)
    results = run(cfg)
    out = tmp_path
    assert json.loads((out / "results.json").read_text()) == results
    assert results["method"] == "dml" and results["sources"] == []
    assert 0.0 <= results["extra"]["test_peer1_acc"] <= 1.0
    assert results["method_settings"]["update"] == "sequential"
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("val/peer1_acc", "train/peer1_loss", "train/loss", "val/acc"):
        assert any(r.get(key) for r in rows), key
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    final = ckpt["state_dict"]
    for prefix in ("target.", "method.peers.0."):
        weights = [k for k in final if k.startswith(prefix) and k.endswith("weight")]
        assert weights and any(not torch.equal(initial[0][k], final[k]) for k in weights), prefix


# ---------------------------------------------------------------------------- the unlabeled stream
def test_dml_loss_task_term_on_the_labeled_rows_kl_on_all():
    """2 labeled + 1 unlabeled rows, one partner, T = 2, by hand: CE over the 2 labeled rows, T^2 KL
    averaged over all 3 rows."""
    z = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, -1.0, 2.0]]
    a = [[1.0, 0.5, 0.0], [0.0, 0.0, 3.0], [2.0, 1.0, -1.0]]
    T = 2.0

    def softmax(row, temp=1.0):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]
    ce = (-math.log(softmax(z[0])[0]) - math.log(softmax(z[1])[2])) / 2
    kl = sum(sum(q * (math.log(q) - math.log(p)) for p, q in zip(softmax(zr, T), softmax(ar, T)))
             for zr, ar in zip(z, a)) / 3 * T * T
    total, term = dml_loss(torch.tensor(z, dtype=torch.float64), [torch.tensor(a, dtype=torch.float64)],
                           torch.tensor([0, 2]), T)
    assert term.item() == pytest.approx(kl, rel=1e-12)
    assert total.item() == pytest.approx(ce + kl, rel=1e-12)


def dict_batches(n=16, bs=8, n_u=4):
    g = torch.Generator().manual_seed(0)
    x, xu = torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)

    class Both(torch.utils.data.Dataset):
        def __len__(self):
            return n // bs

        def __getitem__(self, i):
            s = slice(i * bs, (i + 1) * bs)
            u = slice(i * n_u, (i + 1) * n_u)
            return {"labeled": (x[s], torch.arange(bs) % 10, torch.arange(bs), torch.zeros(bs, dtype=torch.long)),
                    "unlabeled": (xu[u], torch.arange(n_u), torch.zeros(n_u, dtype=torch.long))}
    return DataLoader(Both(), batch_size=None)


def test_unlabeled_stream_reaches_every_peer_and_changes_the_training(tmp_path):
    """Every peer's forward sees the 8 labeled + 4 unlabeled images; the weights after a step differ
    from a run that ignores the stream (the KL term on the unlabeled images has a gradient)."""
    finals = {}
    for unlabeled in (True, False):
        module = dml_module(tmp_path, f"method.unlabeled={str(unlabeled).lower()}")
        rows = {0: [], 1: []}
        for k, net in enumerate(cohort(module)):
            net.register_forward_pre_hook(lambda m, args, k=k: rows[k].append(args[0].shape[0]))
        fit(module, dict_batches(n=8), tmp_path)
        expected = 12 if unlabeled else 8
        assert rows[0] and rows[1] and set(rows[0]) == set(rows[1]) == {expected}
        finals[unlabeled] = snapshot(module.target)
    assert any(not torch.equal(finals[True][k], finals[False][k]) for k in finals[True])


def test_dml_unlabeled_without_the_stream_is_refused(tmp_path):
    module = dml_module(tmp_path, "method.unlabeled=true")
    with pytest.raises(ConfigError, match=r"method.unlabeled=true needs data.unlabeled=true"):
        fit(module, batches(), tmp_path)


@pytest.mark.slow
def test_dml_with_the_unlabeled_stream_end_to_end(tmp_path, cifar_dir):
    cfg = compose_config(["data=cifar10", f"paths.data_dir={cifar_dir}", "model=resnet20", *SMOKE, "method=dml",
                          "method.unlabeled=true", "data.unlabeled=true", "data.labels_per_class=4"], tmp_path)
    results = run(cfg)
    assert results["status"] == "ok" and results["num_unlabeled"] > 0
    assert results["method_settings"]["unlabeled"] is True
    assert 0.0 <= results["extra"]["test_peer1_acc"] <= 1.0
