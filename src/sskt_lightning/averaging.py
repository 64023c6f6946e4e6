"""``model.ema=<decay>``: evaluate the exponential moving average (EMA) of the target's weights.

    model:
      ema: null          # null: off | a decay in (0, 1), e.g. 0.999
      ema_warmup: true   # decay_n = min(decay, (1 + n) / (10 + n)), n = updates already averaged
      ema_bn: average    # the average's BatchNorm statistics: average | recompute (before each evaluation)
      ema_bn_images: 1024

For any method: the average is a :class:`torch.optim.swa_utils.AveragedModel` copy of the target,
updated with :func:`torch.optim.swa_utils.get_ema_multi_avg_fn` after EVERY step of the optimizer
that holds the target's weights (a step post-hook on that optimizer, so methods that step their
optimizers themselves - DML, MAXL - are served as automatically optimized ones; a step that AMP's
grad scaler skips is no step). The first update copies the weights; update ``n + 1`` (``n`` updates
already averaged) is ``ema = d_n * ema + (1 - d_n) * weights`` with ``d_n = decay``, or with
``model.ema_warmup=true`` (the default) ``d_n = min(decay, (1 + n) / (10 + n))`` - the rule of
TensorFlow's ``ExponentialMovingAverage(num_updates=n)``: without it a decay of 0.999 over a
300-step run keeps 0.999^299 = 74 % of the first step's weights in the average; with it the warm-up
is over after (10 decay - 1) / (1 - decay) updates (8990 for 0.999), so long runs are unchanged;
during it the average's mean age is a tenth of the steps taken (30 steps of a 300-step run).

Buffers (BatchNorm statistics) are averaged as the parameters are (``use_buffers=True``: torch's
documented alternative to ``update_bn``, and what Lightning's ``WeightAveraging`` and timm's
``ModelEmaV3`` do); integer buffers (``num_batches_tracked``) are copied. Under DDP the parameters
are identical on every process after every step, so their averages are too (no collective); the
BatchNorm statistics are each process's own between evaluations (as the target's are), so before an
evaluation rank 0's averaged buffers are broadcast, as the module does for the target's.

``model.ema_bn=recompute`` (default ``average``: the above) recomputes the average's BatchNorm
statistics for the averaged weights before every evaluation and every checkpoint (``update_bn``,
torch's recipe for averaged weights; once per state of the average) on ``model.ema_bn_images``
training images, unaugmented: the unlabeled stream's when there is one, else the labelled images
(``ImageDataModule.statistics_images``: a fixed order, the same on every process and after a
resume). Why it exists: averaged statistics need not match averaged weights when the weights still
move at the end of training (high learning rate times weight decay under BatchNorm); measured in
docs/results.md, a recipe lost 8 points to it and recomputed statistics gave the raw accuracy back.
Cost: one forward pass over those images per evaluated or saved state of the average (about once per
epoch). The recomputed statistics are what the checkpoint's ``state_dict`` holds.

Validation, test, ``checkpoints/*.ckpt`` (``state_dict``: the network ``sskt-eval``, a source or a
DML peer read from the file get) and so ``results.json`` and the report use the average. The raw
weights and the average's state stay in the checkpoint under ``"ema"`` (``decay``, ``warmup``,
``updates``, ``raw_state_dict``): a resume continues both exactly. The test also scores the raw
weights, paired (``test/raw_acc``, ``test/raw_loss``; results.json's ``extra``), so one run says
what the average changed.

The average is kept outside the module's registered children: DDP, the optimizers, the model
summary and ``module.state_dict()`` never see it; it lives on the target's device, in float32 or the
target's wider float type (a ``bf16-true`` run averages in float32).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sskt_lightning.errors import ConfigError

if TYPE_CHECKING:
    import torch
# torch is imported where it is used: check_ema_options runs in the config checks, before torch is loaded

CHECKPOINT_KEY = "ema"


def check_ema_options(model_cfg: Mapping | None) -> tuple[float | None, bool]:
    """``(decay or None, warmup)`` of ``model.ema`` / ``model.ema_warmup``, or a :class:`ConfigError`."""
    model_cfg = model_cfg or {}
    decay, warmup = model_cfg.get("ema"), model_cfg.get("ema_warmup", True)
    if not isinstance(warmup, bool):
        raise ConfigError(f"model.ema_warmup={warmup!r}: must be true or false.")
    if decay is None:
        return None, warmup
    if (isinstance(decay, bool) or not isinstance(decay, (int, float)) or math.isnan(decay)
            or not 0.0 < decay < 1.0):
        raise ConfigError(f"model.ema={decay!r}: the decay of the weight average must lie strictly between 0 "
                          "and 1 (e.g. model.ema=0.999, an average over about 1 / (1 - 0.999) = 1000 steps), "
                          "or null for no averaging.")
    return float(decay), warmup


EMA_BN_MODES = ("average", "recompute")


def check_ema_bn(model_cfg: Mapping | None) -> tuple[str, int]:
    """``(mode, images)`` of ``model.ema_bn`` / ``model.ema_bn_images``, or a :class:`ConfigError`."""
    model_cfg = model_cfg or {}
    mode, images = model_cfg.get("ema_bn", "average"), model_cfg.get("ema_bn_images", 1024)
    if mode not in EMA_BN_MODES:
        raise ConfigError(f"model.ema_bn={mode!r}: choose average (the average's BatchNorm statistics are "
                          "averaged with its weights) or recompute (recomputed for the averaged weights before "
                          "each evaluation, on model.ema_bn_images training images).")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ConfigError(f"model.ema_bn_images={images!r}: must be a positive number of images (e.g. 1024).")
    if mode == "recompute" and model_cfg.get("ema") is None:
        raise ConfigError("model.ema_bn=recompute recomputes the weight average's BatchNorm statistics, but there "
                          "is no average: set model.ema=<decay> (e.g. 0.999) or leave model.ema_bn=average.")
    return mode, images


def decay_at(decay: float, warmup: bool, n: int) -> float:
    """The decay of the update that follows ``n`` averaged updates (``n >= 1``)."""
    return min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay


def describe(decay: float | None, warmup: bool = True) -> str:
    """What was evaluated, for results.json / eval.json: ``raw`` or ``ema(0.999)`` / ``ema(0.999, warmup)``."""
    if decay is None:
        return "raw"
    return f"ema({decay:g}{', warmup' if warmup else ''})"


def describe_checkpoint(checkpoint: Mapping) -> str:
    """:func:`describe` for a checkpoint: which weights its ``state_dict`` holds."""
    state = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        return "raw"
    return describe(float(state["decay"]), bool(state.get("warmup", False)))


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _names(module: torch.nn.Module) -> list[str]:
    return [*(n for n, _ in module.named_parameters()), *(n for n, _ in module.named_buffers())]


class TargetAverage:
    """The EMA of one network (the target): update, evaluate with it, checkpoint it.

    A plain object, not an ``nn.Module``, so that the module holding it does not register it (see
    the module docstring). ``averaged`` is the :class:`AveragedModel`; ``updates`` its
    ``n_averaged`` kept on the host (read at no device sync)."""

    def __init__(self, target: torch.nn.Module, decay: float, warmup: bool = True, bn: str = "average",
                 bn_images: int = 1024):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        self.decay, self.warmup = check_ema_options({"ema": decay, "ema_warmup": warmup})
        self.bn, self.bn_images = check_ema_bn({"ema": decay, "ema_bn": bn, "ema_bn_images": bn_images})
        self.averaged = AveragedModel(target, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.averaged.requires_grad_(False)
        self.updates = 0
        self._live: list[torch.Tensor] | None = None   # the raw weights while the target holds the average
        self._hooks: list = []

    @property
    def label(self) -> str:
        return describe(self.decay, self.warmup)

    @property
    def evaluating(self) -> bool:
        """Whether the target holds the average now (between :meth:`swap_in` and :meth:`swap_out`)."""
        return self._live is not None

    # ------------------------------------------------------------------ training
    def attach(self, target: torch.nn.Module, optimizers) -> None:
        """Before training: follow the target's device (and float type, at least float32) and update
        after every step of the optimizer that holds the target's weights."""
        self.detach()
        import torch
        first = next((t for t in _tensors(target) if t.is_floating_point()), None)
        if first is not None:
            dtype = first.dtype if first.element_size() >= 4 else torch.float32
            self.averaged.to(device=first.device, dtype=dtype)
        ids = {id(p) for p in target.parameters()}
        holders = [opt for opt in optimizers
                   if any(id(p) in ids for group in opt.param_groups for p in group["params"])]
        if len(holders) > 1:
            raise ConfigError(f"model.ema: {len(holders)} optimizers hold the target's weights, so 'after every "
                              "optimizer step of the target' is ambiguous; this method cannot average the target "
                              "(leave model.ema=null).")
        self._hooks = [opt.register_step_post_hook(lambda *_: self.update(target)) for opt in holders]

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def update(self, target: torch.nn.Module) -> None:
        """Average the target's current weights in (the first update copies them)."""
        import torch
        with torch.no_grad():
            self._update(target)

    def _update(self, target: torch.nn.Module) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn
        ema, live = _tensors(self.averaged.module), _tensors(target)
        if len(ema) != len(live):
            raise RuntimeError(f"the weight average holds {len(ema)} tensors, the target {len(live)}")
        if self.updates == 0:
            for e, w in zip(ema, live):
                e.copy_(w)
        else:
            average = get_ema_multi_avg_fn(decay_at(self.decay, self.warmup, self.updates))
            groups: dict[tuple, tuple[list, list]] = {}
            for e, w in zip(ema, live):
                if e.is_floating_point():
                    es, ws = groups.setdefault((e.device, e.dtype), ([], []))
                    es.append(e)
                    ws.append(w.to(device=e.device, dtype=e.dtype))
                else:
                    e.copy_(w)        # num_batches_tracked: a count, not a value to average
            for es, ws in groups.values():
                average(es, ws, None)
        self.updates += 1
        self.averaged.n_averaged.fill_(self.updates)   # no device read

    # ------------------------------------------------------------------ evaluation
    def recompute_statistics(self, batches) -> None:
        """``model.ema_bn=recompute``: the average's BatchNorm statistics recomputed over ``batches``
        (normalised inputs on the average's device and float type) by ``torch.optim.swa_utils.update_bn``:
        reset, then the plain mean over the batches in train mode (the running mean and the unbiased
        running variance of every batch, averaged). Deterministic for the same batches, so every
        process of a DDP run and a resumed run compute the same statistics."""
        from torch.optim.swa_utils import update_bn
        update_bn(batches, self.averaged.module)

    def swap_in(self, target: torch.nn.Module) -> bool:
        """Put the average into the target (its raw weights kept aside); False when there is no
        average yet (no step taken: the average of nothing is the weights themselves)."""
        if self.updates == 0 or self._live is not None:
            return False
        live = _tensors(target)
        self._live = [t.detach().clone() for t in live]
        for t, e in zip(live, _tensors(self.averaged.module)):
            t.detach().copy_(e)
        return True

    def raw_forward(self, target: torch.nn.Module, x):
        """While evaluating the average: the target's output with its raw weights (nothing copied)."""
        from torch.func import functional_call
        return functional_call(target, dict(zip(_names(target), self._live)), (x,))

    def swap_out(self, target: torch.nn.Module) -> None:
        """The target's raw weights back, bit for bit."""
        if self._live is None:
            return
        for t, raw in zip(_tensors(target), self._live):
            t.detach().copy_(raw)
        self._live = None

    # ------------------------------------------------------------------ checkpoints
    def export(self, checkpoint: dict, target: torch.nn.Module, prefix: str) -> None:
        """``checkpoint["state_dict"]``'s target entries become the average (the evaluated network);
        the raw ones and the average's state go to ``checkpoint["ema"]``."""
        sd = checkpoint["state_dict"]
        names = _names(target)
        live = self._live if self._live is not None else [t.detach() for t in _tensors(target)]
        average = [t.detach() for t in _tensors(self.averaged.module)] if self.updates else live
        raw = {}
        for name, w, e in zip(names, live, average):
            key = prefix + name
            if key in sd:   # on the module's device (after fit Lightning moves the module to the CPU)
                raw[key], sd[key] = w, e.to(device=sd[key].device)
        checkpoint[CHECKPOINT_KEY] = {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                                      "raw_state_dict": raw}

    def restore(self, checkpoint: dict, target: torch.nn.Module, prefix: str) -> None:
        """The inverse of :meth:`export`, before the state dict is loaded: the average from
        ``state_dict``, the raw weights put back there for the target."""
        self._live = None
        state = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(state, Mapping):     # a checkpoint without an average: start one
            self.updates = 0
            self.averaged.n_averaged.fill_(0)
            return
        sd = checkpoint["state_dict"]
        for name, e in zip(_names(target), _tensors(self.averaged.module)):
            if prefix + name in sd:
                e.detach().copy_(sd[prefix + name])
        sd.update(state["raw_state_dict"])
        self.updates = int(state["updates"])
        self.averaged.n_averaged.fill_(self.updates)


def build_average(model_cfg: Mapping | None, target: torch.nn.Module) -> TargetAverage | None:
    """The target's :class:`TargetAverage` as ``model.ema`` asks, or None (off)."""
    decay, warmup = check_ema_options(model_cfg)
    bn, bn_images = check_ema_bn(model_cfg)
    return None if decay is None else TargetAverage(target, decay, warmup, bn, bn_images)
