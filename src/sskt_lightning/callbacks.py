"""Callbacks of our own.

Always on (train.py adds them whatever ``callbacks=`` says; the run's guarantees rest on them):
:class:`EpochMetricsOnEveryRank` (first: under DDP no callback reads epoch values on one process
alone), :class:`RunState` (random states in every checkpoint, CSV flushed before it), :class:`BestValidation`
(results.json's best validation score), :class:`ThroughputMeter` (images/s) and
:class:`QuietFrozenSources`; ``last.ckpt`` at every epoch's end is a Lightning ``ModelCheckpoint``
built in train.py. The non-finite guard lives in the module itself.

In the ``callbacks/`` config group (``conf/callbacks/``): :class:`BestCheckpoint`,
:class:`LearningRateMonitor`, :class:`RunProgressBar`, besides Lightning's own (EarlyStopping).
"""
from __future__ import annotations

import math
import time
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar


def compute_epoch_metrics(trainer) -> None:
    """Under DDP, make every process compute (and cache) the values logged with ``on_epoch=True``.

    Lightning computes them lazily, on the first read of ``trainer.progress_bar_metrics`` /
    ``callback_metrics`` after the epoch's last batch, and a value logged with ``sync_dist=True``
    (or a torchmetrics metric) is then reduced over processes: a collective. Lightning's progress
    bars read them in ``on_train_epoch_end`` on rank 0 only (Lightning issue 21264), before the
    trainer computes them on every rank, so rank 0 entered an all-reduce the others never did
    (gloo: "Received data size doesn't match expected size", NCCL: a hang). Reading them here, on
    every rank at the same point, runs the reductions everywhere; later reads hit the cache."""
    if trainer.world_size > 1:
        trainer.progress_bar_metrics   # computes every epoch-level value (log, pbar and callback)


class EpochMetricsOnEveryRank(L.Callback):
    """Always on, FIRST among the callbacks: at each training epoch's end every process computes the
    epoch's logged values (:func:`compute_epoch_metrics`) before any other callback can read them
    on rank 0 alone (Lightning's own progress bars, a user's ``rank_zero_only`` callback)."""

    def on_train_epoch_end(self, trainer, module):
        compute_epoch_metrics(trainer)


class ThroughputMeter(L.Callback):
    """Training images per second: images seen by the training loop / time spent in it.

    Times each epoch's training phase from its start to the first validation batch (or the epoch's
    end), synchronising the device only at those two points, never per step. The first epoch is
    skipped when there are more (warm-up, compilation, cudnn autotune).
    """

    def __init__(self):
        self.epochs: list[tuple[int, float]] = []   # (images, seconds) per epoch
        self._t0 = None
        self._images = 0

    def _now(self, module) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, module):
        self._t0, self._images = self._now(module), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        x = batch["labeled"][0] if isinstance(batch, dict) else batch[0]
        self._images += x.shape[0] * trainer.world_size

    def _close(self, module):
        if self._t0 is not None:
            self.epochs.append((self._images, self._now(module) - self._t0))
            self._t0 = None

    def on_validation_start(self, trainer, module):
        if trainer.training:
            self._close(module)

    def on_train_epoch_end(self, trainer, module):
        self._close(module)

    @property
    def images_per_second(self) -> float | None:
        epochs = self.epochs[1:] if len(self.epochs) > 1 else self.epochs
        images, seconds = sum(e[0] for e in epochs), sum(e[1] for e in epochs)
        return images / seconds if seconds > 0 else None


class WeightsDigest(L.Callback):
    """After training, each process writes digests of the target's parameters and of its buffers
    (BatchNorm statistics), and of the resolved config it trained, to
    ``<run dir>/weights_digest_rank<r>.json``: under DDP all ranks must agree (a sync check)."""

    @staticmethod
    def _digest(tensors) -> str:
        import hashlib
        digest = hashlib.sha256()
        for name, tensor in tensors:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def on_fit_end(self, trainer, module):
        import hashlib
        import json
        from pathlib import Path

        from sskt_lightning.atomic import atomic_write_text
        out = Path(trainer.default_root_dir) / f"weights_digest_rank{trainer.global_rank}.json"
        atomic_write_text(out, json.dumps({
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            # the resolved config this process trained (a sweep job's ranks: the job's, all alike)
            "config": hashlib.sha256(json.dumps(module.hparams.get("config"), sort_keys=True,
                                                default=str).encode()).hexdigest(),
            "seed": (module.hparams.get("config") or {}).get("seed"),
            "parameters": self._digest(sorted(module.target.named_parameters())),
            "buffers": self._digest(sorted(module.target.named_buffers()))}))


