"""Where the Hydra configs live, and composing them outside the command line (experiments, tests,
notebooks).

The configs are edited in the repository's top-level ``conf/`` and ship inside the package as
``sskt_lightning.conf`` (pyproject.toml maps ``conf/`` there at build time), so an installed wheel
and a source checkout run the same configs. In Hydra's own terms the shipped copy is
``pkg://sskt_lightning.conf``.
"""
from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sskt_lightning.errors import ConfigError

CONFIG_PACKAGE = "sskt_lightning.conf"


def config_dir() -> Path:
    """The directory of ``train.yaml`` and the config groups.

    A source checkout (``src/sskt_lightning`` beside ``pyproject.toml`` and ``conf/``: an editable
    install, or ``PYTHONPATH=src``) uses its own ``conf/``, so edits there take effect at once and
    the configs always match the code that imports them. An installed package uses the copy it
    ships (``sskt_lightning/conf`` in site-packages). Both are the same files.
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "conf" / "train.yaml").is_file():
        return root / "conf"
    try:
        shipped = Path(str(importlib.resources.files(CONFIG_PACKAGE)))
    except ModuleNotFoundError:
        shipped = None
    if shipped is None or not (shipped / "train.yaml").is_file():
        raise ConfigError(
            f"The Hydra configs of sskt_lightning are missing: no {CONFIG_PACKAGE} package with a "
            f"train.yaml next to {Path(__file__).parent}. Reinstall the package (`pip install "
            "sskt_lightning`, or `pip install -e .` in a checkout) so that conf/ is shipped with it.")
    return shipped


CONFIG_DIR = str(config_dir())


def compose_config(overrides: Sequence[str], output_dir: str | Path, config_name: str = "train") -> DictConfig:
    """The config ``python -m sskt_lightning.<config_name> <overrides>`` would run (``train`` or
    ``eval``), writing to ``output_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=[*overrides, f"paths.output_dir={Path(output_dir).resolve()}"])
