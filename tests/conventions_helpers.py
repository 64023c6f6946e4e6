"""Callbacks the conventions tests put into CLI runs (`+callbacks.<name>._target_=conventions_helpers.X`;
the tests put tests/ on the subprocesses' PYTHONPATH)."""
from __future__ import annotations

import warnings

import lightning as L

UNRELATED = "an unrelated warning raised by a test callback"


class RaiseUnrelatedWarning(L.Callback):
    """Raises one ordinary UserWarning at the start of training: it must still reach the terminal."""

    def on_train_start(self, trainer, module):
        warnings.warn(UNRELATED, UserWarning, stacklevel=1)


class FallingScore(L.Callback):
    """Logs ``fake/score`` = 1 - 0.1 * epoch at every validation: a monitored value that only gets
    worse after epoch 0 (logged through the module, so every callback reads the same value)."""

    def on_validation_epoch_end(self, trainer, module):
        module.log("fake/score", 1.0 - 0.1 * trainer.current_epoch)
