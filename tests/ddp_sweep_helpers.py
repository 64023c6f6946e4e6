"""Callbacks the DDP-sweep tests put into a job (tests/ is on the job's PYTHONPATH)."""
import os
import signal

import lightning as L


class KillAt(L.Callback):
    """SIGKILLs this process at training batch ``batch`` on global rank ``rank`` (-1: never): a job
    killed mid-sweep, with no chance to record anything."""

    def __init__(self, rank: int = -1, batch: int = 1):
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
