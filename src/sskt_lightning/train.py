"""Entry point: ``python -m sskt_lightning.train model=<net> data=<dataset> method=<name> ...``.

Hydra composes ``conf/train.yaml`` with the config groups; this file only wires the pieces: checks
(:mod:`sskt_lightning.validate`) -> data module -> TransferModule -> Trainer (callbacks, loggers,
safe checkpoint I/O) -> fit -> test on the last epoch's weights -> ``results.json`` in the run
directory, one helper a step (``start_run``, ``build_data``, ``build_module``, ``build_callbacks``,
``build_trainer``, ``fit_and_test``, ``build_results``, ...). A failure writes ``failed.txt`` and a
``results.json`` with ``"status": "failed"`` (:func:`run`, the one wrapper that records it).

Nothing in the package imports this module (``tests/test_imports.py``): what other modules need
lives where it belongs (``CONFIG_DIR`` in :mod:`sskt_lightning.compose`, ``data_info_of`` in
:mod:`sskt_lightning.data`).

Only the standard library, Hydra and OmegaConf are imported at the top: ``--help`` and ``--cfg``
answer without loading torch, Lightning or timm.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sskt_lightning.errors import SSKTError
from sskt_lightning.extras import cluster_launch  # (the launch checks below; tests import it from here too)
from sskt_lightning.records import (  # noqa: F401  (the run's records: light, no torch)
    FAILED,
    RESULTS,
    _one_line,
    _task_overrides,
    optimized_value,
    record_failure,
)

log = logging.getLogger("sskt_lightning")
from sskt_lightning.compose import CONFIG_DIR  # noqa: E402  (conf/, shipped as sskt_lightning.conf)
from sskt_lightning.loggers import (  # noqa: E402  (light: stdlib + omegaconf)
    build_loggers,
    check_loggers,
    is_wandb,
    logger_names,
)
from sskt_lightning.loggers import group_name as _group_name  # noqa: E402



def __getattr__(name: str):
    """Heavy names resolved on first use (``train.TransferModule``), so importing this module
    stays light; tests may replace them with ``monkeypatch.setattr``."""
    if name == "TransferModule":
        from sskt_lightning.module import TransferModule
        return TransferModule
    raise AttributeError(name)


def data_info_of(dm) -> dict:
    """:func:`sskt_lightning.data.data_info_of` (what the model needs to know about the data), under
    its old name here; the data module is where it lives (and nothing in the package imports this
    entry point)."""
    from sskt_lightning.data.datamodule import data_info_of as info_of
    return info_of(dm)


def _choices() -> dict:
    try:
        return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    except ValueError:
        return {}


def group_name(cfg: DictConfig, sources: list[str], uses_sources: bool | None = None) -> str:
    """The experiment's identity without the seed (see :func:`sskt_lightning.loggers.group_name`)."""
    return _group_name(cfg, sources, _task_overrides(), uses_sources)


