"""MAXL: meta auxiliary learning (Liu, Davison, Johns, NeurIPS 2019).

Two networks:

* the multi-task network: the target (trunk + primary head, C classes) plus an auxiliary head
  with ``sum(psi)`` classes on the pooled feature (``aux_head``: ``linear``, or ``mlp``, the
  reference's Linear(f, f)-ReLU-Linear(f, sum(psi))), where the ``psi[c]`` contiguous auxiliary
  slots belong to primary class ``c``;
* the label-generation network ``g`` (any model of the harness): its logits over ``sum(psi)``
  classes go through :func:`mask_softmax`, which keeps only the slots of each image's true class.

With the focal form ``l(p, q) = -sum_k q_k (1 - p_k)^2 log p_k`` (``losses.focal_from_probs``):

    multi-task step:  L(theta1) = mean l(primary, onehot(y)) + mean l(aux, g(x, y).detach())
    meta step:        theta1+ = theta1 - lr_inner * D(grad L(theta1))     (g NOT detached)
                      L_gen   = mean l(primary(theta1+), onehot(y)) + w * sum_k ybar_k log ybar_k

and only g's optimizer steps on ``L_gen`` (``ybar``: batch mean of g's output; ``w`` =
``entropy_weight``, 0.2). ``D`` is the update rule of the multi-task optimizer
(``inner_update=optimizer``, :class:`VirtualSGD`: torch.optim.SGD's weight decay, momentum buffer,
dampening and Nesterov term, read from the optimizer's current state), so theta1+ is the step the
multi-task net would really take; ``inner_update=plain`` uses ``D(g) = g`` (the reference's inner
step, the same rule as its plain-SGD multi-task optimizer). ``meta=second_order`` differentiates
through the inner step (``create_graph=True``); ``meta=first_order`` replaces the Hessian-vector
product by a central finite difference (DARTS; the MAXL authors' later variant) along
``dD/dg * v`` -- the same rule's derivative -- which needs no double backward and is what runs
under DDP.

BatchNorm in the virtual forwards (the meta step's forward at theta1, at theta1+ and at
theta1 +- eps*v) runs in training mode, i.e. on the batch's statistics exactly like the real step,
but against throw-away copies of the target's buffers: the target's running statistics are updated
by the multi-task forward only, so they describe the network that is actually trained, and the meta
update leaves every tensor of the target (parameters and buffers) untouched. Symmetrically, g labels
the multi-task step on copies of its own buffers, so the multi-task update leaves g untouched and
g's running statistics follow the meta steps that train it.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.func import functional_call

from sskt_lightning.errors import ConfigError
from sskt_lightning.heads import build_head
from sskt_lightning.losses import focal_from_probs
from sskt_lightning.methods.base import Method, _is_number, split_batch, trainer_of
from sskt_lightning.nets.factory import create_network, resolve_model_name
from sskt_lightning.optim import step_decay

META_MODES = ("second_order", "first_order")
ALTERNATE_MODES = ("step", "epoch")
AUX_HEADS = ("linear", "mlp")
INNER_UPDATES = ("optimizer", "plain")
# g's default: the target's architecture (name null), random weights
GENERATOR = MappingProxyType({"name": None, "pretrained": False, "kwargs": MappingProxyType({})})
# g's optimizer, the reference's: plain SGD (no momentum), lr 1e-3, wd 5e-4, x0.5 every 50 epochs
GENERATOR_OPTIM = MappingProxyType({"lr": 1e-3, "momentum": 0.0, "weight_decay": 5e-4, "nesterov": False,
                                    "step_size": 50, "gamma": 0.5})
_NET = "net."   # the target (TappedNet) keeps its classifier under .net


# ---------------------------------------------------------------------------- the mask softmax
def slot_classes(psi: int | Sequence[int], num_slots: int | None = None) -> torch.Tensor:
    """The primary class of every auxiliary slot: ``psi[c]`` contiguous slots per class ``c``.

    ``psi`` an int means the same count for every class; then ``num_slots`` (= sum(psi)) fixes C.
    """
    if isinstance(psi, int):
        if psi < 1:
            raise ConfigError(f"method.psi={psi}: every primary class needs at least one auxiliary class.")
        if num_slots is None or num_slots % psi:
            raise ConfigError(f"{num_slots} auxiliary logits are not a multiple of psi={psi}.")
        return torch.arange(num_slots) // psi
    counts = torch.as_tensor(list(psi), dtype=torch.long)
    if counts.numel() == 0 or bool((counts < 1).any()):
        raise ConfigError(f"method.psi={list(psi)}: every entry must be a positive integer.")
    if num_slots is not None and int(counts.sum()) != num_slots:
        raise ConfigError(f"sum(psi)={int(counts.sum())} but there are {num_slots} auxiliary logits.")
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def masked_softmax_slots(logits: torch.Tensor, labels: torch.Tensor, slot_class: torch.Tensor) -> torch.Tensor:
    """Softmax over the slots whose class is each row's label; exactly 0 elsewhere.

    The row max over the kept slots is subtracted before exponentiating, so no logit overflows;
    the masked slots are -inf before ``exp`` (exp -> 0, zero gradient), never ``0 * inf``.
    """
    keep = slot_class.to(logits.device)[None, :] == labels[:, None]
    masked = logits.masked_fill(~keep, float("-inf"))
    shifted = masked - masked.amax(dim=1, keepdim=True).detach()
    e = shifted.exp()
    return e / e.sum(dim=1, keepdim=True)


def mask_softmax(logits: torch.Tensor, labels: torch.Tensor, psi: int | Sequence[int]) -> torch.Tensor:
    """MAXL's mask softmax: ``softmax`` of g's ``sum(psi)`` logits restricted to the ``psi[y]``
    slots of each sample's primary class ``y`` (slots of class c are contiguous); zero elsewhere."""
    return masked_softmax_slots(logits, labels, slot_classes(psi, logits.shape[1]))


