"""DML (deep mutual learning, Zhang et al., CVPR 2018): a cohort of K >= 2 networks learn together,
each from the labels and from the others' predictions. For peer k:

    L_k = CE(z_k, y) + 1/(K-1) * sum_{l != k} T^2 * KL(softmax_T(z_l) || softmax_T(z_k))

(formula: :func:`dml_loss`; the paper uses T = 1), with the other peers' logits detached: each
loss only ever reaches its own peer's parameters. Peer 0 is the target (``module.target``), the
run's result; the other peers are model configs listed in ``method.peers`` and live in
``self.peers`` (an ``nn.ModuleList``: checkpointed, moved to the device, in eval mode whenever the
module is). They are evaluated beside the target (``val/peer1_acc``, ``test/peer1_acc``, ...).
``kl_warmup`` (epochs, fractional allowed; 0 = off, the paper) ramps the KL term's weight linearly
from 0 at the first step to 1, step by step: the common fix for peers that drag each other down
while both are still guessing.

With ``unlabeled=True`` (needs ``data.unlabeled=true``) every peer predicts the labeled and the
unlabeled images (one forward of the concatenated batch, so BatchNorm sees both streams) and

    L_k = CE(z_k[:B_l], y) + 1/(K-1) * sum_{l != k} T^2 * KL(softmax_T(z_l) || softmax_T(z_k))

with the KL term the mean over all B_l + B_u images (each image weighted alike) and the task term
on the B_l labeled ones.

Each peer has its own optimizer and scheduler, built from the same ``cfg.optim``; the method uses
manual optimization (``automatic_optimization = False``, steps through ``module.manual_backward``
and ``module.optimizers()``, schedulers stepped by :class:`Method` per epoch or, with
``optim.interval: step``, per training step).
Note that Lightning's ``trainer.global_step`` counts optimizer steps, i.e. K per batch here.

``update``:
  * ``sequential`` (default, the paper's Algorithm 1): all peers predict the batch; peer 0 steps;
    the peer that just stepped predicts the batch again with its new weights; peer 1 steps; and so
    on: each peer's step sees the predictions of every earlier peer made *after* that peer's step
    in this iteration (2K - 1 forwards per batch; the K first forwards keep their graphs until
    each peer's backward). The re-predictions run in train mode like the
    first ones (batch statistics) but without gradients and without touching the BatchNorm running
    statistics (each batch enters them once per peer).
  * ``simultaneous``: one forward of every peer, all K losses from those logits, all K steps.

DDP: every ``manual_backward`` produces gradients for one peer only (the others' logits carry no
graph), so per backward call the other peers' parameters are "unused" and the DDP gradient
reducer has to be told so (``find_unused_parameters=True``, or a strategy that syncs per
optimizer). That is a setting of the trainer/strategy, not of this method.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType

import torch
from torch import nn

from sskt_lightning import weights as W
from sskt_lightning.errors import ConfigError
from sskt_lightning.losses import dml_loss
from sskt_lightning.methods.base import TEMPERATURE_HINT, Method, check_positive, split_batch, trainer_of
from sskt_lightning.nets.factory import create_network, resolve_model_name

UPDATES = ("sequential", "simultaneous")
PEER_KEYS = ("name", "pretrained", "kwargs", "weights")


def _peer_spec(k: int, spec) -> dict:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"method.peers[{k - 1}] (peer {k}) must be a model config such as "
                          f"{{name: resnet20, pretrained: false}}, got {spec!r}.")
    unknown = set(spec) - set(PEER_KEYS)
    if unknown:
        raise ConfigError(f"method.peers[{k - 1}] (peer {k}): unknown option(s) {sorted(unknown)}; known: {list(PEER_KEYS)}.")
    out = {"name": spec.get("name"), "pretrained": bool(spec.get("pretrained") or False),
           "kwargs": dict(spec.get("kwargs") or {}), "weights": spec.get("weights")}
    if not out["name"] and not out["weights"]:
        raise ConfigError(f"method.peers[{k - 1}] (peer {k}) needs a name (e.g. name: resnet20), or weights: a "
                          "checkpoint of this project, which names its architecture.")
    return out


@contextmanager
def _buffers_kept(net: nn.Module):
    """Run a train-mode forward without leaving a trace in the buffers (BN running stats)."""
    saved = [(b, b.detach().clone()) for b in net.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class DML(Method):
    name = "dml"
    automatic_optimization = False
    accepts_unlabeled = True

    def __init__(self, peers: Sequence | Mapping | str = (MappingProxyType(
                     {"name": "resnet20", "pretrained": False, "kwargs": MappingProxyType({}), "weights": None}),),
                 update: str = "sequential", temperature: float = 1.0, kl_warmup: float = 0.0,
                 unlabeled: bool = False):
        super().__init__()
        self.unlabeled = bool(unlabeled)
        if isinstance(kl_warmup, bool) or not isinstance(kl_warmup, (int, float)) or kl_warmup < 0:
            raise ConfigError(f"method.kl_warmup={kl_warmup!r} must be a number of epochs >= 0 (0: the KL "
                              f"term at full weight from the first step).")
        self.kl_warmup = float(kl_warmup)
        if update not in UPDATES:
            raise ConfigError(f"method.update={update!r}; choose one of {list(UPDATES)}.")
        temperature = check_positive("temperature", temperature, TEMPERATURE_HINT)
        if isinstance(peers, (Mapping, str)):
            peers = [peers]
        self.peer_specs = [_peer_spec(k, p) for k, p in enumerate(peers or [], start=1)]
        if not self.peer_specs:
            raise ConfigError("method=dml needs at least one peer beside the target: e.g. "
                              "method.peers='[{name: resnet20, pretrained: false}]'.")
        self.update, self.temperature = update, float(temperature)
        self.peers = nn.ModuleList()
        self.peer_names: list[str] = []

    @classmethod
    def describe_term(cls, key):
        return f"DML peer {key[4:-5]}'s loss" if key.startswith("peer") and key.endswith("_loss") else None

    # ------------------------------------------------------------------ set-up
    def setup(self, module):
        info = module.data_info
        size = info["image_size"]
        size = size[-1] if isinstance(size, (list, tuple)) else size
        for k, spec in enumerate(self.peer_specs, start=1):
            net, name = self._build_peer(k, spec, info, size)   # channels_last: the module converts it
            self.peers.append(net)
            self.peer_names.append(name)

    @staticmethod
    def _build_peer(k: int, spec: dict, info: Mapping, size: int) -> tuple[nn.Module, str]:
        obj = W.read_file(spec["weights"], f"method.peers[{k - 1}].weights") if spec["weights"] else None
        name = spec["name"]
        if name is None and obj is not None and W.is_project_checkpoint(obj):
            name = obj["hyper_parameters"]["model_name"]
        if name is None:
            raise ConfigError(f"method.peers[{k - 1}].name (peer {k}) is required: {spec['weights']} is not a checkpoint "
                              "of this project, so it does not say its architecture.")
        name = resolve_model_name(name, size)
        make = lambda pretrained: create_network(name, info["num_classes"], info["in_chans"],  # noqa: E731
                                                 pretrained=pretrained, **spec["kwargs"])
        if spec["pretrained"] and obj is None:
            from sskt_lightning.sources import create_pretrained
            net = create_pretrained(name, info["in_chans"], f"DML peer {k}",
                                    f"Offline? Pass method.peers[{k - 1}].weights=/path/to/file, or "
                                    "pretrained: false.", num_classes=info["num_classes"], **spec["kwargs"])
        else:
            net = make(False)
        if obj is not None:
            sd = W.extract_state_dict(obj, what=f"method.peers[{k - 1}].weights={spec['weights']}")
            W.load_into(net, sd, f"DML peer {k} ({spec['weights']})")
        return net, name

    def configure_optimizers(self, module):
        """One optimizer (and scheduler) per peer from ``cfg.optim``; the target's first. Schedulers
        keep their interval and are stepped by :class:`Method` (per epoch or per training step)."""
        out = [module.default_optimizers(p for p in net.parameters() if p.requires_grad)
               for net in (module.target, *self.peers)]
        return [o if isinstance(o, Mapping) else {"optimizer": o} for o in out]

    # ------------------------------------------------------------------ training
    def networks(self, module) -> list:
        """The cohort as callables ``x -> logits``: the target first, then the peers."""
        return [lambda x: module.target(x).logits, *self.peers]

    def cohort(self, module) -> list[nn.Module]:
        return [module.target, *self.peers]

    def kl_weight(self, module) -> float:
        """The KL term's weight at this training step: a linear ramp from 0 (first step) to 1 over
        ``kl_warmup`` epochs (``kl_warmup * batches per epoch`` steps), then 1; 1 without a trainer."""
        trainer = trainer_of(module)
        if self.kl_warmup <= 0 or trainer is None:
            return 1.0
        # trainer.global_step counts optimizer steps: one per peer and batch, all taken every batch,
        # so global_step // K is the number of batches trained before this one (0 on the first;
        # restored with the checkpoint on resume)
        step = trainer.global_step // max(1, len(trainer.optimizers))
        return min(1.0, step / (self.kl_warmup * max(1, trainer.num_training_batches)))

    def peer_loss(self, module, logits: torch.Tensor, others: Sequence[torch.Tensor], labels: torch.Tensor,
                  kl_weight: float = 1.0):
        """Peer's loss from its own logits (with graph) and its partners' (detached here)."""
        return dml_loss(logits, others, labels, self.temperature, module.multi_label, kl_weight)

    def _step(self, module, optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        module.manual_backward(loss)
        optimizer.step()

    def training_step(self, module, batch):
        x, y, *_ = split_batch(batch)
        if self.unlabeled:
            if not (isinstance(batch, dict) and "unlabeled" in batch):
                raise ConfigError("method.unlabeled=true needs data.unlabeled=true (a second, unlabeled stream).")
            x = torch.cat([x, batch["unlabeled"][0]])   # labeled first: the task term reads the first len(y)
        n = y.shape[0]
        optimizers = module.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        nets, modules = self.networks(module), self.cohort(module)
        K = len(nets)
        logits = [f(x) for f in nets]                   # every peer, with its graph
        latest = [z.detach() for z in logits]           # each peer's newest prediction
        losses = []
        weight = self.kl_weight(module)
        for k in range(K):
            if self.update == "sequential" and k > 0:
                # peer k-1 just stepped: its partners must see its new prediction
                with torch.no_grad(), _buffers_kept(modules[k - 1]):
                    latest[k - 1] = nets[k - 1](x)
            others = [latest[j] for j in range(K) if j != k]
            loss, _ = self.peer_loss(module, logits[k], others, y, weight)
            self._step(module, optimizers[k], loss)
            losses.append(loss.detach())
        parts = {"loss": losses[0], **{f"peer{k}_loss": losses[k] for k in range(1, K)}}
        if self.kl_warmup > 0:
            parts["kl_weight"] = torch.tensor(weight, device=losses[0].device)
        module.log_train(parts, logits[0][:n].detach(), y)
        return losses[0]

    # ------------------------------------------------------------------ evaluation
    def extra_eval_names(self) -> list[str]:
        return [f"peer{k}" for k in range(1, len(self.peer_specs) + 1)]

    def extra_eval_logits(self, module, x):
        return {f"peer{k}": peer(x) for k, peer in enumerate(self.peers, start=1)}

    def describe(self):
        return {"update": self.update, "temperature": self.temperature, "kl_warmup": self.kl_warmup,
                "unlabeled": self.unlabeled,
                "peers": [{"model": n, "pretrained": s["pretrained"], "weights": s["weights"]}
                          for n, s in zip(self.peer_names, self.peer_specs)]}

    def optimizer_names(self) -> list[str]:
        return ["target", *self.extra_eval_names()]