def instantiate_callbacks(cfg: DictConfig) -> list:
    """The ``callbacks`` group's callbacks (``callbacks.<name>._target_``), in config order. A
    progress bar is left out when ``trainer.enable_progress_bar`` is false."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks.progress import ProgressBar
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if not node:
            continue
        if not node.get("_target_"):
            from sskt_lightning.errors import ConfigError
            raise ConfigError(f"callbacks.{name} has no _target_: give the callback's class "
                              f"(+callbacks.{name}._target_=<module.Class>), or remove it with ~callbacks.{name}.")
        cb = instantiate(node)
        if isinstance(cb, ProgressBar) and cfg.trainer.get("enable_progress_bar") is False:
            continue
        out.append(cb)
    return out


class Interrupted(SSKTError):
    """The run was stopped from outside (SIGTERM: a scheduler's preemption or time limit, ``timeout``,
    ``docker stop``; SIGINT: Ctrl-C) before it finished."""

    def __init__(self, how: str, exit_code: int, cfg: DictConfig):
        ckpt = Path(OmegaConf.select(cfg, "paths.output_dir", default=".") or ".") / "checkpoints" / "last.ckpt"
        self.exit_code = exit_code
        super().__init__(f"the run was interrupted ({how}) before it finished; no results. Continue it with "
                         f"resume={ckpt} (the last checkpoint written), or start it again.")


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; return (and write) its results. A failure is recorded in
    the run directory (``failed.txt``, ``results.json`` with ``status: failed``) and re-raised; so is
    an interruption (SIGTERM, Ctrl-C), as :class:`Interrupted`, whose ``exit_code`` (143 / 130)
    the command line exits with: never 0 for a run that did not finish."""
    try:
        return _run(cfg)
    except Exception as err:
        full = _disk_full(cfg, err)
        if full is not None:   # a write outside atomic_write (the CSV log, a logger's files): one clear error
            _note_unrecorded(full, record_failure(cfg, full))
            raise full from None
        _note_unrecorded(err, record_failure(cfg, err))
        raise
    except BaseException as err:        # SystemExit, KeyboardInterrupt: not a finished run either
        from lightning.pytorch.utilities.exceptions import SIGTERMException
        if isinstance(err, SIGTERMException):
            stop = Interrupted("SIGTERM", 128 + signal.SIGTERM, cfg)
        elif isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and err.code == 1):
            stop = Interrupted("SIGINT / Ctrl-C", 128 + signal.SIGINT, cfg)   # Lightning exits 1 on Ctrl-C
        elif isinstance(err, SystemExit) and err.code in (0, None):
            stop = Interrupted(f"SystemExit({err.code!r}) from inside the run", 1, cfg)
        else:
            record_failure(cfg, RuntimeError(f"the run exited with {type(err).__name__}({getattr(err, 'code', '')!r})"))
            raise
        record_failure(cfg, stop)
        raise stop from None


def _disk_full(cfg: DictConfig, err: Exception):
    """An OutputError for a full disk hidden in ``err`` (an OSError ENOSPC anywhere in its chain that
    no writer of ours explained), else None."""
    if isinstance(err, SSKTError):
        return None
    from sskt_lightning.atomic import explain_os_error, is_disk_full
    found = is_disk_full(err)
    if found is None:
        return None
    where = found.filename or Path(OmegaConf.select(cfg, "paths.output_dir", default=".") or ".") / "(a log file)"
    return explain_os_error(found, where, "writing")


def _note_unrecorded(err: BaseException, problem: str | None) -> None:
    if problem:
        err.unrecorded = problem   # printed with the error: the run directory holds no record of it


def _message(err: BaseException) -> str:
    """The error as the command line prints it, with a word when failed.txt could not be written."""
    problem = getattr(err, "unrecorded", None)
    return f"{err}" + (f"\n(failed.txt and results.json could not be written either: {problem})" if problem else "")


