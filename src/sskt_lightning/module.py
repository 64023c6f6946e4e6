"""TransferModule: the one LightningModule. It owns the target, the frozen sources, metrics and
logging, and delegates the training step (and optimizers, where a method needs several) to the
method strategy object (``sskt_lightning.methods``)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sskt_lightning.errors import ConfigError, SSKTError
from sskt_lightning.finetune import build_target
from sskt_lightning.guard import NonFiniteGuard, check_weights_finite
from sskt_lightning.losses import task_loss
from sskt_lightning.methods.base import Method, enable_strong_views
from sskt_lightning.metrics import primary_metric
from sskt_lightning.nets.factory import TappedNet, resolve_model_name
from sskt_lightning.optim import build_optimizer
from sskt_lightning.sources import SourceBank, build_sources

SOURCES_PREFIX = "sources."


class TransferModule(L.LightningModule):
    """The target, its sources and the method, as one ``LightningModule``.

    From Python, build it with :meth:`from_options` (typed options, checked). The constructor
    takes what the command line gives it:

    Args:
        config: the run's resolved config as a plain dict (``model``, ``method``, ``source``, ``optim``).
        data_info: what the data module says about the data: ``num_classes``, ``in_chans``,
            ``image_size``, ``mean``, ``std``, ``multi_label``, ``class_names``.
    """

    @classmethod
    def from_options(cls, *, data, method, model="resnet20", sources=(), optim="sgd",
                     channels_last: bool = False) -> TransferModule:
        """A module from typed options, with the config the command line would compose.

        Args:
            data: the data module it trains on (an ``ImageDataModule``, e.g. from
                :func:`sskt_lightning.options.data_module`; set up here if it was not) or its
                ``data_info`` dict. Classes, channels, image size and statistics come from it.
            method: ``SSKTOptions(...)``, ``KDOptions``, ``DMLOptions``, ``MAXLOptions``,
                ``ScratchOptions()``, or a method config name (``"sskt"``, ``"paper/sskt"``).
            model: a model config or network name (``"resnet20"``, ``"resnet50.tv_in1k"``), or
                ``ModelOptions(name, pretrained, kwargs)``.
            sources: for SSKT and KD: source config names or ``SourceOptions(config, ...)``.
            optim: ``"sgd"`` / ``"sgd_cosine"`` / ``"maxl"`` or ``OptimOptions(...)``; the schedule's ``max_epochs``
                is the Trainer's unless ``OptimOptions(max_epochs=...)`` says otherwise.
            channels_last: keep the weights (and so the activations) of the target, the method's
                heads / peers and the sources channels-last (GPU speed).

        Unknown options, names or values the command line would refuse raise :class:`ConfigError`.
        """
        from sskt_lightning.options import build_config, data_info_from
        data_info, data_config = data_info_from(data)
        config = build_config(method=method, model=model, sources=sources, optim=optim,
                              channels_last=channels_last, data_config=data_config)
        return cls(config, data_info)

    def __init__(self, config: dict, data_info: dict):
        super().__init__()
        self.save_hyperparameters()
        cfg = OmegaConf.create(config)
        self.cfg, self.data_info = cfg, data_info
        size = data_info["image_size"]
        self.model_name = resolve_model_name(cfg.model.name, size[-1] if isinstance(size, (list, tuple)) else size)
        self.hparams["model_name"] = self.model_name
        self.multi_label = bool(data_info.get("multi_label", False))

        method_cfg = {k: v for k, v in OmegaConf.to_container(cfg.method).items() if k != "name"}
        try:
            self.method: Method = instantiate(method_cfg, _convert_="all")
        except InstantiationException as err:   # a method's own ConfigError, not Hydra's wrapper
            if isinstance(err.__cause__, SSKTError):
                raise err.__cause__ from None
            raise

        self.automatic_optimization = self.method.automatic_optimization
        # model.weights / model.freeze (sskt_lightning.finetune): what results.json records of them
        net, self.model_settings = build_target(self.model_name, OmegaConf.to_container(cfg.model), data_info)
        self.target = TappedNet(net, self.method.tap_pooled, self.method.tap_stages)
        if cfg.model.get("freeze"):
            self.target.freeze_backbone()
        source_cfg = cfg.get("source")
        source_cfg = OmegaConf.to_container(source_cfg) if source_cfg else {}
        self.sources = (build_sources(source_cfg, data_info,
                                      getattr(self.method, "source_bn", "eval"))
                        if self.method.needs_sources else SourceBank([]))
        self.method.setup(self)
        if cfg.get("channels_last"):   # every network of the run: target, heads / peers / generator, sources
            for part in (self.target, self.method, self.sources):
                part.to(memory_format=torch.channels_last)
        from sskt_lightning.averaging import build_average
        self.ema = build_average(cfg.model, self.target)   # model.ema: None (off), or the evaluated average
        self._statistics_images: torch.Tensor | None = None  # model.ema_bn=recompute: its images (uint8)
        self._statistics_at: int | None = None   # the average's update count its statistics were recomputed at
        self.compiled: list[str] = []
        if cfg.get("compile"):
            from sskt_lightning.compiling import compile_networks
            self.compiled = compile_networks(self, cfg.compile)   # in place: state-dict keys unchanged

        self.val_metric = primary_metric(data_info)
        self.test_metric = primary_metric(data_info)
        extras = self.method.extra_eval_names()   # e.g. DML peers, evaluated beside the target
        self.extra_val_metrics = torch.nn.ModuleDict({n: primary_metric(data_info) for n in extras})
        self.extra_test_metrics = torch.nn.ModuleDict({n: primary_metric(data_info) for n in extras})
        # model.ema: the raw weights are tested too (test/raw_acc, test/raw_loss: paired with the average's)
        self.raw_test_metric = primary_metric(data_info) if self.ema is not None else None
        self.guard = NonFiniteGuard(type(self.method))   # every term log_train logs, checked without per-step syncs
        self._eval_bad: torch.Tensor | None = None   # a non-finite eval loss this evaluation (on the device)

    # ------------------------------------------------------------------ training
    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(logits, labels, self.multi_label)

    def training_step(self, batch, batch_idx):
        return self.method.training_step(self, batch)

    def check_finite(self, where: str) -> None:
        """The non-finite guard's check (one host sync; under DDP one all-reduce of a flag)."""
        trainer = self._trainer
        any_rank = None
        if trainer is not None and trainer.world_size > 1:
            any_rank = lambda bad: trainer.strategy.reduce_boolean_decision(bad, all=False)
        self.guard.check(where, self.current_epoch if trainer is not None else None, any_rank)

    def on_train_epoch_start(self):
        self._lr_sums: dict[tuple[int, int], float] = {}
        self._lr_steps = 0

    def on_train_batch_start(self, batch, batch_idx):
        self._add_learning_rates()   # the lr this step uses (Lightning steps schedulers before batch end)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        interval = max(1, int(getattr(self.trainer, "log_every_n_steps", 50) or 50))
        if self.guard.step % interval == 0:
            self.check_finite(f"at a logging interval (trainer.log_every_n_steps={interval})")
        self.method.on_train_batch_end(self)   # manual optimization: per-step schedulers

    def on_train_epoch_end(self):
        self.check_finite("at the end of the epoch")
        self._log_learning_rates()
        self.method.on_train_epoch_end(self)

    def on_fit_start(self):
        # a method with the strong_views capability: the data module adds them to each training batch
        datamodule = getattr(self.trainer, "datamodule", None)
        enable_strong_views(self.method, datamodule)
        if datamodule is not None:
            self.method.attach_data(datamodule)   # idempotent (the command line called it already)
        if self.ema is not None:           # updated after every step of the target's optimizer
            self.ema.attach(self.target, self.trainer.optimizers)
            if self.ema.bn == "recompute":
                self._statistics_data()    # before any step: a run without the images fails now
        self.method.on_fit_start(self)     # e.g. open the soft-label cache

    def on_fit_end(self):
        if self.ema is not None:
            self.ema.detach()
        self.method.on_fit_end(self)

    def log_train(self, parts: Mapping[str, torch.Tensor], logits=None, labels=None,
                  guarded: Mapping[str, torch.Tensor] | None = None) -> None:
        """Log the step's loss terms under ``train/`` (every ``trainer.log_every_n_steps``) and their
        means over the epoch as ``train/<term>_epoch`` (weighted by batch size; so a run shorter
        than one logging interval still records its losses). Tensors only, no host sync per step.
        Every term also feeds the non-finite guard (:mod:`sskt_lightning.guard`)."""
        self.guard.update({**parts, **(guarded or {})})   # guarded: checked, not logged (e.g. a meta objective)
        bs = labels.shape[0] if labels is not None else None
        for key, value in parts.items():
            value = value.detach()
            self.log(f"train/{key}", value, on_step=True, on_epoch=False,
                     batch_size=bs)  # no prog_bar: its per-step refresh would sync the device
            # accumulated on the device; reduced (and, under DDP, synced) once, at the epoch's end
            self.log(f"train/{key}_epoch", value, on_step=False, on_epoch=True, batch_size=bs,
                     sync_dist=True)

    # Learning rates: the mean over the epoch's steps of each optimizer's lr, logged once per epoch
    # as lr/<name> (lr/<name>/pg<k> when its parameter groups differ). Optimizer lrs are Python
    # numbers, so reading them each step costs no device sync.
    def _add_learning_rates(self) -> None:
        trainer = self._trainer
        if trainer is None or not hasattr(self, "_lr_sums"):
            return
        for i, opt in enumerate(trainer.optimizers):
            for g, group in enumerate(opt.param_groups):
                self._lr_sums[(i, g)] = self._lr_sums.get((i, g), 0.0) + float(group["lr"])
        self._lr_steps += 1

    def learning_rate_names(self) -> list[str]:
        """``lr/`` key of each optimizer, in ``configure_optimizers`` order (the method names them:
        ``target``, DML's ``peer<k>``, MAXL's ``generator``)."""
        n = len(self.trainer.optimizers)
        names = list(self.method.optimizer_names())
        return names if len(names) == n else [f"optimizer{i}" for i in range(n)]

    def _log_learning_rates(self) -> None:
        if not getattr(self, "_lr_steps", 0):
            return
        for i, name in enumerate(self.learning_rate_names()):
            means = [total / self._lr_steps for (o, _), total in sorted(self._lr_sums.items()) if o == i]
            if len(set(means)) == 1:
                self.log(f"lr/{name}", means[0], on_step=False, on_epoch=True, sync_dist=True)
            else:
                for g, lr in enumerate(means):
                    self.log(f"lr/{name}/pg{g}", lr, on_step=False, on_epoch=True, sync_dist=True)
        self._lr_steps = 0

    def configure_optimizers(self):
        from sskt_lightning.validate import check_step_budget
        check_step_budget(self.method, getattr(self._trainer, "max_steps", -1), self.cfg.method.get("name"))
        return self.method.configure_optimizers(self)

    def default_optimizers(self, params: Iterable[torch.nn.Parameter]):
        """``cfg.optim``'s optimizer and scheduler over ``params`` (see :func:`optim.build_optimizer`)."""
        sched_cfg = self.cfg.optim.get("scheduler")
        extra = {}
        if sched_cfg is not None and "max_epochs" in sched_cfg and sched_cfg.max_epochs is None:
            extra["max_epochs"] = self._schedule_epochs()   # from_options: the Trainer's max_epochs
        return build_optimizer(self.cfg.optim, params, self._trainer, **extra)

    def _schedule_epochs(self) -> int:
        from sskt_lightning.errors import ConfigError
        epochs = getattr(self._trainer, "max_epochs", None) if self._trainer is not None else None
        if epochs is None or epochs < 1:
            raise ConfigError(f"The learning-rate schedule spans max_epochs, but the Trainer has max_epochs={epochs} "
                              "(a step budget?). Give it with OptimOptions(max_epochs=N).")
        return int(epochs)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch, stage: str):
        x, y, *_ = batch
        logits = self.target(x).logits
        metric = self.val_metric if stage == "val" else self.test_metric
        metric.update(logits, y.int() if self.multi_label else y)
        bs = y.shape[0]
        loss = self.task_loss(logits, y)
        bad = ~torch.isfinite(loss.detach())          # on the device; checked once, at the epoch's end
        self._eval_bad = bad if self._eval_bad is None else self._eval_bad | bad
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=bs)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val", batch_size=bs)
        extras = self.extra_val_metrics if stage == "val" else self.extra_test_metrics
        for name, extra_logits in self.method.extra_eval_logits(self, x).items():
            extras[name].update(extra_logits, y.int() if self.multi_label else y)
            self.log(f"{stage}/{name}_acc", extras[name], on_epoch=True, batch_size=bs)
        if stage == "test" and self.ema is not None and self.ema.evaluating:
            raw_logits = self.ema.raw_forward(self.target, x).logits
            self.raw_test_metric.update(raw_logits, y.int() if self.multi_label else y)
            self.log("test/raw_acc", self.raw_test_metric, on_epoch=True, batch_size=bs)
            self.log("test/raw_loss", self.task_loss(raw_logits, y), on_epoch=True, sync_dist=True, batch_size=bs)

    def _broadcast_buffers(self) -> None:
        """Under DDP, give every process rank 0's BatchNorm statistics before evaluating.

        DDP broadcasts buffers at the start of a training forward, so after the last step each
        process holds the statistics of its own last batch; evaluation (sharded over processes)
        and checkpoints must all use one set. Frozen sources never change and are skipped. With
        ``model.ema`` the average's BatchNorm statistics too (each process averaged its own)."""
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            average = self.ema.averaged.module.buffers() if self.ema is not None and self.ema.updates else ()
            for buffer in [*self.target.buffers(), *self.method.buffers(), *average]:
                torch.distributed.broadcast(buffer, src=0)

    def on_validation_start(self):
        self._broadcast_buffers()
        self._evaluate_average()

    def on_test_start(self):
        self._broadcast_buffers()
        self._evaluate_average()

    def _evaluate_average(self) -> None:
        """model.ema: evaluate the average of the target's weights (raw weights back at the end)."""
        if self.ema is not None and self.ema.updates:   # its statistics: rank 0's (_broadcast_buffers)
            self._recompute_average_statistics()         # model.ema_bn=recompute: the same on every process
            self.ema.swap_in(self.target)

    def _statistics_data(self):
        dm = getattr(self.trainer, "datamodule", None)
        if not hasattr(dm, "statistics_images"):
            raise ConfigError("model.ema_bn=recompute needs the training images of the run's data module "
                              "(sskt_lightning.data.ImageDataModule, passed to the trainer as datamodule=); "
                              "this run has none: use model.ema_bn=average.")
        return dm

    def _recompute_average_statistics(self) -> None:
        """model.ema_bn=recompute: the average's BatchNorm statistics over the data module's
        ``statistics_images`` (normalised as every batch is, in batches of the configured, global
        evaluation size: every process computes all of them, so one process or several get the same), once
        per state of the average: before it is evaluated or saved (last.ckpt is written at the end
        of the training epoch, before validation), so what a checkpoint holds is what was evaluated."""
        if self.ema is None or not self.ema.updates or self.ema.bn != "recompute" \
                or self._statistics_at == self.ema.updates:
            return
        dm = self._statistics_data()
        if self._statistics_images is None:
            self._statistics_images = dm.statistics_images(self.ema.bn_images)
        from sskt_lightning.data.augment import normalize
        first = next(self.ema.averaged.module.parameters())
        size = dm.global_eval_batch_size
        images = self._statistics_images
        fmt = torch.channels_last if self.cfg.get("channels_last") else torch.contiguous_format
        self.ema.recompute_statistics(
            normalize(images[i:i + size].to(first.device), dm.mean, dm.std).to(dtype=first.dtype, memory_format=fmt)
            for i in range(0, len(images), size))
        self._statistics_at = self.ema.updates

    def on_validation_end(self):
        if self.ema is not None:
            self.ema.swap_out(self.target)

    def on_test_end(self):
        if self.ema is not None:
            self.ema.swap_out(self.target)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self):
        self._eval_bad = None

    def on_test_epoch_start(self):
        self._eval_bad = None

    def on_validation_epoch_end(self):
        self._check_eval_finite("validation")

    def on_test_epoch_end(self):
        self._check_eval_finite("test")

    def _check_eval_finite(self, stage: str) -> None:
        """Never a validation or test number from non-finite outputs (argmax of NaN logits still
        gives a plausible accuracy): one host sync per evaluation (under DDP, any process)."""
        bad = self._eval_bad
        self._eval_bad = None
        if bad is None:
            return
        bad = bool(bad)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            # a training loss or the weights gone non-finite is the cause to name (validation runs
            # inside the training epoch, before its end-of-epoch check)
            self.check_finite(f"when the {stage} outputs went non-finite")
            check_weights_finite(((f"target.{k}", v) for k, v in self.target.state_dict().items()),
                                 f"at the {stage} of epoch {self.current_epoch}")
            from sskt_lightning.errors import NonFiniteError
            raise NonFiniteError(
                f"Stopped: the {stage} loss went non-finite (NaN or inf) at epoch {self.current_epoch}, although "
                "the weights are finite: the network's eval-mode outputs overflow or are undefined (BatchNorm "
                "running statistics gone wrong, or a reduced precision such as 16-true). No "
                f"{stage} number is reported; results.json records the failure. Lower the learning rate, use "
                "trainer.precision=32-true or bf16-mixed, or resume from an earlier checkpoint.")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint):
        """Never a checkpoint of a run gone non-finite; frozen sources are rebuilt from the config,
        so they stay out of every checkpoint."""
        self.check_finite("before saving a checkpoint")
        sd = checkpoint["state_dict"]
        if self.ema is not None:   # state_dict: the average (what is evaluated); raw weights under "ema"
            if not self.ema.evaluating:
                self._recompute_average_statistics()
            self.ema.export(checkpoint, self.target, "target.")
        raw = (checkpoint.get("ema") or {}).get("raw_state_dict") or {}
        check_weights_finite(((k, v) for k, v in [*sd.items(), *raw.items()] if not k.startswith(SOURCES_PREFIX)),
                             f"at epoch {self.current_epoch}, step {self.global_step}")
        for key in [k for k in sd if k.startswith(SOURCES_PREFIX)]:
            del sd[key]
        checkpoint["guard_step"] = self.guard.step      # a resumed run names steps as the whole run counts them

    def on_load_checkpoint(self, checkpoint):
        self.guard.step = self.guard.checked_through = int(checkpoint.get("guard_step", 0))
        if self.ema is not None:   # the average from state_dict, the raw weights back into it
            self.ema.restore(checkpoint, self.target, "target.")
        sd = checkpoint["state_dict"]
        for key, value in self.sources.state_dict(prefix=SOURCES_PREFIX).items():
            sd.setdefault(key, value)
