"""MAXL: the mask softmax, the meta gradient (against finite differences and against its
first-order approximation), which update moves which network, and end-to-end runs."""
import copy
import csv
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sskt_lightning.compose import compose_config
from sskt_lightning.errors import ConfigError
from sskt_lightning.methods.maxl import MAXL, mask_softmax
from sskt_lightning.nets.factory import TappedNet
from sskt_lightning.train import run

from small_trainer import small_trainer

SMOKE = ["trainer=smoke", "data.batch_size=4", "data.val_size=16", "data.num_workers=0",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


# ---------------------------------------------------------------------------- tiny networks
class TinyNet(nn.Module):
    """conv-BN-tanh-pool-linear: a classifier whose last Linear is the head (as TappedNet expects).
    tanh, not ReLU, so second derivatives are smooth for the finite-difference checks."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).mean((2, 3)))


def tiny_maxl(psi, num_classes=3, dtype=torch.float64, seed=0, **kwargs):
    """A MAXL method set up on a tiny target (with a tiny generator) outside any Trainer."""
    torch.manual_seed(seed)
    target = TappedNet(TinyNet(num_classes), tap_pooled=True)
    module = SimpleNamespace(target=target, multi_label=False,
                             cfg=OmegaConf.create({"model": {"name": "resnet20", "kwargs": {}}}),
                             data_info={"image_size": [6, 6], "in_chans": 3, "num_classes": num_classes})
    method = MAXL(psi=psi, **kwargs)
    method.setup(module)
    method.generator = TinyNet(method.slot_class.numel())   # tiny g instead of the target's arch
    target.to(dtype).train()
    method.to(dtype).train()
    return method, module


def batch(num_classes=3, n=6, size=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
    return x, torch.arange(n) % num_classes


def focal(p, q):   # the formula of docs/methods.md (MAXL), written out independently of the package
    return -(q * (1 - p) ** 2 * torch.log(p)).sum(1).mean()


# ---------------------------------------------------------------------------- mask softmax
@pytest.mark.parametrize("psi", [2, [1, 3, 2]])
def test_mask_softmax_keeps_only_the_true_class_slots(psi):
    counts = [psi] * 3 if isinstance(psi, int) else psi
    starts = [sum(counts[:c]) for c in range(3)]
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    logits = torch.randn(6, sum(counts), generator=torch.Generator().manual_seed(0)) * 3
    q = mask_softmax(logits, y, psi)
    assert q.shape == logits.shape
    torch.testing.assert_close(q.sum(1), torch.ones(6))
    for i, c in enumerate(y.tolist()):
        inside = torch.zeros(sum(counts), dtype=torch.bool)
        inside[starts[c]:starts[c] + counts[c]] = True
        assert torch.all(q[i, ~inside] == 0)
        torch.testing.assert_close(q[i, inside], torch.softmax(logits[i, inside], 0))


@pytest.mark.parametrize("psi", [2, [1, 3, 2]])
def test_mask_softmax_is_finite_on_huge_logits(psi):
    n = 6 if isinstance(psi, int) else sum(psi)
    y = torch.tensor([0, 1, 2, 0])
    logits = (torch.tensor([1e4, -1e4]).repeat(n)[:n].expand(4, n).clone()
              * torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])).requires_grad_()
    q = mask_softmax(logits, y, psi)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(4))
    (q * torch.arange(n, dtype=q.dtype)).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_psi_is_validated():
    with pytest.raises(ConfigError, match="psi"):
        MAXL(psi=0)
    with pytest.raises(ConfigError, match="psi"):
        MAXL(psi=[2, 0, 1])
    with pytest.raises(ConfigError, match="psi"):
        MAXL(psi="five")
    with pytest.raises(ConfigError, match="3 classes"):
        tiny_maxl([2, 2], num_classes=3)
    with pytest.raises(ConfigError, match="meta"):
        MAXL(meta="third_order")
    with pytest.raises(ConfigError, match="alternate"):
        MAXL(alternate="batch")
    with pytest.raises(ConfigError, match="generator_optim"):
        MAXL(generator_optim={"learning_rate": 0.1})
    method, _ = tiny_maxl([1, 2, 3])
    assert method.slot_class.tolist() == [0, 1, 1, 2, 2, 2]
    assert method.aux_head.fc.out_features == 6 and method.describe()["num_aux_classes"] == 6


# ---------------------------------------------------------------------------- meta gradient
def reference_gen_loss(method, target, x, y, lr, w, psi):
    """L_gen(theta1+(g)) the long way: copy the multi-task net, take one plain SGD step on
    L(theta1) with g's labels, evaluate the primary focal loss there, add the entropy term."""
    net, head = copy.deepcopy(target), copy.deepcopy(method.aux_head)
    gen = mask_softmax(method.generator(x), y, psi)
    out = net(x)
    onehot = F.one_hot(y, out.logits.shape[1]).to(x.dtype)
    loss = focal(out.logits.softmax(1), onehot) + focal(head(out).softmax(1), gen)
    params = list(net.net.parameters())
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
    ybar = gen.mean(0)
    return focal(net.net(x).softmax(1), onehot) + w * (ybar * ybar.log()).sum()


@pytest.mark.parametrize("w", [0.0, 0.2])
def test_second_order_meta_gradient_matches_finite_differences(w):
    psi, lr = 2, 0.5
    method, module = tiny_maxl(psi, entropy_weight=w)
    x, y = batch()
    objective, logs = method.generator_objective(module.target, x, y, lr, meta="second_order")
    gen_params = list(method.generator.parameters())
    autograd = torch.autograd.grad(objective, gen_params)
    torch.testing.assert_close(objective.detach(), reference_gen_loss(method, module.target, x, y, lr, w, psi))
    torch.testing.assert_close(logs["gen_loss"], objective.detach())

    def loss_at(p, idx, value):
        with torch.no_grad():
            p.view(-1)[idx] = value
        return reference_gen_loss(method, module.target, x, y, lr, w, psi).item()

    h = 1e-6
    checked = 0
    names = [n for n, _ in method.generator.named_parameters()]
    entries = {"conv.weight": [0, 50], "bn.weight": [1], "fc.weight": [3, 17], "fc.bias": [5]}
    for name, p, g in zip(names, gen_params, autograd):
        for idx in entries.get(name, []):
            old = p.view(-1)[idx].item()
            up, down = loss_at(p, idx, old + h), loss_at(p, idx, old - h)
            loss_at(p, idx, old)
            numeric = (up - down) / (2 * h)
            assert g.view(-1)[idx].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9), (name, idx)
            checked += abs(numeric) > 1e-6
    assert checked >= 5   # the gradients compared are not all ~0
    if w == 0.0:          # no entropy term: the whole gradient comes through theta1+
        assert max(g.abs().max().item() for g in autograd) > 1e-4