def _run(cfg: DictConfig) -> dict:
    """One run, each step a helper (as lightning-hydra-template's ``train()``): the checks and the
    run directory, the data, the module (with a resume checked against it), callbacks, loggers and
    the trainer, fit and test, the results. :func:`run` records a failure of any step."""
    output_dir = start_run(cfg)
    resume_path, resume_obj = load_resume(cfg, output_dir)
    from sskt_lightning.ranking.auto import choose_sources
    source_ranking = choose_sources(cfg, output_dir)   # source=[auto,...]: cfg.source becomes the top K
    if (cfg.get("extras") or {}).get("quiet_known_noise", True):
        from sskt_lightning.extras import quiet_known_noise
        quiet_known_noise()
    dm = build_data(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    data_info = data_info_of(dm)
    module = build_module(config, data_info)
    from sskt_lightning.methods.base import enable_strong_views
    enable_strong_views(module.method, dm)     # FixMatch's strong views (a ConfigError without data.unlabeled)
    module.method.attach_data(dm)              # state sized by the data, before a resume is checked against it
    keep_through_epoch = wandb_run_id = None
    if resume_obj is not None:
        keep_through_epoch, wandb_run_id = check_resume(cfg, resume_obj, module)
        resume_obj = None                      # Lightning reads the (verified) file itself
    # after the resume checks: a refused resume leaves the run directory's config.yaml as it was
    from sskt_lightning.atomic import atomic_write_text
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(config))
    sources = list(module.sources.sources) if module.method.needs_sources else []
    group = group_name(cfg, sources, uses_sources=module.method.needs_sources)

    loggers = build_loggers(cfg, output_dir, group, config, keep_through_epoch, wandb_run_id)
    callbacks, watch = build_callbacks(cfg, output_dir / "checkpoints")
    trainer = build_trainer(cfg, module, callbacks, loggers, output_dir)
    dm.split_batch_across(trainer.world_size)   # data.batch_size is global
    outcome = fit_and_test(cfg, trainer, module, dm, resume_path, watch, output_dir / "checkpoints")
    results = build_results(cfg, module, dm, data_info, trainer, outcome, watch, group, sources, output_dir)
    if source_ranking is not None:
        results["source_ranking"] = source_ranking
    if trainer.is_global_zero:
        publish_results(results, trainer, output_dir)
    return results


def start_run(cfg: DictConfig) -> Path:
    """What refuses a run before anything is read (the config, the loggers' credentials, the run
    directory), then the run directory made ready: an earlier run's ``failed.txt`` /
    ``results.json`` removed (no longer true), the header logged, stale temporary files of writers
    killed mid-write removed. Returns the run directory."""
    from sskt_lightning.validate import check_output_dir, validate_config
    validate_config(cfg)                       # before any data is read
    check_loggers(cfg)                         # W&B credentials, logger packages: before anything is built
    output_dir = check_output_dir(cfg.paths.output_dir)
    for name in (FAILED, RESULTS):             # from an earlier run in this directory: no longer true
        (output_dir / name).unlink(missing_ok=True)
    _log_header(cfg, output_dir)
    from sskt_lightning.atomic import remove_stale_temps
    for d in (output_dir, output_dir / "checkpoints"):
        remove_stale_temps(d)                  # left by a writer killed mid-write
    return output_dir


def _log_header(cfg: DictConfig, output_dir: Path) -> None:
    """The run's header (and, with ``extras.print_config``, the config tree), on rank 0 only."""
    from sskt_lightning.extras import header, print_config_tree, rank_from_env
    extras = cfg.get("extras") or {}
    if rank_from_env() != 0:
        return
    if extras.get("header", True):
        uses = _uses_sources(cfg)
        srcs = list(cfg.get("source") or []) if uses else []
        log.info(header(cfg, output_dir, _choices(), srcs, logger_names(cfg)))
    if extras.get("print_config"):
        print_config_tree(cfg)


def load_resume(cfg: DictConfig, output_dir: Path) -> tuple[Path | None, dict | None]:
    """``(path, checkpoint)`` of ``resume=`` (read with ``weights_only=True`` and checked before
    anything trains), or ``(None, None)``."""
    if not cfg.get("resume"):
        return None, None
    from sskt_lightning.checkpoints import prepare_resume
    return prepare_resume(str(cfg.resume), output_dir)


def build_data(cfg: DictConfig):
    """The seeded data module, its data read now: missing files fail here, before any weights are
    fetched."""
    import lightning as L
    from hydra.utils import instantiate
    L.seed_everything(cfg.seed, workers=True)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return dm


def build_module(config: dict, data_info: dict):
    """The :class:`~sskt_lightning.module.TransferModule` of the resolved config (``train.TransferModule``:
    tests may replace it)."""
    module_cls = globals().get("TransferModule") or __getattr__("TransferModule")
    return module_cls(config, data_info)


