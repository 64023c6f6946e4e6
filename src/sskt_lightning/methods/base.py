"""The method seam: a strategy object that knows its losses, extra networks and optimizers.

:class:`sskt_lightning.module.TransferModule` owns the target, the frozen sources, the metrics and
the logging; it delegates the training step (and, for methods with several optimizers or a meta
step, the optimizer set-up) to its ``method``. A method is an ``nn.Module`` so that the networks it
adds (aux heads, DML peers, the MAXL label generator) move with the module, are checkpointed, and
are seen by DDP.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from sskt_lightning.module import TransferModule


def split_batch(batch):
    """``(x, y, index, view)`` from a plain batch, or from the ``labeled`` part of a dict batch
    (``view``: each sample's augmentation view id, see ``ImageDataModule.prepare_batch``)."""
    return batch["labeled"] if isinstance(batch, dict) else batch


def trainer_of(module):
    """The Trainer running ``module`` (Lightning's public ``module.trainer``), or None outside one."""
    try:
        return module.trainer
    except (RuntimeError, AttributeError):
        return None


TEMPERATURE_HINT = " (softmax(z / T) divides by it); common values 1-4"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_positive(option: str, value, hint: str = "") -> float:
    """``value`` as a float, or a :class:`ConfigError` naming ``method.<option>``: a number > 0."""
    from sskt_lightning.errors import ConfigError
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"method.{option}={value!r}: must be > 0{hint}.")
    return float(value)


def check_range(option: str, value, low: float = 0.0, high: float = float("inf"), valid: str | None = None) -> float:
    """``value`` as a float in ``[low, high]``, or a :class:`ConfigError` saying the valid range."""
    from sskt_lightning.errors import ConfigError
    if not _is_number(value) or not low <= value <= high:
        raise ConfigError(f"method.{option}={value!r}: must lie in {valid or f'[{low}, {high}]'}.")
    return float(value)


def enable_strong_views(method, datamodule) -> None:
    """Turn ``datamodule.strong_views`` on when ``method`` (its ``strong_views`` capability) trains on
    FixMatch's strong views: run by the command line and by ``TransferModule.on_fit_start`` (a
    user's own Trainer), before the first training batch. Never turns it off. A data module without
    the attribute (the user's own loaders) is left alone: its batches must carry the key themselves.
    A :class:`ConfigError` when there is no unlabeled stream to augment."""
    if not getattr(method, "strong_views", False) or datamodule is None or not hasattr(datamodule, "strong_views"):
        return
    if not getattr(datamodule, "unlabeled", False):
        from sskt_lightning.errors import ConfigError
        name = getattr(method, "name", type(method).__name__)
        raise ConfigError(f"method={name} trains on strong views of the unlabeled images (FixMatch), but there is "
                          "no unlabeled stream: set data.unlabeled=true (with data.labels_per_class, or a dataset "
                          "with an unlabeled split such as stl10).")
    datamodule.strong_views = True