# ---------------------------------------------------------------------------- the loss pieces
def focal_on_logits(logits: torch.Tensor, q: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """``mean_b l(softmax(logits), q)`` with the log taken as ``log_softmax`` (no log(0))."""
    log_p = F.log_softmax(logits, dim=1)
    return focal_from_probs(log_p.exp(), q, gamma, log_p=log_p)


def neg_entropy_of_mean(gen: torch.Tensor) -> torch.Tensor:
    """``sum_k ybar_k log ybar_k`` with ``ybar`` the batch mean of g's output (minimised: spread)."""
    ybar = gen.mean(0)
    return (ybar * ybar.clamp_min(1e-20).log()).sum()


# ---------------------------------------------------------------------------- the virtual step
@dataclass
class VirtualSGD:
    """The update ``torch.optim.SGD`` applies to one parameter, ``p+ = p - lr * D(p, g)``:

        d = g + weight_decay * p
        b = d                                   (no momentum buffer yet: the first step)
        b = momentum * b_prev + (1 - dampening) * d
        D = d + momentum * b  (nesterov)   or   D = b   (momentum > 0)   or   D = d

    ``buffer`` is the optimizer's current momentum buffer (a constant). ``VirtualSGD()`` is the
    plain step ``D = g``. ``D`` is affine in ``g``; :meth:`grad_scale` is its slope.
    """
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    buffer: torch.Tensor | None = None

    def direction(self, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        d = g + self.weight_decay * p if self.weight_decay else g
        if self.momentum:
            b = d if self.buffer is None else self.momentum * self.buffer + (1 - self.dampening) * d
            d = d + self.momentum * b if self.nesterov else b
        return d

    def grad_scale(self) -> float:
        """``dD/dg``: the factor with which the gradient (hence g's labels) enters the update."""
        if not self.momentum:
            return 1.0
        c = 1.0 if self.buffer is None else 1.0 - self.dampening
        return 1.0 + self.momentum * c if self.nesterov else c


def virtual_sgd_rules(optimizer, named_params: Mapping[str, torch.Tensor]) -> dict[str, VirtualSGD]:
    """One :class:`VirtualSGD` per named parameter, from an SGD optimizer's groups and state."""
    opt = getattr(optimizer, "optimizer", optimizer)   # unwrap Lightning's LightningOptimizer
    if not isinstance(opt, torch.optim.SGD):
        raise ConfigError(
            f"method=maxl: method.inner_update=optimizer mirrors the multi-task optimizer's update in the "
            f"meta step and knows torch.optim.SGD only, but cfg.optim builds {type(opt).__name__}. Use an "
            f"SGD optimizer, or method.inner_update=plain (theta - lr_inner * grad, the reference's step).")
    group_of = {id(p): group for group in opt.param_groups for p in group["params"]}
    rules = {}
    for name, p in named_params.items():
        group = group_of.get(id(p))
        if group is None:
            raise ConfigError(f"method=maxl: parameter {name!r} is not in the multi-task optimizer.")
        if group.get("maximize", False):
            raise ConfigError("method=maxl: the multi-task optimizer maximises (maximize=True); "
                              "the meta step assumes it minimises.")
        buf = opt.state.get(p, {}).get("momentum_buffer")
        rules[name] = VirtualSGD(float(group["momentum"]), float(group["dampening"]),
                                 float(group["weight_decay"]), bool(group["nesterov"]),
                                 None if buf is None else buf.detach())
    return rules


class MAXL(Method):
    name = "maxl"
    automatic_optimization = False
    loss_terms = {"primary_loss": "MAXL's primary (focal) loss", "aux_loss": "MAXL's auxiliary loss",
                  "gen_loss": "MAXL's label-generator loss", "gen_entropy": "MAXL's generator entropy",
                  "meta_objective": "MAXL's meta objective, which the generator steps on"}
    tap_pooled = True
    no_compiled_target = ("MAXL's meta step differentiates the target twice (second order), which "
                          "torch.compile does not support")

    def __init__(self, psi: int | Sequence[int] = 5, generator: Mapping | None = GENERATOR,
                 generator_optim: Mapping | None = GENERATOR_OPTIM, lr_inner: float | None = None,
                 entropy_weight: float = 0.2, focal_gamma: float = 2.0, meta: str = "second_order",
                 alternate: str = "step", fd_eps: float = 0.01, aux_head: str = "linear",
                 lr_inner_decay: dict | None = None, inner_update: str = "optimizer"):
        super().__init__()
        if aux_head not in AUX_HEADS:
            raise ConfigError(f"method.aux_head={aux_head!r}; choose one of {list(AUX_HEADS)} "
                              f"(mlp: Linear(f, f)-ReLU-Linear(f, sum(psi)), the reference's).")
        if inner_update not in INNER_UPDATES:
            raise ConfigError(f"method.inner_update={inner_update!r}; choose one of {list(INNER_UPDATES)}.")
        if meta not in META_MODES:
            raise ConfigError(f"method.meta={meta!r}; choose one of {list(META_MODES)}.")
        if alternate not in ALTERNATE_MODES:
            raise ConfigError(f"method.alternate={alternate!r}; choose one of {list(ALTERNATE_MODES)}.")
        if isinstance(psi, bool) or not isinstance(psi, (int, list, tuple)):
            raise ConfigError(f"method.psi={psi!r}: give an int or a list of ints (one per primary class).")
        if isinstance(psi, int):
            slot_classes(psi, psi)          # positivity
        else:
            if not all(isinstance(p, int) and not isinstance(p, bool) for p in psi):
                raise ConfigError(f"method.psi={list(psi)}: every entry must be a positive integer.")
            slot_classes(psi)
        if lr_inner is not None and float(lr_inner) <= 0:
            raise ConfigError(f"method.lr_inner={lr_inner}: must be positive, or null (the multi-task lr).")
        if fd_eps <= 0:
            raise ConfigError(f"method.fd_eps={fd_eps}: must be positive.")
        self.psi = psi if isinstance(psi, int) else [int(p) for p in psi]
        self.generator_cfg = dict(generator or {})
        defaults = GENERATOR_OPTIM    # keys given override these (generator_optim={lr: 0.01} keeps the rest)
        unknown = set(generator_optim or {}) - set(defaults)
        if unknown:
            raise ConfigError(f"method.generator_optim: unknown keys {sorted(unknown)}; "
                              f"known: {sorted(defaults)}.")
        self.generator_optim_cfg = {**defaults, **(generator_optim or {})}
        lr = self.generator_optim_cfg["lr"]
        if not _is_number(lr) or lr <= 0:
            raise ConfigError(f"method.generator_optim.lr={lr!r}: the learning rate must be a number > 0.")
        self.lr_inner = None if lr_inner is None else float(lr_inner)
        self.lr_inner_decay = self._check_decay(lr_inner_decay, lr_inner)
        self.aux_head_kind, self.inner_update = aux_head, inner_update
        self.entropy_weight, self.gamma, self.fd_eps = float(entropy_weight), float(focal_gamma), float(fd_eps)
        self.meta, self.requested_meta, self.alternate = meta, meta, alternate
        self.aux_head: nn.Module | None = None
        self.generator: nn.Module | None = None
        self.generator_name: str | None = None

    @staticmethod
    def _check_decay(decay: dict | None, lr_inner) -> dict | None:
        if not decay:
            return None
        decay = dict(decay)
        if set(decay) != {"every", "factor"}:
            raise ConfigError(f"method.lr_inner_decay={decay}: give {{every: <epochs>, factor: <x>}} "
                              f"(the reference: {{every: 50, factor: 0.5}}), or null.")
        every, factor = decay["every"], decay["factor"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1 or float(factor) <= 0:
            raise ConfigError(f"method.lr_inner_decay={decay}: every must be a positive integer and "
                              f"factor positive.")
        if lr_inner is None:
            raise ConfigError("method.lr_inner_decay needs a fixed method.lr_inner: with lr_inner=null the "
                              "inner step already uses the multi-task optimizer's scheduled lr.")
        return {"every": int(every), "factor": float(factor)}

    # ------------------------------------------------------------------ set-up
    def setup(self, module):
        if getattr(module, "multi_label", False):
            raise ConfigError("method=maxl needs single-label data: its label generator masks by the "
                              "true class (multi-label data such as VOC cannot be used).")
        num_classes = module.target.num_classes
        if isinstance(self.psi, list) and len(self.psi) != num_classes:
            raise ConfigError(f"method.psi has {len(self.psi)} entries but the data has {num_classes} "
                              f"classes: give one count per class, or a single int.")
        psi = [self.psi] * num_classes if isinstance(self.psi, int) else self.psi
        num_aux = sum(psi)
        self.register_buffer("slot_class", slot_classes(psi, num_aux), persistent=False)
        self.aux_head = build_head(self.aux_head_kind, module.target, num_aux)
        self.generator = self._build_generator(module, num_aux)

    def _build_generator(self, module, num_aux: int) -> nn.Module:
        cfg = self.generator_cfg
        model_cfg = module.cfg.model
        name = cfg.get("name") or model_cfg.name
        kwargs = dict(cfg.get("kwargs") or {})
        if not cfg.get("name"):   # same architecture as the target: its kwargs too, unless overridden
            kwargs = {**dict(model_cfg.get("kwargs") or {}), **kwargs}
        size = module.data_info["image_size"]
        size = size[-1] if isinstance(size, (list, tuple)) else size
        self.generator_name = resolve_model_name(str(name), size)
        return create_network(self.generator_name, num_aux, module.data_info["in_chans"],
                              pretrained=bool(cfg.get("pretrained", False)), **kwargs)

    def multitask_parameters(self, module) -> list[nn.Parameter]:
        return [p for p in [*module.target.parameters(), *self.aux_head.parameters()] if p.requires_grad]

    def configure_optimizers(self, module):
        self._resolve_meta(module)
        multitask = module.default_optimizers(self.multitask_parameters(module))
        if not isinstance(multitask, dict):
            multitask = {"optimizer": multitask}
        c = self.generator_optim_cfg
        gen_opt = torch.optim.SGD([p for p in self.generator.parameters() if p.requires_grad],
                                  lr=float(c["lr"]), momentum=float(c["momentum"]),
                                  weight_decay=float(c["weight_decay"]), nesterov=bool(c["nesterov"]))
        gen = {"optimizer": gen_opt}
        if c.get("step_size"):
            gen["lr_scheduler"] = {"scheduler": step_decay(gen_opt, int(c["step_size"]), float(c["gamma"])),
                                   "interval": "epoch"}
        return [multitask, gen]

    def _resolve_meta(self, module) -> None:
        """Second-order gradients do not work under DDP: fall back to the first-order form there."""
        trainer = trainer_of(module)
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        # the strategy's wrapped model (set up before the optimizers are configured): a
        # DistributedDataParallel says whether it detects unused parameters; other wrappers say nothing
        wrapped = getattr(getattr(trainer, "strategy", None), "model", None)
        find_unused = getattr(wrapped, "find_unused_parameters", None)
        if world > 1 and find_unused is False:
            # each of MAXL's two backward passes reaches only one network: DDP must be told
            raise ConfigError("method=maxl under DDP needs unused-parameter detection (the multi-task "
                              "and meta updates each reach only their own network): use trainer=ddp "
                              "(or trainer=ddp_cpu), which turns it on for manually optimized methods, "
                              "or trainer.strategy=ddp_find_unused_parameters_true.")
        if world > 1 and self.requested_meta == "second_order":
            if self.meta != "first_order":
                rank_zero_warn(f"method=maxl: meta=second_order does not work under distributed training "
                               f"(world size {world}: DistributedDataParallel cannot take second-order "
                               f"gradients); using meta=first_order (finite-difference Hessian-vector "
                               f"product) instead.")
            self.meta = "first_order"
        else:
            self.meta = self.requested_meta

    def on_train_epoch_end(self, module) -> None:
        """The base class steps both schedulers per epoch. With alternate=epoch one optimizer sits an
        epoch out by design; PyTorch's 'scheduler before optimizer step' warning is then noise."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            super().on_train_epoch_end(module)

    # ------------------------------------------------------------------ pieces
    def generator_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """g(x, y): the mask softmax of g's logits over the slots of the true class."""
        return masked_softmax_slots(self.generator(x), y, self.slot_class)

    def primary_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return focal_on_logits(logits, F.one_hot(y, logits.shape[1]).to(logits.dtype), self.gamma)

    def multitask_loss(self, out, y: torch.Tensor, gen: torch.Tensor):
        """``L(theta1)`` = primary focal + auxiliary focal against ``gen``; also both terms."""
        primary = self.primary_loss(out.logits, y)
        aux = focal_on_logits(self.aux_head(out), gen, self.gamma)
        return primary + aux, primary, aux

    @staticmethod
    def _net_params(target) -> dict[str, torch.Tensor]:
        return {n: p for n, p in target.net.named_parameters() if p.requires_grad}

    @staticmethod
    def _scratch_buffers(target) -> dict[str, torch.Tensor]:
        """Copies of the target's buffers for the virtual forwards (see the module docstring)."""
        return {n: b.clone() for n, b in target.net.named_buffers()}

    @staticmethod
    def _prefixed(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {_NET + n: t for n, t in d.items()}

    def inner_lr(self, module) -> float:
        """``lr_inner`` (times ``factor ** (epoch // every)`` with ``lr_inner_decay``), or (null)
        the multi-task optimizer's current learning rate."""
        if self.lr_inner is not None:
            if self.lr_inner_decay is None:
                return self.lr_inner
            d = self.lr_inner_decay
            return self.lr_inner * d["factor"] ** (int(module.current_epoch) // d["every"])
        opt = module.optimizers()[0]
        return float(getattr(opt, "optimizer", opt).param_groups[0]["lr"])

    def virtual_rules(self, module) -> dict[str, VirtualSGD] | None:
        """The multi-task optimizer's update rule per target parameter (``inner_update=optimizer``),
        or None (``plain``: theta - lr * grad)."""
        if self.inner_update == "plain":
            return None
        return virtual_sgd_rules(module.optimizers()[0], self._net_params(module.target))

    # ------------------------------------------------------------------ the meta objective
    def generator_objective(self, target, x: torch.Tensor, y: torch.Tensor, lr_inner: float,
                            meta: str | None = None, rules: Mapping[str, VirtualSGD] | None = None):
        """A scalar whose gradient with respect to g's parameters is the meta gradient of
        ``L_gen``, and a dict of values to log (``gen_loss`` = L_gen, ``gen_entropy`` = H(ybar)).

        ``rules``: the update rule per target parameter name (:class:`VirtualSGD`; None: plain
        ``theta - lr * grad``): ``theta1+ = theta1 - lr * D(theta1, grad L(theta1))``.
        ``second_order``: the scalar is ``L_gen(theta1+(g))`` itself, theta1+ kept in the graph.
        ``first_order``: ``-lr/(2 eps) * [L(theta1 + eps u) - L(theta1 - eps u)] + w * sum ybar log ybar``
        with ``u = dD/dg * v``, ``v = grad L_gen-primary(theta1+)`` (theta1+ detached),
        ``eps = fd_eps / ||u||``; only g's parameters are leaves of its graph (the target and aux
        head enter as constants).
        """
        meta = meta or self.meta
        plain = VirtualSGD()
        rule = (lambda n: plain) if rules is None else (lambda n: rules.get(n, plain))
        gen = self.generator_output(x, y)
        neg_ent = neg_entropy_of_mean(gen)
        params = self._net_params(target)
        names = list(params)
        buffers = self._scratch_buffers(target)
        out = functional_call(target, self._prefixed(buffers), (x,))   # theta1, real parameters
        if meta == "second_order":
            loss, primary, aux = self.multitask_loss(out, y, gen)       # gen NOT detached
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True,
                                        allow_unused=True)
            plus = {n: params[n] - lr_inner * rule(n).direction(params[n], g) if g is not None else params[n]
                    for n, g in zip(names, grads)}
            logits_plus = functional_call(target.net, {**plus, **buffers}, (x,))
            gen_primary = self.primary_loss(logits_plus, y)
            objective = gen_primary + self.entropy_weight * neg_ent
            gen_loss = objective
        elif meta == "first_order":
            loss, primary, aux = self.multitask_loss(out, y, gen.detach())
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            plus = {n: (params[n] - lr_inner * rule(n).direction(params[n], g) if g is not None
                        else params[n]).detach().requires_grad_()
                    for n, g in zip(names, grads)}
            logits_plus = functional_call(target.net, {**plus, **buffers}, (x,))
            gen_primary = self.primary_loss(logits_plus, y)
            v = torch.autograd.grad(gen_primary, [plus[n] for n in names], allow_unused=True)
            v = [torch.zeros_like(plus[n]) if g is None or grads[i] is None else rule(n).grad_scale() * g
                 for i, (n, g) in enumerate(zip(names, v))]
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v)).to(v[0].dtype)
            eps = self.fd_eps / norm.clamp_min(1e-12)
            head = {n: p.detach() for n, p in self.aux_head.named_parameters()}

            def aux_at(sign: float) -> torch.Tensor:
                shifted = {n: params[n].detach() + sign * eps * g for n, g in zip(names, v)}
                o = functional_call(target, self._prefixed({**shifted, **buffers}), (x,))
                return focal_on_logits(functional_call(self.aux_head, head, (o,)), gen, self.gamma)

            hvp_term = -lr_inner * (aux_at(1.0) - aux_at(-1.0)) / (2 * eps)
            objective = hvp_term + self.entropy_weight * neg_ent
            gen_loss = gen_primary.detach() + self.entropy_weight * neg_ent.detach()
        else:
            raise ConfigError(f"method.meta={meta!r}; choose one of {list(META_MODES)}.")
        logs = {"loss": loss.detach(), "primary_loss": primary.detach(), "aux_loss": aux.detach(),
                "gen_loss": gen_loss.detach(), "gen_entropy": -neg_ent.detach()}
        return objective, logs

    # ------------------------------------------------------------------ the two updates
    def multitask_update(self, module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step of the multi-task optimizer on ``L(theta1)``; g only labels (no gradient)."""
        opt = module.optimizers()[0]
        with torch.no_grad():   # g's BN on copies of its buffers: this update leaves g bit-identical
            scratch = {n: b.clone() for n, b in self.generator.named_buffers()}
            gen = masked_softmax_slots(functional_call(self.generator, scratch, (x,)), y, self.slot_class)
        out = module.target(x)
        loss, primary, aux = self.multitask_loss(out, y, gen)
        opt.zero_grad()
        module.manual_backward(loss)
        opt.step()
        return {"loss": loss.detach(), "primary_loss": primary.detach(), "aux_loss": aux.detach(),
                "logits": out.logits.detach()}

    def meta_update(self, module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step of g's optimizer on the meta gradient; the multi-task network is not touched."""
        opt = module.optimizers()[1]
        objective, logs = self.generator_objective(module.target, x, y, self.inner_lr(module),
                                                   rules=self.virtual_rules(module))
        opt.zero_grad()
        module.manual_backward(objective, inputs=[p for p in self.generator.parameters() if p.requires_grad])
        opt.step()
        return {**logs, "meta_objective": objective.detach()}   # what g stepped on (first order: not gen_loss)

    def training_step(self, module, batch):
        self._resolve_meta(module)
        x, y, *_ = split_batch(batch)
        do_multitask = self.alternate == "step" or module.current_epoch % 2 == 0
        do_meta = self.alternate == "step" or module.current_epoch % 2 == 1
        parts: dict[str, torch.Tensor] = {}
        guarded: dict[str, torch.Tensor] = {}
        logits = None
        if do_multitask:
            mt = self.multitask_update(module, x, y)
            logits = mt.pop("logits")
            parts.update(mt)
        if do_meta:
            logs = self.meta_update(module, x, y)
            parts.update({"gen_loss": logs["gen_loss"], "gen_entropy": logs["gen_entropy"]})
            guarded["meta_objective"] = logs["meta_objective"]
            if not do_multitask:   # meta-only epoch: L(theta1) was computed on the way
                parts.update({k: logs[k] for k in ("loss", "primary_loss", "aux_loss")})
        module.log_train(parts, logits, y, guarded=guarded)
        return parts["loss"]

    def describe(self):
        return {"psi": self.psi, "num_aux_classes": int(self.slot_class.numel()) if hasattr(self, "slot_class") else None,
                "meta": self.meta, "requested_meta": self.requested_meta, "alternate": self.alternate,
                "lr_inner": self.lr_inner if self.lr_inner is not None else "multi-task lr",
                "lr_inner_decay": self.lr_inner_decay, "inner_update": self.inner_update,
                "aux_head": self.aux_head_kind,
                "entropy_weight": self.entropy_weight, "focal_gamma": self.gamma,
                "generator": self.generator_name, "generator_optim": dict(self.generator_optim_cfg)}

    def optimizer_names(self) -> list[str]:
        return ["target", "generator"]   # the multi-task optimizer (target + aux head), then g's
