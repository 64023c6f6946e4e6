"""sskt_lightning: knowledge transfer between image classifiers as one Lightning harness.

The CIFAR-style networks (``cifar_*``) are registered with timm's registry when
``sskt_lightning.nets`` is imported (every part of the harness that builds a network does so);
the package itself imports nothing heavy, so ``python -m sskt_lightning.train --help`` starts fast.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "nets":   # `sskt_lightning.nets` as an attribute: import (and register) on first use
        import importlib
        return importlib.import_module("sskt_lightning.nets")
    raise AttributeError(name)