def check_resume(cfg: DictConfig, resume_obj: dict, module) -> tuple[int, str | None]:
    """Refuse a checkpoint that does not fit ``module``; ``(the epoch it ends, its W&B run id)``: the
    CSV log keeps its rows through that epoch and the same W&B run continues."""
    from sskt_lightning.callbacks import RunState
    from sskt_lightning.checkpoints import check_resume_fits
    check_resume_fits(resume_obj, module, cfg.resume)
    return int(resume_obj["epoch"]), RunState.stored_wandb_run_id(resume_obj)


class Watchers:
    """The always-on callbacks :func:`build_results` reads: the last checkpoint, the best validation
    value, the throughput."""

    def __init__(self, ckpt_dir: Path):
        from sskt_lightning.callbacks import BestValidation, ThroughputMeter, last_checkpoint
        self.last, self.meter = last_checkpoint(ckpt_dir), ThroughputMeter()
        self.best = BestValidation("val/acc", "max")


def build_callbacks(cfg: DictConfig, ckpt_dir: Path) -> tuple[list, Watchers]:
    """The always-on callbacks around the ``callbacks`` group's (docs/reliability.md); Lightning
    runs the checkpoint callbacks last in any case."""
    from sskt_lightning.callbacks import EpochMetricsOnEveryRank, QuietFrozenSources, RunState
    watch = Watchers(ckpt_dir)
    quiet = [QuietFrozenSources()] if (cfg.get("extras") or {}).get("quiet_known_noise", True) else []
    # EpochMetricsOnEveryRank first: under DDP every process computes the epoch's values before any
    # callback (the progress bar) reads them on rank 0 alone
    return [EpochMetricsOnEveryRank(), RunState(), *quiet, *instantiate_callbacks(cfg), watch.best, watch.last,
            watch.meter], watch


def build_trainer(cfg: DictConfig, module, callbacks: list, loggers: list, output_dir: Path):
    """``cfg.trainer`` with the callbacks, loggers and the safe checkpoint I/O."""
    from hydra.utils import instantiate

    from sskt_lightning.checkpoints import SafeCheckpointIO
    extra = {}
    if cfg.trainer.get("strategy") == "ddp":
        # several optimizers stepped in one step (DML, MAXL): each backward touches only some
        # parameters, which DDP must be told about
        from lightning.pytorch.strategies import DDPStrategy
        extra["strategy"] = DDPStrategy(find_unused_parameters=not module.automatic_optimization)
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[SafeCheckpointIO()],
                       default_root_dir=str(output_dir), **extra)


def fit_and_test(cfg: DictConfig, trainer, module, dm, resume_path: Path | None, watch: Watchers,
                 ckpt_dir: Path) -> dict:
    """Fit (from ``resume_path`` if given), make sure ``last.ckpt`` holds the final weights, then test
    them (unless ``test=false``). Returns ``wall`` (fit seconds), ``val`` (the last validation
    value), ``tested`` (the test metrics; empty without test) and ``last_path``."""
    import time
    start = time.perf_counter()
    # Lightning reads the verified file through SafeCheckpointIO (weights_only=True, local only)
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume_path) if resume_path else None)
    wall = time.perf_counter() - start
    last_path = ckpt_dir / "last.ckpt"
    if watch.last._last_global_step_saved != trainer.global_step or not last_path.is_file():
        trainer.save_checkpoint(last_path, weights_only=False)   # a full checkpoint (resumable), e.g. when a step
        # budget ends mid-epoch or under fast_dev_run: the weights test measures are on disk
    val_hist = trainer.callback_metrics.get("val/acc")  # the last validation (before test resets it)
    # last epoch's weights = last.ckpt; test=false (a search trial) never reads the test split
    tested = trainer.test(module, datamodule=dm, verbose=False)[0] if cfg.get("test", True) else {}
    return {"wall": wall, "val": val_hist, "tested": tested, "last_path": last_path}