class Method(nn.Module):
    """A transfer method. A new method is a subclass in one file of ``sskt_lightning/methods/`` plus
    a config ``conf/method/<name>.yaml`` whose ``_target_`` names the class and whose keys are the
    constructor's arguments (with the same defaults). The harness never tests a method's name: it
    asks the class for the capabilities below (docs/extending.md).

    The constructor is the one place where a method checks its options' values: it is cheap (no
    networks: those are built in :meth:`setup`), so :meth:`check_options` can run it when the
    config is validated, before any data is read."""

    name = "base"                  # method=<name>; a subclass that sets it is registered (``registry``)
    # ---- capabilities (class attributes; the harness reads these, never the name)
    needs_sources = False          # build cfg.source into module.sources (frozen teachers)
    soft_label_cache = False       # the sources' logits may come from the soft-label cache
                                   # (set by the SourceCacheOptions mixin, with method.cache*)
    accepts_unlabeled = False      # trains on data.unlabeled=true's second stream (method.unlabeled)
    requires_unlabeled = False     # ... and cannot train without it (FixMatch): the contract tests add the stream
    strong_views = False           # each training batch also holds "unlabeled_strong": FixMatch's strong
                                   # view of the unlabeled images (same images and order as "unlabeled";
                                   # needs data.unlabeled=true). The harness turns the data module's
                                   # strong_views on before the first batch (enable_strong_views); an
                                   # instance may set it in its constructor (an option that needs them)
    automatic_optimization = True  # False: the method steps its optimizers via manual_backward
                                   # (several optimizers: peers, a generator; trainer.max_steps refused)
    tap_pooled = False             # target forward also returns the pooled feature
    tap_stages = False             # ... and every stage's output
    no_compiled_target: str | None = None   # why compile.target cannot serve this method (None: it can)

    # the loss terms this method logs (log_train keys) -> what they are: the non-finite guard names them
    loss_terms: ClassVar[dict[str, str]] = {}

    registry: ClassVar[dict[str, type[Method]]] = {}   # name -> class, filled by subclassing

    @classmethod
    def describe_term(cls, key: str) -> str | None:
        """What the logged term ``key`` is, for the non-finite guard's message (None: not this
        method's); override for terms named by pattern (``aux_<source>``, ``peer<k>_loss``)."""
        return cls.loss_terms.get(key)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if isinstance(name, str) and name:
            Method.registry[name] = cls

    @classmethod
    def option_names(cls) -> list[str]:
        """The method's options: its constructor's keyword arguments (``method.<option>``)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Method:
        """The method built from ``cfg.method`` (less ``_target_`` and ``name``); an unknown option
        is a :class:`ConfigError` naming the known ones."""
        from sskt_lightning.errors import ConfigError
        options = {k: v for k, v in options.items() if k not in ("_target_", "name")}
        known = cls.option_names()
        unknown = [k for k in options if k not in known]
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                     for k in unknown]
            raise ConfigError(f"method={cls.name}: unknown option(s) {', '.join(hints)}; known: {', '.join(known)}.")
        return cls(**options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse impossible option values (a :class:`ConfigError` from the constructor) without
        reading data: builds the method and drops it."""
        cls.from_options(options)

    def setup(self, module: TransferModule) -> None:
        """Build what depends on the target/sources/data (heads, peers). Called once at init."""

    def training_step(self, module: TransferModule, batch) -> torch.Tensor | None:
        raise NotImplementedError

    def configure_optimizers(self, module: TransferModule):
        """Default: one optimizer (``cfg.optim``) over every trainable parameter of the module."""
        return module.default_optimizers(p for p in module.parameters() if p.requires_grad)

    def attach_data(self, datamodule) -> None:
        """State whose size depends on the data beyond ``module.data_info`` (FlexMatch's per-sample
        memory over the unlabeled pool), from the set-up data module: called by the command line
        before a resumed checkpoint is checked against the module, and again at fit start (a user's
        own Trainer): must be idempotent."""

    def on_fit_start(self, module: TransferModule) -> None:
        """Before the first training step, with the trainer and its data module at hand."""

    def on_fit_end(self, module: TransferModule) -> None:
        """After training (not after a failure)."""

    def on_train_epoch_end(self, module: TransferModule) -> None:
        """Manual optimization: Lightning does not step schedulers; step the per-epoch ones here."""
        self.step_schedulers(module, "epoch")

    def on_train_batch_end(self, module: TransferModule) -> None:
        """Manual optimization: step the per-step schedulers (``optim.interval: step``) after every
        training step, as Lightning does for automatically optimized methods."""
        self.step_schedulers(module, "step")

    def step_schedulers(self, module: TransferModule, interval: str) -> None:
        """Step every scheduler configured with ``interval`` (manual optimization only: Lightning
        steps them itself otherwise). The interval is the one in the method's
        ``configure_optimizers`` dicts (``{"scheduler": ..., "interval": "step"}``), default epoch."""
        if self.automatic_optimization:
            return
        for config in module.trainer.lr_scheduler_configs:
            if config.interval == interval:
                config.scheduler.step()

    def extra_eval_names(self) -> list[str]:
        """Names of additional networks evaluated beside the target (e.g. DML peers)."""
        return []

    def extra_eval_logits(self, module: TransferModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Their logits on an evaluation batch, keyed by :meth:`extra_eval_names`."""
        return {}

    def describe(self) -> dict:
        """Settings recorded in results.json."""
        return {}

    def optimizer_names(self) -> list[str]:
        """One name per optimizer of :meth:`configure_optimizers`, in order: the key of its logged
        learning rate (``lr/<name>``)."""
        return ["target"]
