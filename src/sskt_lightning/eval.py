"""Evaluate a checkpoint: ``python -m sskt_lightning.eval ckpt_path=<ckpt> [data=<dataset>] [split=val]``.

The checkpoint (read with ``torch.load(weights_only=True)`` through :mod:`sskt_lightning.weights`)
says everything about the network (its ``state_dict``: with ``model.ema``, the average of the weights,
which ``eval.json``'s ``weights`` names): its architecture (``model_name`` and ``model.kwargs``), its
classes and the input statistics it was trained with (``data_info``). Only the target network is
rebuilt: frozen sources, auxiliary heads and peers are not needed to evaluate it (and a source's
hub weights are never fetched). The data is the checkpoint's own data config unless ``data=``
chooses another; either way its class count must be the checkpoint's. A checkpoint is a file from
anywhere: its data config only supplies arguments of :class:`ImageDataModule` (any other
``_target_``, or a Hydra key such as ``_target_`` nested in a value, is refused, so the file never
chooses code to run), and it downloads nothing unless ``data_dir=`` names where to. Writes ``eval.json`` into
the run directory (atomically) and returns what it wrote.
"""
from __future__ import annotations

import inspect
import json
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sskt_lightning import weights as W
from sskt_lightning.atomic import atomic_write_text
from sskt_lightning.averaging import describe_checkpoint
from sskt_lightning.compose import CONFIG_DIR
from sskt_lightning.errors import ConfigError, SSKTError, WeightsError
from sskt_lightning.losses import task_loss
from sskt_lightning.metrics import primary_metric
from sskt_lightning.nets.factory import create_network

SPLITS = ("test", "val")
DATA_TARGETS = ("sskt_lightning.data.ImageDataModule", "sskt_lightning.data.datamodule.ImageDataModule")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint of this project (``hyper_parameters`` with ``config``, ``data_info`` and
    ``model_name``), or a :class:`WeightsError` that says what the file is instead."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"ckpt_path={str(path)!r} does not exist. Give a checkpoint written by "
                           "sskt-train: <run dir>/checkpoints/last.ckpt or best-*.ckpt.")
    obj = W.read_file(path)
    if not W.is_project_checkpoint(obj) or "model_name" not in obj["hyper_parameters"]:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(
            f"ckpt_path={str(path)!r} is not a checkpoint of this project (it holds {keys}, not "
            "hyper_parameters with config, data_info and model_name). sskt-eval evaluates the "
            ".ckpt files that sskt-train writes; to use other weights as a source, see "
            "source.<name>.weights.")
    return obj


def build_target(ckpt: dict) -> torch.nn.Module:
    """The checkpoint's target network with its trained weights (strictly loaded)."""
    hp = ckpt["hyper_parameters"]
    info, model_cfg = hp["data_info"], hp["config"].get("model") or {}
    kwargs = model_cfg.get("kwargs") or {}
    try:
        net = create_network(hp["model_name"], int(info["num_classes"]), int(info["in_chans"]),
                             pretrained=False, **kwargs)
    except TypeError as err:     # kwargs the network does not take (another version of its code?)
        raise WeightsError(f"The checkpoint's network {hp['model_name']!r} cannot be rebuilt with its recorded "
                           f"model.kwargs {kwargs}: {err}.") from None
    W.load_into(net, W.extract_state_dict(ckpt), f"the target network {hp['model_name']!r} of the checkpoint")
    return net


def data_config(cfg: DictConfig, ckpt: dict) -> dict:
    """The data config to evaluate on: ``data=`` if given, else the checkpoint's own; normalised
    with the checkpoint's statistics unless the data config sets ``mean``/``std`` itself."""
    trained = ckpt["hyper_parameters"]["data_info"]
    if cfg.get("data") is not None:
        data = OmegaConf.to_container(cfg.data, resolve=True)
    else:
        data = dict(ckpt["hyper_parameters"]["config"].get("data") or {})
        if "_target_" not in data:
            raise ConfigError("The checkpoint records no data config; choose one with data=<dataset> "
                              "(e.g. data=cifar10).")
        if "unlabeled" in data:
            data["unlabeled"] = False   # evaluation reads labelled splits only
    if cfg.get("data_dir"):
        data["data_dir"] = str(cfg.data_dir)
    for key in ("mean", "std"):
        if data.get(key) is None:
            data[key] = list(trained[key])
    return data