@pytest.mark.parametrize("w", [0.0, 0.2])
def test_first_order_meta_gradient_approximates_second_order(w):
    method, module = tiny_maxl([1, 2, 3], entropy_weight=w)
    x, y = batch()
    gen_params = list(method.generator.parameters())
    flat = {}
    for meta in ("second_order", "first_order"):
        objective, _ = method.generator_objective(module.target, x, y, 0.5, meta=meta)
        flat[meta] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, gen_params)])
    second, first = flat["second_order"], flat["first_order"]
    assert second.norm() > 1e-4
    assert F.cosine_similarity(first, second, dim=0) > 0.99
    assert (first.norm() / second.norm()).item() == pytest.approx(1.0, abs=0.05)


def test_first_order_graph_reaches_only_the_generator():
    method, module = tiny_maxl(2)
    x, y = batch()
    objective, _ = method.generator_objective(module.target, x, y, 0.1, meta="first_order")
    others = [*module.target.parameters(), *method.aux_head.parameters()]
    assert all(g is None for g in torch.autograd.grad(objective, others, allow_unused=True, retain_graph=True))
    assert all(g is not None for g in torch.autograd.grad(objective, list(method.generator.parameters())))


def test_second_order_falls_back_to_first_order_under_ddp():
    """(A real 2-process gloo run is too slow for this suite; the fallback logic is checked here.)"""
    method, module = tiny_maxl(2)
    ddp = SimpleNamespace(model=SimpleNamespace(find_unused_parameters=True))   # the DDP-wrapped model
    module.trainer = SimpleNamespace(world_size=2, strategy=ddp)
    with pytest.warns(UserWarning, match="first_order"):
        method._resolve_meta(module)
    assert method.meta == "first_order" and method.describe()["meta"] == "first_order"
    assert method.describe()["requested_meta"] == "second_order"
    module.trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(
        model=SimpleNamespace(find_unused_parameters=False)))
    with pytest.raises(ConfigError, match="ddp_find_unused_parameters_true"):
        method._resolve_meta(module)
    module.trainer = SimpleNamespace(world_size=1)
    method._resolve_meta(module)
    assert method.meta == "second_order"


