"""sskt_lightning: knowledge transfer between image classifiers as one Lightning harness.

The package itself imports nothing heavy, so ``python -m sskt_lightning.train --help`` starts
fast. The names below are imported on first use (``from sskt_lightning import TransferModule``).

The CIFAR-style networks (``cifar_*``) are registered with timm's registry when
``sskt_lightning.nets`` is imported: ``import sskt_lightning.nets`` (or any import that builds a
network: ``TransferModule``, ``sskt_lightning.nets.factory``, ...). ``import sskt_lightning``
alone does not register them, as that would load torch and timm.
"""

__version__ = "0.1.0"

_LAZY = {
    "TransferModule": "sskt_lightning.module",
    "ImageDataModule": "sskt_lightning.data",
    "data_module": "sskt_lightning.options",
}
# ModelOptions, SourceOptions, OptimOptions and each method's <Class>Options (SSKTOptions, KDOptions,
# ...) come from sskt_lightning.options


def __dir__():
    return sorted([*globals(), "nets", *_LAZY, "ModelOptions", "SourceOptions", "OptimOptions"])


def __getattr__(name: str):
    import importlib
    if name == "nets":   # `sskt_lightning.nets` as an attribute: import (and register) on first use
        return importlib.import_module("sskt_lightning.nets")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name.endswith("Options") and not name.startswith("_"):
        return getattr(importlib.import_module("sskt_lightning.options"), name)
    raise AttributeError(f"module 'sskt_lightning' has no attribute {name!r}")