def build_results(cfg: DictConfig, module, dm, data_info: dict, trainer, outcome: dict, watch: Watchers,
                  group: str, sources: list[str], output_dir: Path) -> dict:
    """The content of ``results.json`` (``outcome``: :func:`fit_and_test`'s)."""
    from sskt_lightning.device_slots import assignment
    tested, val_hist = outcome["tested"], outcome["val"]
    return {
        "status": "ok",
        "method": module.method.name, "model": module.model_name, "data": data_info["name"],
        "sources": sources, "seed": int(cfg.seed), "epochs": int(trainer.current_epoch),
        "group": group, "tags": [str(x) for x in (cfg.get("tags") or [])], "test_metric": data_info["metric"],
        "test_acc": float(tested["test/acc"]) if tested else None,
        "weights": module.ema.label if getattr(module, "ema", None) is not None else "raw",   # evaluated (model.ema)
        "best_val_acc": watch.best.best,
        "best_val_epoch": watch.best.epoch,
        "last_val_acc": float(val_hist) if val_hist is not None else None,
        "wall_time_s": round(outcome["wall"], 2), "train_images_per_s": watch.meter.images_per_second,
        "num_train": dm.num_train, "num_val": dm.num_val, "num_test": dm.num_test, "num_unlabeled": dm.num_unlabeled,
        "metrics_csv": "csv/metrics.csv",
        "checkpoints": {"last": _rel(str(outcome["last_path"]), output_dir),
                        "best": _rel(_best_checkpoint_path(trainer), output_dir)},
        "resumed_from": str(cfg.resume) if cfg.get("resume") else None,
        "method_settings": module.method.describe(),
        "compiled": module.compiled,   # networks run through torch.compile (compile.*)
        "model_settings": module.model_settings,   # model.weights (+ sha256) / model.freeze; {} when unset
        "overrides": _task_overrides(),
        "devices": assignment(),   # CUDA_VISIBLE_DEVICES and the GPU slot of a sweep / protocol job
        "extra": {k.replace("/", "_"): float(v) for k, v in tested.items() if k != "test/acc"},
    }


