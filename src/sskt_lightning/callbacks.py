"""Callbacks of our own (Lightning's cover checkpoints and progress)."""
from __future__ import annotations

import time

import lightning as L
import torch


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
    (BatchNorm statistics) to ``<run dir>/weights_digest_rank<r>.json``: under DDP all ranks must
    agree (a sync check)."""

    @staticmethod
    def _digest(tensors) -> str:
        import hashlib
        digest = hashlib.sha256()
        for name, tensor in tensors:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def on_fit_end(self, trainer, module):
        import json
        from pathlib import Path

        from sskt_lightning.atomic import atomic_write_text
        out = Path(trainer.default_root_dir) / f"weights_digest_rank{trainer.global_rank}.json"
        atomic_write_text(out, json.dumps({
            "rank": trainer.global_rank, "world_size": trainer.world_size,
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
      rows up to a checkpoint are on disk whenever the checkpoint is.
    """

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return {"rng": collect_rng_states()}

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
