"""A run's records in its directory: ``results.json`` and ``failed.txt`` (what a failed run leaves),
and the value a sweeper optimises. Used by the entry point (:mod:`sskt_lightning.train`) and by the
processes that run it for a sweep (:mod:`sskt_lightning.ddp_launch`); light: no torch."""
from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sskt_lightning.errors import SSKTError
from sskt_lightning.jsonfile import read_object

log = logging.getLogger("sskt_lightning")
RESULTS, FAILED = "results.json", "failed.txt"


def _task_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed outside @hydra.main (tests, notebooks)
        return []


def optimized_value(cfg: DictConfig, results: dict) -> float:
    """What a sweeper optimises: ``cfg.optimized_metric`` (a validation number), never test."""
    value = results.get(cfg.get("optimized_metric") or "best_val_acc")
    return float(value) if value is not None else float("nan")


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def record_failure(cfg: DictConfig, err: BaseException) -> str | None:
    """``failed.txt`` (line 1: the error on one line; then the traceback for unexpected errors) and
    ``results.json`` with ``status: failed`` in the run directory, both atomic; never raises.
    Returns why they could not be written (a full disk, a removed directory), or None."""
    from sskt_lightning.atomic import atomic_write_text
    out = Path(OmegaConf.select(cfg, "paths.output_dir", default=".") or ".")
    detail = "" if isinstance(err, SSKTError) else "\n\n" + "".join(traceback.format_exception(err))
    failure = {"status": "failed", "error": _one_line(err), "error_type": type(err).__name__,
               "method": OmegaConf.select(cfg, "method.name", default=None),
               "model": OmegaConf.select(cfg, "model.name", default=None),
               "data": OmegaConf.select(cfg, "data.name", default=None),
               "seed": OmegaConf.select(cfg, "seed", default=None),
               "overrides": _task_overrides(), "failed_txt": FAILED}
    try:
        atomic_write_text(out / FAILED, _one_line(err) + "\n" + detail)
        if _finished_results(out / RESULTS):
            # refused before this run began (a bad option, a bad resume=) in a finished run's directory:
            # that run's results stay; failed.txt says what was refused
            log.error("%s keeps the finished run's results; this attempt's failure is in %s", out / RESULTS,
                      out / FAILED)
        else:
            atomic_write_text(out / RESULTS, json.dumps(failure, indent=2, default=str))
    except Exception as write_err:   # e.g. the run directory itself is the problem
        log.error("could not record the failure in %s: %s", out, write_err)
        unrecorded = str(write_err)
    else:
        unrecorded = None
    try:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish(exit_code=1)
    except Exception as wandb_err:   # never raises: the run's own error is the one to report
        log.error("could not close the W&B run: %s", wandb_err)
    return unrecorded


def _finished_results(path: Path) -> bool:
    return (read_object(path) or {}).get("status") == "ok"
