"""sskt_lightning: knowledge transfer between image classifiers as one Lightning harness.

Importing the package registers the CIFAR-style networks (``cifar_*``) with timm's registry.
"""
from sskt_lightning import nets  # noqa: F401  (registers cifar_* models with timm)

__version__ = "0.1.0"