# ---------------------------------------------------------------------------- who moves what
def tiny_module(tmp_path, *overrides):
    from sskt_lightning.module import TransferModule
    cfg = compose_config(["model=resnet20", "method=maxl", *overrides], tmp_path)
    info = {"name": "tiny", "num_classes": 3, "in_chans": 3, "image_size": [8, 8], "mean": [0.5] * 3,
            "std": [0.25] * 3, "multi_label": False, "class_names": ["a", "b", "c"]}
    return TransferModule(OmegaConf.to_container(cfg, resolve=True), info)


def snapshot(mod: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in mod.state_dict().items()}


def same(before: dict, mod: nn.Module) -> bool:
    return all(torch.equal(before[k], v) for k, v in mod.state_dict().items())


@pytest.mark.parametrize("meta", ["second_order", "first_order"])
def test_each_update_moves_only_its_own_network(tmp_path, meta):
    module = tiny_module(tmp_path, "method.psi=2", f"method.meta={meta}")
    method = module.method
    calls = []
    multitask_update, meta_update = method.multitask_update, method.meta_update

    def checked_multitask(mod, x, y):
        g, net, head = snapshot(method.generator), snapshot(mod.target), snapshot(method.aux_head)
        out = multitask_update(mod, x, y)
        assert same(g, method.generator), "the multi-task update changed g"
        assert not same(net, mod.target) and not same(head, method.aux_head)
        calls.append("multitask")
        return out

    def checked_meta(mod, x, y):
        g, net, head = snapshot(method.generator), snapshot(mod.target), snapshot(method.aux_head)
        assert method.inner_lr(mod) == pytest.approx(0.1)   # lr_inner null: cfg.optim's current lr
        out = meta_update(mod, x, y)
        assert same(net, mod.target), "the meta update changed the target (parameters or BN buffers)"
        assert same(head, method.aux_head), "the meta update changed the auxiliary head"
        assert not same(g, method.generator), "the meta update did not move g"
        calls.append("meta")
        return out

    method.multitask_update, method.meta_update = checked_multitask, checked_meta
    x = torch.randn(8, 3, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.arange(8) % 3, torch.arange(8)), batch_size=8)
    trainer = small_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    assert calls == ["multitask", "meta"]
    assert method.meta == meta


# ---------------------------------------------------------------------------- end to end
def train(tmp_path, data_dir, *overrides):
    cfg = compose_config(["data=cifar10", f"paths.data_dir={data_dir}", "model=resnet20", *SMOKE,
                          "method=maxl", *overrides], tmp_path)
    return run(cfg), tmp_path


@pytest.mark.slow
def test_maxl_trains_end_to_end(tmp_path, cifar_dir):
    results, out = train(tmp_path, cifar_dir)
    assert json.loads((out / "results.json").read_text()) == results
    assert results["method"] == "maxl" and results["sources"] == [] and 0.0 <= results["test_acc"] <= 1.0
    settings = results["method_settings"]
    assert settings["psi"] == 5 and settings["meta"] == "second_order" and settings["alternate"] == "step"
    assert settings["entropy_weight"] == 0.2 and settings["generator"] == "cifar_resnet20"
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("loss", "primary_loss", "aux_loss", "gen_loss", "gen_entropy"):
        assert f"train/{key}" in header, key
    sd = torch.load(out / results["checkpoints"]["last"], weights_only=True)["state_dict"]
    assert any(k.startswith("method.generator.") for k in sd) and "method.aux_head.fc.weight" in sd
    assert sd["method.aux_head.fc.weight"].shape[0] == 50


@pytest.mark.slow
def test_maxl_first_order_alternating_by_epoch(tmp_path, cifar_dir):
    results, out = train(tmp_path, cifar_dir, "method.meta=first_order", "method.alternate=epoch",
                         "trainer.max_epochs=2", "method.lr_inner=0.01", "method.psi=2")
    assert results["method_settings"]["meta"] == "first_order"
    assert results["method_settings"]["alternate"] == "epoch" and results["method_settings"]["lr_inner"] == 0.01
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r.get("train/loss")]
    # epoch 0: multi-task updates only; epoch 1: meta updates only
    assert all(not r["train/gen_loss"] for r in train_rows if r["epoch"] == "0")
    assert any(r["train/gen_loss"] for r in train_rows if r["epoch"] == "1")
