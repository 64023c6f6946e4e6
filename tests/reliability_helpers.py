"""Callbacks the reliability tests put into runs (by `+callbacks.<name>._target_=reliability_helpers.X`;
tests/ is on the path of the test process and of the subprocesses they start)."""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch


class Stall(L.Callback):
    """At batch `batch` of epoch `epoch`, write `ready` and wait until the test signals or kills the
    process: a SIGTERM (Lightning's handler sets a flag: the wait ends and Lightning stops after this
    batch), a SIGINT (KeyboardInterrupt ends the sleep) or a SIGKILL. `seconds` is only a hang guard
    (the tests always signal), never a window the test must hit. It does not change what the run
    computes, so the resumed run may leave it out."""

    affects_training = False

    def __init__(self, ready: str, epoch: int = 1, batch: int = 3, seconds: float = 3600.0):
        self.ready, self.epoch, self.batch, self.seconds = Path(ready), epoch, batch, seconds

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self.ready.write_text(f"epoch {trainer.current_epoch} batch {batch_idx}")
            end = time.monotonic() + self.seconds
            while time.monotonic() < end and not trainer._signal_connector.received_sigterm:
                time.sleep(0.05)


class DecreasingValAcc(L.Callback):
    """Log val/acc = 1 - 0.1 * epoch at each validation epoch's end, so the best validation epoch is
    epoch 0 and every later epoch is worse. Logged after the module's own val/acc (the callback's
    entry is the later one, so it is the value every reader gets: BestValidation, the checkpoint
    callbacks). Writing ``trainer.callback_metrics`` instead does nothing: Lightning rebuilds that
    dict from the logged results each time it is read."""

    def on_validation_epoch_end(self, trainer, module):
        module.log("val/acc", 1.0 - 0.1 * trainer.current_epoch)


@contextmanager
def sigkilled_at_exit(proc):
    """Run the body, then SIGKILL ``proc`` (unless it already ended) and reap it - also when the
    body failed, so no test leaves a process behind."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


class BreakBatchNormInEval(L.Callback):
    """Before each validation, set the target's first BatchNorm running variance to -1: finite
    buffers (the weight check passes), but eval-mode outputs are NaN (sqrt of a negative)."""

    def on_validation_start(self, trainer, module):
        bn = next(m for m in module.target.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var.fill_(-1.0)


class LearningRateFrom(L.Callback):
    """From epoch `epoch` on, every optimizer's learning rate is `lr`: a run that diverges after a good
    first epoch (so epoch 0's checkpoint is on disk when it fails)."""

    def __init__(self, lr: float, epoch: int = 1):
        self.lr, self.epoch = lr, epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch >= self.epoch:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = self.lr


def main_in_process(monkeypatch, capsys, *args) -> tuple[int, str]:
    """``python -m sskt_lightning.train *args`` in this process: (exit code, stderr)."""
    import sys

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from sskt_lightning import train as train_mod
    monkeypatch.setattr(sys, "argv", ["train", *args, "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"])
    code = 0
    try:
        train_mod.main()
    except SystemExit as exit_:
        code = exit_.code
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None     # later in-process runs must not see this job's overrides
    return code, capsys.readouterr().err
