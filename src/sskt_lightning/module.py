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

from sskt_lightning.errors import SSKTError
from sskt_lightning.losses import task_loss
from sskt_lightning.metrics import primary_metric
from sskt_lightning.methods.base import Method
from sskt_lightning.nets.factory import TappedNet, create_network, resolve_model_name
from sskt_lightning.sources import SourceBank, build_sources

SOURCES_PREFIX = "sources."


class TransferModule(L.LightningModule):
    """Args:
        config: the run's resolved config as a plain dict (``model``, ``method``, ``source``, ``optim``).
        data_info: what the data module says about the data: ``num_classes``, ``in_chans``,
            ``image_size``, ``mean``, ``std``, ``multi_label``, ``class_names``.
    """

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
        net = create_network(self.model_name, data_info["num_classes"], data_info["in_chans"],
                             pretrained=bool(cfg.model.get("pretrained", False)),
                             **(cfg.model.get("kwargs") or {}))
        if cfg.get("channels_last"):
            net = net.to(memory_format=torch.channels_last)
        self.target = TappedNet(net, self.method.tap_pooled, self.method.tap_stages)
        source_cfg = cfg.get("source")
        source_cfg = OmegaConf.to_container(source_cfg) if source_cfg else {}
        self.sources = (build_sources(source_cfg, data_info,
                                      getattr(self.method, "source_bn", "eval"))
                        if self.method.needs_sources else SourceBank([]))
        self.method.setup(self)

        self.val_metric = primary_metric(data_info)
        self.test_metric = primary_metric(data_info)
        extras = self.method.extra_eval_names()   # e.g. DML peers, evaluated beside the target
        self.extra_val_metrics = torch.nn.ModuleDict({n: primary_metric(data_info) for n in extras})
        self.extra_test_metrics = torch.nn.ModuleDict({n: primary_metric(data_info) for n in extras})

    # ------------------------------------------------------------------ training
    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(logits, labels, self.multi_label)

    def training_step(self, batch, batch_idx):
        return self.method.training_step(self, batch)

    def on_train_epoch_end(self):
        self.method.on_train_epoch_end(self)

    def on_fit_start(self):
        self.method.on_fit_start(self)     # e.g. open the soft-label cache

    def on_fit_end(self):
        self.method.on_fit_end(self)

    def log_train(self, parts: Mapping[str, torch.Tensor], logits=None, labels=None) -> None:
        """Log the step's loss terms under ``train/``; tensors only, no host sync per step."""
        bs = labels.shape[0] if labels is not None else None
        for key, value in parts.items():
            self.log(f"train/{key}", value.detach(), on_step=True, on_epoch=False,
                     batch_size=bs)  # no prog_bar: its per-step refresh would sync the device

    def configure_optimizers(self):
        return self.method.configure_optimizers(self)

    def default_optimizers(self, params: Iterable[torch.nn.Parameter]):
        """``cfg.optim``'s optimizer and (per-epoch) scheduler over ``params``."""
        optimizer = instantiate(self.cfg.optim.optimizer)(params=list(params))
        if self.cfg.optim.get("scheduler") is None:
            return optimizer
        scheduler = instantiate(self.cfg.optim.scheduler)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch, stage: str):
        x, y, *_ = batch
        logits = self.target(x).logits
        metric = self.val_metric if stage == "val" else self.test_metric
        metric.update(logits, y.int() if self.multi_label else y)
        bs = y.shape[0]
        self.log(f"{stage}/loss", self.task_loss(logits, y), on_epoch=True, sync_dist=True, batch_size=bs)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val", batch_size=bs)
        extras = self.extra_val_metrics if stage == "val" else self.extra_test_metrics
        for name, extra_logits in self.method.extra_eval_logits(self, x).items():
            extras[name].update(extra_logits, y.int() if self.multi_label else y)
            self.log(f"{stage}/{name}_acc", extras[name], on_epoch=True, batch_size=bs)

    def _broadcast_buffers(self) -> None:
        """Under DDP, give every process rank 0's BatchNorm statistics before evaluating.

        DDP broadcasts buffers at the start of a training forward, so after the last step each
        process holds the statistics of its own last batch; evaluation (sharded over processes)
        and checkpoints must all use one set. Frozen sources never change and are skipped."""
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            for buffer in [*self.target.buffers(), *self.method.buffers()]:
                torch.distributed.broadcast(buffer, src=0)

    def on_validation_start(self):
        self._broadcast_buffers()

    def on_test_start(self):
        self._broadcast_buffers()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint):
        """Frozen sources are rebuilt from the config; keep them out of every checkpoint."""
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith(SOURCES_PREFIX)]:
            del sd[key]

    def on_load_checkpoint(self, checkpoint):
        sd = checkpoint["state_dict"]
        for key, value in self.sources.state_dict(prefix=SOURCES_PREFIX).items():
            sd.setdefault(key, value)
