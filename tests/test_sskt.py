"""SSKT (method=sskt): one training step against a loss computed by hand (in float64, from the logits,
per METHODS.md: L = CE(z, y) + alpha * sum_s L_aux(a_s, t_s), with each auxiliary loss's form and the
reference code's quirks as implemented), and the gradients of a real module's step: the target and
the auxiliary heads get them, the frozen sources never do."""
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sskt_lightning.compose import compose_config
from sskt_lightning.data.formats import CIFAR10_CLASSES
from sskt_lightning.errors import ConfigError
from sskt_lightning.losses import task_loss
from sskt_lightning.methods.sskt import SSKT
from sskt_lightning.module import TransferModule
from sskt_lightning.nets.factory import TappedNet

from method_contract import SMALL_SOURCE

B, C = 4, 3                       # batch, target classes
SOURCE_CLASSES = {"a": 5, "b": 7}  # two sources with their own label spaces


class TinyNet(nn.Module):
    """conv-BN-tanh-pool-linear: a classifier whose last Linear is the head (as TappedNet expects)."""

    def __init__(self, num_classes: int, width: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).mean((2, 3)))


class FixedSources:
    """Stands for module.sources: fixed source logits, the bank's interface."""

    def __init__(self, logits: dict):
        self.sources = logits
        self.num_classes = [t.shape[1] for t in logits.values()]
        self.calls = []

    def __len__(self):
        return len(self.sources)

    def __call__(self, x, idx, view, stream="labeled"):
        self.calls.append(stream)
        return list(self.sources.values())


# ---------------------------------------------------------------------------- by hand, float64
def log_softmax(z):
    z = z - z.max(1, keepdim=True).values
    return z - z.exp().sum(1, keepdim=True).log()


def ce(z, y):
    return -log_softmax(z)[torch.arange(len(y)), y].mean()


def aux_by_hand(kind: str, a, t, T):
    """METHODS.md's auxiliary losses, written out: ce / kd with T^2, mean over the batch, sum over
    classes; kd_reference: the reference code's KLDivLoss() mean over B*K; focal: no temperature."""
    if kind == "ce":
        q = log_softmax(t / T).exp()
        return T * T * -(q * log_softmax(a / T)).sum(1).mean()
    if kind in ("kd", "kd_reference"):
        log_q, log_p = log_softmax(t / T), log_softmax(a / T)
        kl = (log_q.exp() * (log_q - log_p)).sum(1)
        return T * T * (kl.mean() if kind == "kd" else kl.sum() / a.numel())
    if kind == "focal":
        log_p, q = log_softmax(a), log_softmax(t).exp()
        return -(q * (1 - log_p.exp()) ** 2 * log_p).sum(1).mean()
    raise ValueError(kind)


