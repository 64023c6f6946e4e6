"""Imported once by the protocol's fork server (sskt_lightning.workers): what every training job
imports, so forked jobs start with it done. Imports only: no tensor op, no CUDA, no thread pool."""
import hydra  # noqa: F401
import lightning  # noqa: F401
import omegaconf  # noqa: F401
import torch  # noqa: F401
import torchvision  # noqa: F401

import sskt_lightning.callbacks  # noqa: F401
import sskt_lightning.data.datamodule  # noqa: F401
import sskt_lightning.module  # noqa: F401
import sskt_lightning.train  # noqa: F401

try:                 # a search trial's pruning decision (sskt_lightning.pruning) asks optuna at every validation
    import optuna  # noqa: F401
except ImportError:  # the protocol names the extra itself when it needs it
    pass