def _hydra_keys(value, where: str = "data") -> list[str]:
    """Where ``value`` holds keys Hydra would act on (``_target_``, ``_partial_``, ``_args_`` ...)."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and len(key) > 2 and key.startswith("_") and key.endswith("_"):
                found.append(f"{where}.{key}")
            found += _hydra_keys(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found += _hydra_keys(item, f"{where}[{i}]")
    return found


def recorded_data_module(data: dict, ckpt_path: Path, user_data_dir: bool):
    """The :class:`ImageDataModule` a checkpoint's own data config describes, built directly from
    its arguments: never ``instantiate`` on a file's content (its ``_target_`` could name any
    callable). Downloads only into a ``data_dir=`` the user gave."""
    from sskt_lightning.data import ImageDataModule

    fix = "choose the data yourself with data=<dataset> (e.g. data=cifar10 paths.data_dir=DIR)"
    target = data.get("_target_")
    if target not in DATA_TARGETS:
        raise WeightsError(f"The data config recorded in {ckpt_path} has _target_={target!r}; sskt-eval builds "
                           f"only {DATA_TARGETS[0]} from a checkpoint (a file never chooses code to run): {fix}.")
    args = {k: v for k, v in data.items() if k != "_target_"}
    hydra_keys = _hydra_keys(args)
    if hydra_keys:
        raise WeightsError(f"The data config recorded in {ckpt_path} holds Hydra keys {hydra_keys[:5]}, which a "
                           f"checkpoint of this project never has; refusing to build from it: {fix}.")
    known = set(inspect.signature(ImageDataModule).parameters) - {"self"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise WeightsError(f"The data config recorded in {ckpt_path} has arguments {unknown} that "
                           f"ImageDataModule does not take (another version of this project?): {fix}.")
    if not user_data_dir:
        args["download"] = False
    return ImageDataModule(**args)


def check_data_fits(info: dict, trained: dict) -> None:
    """The evaluation data must have the checkpoint's classes (count and input channels); other
    differences (class names, image size) are allowed but said."""
    if int(info["num_classes"]) != int(trained["num_classes"]):
        raise ConfigError(
            f"The data ({info['name']}) has {info['num_classes']} classes but the checkpoint's network "
            f"was trained on {trained['num_classes']} ({trained.get('name')}). Choose data with the same "
            "classes, e.g. the same data.classes / data.label_map as in training, or leave data= out "
            "to evaluate on the checkpoint's own data.")
    if int(info["in_chans"]) != int(trained["in_chans"]):
        raise ConfigError(f"The data ({info['name']}) has {info['in_chans']}-channel images but the checkpoint's "
                          f"network takes {trained['in_chans']} channels; choose data of the same kind.")
    if bool(info["multi_label"]) != bool(trained.get("multi_label", False)):
        raise ConfigError(f"The data ({info['name']}) and the checkpoint ({trained.get('name')}) differ in "
                          "single- vs multi-label classes; choose data of the same kind.")
    names = trained.get("class_names")
    if names and list(names) != list(info["class_names"]):
        warnings.warn(f"The data's class names {list(info['class_names'])[:5]}... differ from the "
                      f"checkpoint's {list(names)[:5]}...: outputs are compared by index.", stacklevel=2)
    if list(info["image_size"]) != list(trained["image_size"]):
        warnings.warn(f"The data's images are {info['image_size']} px, the checkpoint was trained on "
                      f"{trained['image_size']} px.", stacklevel=2)


class CheckpointClassifier(L.LightningModule):
    """A trained target network, scored with the project's metric for its data
    (``<split>/acc``: accuracy, or mAP for multi-label data) and task loss."""

    def __init__(self, net: torch.nn.Module, data_info: dict):
        super().__init__()
        self.net = net
        self.multi_label = bool(data_info.get("multi_label", False))
        self.metric = primary_metric(data_info)

    def _step(self, batch, stage: str) -> None:
        x, y = batch[0], batch[1]
        logits = self.net(x)
        self.metric.update(logits, y.int() if self.multi_label else y)
        self.log(f"{stage}/loss", task_loss(logits, y, self.multi_label), on_epoch=True, sync_dist=True,
                 batch_size=y.shape[0])
        self.log(f"{stage}/acc", self.metric, on_epoch=True, batch_size=y.shape[0])

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:mod:`sskt_lightning.atomic`), so a reader sees
    either the old file or the whole new one; an object that is not JSON fails before any write."""
    atomic_write_text(path, json.dumps(obj, indent=2))


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``; write and return ``eval.json``'s content."""
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError("ckpt_path is required: sskt-eval ckpt_path=<run dir>/checkpoints/last.ckpt")
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r}: choose one of {list(SPLITS)}.")
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser().resolve()
    ckpt = read_checkpoint(ckpt_path)
    hp = ckpt["hyper_parameters"]
    trained = hp["data_info"]
    net = build_target(ckpt)

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    data = data_config(cfg, ckpt)
    if cfg.get("data") is not None:          # the user's own config: composed by Hydra, trusted
        dm = instantiate(data)
    else:                                     # the checkpoint's: arguments only
        dm = recorded_data_module(data, ckpt_path, user_data_dir=bool(cfg.get("data_dir")))
    dm.setup("test")
    from sskt_lightning.data.datamodule import data_info_of
    info = data_info_of(dm)
    check_data_fits(info, trained)

    module = CheckpointClassifier(net, info)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    dm.split_batch_across(trainer.world_size)
    run = trainer.test if cfg.split == "test" else trainer.validate
    scores = run(module, datamodule=dm, verbose=False)[0]

    result = {
        "ckpt_path": str(ckpt_path), "split": cfg.split, "metric": info["metric"],
        "acc": float(scores[f"{cfg.split}/acc"]), "loss": float(scores[f"{cfg.split}/loss"]),
        "num_samples": int(dm.num_test if cfg.split == "test" else dm.num_val),
        "limit_batches": cfg.trainer.get(f"limit_{cfg.split}_batches"),
        "data": info["name"], "num_classes": info["num_classes"], "class_names": info["class_names"],
        "model": hp["model_name"], "method": (hp["config"].get("method") or {}).get("name"),
        "trained_on": trained.get("name"), "seed": (hp["config"].get("seed")),
        "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"),
        "weights": describe_checkpoint(ckpt),   # "raw", or "ema(0.999, warmup)": model.ema's average
    }
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        write_json_atomic(out / "eval.json", result)
        print(f"{cfg.split} {result['metric']} {result['acc']:.4f} ({result['model']} from {ckpt_path}) "
              f"-> {out / 'eval.json'}")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> float:
    try:
        return evaluate(cfg)["acc"]
    except SSKTError as err:
        print(f"\nerror: {err}\n", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
