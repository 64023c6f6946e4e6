"""What a run prints around the training itself (``extras`` in ``conf/train.yaml``).

* :func:`header`: two short lines at the start, what runs and where it writes;
* :func:`print_config_tree`: the resolved config as a rich tree (``extras.print_config=true``);
* :func:`quiet_known_noise`: Lightning's known-harmless messages hidden by their text, never by
  category, so every other warning still shows (``extras.quiet_known_noise=false`` shows all);
* :class:`ConsoleHandler`, :class:`ConsoleFormatter`: the terminal of ``hydra/job_logging=sskt``.

Only the standard library at import time: Hydra's logging set-up imports this module.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence

# Python warnings known to be harmless here, by message (re.match at the start of the text):
KNOWN_NOISE_WARNINGS = (
    # torch's pytree API change, raised inside Lightning's own code, once per run
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # an epoch shorter than log_every_n_steps (trainer=default: 50): it only means fewer per-step
    # rows; every epoch-level row (validation, learning rate) is logged all the same
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)
# Lightning's info lines (logging records) that say nothing about this run:
KNOWN_NOISE_RECORDS = (
    r".*Tip: For seamless cloud",                 # the litlogger / litmodels advertisement
    r"TPU available: ", r"HPU available: ",      # hardware this harness does not use
    r"Seed set to \d+",                           # the header says the seed
)
_NOISY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                  "lightning.fabric.utilities.seed", "lightning.pytorch", "lightning.fabric")


def eval_mode_message(n_modules: int) -> str:
    """The start of Lightning's warning about modules in eval mode, for exactly ``n_modules``."""
    return rf"Found {int(n_modules)} module\(s\) in eval mode at the start of training"


class KnownNoiseFilter(logging.Filter):
    """Drops the records whose message matches :data:`KNOWN_NOISE_RECORDS`."""

    _pattern = re.compile("|".join(f"(?:{p})" for p in KNOWN_NOISE_RECORDS))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self._pattern.match(record.getMessage())
        except Exception:   # a record whose arguments do not format: not ours to judge
            return True


_FILTER = KnownNoiseFilter()


def quiet_known_noise() -> None:
    """Hide the known-harmless messages (see the module docstring); idempotent.

    Also, when the process already has logging configured (Hydra's job logging), removes the
    console handler the ``lightning`` package adds to its own logger on import, which would
    print every Lightning info line a second time."""
    for pattern in KNOWN_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    root = logging.getLogger()
    if root.handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:   # lightning/__init__.py's `_console`
                lightning_logger.removeHandler(handler)


def ignore_eval_mode_warning(n_modules: int) -> None:
    """Hide Lightning's "Found N module(s) in eval mode" for exactly ``n_modules`` (the frozen
    sources): a different count, i.e. other modules in eval mode, still warns."""
    warnings.filterwarnings("ignore", message=eval_mode_message(n_modules))


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever ``sys.stdout`` is at the time of each record, not
    the one it was created with: while the rich progress bar is live it redirects ``sys.stdout``,
    and a log line (a warning, Lightning's "fit stopped") is then printed above the bar instead of
    through it."""

    def __init__(self):
        super().__init__(stream=None)

    @property
    def stream(self):
        import sys
        return sys.stdout

    @stream.setter
    def stream(self, value):   # StreamHandler.__init__ / setStream assign it: always sys.stdout
        pass


class ConsoleFormatter(logging.Formatter):
    """The message alone for INFO and below; ``warning: ...`` / ``error: ...`` above."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message.rstrip()}"
        return message


# ---------------------------------------------------------------------------- the header
def rank_from_env(env: Mapping[str, str] = os.environ) -> int:
    """This process's global rank as the launchers announce it (Lightning's own rule), before any
    Trainer exists: 0 for a single process."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if env.get(key):
            try:
                return int(env[key])
            except ValueError:
                pass
    return 0


def _get(cfg, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        try:
            node = node.get(part) if hasattr(node, "get") else None
        except Exception:
            return default
        if node is None:
            return default
    return node


def _budget(cfg) -> str:
    trainer = cfg.get("trainer") or {}
    if trainer.get("fast_dev_run"):
        return "fast_dev_run"
    steps = trainer.get("max_steps")
    if isinstance(steps, int) and steps > 0:
        return f"{steps} steps"
    epochs = trainer.get("max_epochs")
    return f"{epochs} epoch{'s' if epochs != 1 else ''}"


def header(cfg, output_dir, choices: Mapping[str, str] | None = None,
           sources: Sequence[str] | None = None, loggers: Sequence[str] = ()) -> str:
    """Two lines: what runs (method, model, data, sources, seed, budget, trainer option) and where
    it writes (the run directory and what goes there)."""
    choices = choices or {}
    method = _get(cfg, "method.name", "?")
    parts = [f"method={method}"]
    if sources:
        parts.append(f"sources={','.join(sources)}")
    parts += [f"model={_get(cfg, 'model.name', '?')}", f"data={_get(cfg, 'data.name', '?')}",
              f"seed={cfg.get('seed')}", _budget(cfg)]
    if choices.get("trainer"):
        parts.append(f"trainer={choices['trainer']}")
    if choices.get("experiment"):
        parts.append(f"experiment={choices['experiment']}")
    if choices.get("debug"):
        parts.append(f"debug={choices['debug']}")
    tags = list(cfg.get("tags") or [])
    if tags:
        parts.append(f"tags={','.join(map(str, tags))}")
    logs = ", ".join(["csv/metrics.csv", *[n for n in loggers if n != "csv"]])
    return (f"sskt-train: {' '.join(parts)}\n"
            f"run dir: {output_dir} (results.json, checkpoints/, {logs}, train.log)")


def print_config_tree(cfg, order: Sequence[str] = ("data", "model", "method", "source", "optim", "trainer",
                                                    "callbacks", "logger", "paths", "extras")) -> None:
    """The resolved config as a rich tree, one branch per top-level key (``order`` first)."""
    from omegaconf import OmegaConf
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        value = cfg[key]
        if OmegaConf.is_config(value):
            text = OmegaConf.to_yaml(value, resolve=True)
        else:
            text = str(value)
        branch.add(Syntax(text.rstrip() or "{}", "yaml", theme="ansi_dark", background_color="default"))
    rich_print(tree)


def cluster_launch(env=os.environ) -> tuple[str, int] | None:
    """``(launcher, processes)`` when a cluster launcher started this process as one of several
    (Lightning's detection rules: torchrun sets RANK, GROUP_RANK, LOCAL_RANK and LOCAL_WORLD_SIZE;
    SLURM sets SLURM_NTASKS outside an interactive ``bash``/``interactive`` job), else None. Then
    Lightning joins the processes it finds and starts none itself."""
    if {"RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"} <= set(env):
        n = int(env.get("WORLD_SIZE") or 1)
        return ("torchrun", n) if n > 1 else None
    if env.get("SLURM_NTASKS") and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        n = int(env["SLURM_NTASKS"])
        return ("SLURM", n) if n > 1 else None
    return None