# ---------------------------------------------------------------------------- resume state
def collect_rng_states() -> dict:
    """Every global random state the run draws from, as tensors and plain values only (so the
    checkpoint stays loadable with ``weights_only=True``): torch CPU (and CUDA, when in use: the
    on-device augmentation draws from it), numpy and python ``random``."""
    import random

    import numpy as np
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)],
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    import random

    import numpy as np
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunState(L.Callback):
    """What a resumed run needs beyond weights, optimizers and loops (which Lightning keeps):

    * the global random states (:func:`collect_rng_states`), captured with every checkpoint and put
      back at the start of the first training epoch after a resume, i.e. at the point where the
      uninterrupted run continued from the same state (the data module keeps its samplers'
      generators in its own ``state_dict``);
    * the CSV log flushed to disk before the checkpoint callbacks save at an epoch's end, so the
      rows up to a checkpoint are on disk whenever the checkpoint is;
    * the W&B run id (``wandb_run_id``, when a W&B logger has started its run), so that a resume
      logs into the same W&B run (:meth:`stored_wandb_run_id`, ``loggers.build_loggers``).
    """

    def __init__(self):
        self._pending: dict | None = None
        self._loggers: list = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._loggers = list(trainer.loggers)

    def state_dict(self) -> dict:
        state = {"rng": collect_rng_states()}
        from sskt_lightning.loggers import is_wandb
        for logger in self._loggers:
            # the W&B run's id (or the id it was given); `version` never starts a run
            run_id = logger.version if is_wandb(logger) else None
            if run_id:
                state["wandb_run_id"] = str(run_id)
                break
        return state

    @staticmethod
    def stored_wandb_run_id(checkpoint) -> str | None:
        """The W&B run id a checkpoint's RunState recorded, or None (no W&B logger, or a
        checkpoint written before the id was kept)."""
        state = ((checkpoint.get("callbacks") or {}).get(RunState.__qualname__) or {}) if checkpoint else {}
        run_id = state.get("wandb_run_id") if isinstance(state, dict) else None
        return str(run_id) if run_id else None

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict.get("rng")

    def on_train_epoch_start(self, trainer, module):
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None

    def on_train_epoch_end(self, trainer, module):
        from lightning.pytorch.loggers import CSVLogger
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()


# ---------------------------------------------------------------------------- best validation
class BestValidation(L.Callback):
    """The best validation score of the run and its epoch (``results.json``'s ``best_val_acc`` /
    ``best_val_epoch``, what a sweeper optimises), whatever checkpoint callbacks are configured.

    Reads ``monitor`` at each validation's end (not during the sanity check); a tie keeps the
    earlier epoch, like ``ModelCheckpoint``. Kept in checkpoints, so a resumed run, also into
    another directory, goes on from the same best."""

    def __init__(self, monitor: str = "val/acc", mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r}: max or min")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.epoch: int | None = None

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if math.isnan(value):
            return
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best, self.epoch = value, int(trainer.current_epoch)

    def on_train_start(self, trainer, module):
        if self.best is not None:
            return
        # a checkpoint written before this callback existed: its best checkpoint knows the score
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "monitor", None) == self.monitor and cb.best_model_score is not None:
                self.best = float(cb.best_model_score)

    def state_dict(self) -> dict:
        return {"best": self.best, "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.epoch = state_dict.get("best"), state_dict.get("epoch")


class BestCheckpoint(ModelCheckpoint):
    """``checkpoints/best-*.ckpt`` (``callbacks.model_checkpoint``): Lightning's ModelCheckpoint
    that also keeps the best score across a resume into another directory (Lightning keeps only
    the path there); files outside its own directory are never deleted by Lightning."""

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for key in ("best_model_score", "kth_best_model_path", "kth_value", "best_k_models"):
            if key in state_dict:
                setattr(self, key, state_dict[key])


def last_checkpoint(ckpt_dir) -> ModelCheckpoint:
    """``last.ckpt`` at the end of EVERY epoch, after its validation, whatever the score
    (Lightning's ``save_last=True`` writes it only with a new best). Always on."""
    return ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                           save_on_train_epoch_end=True, enable_version_counter=False)


