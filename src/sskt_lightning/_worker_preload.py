"""Imported once by the protocol's fork server (sskt_lightning.workers): what every training job
imports, so forked jobs start with it done. Imports only: no tensor op, no CUDA, no thread pool."""
import hydra  # noqa: F401
import lightning  # noqa: F401
import omegaconf  # noqa: F401
import torch  # noqa: F401
import torchvision  # noqa: F401

import sskt_lightning.callbacks  # noqa: F401
import sskt_lightning.data.datamodule  # noqa: F401
import sskt_lightning.loggers  # noqa: F401
import sskt_lightning.methods  # noqa: F401
import sskt_lightning.module  # noqa: F401
import sskt_lightning.records  # noqa: F401
import sskt_lightning.sources  # noqa: F401
# (not the entry point itself: nothing in the package imports sskt_lightning.train; a job runs it
# as `python -m sskt_lightning.train` would, sskt_lightning.workers)

try:                 # a search trial's pruning decision (sskt_lightning.pruning) asks optuna at every validation
    import optuna  # noqa: F401
except ImportError:  # the protocol names the extra itself when it needs it
    pass