def tiny_sskt(aux_loss: str, alpha=0.3, temperature=2.0, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    target = TappedNet(TinyNet(C), tap_pooled=True).double().train()
    sources = FixedSources({k: torch.randn(B, K, generator=g, dtype=torch.float64) * 3
                            for k, K in SOURCE_CLASSES.items()})
    logged = {}
    module = SimpleNamespace(target=target, sources=sources, multi_label=False,
                             task_loss=lambda z, y: task_loss(z, y),
                             log_train=lambda parts, logits, labels: logged.update(parts))
    method = SSKT(alpha=alpha, temperature=temperature, aux_loss=aux_loss, aux_head="linear")
    method.setup(module)
    method.double()
    x = torch.randn(B, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    return method, module, logged, (x, y, torch.arange(B), torch.zeros(B, dtype=torch.long))


@pytest.mark.parametrize("aux_loss", ["ce", "kd", "kd_reference", "focal"])
def test_training_step_loss_matches_hand_computation(aux_loss):
    alpha, T = 0.3, 2.0
    method, module, logged, batch = tiny_sskt(aux_loss, alpha, T)
    loss = method.training_step(module, batch)
    x, y = batch[0], batch[1]

    # the same forward, then every formula by hand from the logits and the heads' weights
    with torch.no_grad():
        out = module.target(x)
        assert out.logits.dtype == torch.float64
        task = ce(out.logits, y)
        terms = {}
        for (key, t), head in zip(module.sources.sources.items(), method.heads):
            a = out.pooled @ head.fc.weight.T + head.fc.bias       # the linear aux head, by hand
            assert a.shape == (B, SOURCE_CLASSES[key])
            terms[key] = aux_by_hand(aux_loss, a, t, T)
        expected = task + alpha * sum(terms.values())

    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert logged["loss"].item() == pytest.approx(expected.item(), rel=1e-12)
    assert logged["task_loss"].item() == pytest.approx(task.item(), rel=1e-12)
    for key, term in terms.items():
        assert logged[f"aux_{key}"].item() == pytest.approx(term.item(), rel=1e-12)
    assert set(logged) == {"loss", "task_loss", "aux_a", "aux_b", "aux_kl_a", "aux_kl_b"}
    # aux_kl (logged only): T^2 KL(source || head) at the method's T, computed in float32 by design
    for (key, t), head in zip(module.sources.sources.items(), method.heads):
        kd = aux_by_hand("kd", out.pooled @ head.fc.weight.T + head.fc.bias, t, T)
        assert logged[f"aux_kl_{key}"].item() == pytest.approx(kd.item(), rel=1e-5)


def test_alpha_zero_is_the_task_loss_and_the_reference_kd_is_k_times_weaker():
    """alpha = 0: the task loss alone. kd_reference (the reference code's KLDivLoss() mean) is the
    batch-mean kd divided by each source's class count K (same heads, same logits)."""
    method, module, logged, batch = tiny_sskt("ce", alpha=0.0)
    loss = method.training_step(module, batch)
    assert loss.item() == pytest.approx(logged["task_loss"].item(), rel=1e-15)
    runs = {}
    for kind in ("kd", "kd_reference"):
        method, module, logged, batch = tiny_sskt(kind)
        method.training_step(module, batch)
        runs[kind] = logged
    for key, K in SOURCE_CLASSES.items():
        assert runs["kd_reference"][f"aux_{key}"].item() == pytest.approx(runs["kd"][f"aux_{key}"].item() / K, rel=1e-12)


def test_bad_options_are_refused_by_the_constructor():
    with pytest.raises(ConfigError, match=r"method.alpha=-0.1: must lie in >= 0"):
        SSKT(alpha=-0.1)
    with pytest.raises(ConfigError, match=r"method.temperature=0: must be > 0"):
        SSKT(temperature=0)
    with pytest.raises(ConfigError, match="method.aux_loss='mse'"):
        SSKT(aux_loss="mse")


# ---------------------------------------------------------------------------- a real module
CIFAR10_INFO = {"name": "cifar10", "num_classes": 10, "in_chans": 3, "image_size": [32, 32],
                "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "multi_label": False,
                "class_names": list(CIFAR10_CLASSES)}


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.filterwarnings("ignore:.*self.log")
@pytest.mark.parametrize("aux_head", ["transfer_module", "linear"])
def test_gradients_reach_the_target_and_heads_not_the_sources(tmp_path, aux_head):
    cfg = compose_config(["model=resnet20", "method=sskt", f"method.aux_head={aux_head}", *SMALL_SOURCE], tmp_path)
    torch.manual_seed(0)
    module = TransferModule(OmegaConf.to_container(cfg, resolve=True), CIFAR10_INFO).double()
    module.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 7, 9])
    batch = (x, y, torch.arange(B), torch.zeros(B, dtype=torch.long))
    loss = module.method.training_step(module, batch)
    # the total is the task loss plus alpha times the aux term, in float64
    with torch.no_grad():
        out = module.target(x)
        t = module.sources(x, *batch[2:])[0]
        a = module.method.heads[0](out)
        expected = ce(out.logits, y) + 0.1 * aux_by_hand("ce", a, t, 3.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    target_grads = [p.grad for p in module.target.parameters()]
    head_grads = [p.grad for p in module.method.heads.parameters()]
    assert target_grads and all(gr is not None and torch.isfinite(gr).all() for gr in target_grads)
    assert head_grads and all(gr is not None for gr in head_grads)
    assert any(gr.abs().sum() > 0 for gr in head_grads)
    source_params = list(module.sources.parameters())
    assert source_params and all(p.grad is None and not p.requires_grad for p in source_params)
