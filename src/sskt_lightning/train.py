"""Entry point: ``python -m sskt_lightning.train model=<net> data=<dataset> method=<name> ...``.

Hydra composes ``conf/train.yaml`` with the config groups; this file only wires the pieces: data
module -> TransferModule -> Trainer (callbacks, loggers) -> fit -> test on the last epoch's weights
-> ``results.json`` in the run directory.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from sskt_lightning.callbacks import ThroughputMeter
from sskt_lightning.errors import SSKTError
from sskt_lightning.module import TransferModule

log = logging.getLogger("sskt_lightning")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
# Overrides that do not change the experiment: left out of the W&B / report group.
_NOT_IN_GROUP = ("seed=", "paths.", "logger", "hydra.", "trainer.devices", "trainer.accelerator",
                 "data.num_workers")


def data_info_of(dm) -> dict:
    """What the model needs to know about the data (and what a checkpoint records of it)."""
    return {"name": dm.name, "num_classes": int(dm.num_classes), "in_chans": int(dm.in_chans),
            "image_size": list(dm.image_size), "mean": list(dm.mean), "std": list(dm.std),
            "multi_label": bool(getattr(dm, "multi_label", False)), "metric": dm.metric,
            "class_names": list(dm.class_names)}


def _task_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed outside @hydra.main (tests, notebooks)
        return []


def group_name(cfg: DictConfig, sources: list[str]) -> str:
    """The experiment's identity without the seed: seeds of one group aggregate (W&B, report)."""
    parts = [f"data={cfg.data.name}", f"model={cfg.model.name}", f"method={cfg.method.name}",
             f"sources={'+'.join(sources) or '-'}"]
    named = ("data=", "model=", "method=", "source=")
    parts += sorted(o.lstrip("+~") for o in _task_overrides()
                    if not o.lstrip("+~").startswith(_NOT_IN_GROUP + named))
    return " ".join(parts)


def build_loggers(cfg: DictConfig, output_dir: Path, group: str, config: dict) -> list:
    loggers = [CSVLogger(save_dir=str(output_dir), name="csv", version="")]
    wandb_cfg = cfg.logger.get("wandb") if cfg.get("logger") else None
    if wandb_cfg:
        from lightning.pytorch.loggers import WandbLogger
        os.environ.setdefault("WANDB_MODE", str(wandb_cfg.get("mode", "online")))
        loggers.append(WandbLogger(
            project=wandb_cfg.project, entity=wandb_cfg.get("entity"), group=group,
            tags=list(wandb_cfg.get("tags") or []), name=wandb_cfg.get("name"),
            save_dir=str(output_dir), mode=os.environ["WANDB_MODE"], config=config))
    return loggers


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; return (and write) its results."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    dm = instantiate(cfg.data)
    dm.setup("fit")  # reads the data now: missing files fail here, before any weights are fetched
    data_info = data_info_of(dm)
    config = OmegaConf.to_container(cfg, resolve=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    module = TransferModule(config, data_info)
    sources = list(module.sources.sources) if module.method.needs_sources else []
    group = group_name(cfg, sources)

    best = ModelCheckpoint(dirpath=output_dir / "checkpoints", monitor="val/acc", mode="max",
                           filename="best-epoch{epoch:03d}-acc{val/acc:.4f}",
                           auto_insert_metric_name=False, save_last=True, save_top_k=1)
    meter = ThroughputMeter()
    loggers = build_loggers(cfg, output_dir, group, config)
    extra = {}
    if cfg.trainer.get("strategy") == "ddp":
        # several optimizers stepped in one step (DML, MAXL): each backward touches only some
        # parameters, which DDP must be told about
        from lightning.pytorch.strategies import DDPStrategy
        extra["strategy"] = DDPStrategy(find_unused_parameters=not module.automatic_optimization)
    callbacks = [best, meter, *(instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers,
                          default_root_dir=str(output_dir), **extra)
    dm.split_batch_across(trainer.world_size)   # data.batch_size is global
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("resume"))
    wall = time.perf_counter() - start
    val_hist = trainer.callback_metrics.get("val/acc")  # the last validation (before test resets it)
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]  # last epoch's weights

    results = {
        "method": module.method.name, "model": module.model_name, "data": data_info["name"],
        "sources": sources, "seed": int(cfg.seed), "epochs": int(trainer.current_epoch),
        "group": group, "test_metric": data_info["metric"],
        "test_acc": float(tested["test/acc"]),
        "best_val_acc": float(best.best_model_score) if best.best_model_score is not None else None,
        "best_val_epoch": _epoch_of(best.best_model_path),
        "last_val_acc": float(val_hist) if val_hist is not None else None,
        "wall_time_s": round(wall, 2), "train_images_per_s": meter.images_per_second,
        "num_train": dm.num_train, "num_val": dm.num_val, "num_test": dm.num_test, "num_unlabeled": dm.num_unlabeled,
        "metrics_csv": "csv/metrics.csv",
        "checkpoints": {"last": _rel(best.last_model_path, output_dir),
                        "best": _rel(best.best_model_path, output_dir)},
        "method_settings": module.method.describe(),
        "overrides": _task_overrides(),
        "extra": {k.replace("/", "_"): float(v) for k, v in tested.items() if k != "test/acc"},
    }
    if trainer.is_global_zero:
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        for lg in loggers[1:]:  # W&B: the results as the run's summary, then close the run
            lg.experiment.summary.update({k: v for k, v in results.items() if not isinstance(v, (dict, list))})
            lg.experiment.save(str(output_dir / "results.json"), base_path=str(output_dir), policy="now")
            lg.experiment.finish()
        log.info("results: test %s %.4f (last epoch), best val %.4f -> %s", results["test_metric"],
                 results["test_acc"], results["best_val_acc"] or float("nan"), output_dir)
    return results


def _epoch_of(path: str) -> int | None:
    name = Path(path).name if path else ""
    return int(name.split("epoch")[1][:3]) if "epoch" in name else None


def _rel(path: str, root: Path) -> str | None:
    return str(Path(path).relative_to(root)) if path else None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and cfg.trainer.get("strategy") == "ddp" and cfg.trainer.get("devices") not in (1, "1"):
        # Lightning's DDP launcher re-runs the command line in each child process: under -m that
        # would start the whole sweep again in every child
        print("\nerror: trainer=ddp cannot run inside a Hydra multirun (-m): Lightning's DDP launcher "
              "re-runs the command line, i.e. the whole sweep, in every process. Run each job as a "
              "single run instead (see README, 'Sweeps with DDP').\n", file=sys.stderr)
        sys.exit(2)
    try:
        return run(cfg)["test_acc"]
    except SSKTError as err:
        if multirun:  # one failed job must not end the sweep
            _record_failure(cfg, err)
            return None
        print(f"\nerror: {err}\n", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if multirun:
            _record_failure(cfg, err)
            return None
        raise


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "failed.txt").write_text("".join(traceback.format_exception(err)))
    log.error("job failed (%s: %s); the sweep goes on. Details: %s", type(err).__name__, err,
              out / "failed.txt")


if __name__ == "__main__":
    main()