def publish_results(results: dict, trainer, output_dir: Path) -> None:
    """``results.json`` (atomic), W&B's run summary (then the W&B run is closed), the log line."""
    from sskt_lightning.atomic import atomic_write_text
    atomic_write_text(output_dir / RESULTS, json.dumps(results, indent=2))
    # W&B: the results as the run's summary, then close the run (not under fast_dev_run, where
    # Lightning replaced the loggers and no W&B run was started)
    for lg in (lg for lg in trainer.loggers if is_wandb(lg)):
        lg.experiment.summary.update({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
        lg.experiment.save(str(output_dir / RESULTS), base_path=str(output_dir), policy="now")
        lg.experiment.finish()
    log.info("results: test %s %s (last epoch), best val %.4f -> %s", results["test_metric"],
             "not run (test=false)" if results["test_acc"] is None else f"{results['test_acc']:.4f}",
             float("nan") if results["best_val_acc"] is None else results["best_val_acc"], output_dir)


def _uses_sources(cfg: DictConfig) -> bool:
    from sskt_lightning.validate import _method_class
    return bool(getattr(_method_class(cfg), "needs_sources", True))


def _best_checkpoint_path(trainer) -> str | None:
    """The file of the first checkpoint callback that keeps the best validation accuracy, if any
    (``callbacks=none`` has none)."""
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "monitor", None) == "val/acc" and getattr(cb, "best_model_path", None):
            return cb.best_model_path
    return None


def _rel(path: str, root: Path) -> str | None:
    """``path`` relative to the run directory; absolute when it lies elsewhere (a resume into a
    fresh directory keeps the earlier best checkpoint where it is)."""
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def launch_problem(cfg: DictConfig, multirun: bool, run_dir_given: bool, env=os.environ) -> str | None:
    """Why this DDP set-up cannot start, or None.

    * a multirun on one machine (no cluster launcher started it) whose jobs span several nodes
      (``trainer.num_nodes`` > 1): the sweep can start a job's processes on this node only (a
      job with several devices on this node is run by :mod:`sskt_lightning.ddp_launch`);
    * several processes started by torchrun or SLURM for a single run without ``hydra.run.dir``:
      each resolves the default ``${now:...}`` directory on its own and could write elsewhere."""
    launched = cluster_launch(env)
    nodes = cfg.trainer.get("num_nodes", 1)
    if multirun and launched is None and isinstance(nodes, int) and nodes > 1:
        return (f"trainer.num_nodes={nodes} inside a Hydra multirun (-m) that no cluster launcher started: "
                "a sweep on this machine can start each job's processes on this node only. Sweep on a SLURM "
                "cluster with hydra/launcher=submitit_slurm hydra.launcher.nodes=<nodes> "
                "hydra.launcher.tasks_per_node=<devices> (see docs/multi-gpu-and-clusters.md), or use "
                "trainer.num_nodes=1.")
    if launched is not None and not multirun and not run_dir_given:
        launcher, n = launched
        example = "outputs/$SLURM_JOB_ID" if launcher == "SLURM" else "outputs/<run name>"
        return (f"this process is one of {n} started by {launcher}; each resolves the default run "
                "directory (outputs/<date>/<time>) from its own clock, so they could write to different "
                f"directories. Give them one: hydra.run.dir={example}.")
    return None


def own_process_plan(cfg: DictConfig, hydra_cfg, multirun: bool, env=os.environ) -> tuple[bool, int | None]:
    """``(run this multirun job in a process of its own, GPUs per job or None)``: a job of several
    processes (DDP) or one on a GPU slot, in a sweep no cluster launcher started
    (:mod:`sskt_lightning.ddp_launch`)."""
    if not multirun or cluster_launch(env) is not None:
        return False, None
    from sskt_lightning.ddp_launch import several_processes, slot_plan
    per_job = slot_plan(cfg, str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or ""), env)
    return per_job is not None or several_processes(cfg), per_job


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir_given = any(o.split("=")[0].lstrip("+") == "hydra.run.dir" for o in hydra_cfg.overrides.hydra)
    problem = launch_problem(cfg, multirun, run_dir_given)
    if problem:
        print(f"\nerror: {problem}\n", file=sys.stderr)
        sys.exit(2)
    if any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
        logging.captureWarnings(True)   # warnings into the run's log file too (hydra/job_logging=sskt)
    try:
        from sskt_lightning.ddp_launch import check_digest, run_job_in_subprocess
        try:
            check_digest(cfg)                   # a sweep job's process (each rank): the job's config
            own, per_job = own_process_plan(cfg, hydra_cfg, multirun)
            if own:                             # DDP / a GPU slot inside -m: the job as a single run
                return run_job_in_subprocess(cfg, hydra_cfg, per_job)
        except SSKTError as err:                # refused before training (no slot fits, another config)
            record_failure(cfg, err)
            raise
        return optimized_value(cfg, run(cfg))   # run() records a failure in the run directory
    except Interrupted as err:                  # a sweep stops too: it was asked to
        print(f"\nerror: {err}\n", file=sys.stderr)
        sys.exit(err.exit_code)
    except SSKTError as err:
        if multirun:  # one failed job must not end the sweep; the summary at the end lists it
            log.error("job failed: %s; the sweep goes on.", _one_line(err))
            return math.nan
        print(f"\nerror: {_message(err)}\n", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if multirun:
            log.error("job failed (%s); the sweep goes on. Details: %s", _one_line(err),
                      Path(cfg.paths.output_dir) / FAILED)
            return math.nan
        raise


def main() -> float | None:
    """The command line: checks Hydra cannot phrase well first (unknown source configs, an
    unwritable run directory), then Hydra composes and runs :func:`_hydra_main`."""
    from sskt_lightning.validate import command_line
    return command_line(_hydra_main)


if __name__ == "__main__":
    main()
