"""Checks that refuse a run before anything is read or trained (stdlib + hydra/omegaconf only).

* :func:`preflight` looks at the command line before Hydra composes it: unknown source configs
  (``source=[nosuch]`` lists the available ones, as ``model=nosuch`` does) and an output directory
  that cannot be written (under a file, read-only), which Hydra would otherwise meet with a traceback.
* :func:`validate_config` checks the composed config: unknown top-level keys (``++resum=...``),
  values that cannot be right (a non-positive learning rate or epoch count, a non-integer seed;
  the method's options through its class's own check, ``Method.check_options``: temperature <= 0,
  negative alpha, KD's alpha > 1, ...), required options left unset
  (``source.checkpoint.weights``), the metric a sweeper optimises, and a writable run directory.
"""
from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sskt_lightning.errors import ConfigError, OutputError

_NO_RUN_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
                 "--version", "--resolve")


# ---------------------------------------------------------------------------- config groups
def _config_dir() -> Path:
    # one definition of where the configs live
    from sskt_lightning.compose import CONFIG_DIR
    return Path(CONFIG_DIR)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (_config_dir() / group).glob("*.yaml"))


def known_top_level_keys() -> set[str]:
    """The keys ``conf/train.yaml`` defines, plus one per config group directory and one per package a
    group's file names in its header (``conf/ranking/*.yaml``: ``# @package rank``)."""
    config_dir = _config_dir()
    root = OmegaConf.load(config_dir / "train.yaml")
    keys = {k for k in root if k not in ("defaults", "hydra")}
    groups = [p for p in config_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    keys |= {p.name for p in groups}
    for group in groups:
        for f in group.glob("*.yaml"):
            first = f.read_text().split("\n", 1)[0]
            if first.startswith("# @package "):
                top = first[len("# @package "):].strip().split(".")[0]
                if top and not top.startswith("_"):
                    keys.add(top)
    return keys


# ---------------------------------------------------------------------------- the command line
def _source_names(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _source_names(v)]
    return []


def _writable_location(path: Path) -> str | None:
    """Why ``path`` (a directory that may not exist yet) cannot be written, or None."""
    path = Path(os.path.abspath(path))
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{path} lies under {probe}, which is a file, not a directory"
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".sskt-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        return f"{probe} is not writable ({os.strerror(err.errno) if err.errno else err})"
    return None


def command_line(hydra_main):
    """Run a Hydra entry point as a command: :func:`preflight` on ``sys.argv`` first (an unknown
    source config, an unwritable run directory: one line and exit code 2, not Hydra's traceback),
    then ``hydra_main()`` (sskt-train, sskt-rank)."""
    import sys

    from sskt_lightning.errors import SSKTError
    try:
        preflight(sys.argv[1:])
    except SSKTError as err:
        print(f"\nerror: {err}\n", file=sys.stderr)
        sys.exit(2)
    return hydra_main()


def preflight(argv: Sequence[str]) -> None:
    """Raise :class:`ConfigError` / :class:`OutputError` for what Hydra would report with a traceback."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    args = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:   # Hydra reports syntax errors itself
        return
    available = group_options("source")
    for o in overrides:
        if o.key_or_group != "source" or o.package is not None or o.is_delete():
            continue
        values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        unknown = [n for v in values for n in _source_names(v) if n not in available]
        if unknown:
            raise ConfigError(f"source: no config named {sorted(set(unknown))} in {_config_dir() / 'source'}. "
                              f"Available: {available} (source=[a,b] picks several; a timm model by name: "
                              "source=[timm] source.timm.name=<model>).")
    if any(a.split("=")[0] in _NO_RUN_FLAGS or a in _NO_RUN_FLAGS for a in argv):
        return
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o.value() for o in overrides if o.key_or_group == key and isinstance(o.value(), str)]
    target = Path(given[-1]) if given and "${" not in given[-1] else Path.cwd() / ("multirun" if multirun else "outputs")
    problem = _writable_location(target)
    if problem:
        raise OutputError(f"Cannot write the run directory: {problem}. Choose a writable one with "
                          f"{key}=<dir>.")


# ---------------------------------------------------------------------------- the composed config
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _method_class(cfg: DictConfig):
    target = cfg.method.get("_target_") if cfg.get("method") else None
    if not target:
        return None
    from hydra.utils import get_class
    try:
        return get_class(target)
    except Exception:
        return None


def check_step_budget(method, max_steps, name: str | None = None) -> None:
    """Refuse ``trainer.max_steps`` for a method that steps several optimizers per batch (DML, MAXL):
    Lightning counts every optimizer step, so the run would stop after a fraction of the batches with
    its step schedule placed for the wrong length."""
    if getattr(method, "automatic_optimization", True) or max_steps is None or max_steps < 1:
        return
    name = name or getattr(method, "__name__", type(method).__name__)
    raise ConfigError(f"trainer.max_steps={max_steps} cannot budget method={name}: it steps several optimizers per "
                      "batch and Lightning counts each as a step, so it would train max_steps / <optimizers> "
                      "batches, its schedule placed for another length. Give the budget in batches, the same for "
                      "every method: data.steps_per_epoch=K with trainer.max_epochs=E (K x E batches).")


def validate_config(cfg: DictConfig) -> None:
    """Refuse what cannot be right, before any data is read (see the module docstring)."""
    known = known_top_level_keys()
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                 for k in unknown]
        raise ConfigError(f"Unknown top-level option(s): {', '.join(hints)}. Known: {sorted(known)}. "
                          "A mistyped option would otherwise be ignored silently.")

    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed={seed!r}: must be an integer (e.g. seed=0).")

    trainer = cfg.get("trainer") or {}
    max_steps, max_epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if max_steps is None or max_steps == -1:
        if not _is_number(max_epochs) or int(max_epochs) != max_epochs or max_epochs < 1:
            raise ConfigError(f"trainer.max_epochs={max_epochs!r}: must be an integer >= 1 (or set "
                              "trainer.max_steps to a positive step budget; -1 would train forever, "
                              "0 would report an untrained network).")
    elif not _is_number(max_steps) or int(max_steps) != max_steps or max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps!r}: must be an integer >= 1 (or -1 / null: "
                          "use trainer.max_epochs).")

    optimizer = (cfg.get("optim") or {}).get("optimizer") or {}
    lr = optimizer.get("lr")
    if lr is not None and (not _is_number(lr) or lr <= 0):
        raise ConfigError(f"optim.optimizer.lr={lr!r}: the learning rate must be a number > 0.")

    metric = cfg.get("optimized_metric")
    if metric is not None and (not isinstance(metric, str) or metric.startswith("test")):
        raise ConfigError(f"optimized_metric={metric!r}: a sweeper must optimise a validation number "
                          "(best_val_acc or last_val_acc), never a test one.")

    method_cls = _method_class(cfg)
    name = (cfg.get("method") or {}).get("name")
    if method_cls is not None and hasattr(method_cls, "check_options"):
        # the method's own checks (its constructor: temperature > 0, alpha's range, cache mode, ...)
        method_cls.check_options(OmegaConf.to_container(cfg.method, resolve=True))
    check_step_budget(method_cls, max_steps, name)
    from sskt_lightning.compiling import check_compile_options
    check_compile_options(cfg.get("compile"), method_cls)
    from sskt_lightning.averaging import check_ema_bn, check_ema_options
    check_ema_options(cfg.get("model"))
    check_ema_bn(cfg.get("model"))

    needs_sources = getattr(method_cls, "needs_sources", True)
    for key in OmegaConf.missing_keys(cfg):
        if key.startswith("source.") and not needs_sources:
            continue
        if key.startswith(("hydra.", "paths.output_dir")):
            continue
        example = {"source.checkpoint.weights": "=outputs/<date>/<time>/checkpoints/last.ckpt",
                   "source.timm.name": "=resnet50"}.get(key, "=<value>")
        raise ConfigError(f"{key} is required (it has no default): pass {key}{example}.")


def check_output_dir(path: str | Path) -> Path:
    """Create the run directory and prove it takes a file; :class:`OutputError` otherwise."""
    path = Path(path)
    problem = _writable_location(path)
    if problem is None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = f"{path} cannot be created ({os.strerror(err.errno) if err.errno else err})"
    if problem is None:
        problem = _writable_location(path)
    if problem:
        raise OutputError(f"Cannot write the run directory: {problem}. Choose a writable one with "
                          "hydra.run.dir=<dir> (hydra.sweep.dir for -m).")
    return path
