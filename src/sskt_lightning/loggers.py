"""The run's loggers (``conf/logger/``): the CSV log, always on, plus every ``_target_`` logger the
group adds (W&B, TensorBoard); the experiment's group name; and the checks that must pass before
anything is built (the logger's package installed, W&B credentials for online logging).

Only the standard library, Hydra and OmegaConf at import time (``train.py`` imports it).
"""
from __future__ import annotations

import hashlib
import importlib.util
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import DictConfig

from sskt_lightning.errors import ConfigError

WANDB_GROUP_MAX = 128          # W&B refuses longer group names
CSV_TARGET = "sskt_lightning.runlog.RunCSVLogger"

# Overrides that do not change the experiment: left out of the group (W&B, report).
NOT_IN_GROUP = ("seed=", "paths.", "logger", "hydra.", "hydra/", "trainer.devices", "trainer.accelerator",
                "trainer.num_nodes", "trainer.enable_progress_bar", "data.num_workers", "resume=", "tags=",
                "extras.", "callbacks.progress_bar", "callbacks.lr_monitor", "optimized_metric=")
# Overrides named by the group's first parts already
_NAMED = ("data=", "model=", "method=", "source=")
# Overrides that only matter to methods that use sources (sskt, kd)
_SOURCE_OVERRIDES = ("source.", "source@", "source/")


def group_name(cfg: DictConfig, sources: Sequence[str], overrides: Sequence[str] = (),
               uses_sources: bool | None = None) -> str:
    """The experiment's identity without the seed, so that seeds of one group aggregate (W&B, the
    report): ``data=… model=… method=… sources=…`` plus the other overrides that change the
    experiment, sorted. Overrides of sources are left out for methods that use none (a scratch
    run's group does not name ``source.checkpoint.weights``)."""
    if uses_sources is None:
        uses_sources = bool(sources)
    parts = [f"data={cfg.data.name}", f"model={cfg.model.name}", f"method={cfg.method.name}",
             f"sources={'+'.join(sources) or '-'}"]
    skip = NOT_IN_GROUP + _NAMED + (() if uses_sources else _SOURCE_OVERRIDES)
    parts += sorted(o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(skip))
    return " ".join(parts)


def short_group(group: str, limit: int = WANDB_GROUP_MAX) -> str:
    """``group`` if it fits in ``limit`` characters, else its beginning and ``#`` + 8 hex digits of
    its SHA-1 (so different long groups stay different); the full text stays in the config."""
    if len(group) <= limit:
        return group
    digest = hashlib.sha1(group.encode()).hexdigest()[:8]
    return f"{group[:limit - 10].rstrip()} #{digest}"


# ---------------------------------------------------------------------------- what the group holds
def logger_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """``logger.<name>`` entries that are set (``logger=<option>``, ``+logger.<name>...``)."""
    node = cfg.get("logger")
    if not node:
        return {}
    return {str(k): v for k, v in node.items() if v}


def _target_class(name: str, node) -> type:
    from hydra.utils import get_class
    target = node.get("_target_") if hasattr(node, "get") else None
    if not target:
        raise ConfigError(f"logger.{name} has no _target_: give the logger's class, e.g. "
                          f"logger.{name}._target_=lightning.pytorch.loggers.CSVLogger.")
    try:
        return get_class(str(target))
    except Exception as err:
        raise ConfigError(f"logger.{name}._target_={target}: cannot import it ({err}).") from None


def _is(cls: type, module: str, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith(module) for c in cls.__mro__)


def wandb_mode(node, env: Mapping[str, str] = os.environ) -> str:
    """online | offline | disabled: WANDB_MODE in the environment wins over the config's mode."""
    mode = env.get("WANDB_MODE") or ("offline" if node.get("offline") else None) or node.get("mode") or "online"
    mode = str(mode).lower()
    return "offline" if mode == "dryrun" else mode


