"""The Lightning ``Trainer`` the unit tests fit with: the one a user of the Python API gets.

Lightning's defaults stay on (progress bar, logger, checkpointing, model summary), written under
the test's own directory; a test is kept small only through the limits it passes (steps, batches,
epochs), never by switching a default off, so a bug that the default progress bar, logger or
checkpoint callback triggers shows up here as it would for a user."""
from __future__ import annotations

from pathlib import Path

OFF_SWITCHES = ("enable_progress_bar", "enable_model_summary", "enable_checkpointing", "logger")


def small_trainer(root: Path, **limits):
    import lightning as L
    switched_off = [k for k in OFF_SWITCHES if k in limits]
    if switched_off:
        raise ValueError(f"small_trainer keeps Lightning's defaults on; pass limits, not {switched_off}")
    return L.Trainer(accelerator="cpu", default_root_dir=str(root), **limits)
