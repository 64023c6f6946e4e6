"""Compose the training config outside the command line (experiments, tests, notebooks)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sskt_lightning.train import CONFIG_DIR


def compose_config(overrides: Sequence[str], output_dir: str | Path) -> DictConfig:
    """The config ``python -m sskt_lightning.train <overrides>`` would run, writing to ``output_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={Path(output_dir).resolve()}"])
