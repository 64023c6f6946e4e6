"""A Lightning callback for the throughput benchmark: wall and CPU time of the fit and of each
training epoch, written to ``<run dir>/timing.json``.

CPU time (``time.process_time``: this process, all its threads) is far less sensitive than wall time
to other processes competing for the cores, so on a shared machine the benchmark reports ratios
of both. Added to a run with ``+callbacks.timing._target_=cpu_meter.TimingMeter`` (this directory
on PYTHONPATH).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L


class TimingMeter(L.Callback):
    def __init__(self):
        self.epochs: list[dict] = []
        self.fit: dict = {}
        self._epoch = None
        self._images = 0

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def on_fit_start(self, trainer, module):
        self._fit = self._now()

    def on_train_epoch_start(self, trainer, module):
        self._epoch, self._images = self._now(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        x = batch["labeled"][0] if isinstance(batch, dict) else batch[0]
        self._images += x.shape[0]

    def _close(self):
        if self._epoch is not None:
            wall, cpu = self._now()
            self.epochs.append({"images": self._images, "wall": wall - self._epoch[0], "cpu": cpu - self._epoch[1]})
            self._epoch = None

    def on_validation_start(self, trainer, module):
        if trainer.training:
            self._close()

    def on_train_epoch_end(self, trainer, module):
        self._close()

    def on_fit_end(self, trainer, module):
        wall, cpu = self._now()
        self.fit = {"wall": wall - self._fit[0], "cpu": cpu - self._fit[1]}
        counted = self.epochs[1:] if len(self.epochs) > 1 else self.epochs     # the first epoch is warm-up
        images = sum(e["images"] for e in counted)
        out = {"fit": self.fit, "epochs": self.epochs,
               "train_images_per_s_wall": images / sum(e["wall"] for e in counted),
               "train_images_per_s_cpu": images / sum(e["cpu"] for e in counted)}
        Path(trainer.default_root_dir, "timing.json").write_text(json.dumps(out, indent=1))