# ---------------------------------------------------------------------------- learning rates
class LearningRateMonitor(_LearningRateMonitor):
    """Lightning's LearningRateMonitor whose rows also carry the epoch, as every other row of the
    CSV log does (a resumed run keeps the rows of the epochs its checkpoint covers, by epoch)."""

    def _log(self, trainer, stats: dict) -> None:
        if stats:
            row = {**stats, "epoch": trainer.current_epoch}
            for logger in trainer.loggers:
                logger.log_metrics(row, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if not trainer._logger_connector.should_update_logs or self.logging_interval == "epoch":
            return
        self._log(trainer, self._extract_stats(trainer, "step" if self.logging_interval is None else "any"))

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if self.logging_interval == "step":
            return
        self._log(trainer, self._extract_stats(trainer, "epoch" if self.logging_interval is None else "any"))


# ---------------------------------------------------------------------------- the terminal
def run_fraction(current_epoch: int, batches_done: int, batches_per_epoch: float, max_epochs: int | None,
                 global_step: int, max_steps: int | None) -> float | None:
    """How much of the whole run is done, 0..1: the larger of the epoch and the step budget's
    fractions (the run ends when either is reached); None when neither is known."""
    fractions = []
    if max_epochs is not None and max_epochs > 0 and batches_per_epoch and math.isfinite(batches_per_epoch):
        fractions.append((current_epoch + batches_done / batches_per_epoch) / max_epochs)
    if max_steps is not None and max_steps > 0:
        fractions.append(global_step / max_steps)
    return min(1.0, max(fractions)) if fractions else None


def eta_seconds(elapsed: float, fraction: float | None, start_fraction: float) -> float | None:
    """Seconds left at the rate since this process started training (validation included)."""
    if fraction is None or fraction <= start_fraction or elapsed <= 0:
        return None
    return elapsed * (1.0 - fraction) / (fraction - start_fraction)


def format_eta(seconds: float | None) -> str:
    return "-" if seconds is None else str(timedelta(seconds=int(round(seconds))))


class RunProgressBar(RichProgressBar):
    """Lightning's rich progress bar plus ``img/s`` (training images per second over the current
    epoch, all processes) and ``run ETA`` (the time left for the WHOLE run, from the progress of
    the epoch and step budgets since training started; validation time included). Host timers and
    batch shapes only: no device synchronisation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._run_t0 = self._epoch_t0 = None
        self._start_fraction = 0.0
        self._images = 0
        self._batches_done = 0

    def _fraction(self, trainer) -> float | None:
        return run_fraction(trainer.current_epoch, self._batches_done, trainer.num_training_batches,
                            trainer.max_epochs, trainer.global_step, trainer.max_steps)

    def on_train_epoch_start(self, trainer, module):
        super().on_train_epoch_start(trainer, module)
        self._epoch_t0, self._images, self._batches_done = time.perf_counter(), 0, 0
        if self._run_t0 is None:
            self._run_t0 = self._epoch_t0
            self._start_fraction = self._fraction(trainer) or 0.0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        x = batch["labeled"][0] if isinstance(batch, dict) else batch[0]
        self._images += int(x.shape[0]) * trainer.world_size
        self._batches_done = batch_idx + 1
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, module):
        compute_epoch_metrics(trainer)   # on every rank: the bar reads them on rank 0 only
        super().on_train_epoch_end(trainer, module)

    def configure_columns(self, trainer) -> list:
        # Lightning's batches/s column gives way to images/s (in the metrics)
        from lightning.pytorch.callbacks.progress.rich_progress import (
            ProcessingSpeedColumn,
        )
        return [c for c in super().configure_columns(trainer) if not isinstance(c, ProcessingSpeedColumn)]

    def get_metrics(self, trainer, module):
        items = super().get_metrics(trainer, module)
        items.pop("v_num", None)
        now = time.perf_counter()
        if self._epoch_t0 is not None and self._images and now > self._epoch_t0:
            items["img/s"] = f"{self._images / (now - self._epoch_t0):.0f}"
        if self._run_t0 is not None:
            items["run ETA"] = format_eta(eta_seconds(now - self._run_t0, self._fraction(trainer),
                                                      self._start_fraction))
        return items


class QuietFrozenSources(L.Callback):
    """Hides Lightning's "Found N module(s) in eval mode" when those N modules are exactly the
    frozen sources (eval mode on purpose, docs/configuration.md, sources); any other module in eval mode still
    warns (the count differs)."""

    def on_fit_start(self, trainer, module):
        sources = getattr(module, "sources", None)
        if sources is None:
            return
        in_eval = {id(m) for _, m in module.named_modules() if not m.training}
        frozen = {id(m) for _, m in sources.named_modules() if not m.training}
        if in_eval and in_eval == frozen:
            from sskt_lightning.extras import ignore_eval_mode_warning
            ignore_eval_mode_warning(len(in_eval))