def wandb_credentials(env: Mapping[str, str] = os.environ) -> str | None:
    """Where W&B would find an API key, or None: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, a
    netrc entry for the W&B host (NETRC, ~/.netrc, ~/_netrc: what `wandb login` writes), or an
    ``api_key`` in W&B's settings file. Reads files only; no network."""
    if env.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    host = urlsplit(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    candidates = [Path(env["NETRC"]).expanduser()] if env.get("NETRC") else [home / ".netrc", home / "_netrc"]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            entry = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if entry and entry[2]:
            return str(path)
    config_dir = Path(env.get("WANDB_CONFIG_DIR") or home / ".config" / "wandb")
    settings = config_dir / "settings"
    if settings.is_file():
        import configparser
        parser = configparser.ConfigParser()
        try:
            parser.read(settings)
            if parser.get("default", "api_key", fallback=None):
                return str(settings)
        except configparser.Error:
            pass
    return None


# the logger classes the group names, by their `_target_` (checked without importing Lightning)
_KNOWN = {"lightning.pytorch.loggers.WandbLogger": "wandb", "lightning.pytorch.loggers.wandb.WandbLogger": "wandb",
          "lightning.pytorch.loggers.TensorBoardLogger": "tensorboard",
          "lightning.pytorch.loggers.tensorboard.TensorBoardLogger": "tensorboard",
          "lightning.pytorch.loggers.CSVLogger": "other", CSV_TARGET: "other"}


def check_loggers(cfg: DictConfig, env: Mapping[str, str] = os.environ) -> None:
    """Before anything is built: every configured logger importable with its package installed,
    and online W&B logging with credentials. Raises :class:`ConfigError` naming the fix."""
    for name, node in logger_configs(cfg).items():
        kind = _KNOWN.get(str(node.get("_target_")))   # known names: no import of Lightning here
        if kind is None:
            cls = _target_class(name, node)
            kind = ("tensorboard" if _is(cls, "lightning", "TensorBoardLogger") else
                    "wandb" if _is(cls, "lightning", "WandbLogger") else "other")
        if kind == "tensorboard" and not (
                importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
            raise ConfigError(f"logger.{name} (TensorBoard) needs the tensorboard package: "
                              "pip install 'sskt_lightning[tensorboard]' (or leave out logger=tensorboard).")
        if kind != "wandb":
            continue
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"logger.{name} (W&B) needs the wandb package: pip install "
                              "'sskt_lightning[wandb]' (or leave out logger=wandb).")
        mode = wandb_mode(node, env)
        if mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logger.{name}.mode={mode!r} (or WANDB_MODE): must be online, offline or disabled.")
        if mode == "online" and wandb_credentials(env) is None:
            host = urlsplit(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
            raise ConfigError(
                f"W&B logging (logger.{name}) is online, but no W&B API key was found (no WANDB_API_KEY, no entry for "
                f"{host} in ~/.netrc). Either run `wandb login` once (it stores the key in ~/.netrc), "
                "or set WANDB_API_KEY=<your key>, or log offline with WANDB_MODE=offline (or "
                f"logger.{name}.mode=offline; upload later with `wandb sync <run dir>/wandb/offline-run-*`).")


def build_loggers(cfg: DictConfig, output_dir: Path, group: str, config: dict,
                  keep_through_epoch: int | None = None, wandb_run_id: str | None = None) -> list:
    """The CSV log first (always; Lightning's ``trainer.logger``), then the group's other loggers.

    The CSV log always writes ``<run dir>/csv/metrics.csv`` and continues it on resume
    (``keep_through_epoch``); W&B gets the group (shortened to 128 characters, the full text in
    its config), the resolved config, the tags and its mode (WANDB_MODE wins). On resume,
    ``wandb_run_id`` (kept in the checkpoint by ``RunState``) makes W&B continue that run
    (``id=..., resume="allow"``) unless ``logger.<name>.id`` / ``.version`` is set."""
    from hydra.utils import instantiate

    from sskt_lightning.runlog import RunCSVLogger
    csv_logger, others = None, []
    for name, node in logger_configs(cfg).items():
        cls = _target_class(name, node)
        if issubclass(cls, RunCSVLogger):
            csv_logger = instantiate(node, save_dir=str(output_dir), keep_through_epoch=keep_through_epoch)
            continue
        if _is(cls, "lightning", "WandbLogger"):
            mode = wandb_mode(node)
            os.environ["WANDB_MODE"] = mode   # the wandb service started by this process follows it
            same_run = ({"id": wandb_run_id, "resume": "allow"}
                        if wandb_run_id and not (node.get("id") or node.get("version")) else {})
            factory = instantiate(node, _partial_=True, _convert_="all",
                                  group=short_group(str(node.get("group") or group)), mode=mode,
                                  tags=[str(t) for t in (node.get("tags") or [])], **same_run)
            wandb_run_id = None   # one W&B run per checkpoint: the first W&B logger continues it
            # `config` cannot pass through instantiate (its own first parameter's name)
            others.append(factory(config={**config, "group": group}))
        else:
            others.append(instantiate(node, _convert_="all"))
    if csv_logger is None:
        csv_logger = RunCSVLogger(save_dir=str(output_dir), keep_through_epoch=keep_through_epoch)
    return [csv_logger, *others]


def is_wandb(logger) -> bool:
    return _is(type(logger), "lightning", "WandbLogger")


def logger_names(cfg: DictConfig) -> list[str]:
    return list(logger_configs(cfg))
