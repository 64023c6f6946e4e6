"""Typed options: build a :class:`~sskt_lightning.module.TransferModule` from Python without
free-form dicts or Hydra override strings.

    from sskt_lightning import TransferModule, SSKTOptions, SourceOptions, OptimOptions, data_module

    dm = data_module("cifar10", data_dir="data", batch_size=128)
    module = TransferModule.from_options(
        data=dm, model="resnet20", method=SSKTOptions(alpha=0.5, temperature=2.0),
        sources=[SourceOptions("imagenet_resnet18")], optim=OptimOptions(lr=0.05))

Each call builds the config the command line would build: the packaged config groups are composed
(``model=``, ``method=``, ``source=[...]``, ``optim=``, ``data=``) and the options given are set on
them, then checked like a command line (:func:`sskt_lightning.validate.validate_config`). The
method dataclasses are made from the method classes' constructors (:func:`method_options`), whose
defaults the packaged method configs carry (a test over ``conf/method/`` keeps them equal). A
misspelt option is a :class:`~sskt_lightning.errors.ConfigError` that names the valid ones. The
result is a plain dict, so checkpoints stay loadable with ``torch.load(weights_only=True)``.

This module imports only the standard library, Hydra and OmegaConf; the method options import the
methods (and torch) when first used.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from omegaconf import OmegaConf, open_dict

from sskt_lightning.errors import ConfigError

# and one <Class>Options per method (SSKTOptions, KDOptions, ...: module __getattr__, made on first use)
__all__ = ["ModelOptions", "SourceOptions", "OptimOptions", "MethodOptions", "method_options", "build_config",
           "data_module", "data_info_from"]


def _unknown(where: str, given: Sequence[str], known: Sequence[str]) -> ConfigError:
    hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
             for k in given]
    return ConfigError(f"{where}: unknown option(s) {', '.join(hints)}; known: {', '.join(known)}.")


def _refuse_unknown(cls):
    """A dataclass whose constructor turns an unknown keyword into a :class:`ConfigError`."""
    init, known = cls.__init__, [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            raise _unknown(cls.__name__, unknown, known)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _options(cls=None, *, kw_only: bool = True):
    """``@dataclass`` whose constructor turns an unknown keyword into a :class:`ConfigError`."""
    def wrap(cls):
        return _refuse_unknown(dataclasses.dataclass(cls, kw_only=kw_only))
    return wrap if cls is None else wrap(cls)


# ---------------------------------------------------------------------------------------- model
@_options(kw_only=False)
class ModelOptions:
    """The target network (``conf/model/``).

    ``name``: a model config (``resnet20``, ``vgg16``, ... as in ``model=<name>``), or any timm name
    (``resnet50.tv_in1k``, ``cifar_wrn40_2``), or ``torchvision.<arch>`` (``model=timm
    model.name=<name>``). ``kwargs``: passed to the network's constructor (e.g. ``{"shortcut": "B"}``).
    """
    name: str = "resnet20"
    pretrained: bool = False
    kwargs: dict = dataclasses.field(default_factory=dict)
    weights: str | None = None      # model.weights: a local file to start from (fine-tuning)
    freeze: str | None = None       # model.freeze: None or "backbone" (train the classifier only)
    ema: float | None = None        # model.ema: the decay of the evaluated weight average (None: off)
    ema_warmup: bool = True         # model.ema_warmup: decay min(ema, (1 + n) / (10 + n)) at update n
    ema_bn: str = "average"         # model.ema_bn: the average's BatchNorm statistics, average | recompute
    ema_bn_images: int = 1024       # model.ema_bn_images: images model.ema_bn=recompute uses


# --------------------------------------------------------------------------------------- methods
class MethodOptions:
    """Base of the typed options of every method: ``<Class>Options`` (``SSKTOptions``,
    ``KDOptions``, ``DMLOptions``, ``MAXLOptions``, ``ScratchOptions``, and one for each method added
    later) is a dataclass made from the method class's constructor: one keyword field per argument,
    with its default (the packaged ``conf/method/<name>.yaml`` carries the same defaults; a test
    over ``conf/method/`` keeps them equal). ``config``: the method config it sets
    (``method=<config>``). Built on first use (:func:`method_options`), so importing this module
    does not import torch."""
    config: ClassVar[str]
    method_class: ClassVar[type]


def _fresh(value: Any) -> Any:
    """A new copy of a default for every options object: tuples as lists, mappings as dicts."""
    if isinstance(value, (list, tuple)):
        return [_fresh(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _fresh(v) for k, v in value.items()}
    return value


def _doc(method_cls, params) -> str:
    summary = inspect.getdoc(method_cls) or ""
    if summary == inspect.getdoc(method_cls.__mro__[1]):   # inherited: say nothing
        summary = ""
    module = inspect.getmodule(method_cls)
    if not summary and module is not None and module.__doc__:
        summary = module.__doc__.strip()
    paragraphs = summary.split("\n\n")
    summary = paragraphs[0]
    for more in paragraphs[1:3]:   # a paragraph that announces a formula: keep the formula
        if not summary.rstrip().endswith(":"):
            break
        summary += "\n\n" + more
    lines = [f"    {p.name}: {p.annotation if p.annotation is not p.empty else 'Any'}"
             + ("" if p.default is p.empty else f" = {_fresh(p.default)!r}") for p in params]
    return (f"``method={method_cls.name}`` (:class:`{method_cls.__module__}.{method_cls.__qualname__}`; "
            f"``conf/method/{method_cls.name}.yaml``).\n\n{summary}\n\nOptions (the constructor's "
            "arguments, ``method.<option>=`` on the command line)::\n\n" + "\n".join(lines or ["    (none)"]))


_MADE: dict[type, type] = {}


def method_options(method_cls) -> type:
    """The options dataclass of a :class:`~sskt_lightning.methods.Method` subclass, made from its
    constructor's signature (its one source of truth): ``method_options(SSKT)`` is ``SSKTOptions``."""
    if method_cls in _MADE:
        return _MADE[method_cls]
    params = [p for p in inspect.signature(method_cls.__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    fields = []
    for p in params:
        kind = p.annotation if p.annotation is not p.empty else Any
        if p.default is p.empty:
            fields.append((p.name, kind))
        elif isinstance(p.default, (list, tuple, Mapping)):
            fields.append((p.name, kind, dataclasses.field(default_factory=functools.partial(_fresh, p.default))))
        else:
            fields.append((p.name, kind, dataclasses.field(default=p.default)))
    name = f"{method_cls.__name__}Options"
    cls = dataclasses.make_dataclass(name, fields, bases=(MethodOptions,), kw_only=True, namespace={
        "config": method_cls.name, "method_class": method_cls, "__doc__": _doc(method_cls, params),
        "__module__": __name__, "__qualname__": name})
    _MADE[method_cls] = _refuse_unknown(cls)
    return cls


def _method_classes() -> dict[str, type]:
    """``<Class>Options`` name -> method class, for every method of ``sskt_lightning.methods``."""
    from sskt_lightning.methods import Method
    return {f"{c.__name__}Options": c for c in Method.registry.values()
            if c.__module__.startswith("sskt_lightning.methods.")}


def __getattr__(name: str):
    if name.endswith("Options") and not name.startswith("_"):
        classes = _method_classes()
        if name in classes:
            made = method_options(classes[name])
            globals()[name] = made
            return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_method_classes()])


# --------------------------------------------------------------------------------- sources, optim
@_options(kw_only=False)
class SourceOptions:
    """One source: ``config`` is a source config (``imagenet_resnet50``, ``checkpoint``, ``timm``,
    ``paper/places365_resnet50``, ... as in ``source=[<config>]``); every other field left at
    ``None`` keeps that config's value (see docs/configuration.md, sources)."""
    config: str
    name: str | None = None
    pretrained: bool | None = None
    weights: str | None = None
    url: str | None = None
    num_classes: int | None = None
    strip_prefix: list | None = None
    mean: list | None = None
    std: list | None = None
    in_chans: int | None = None
    input_size: int | None = None
    adapter: str | None = None
    scale_factor: float | None = None


_OPTIMIZER_FIELDS = ("lr", "momentum", "weight_decay", "nesterov")


@_options(kw_only=False)
class OptimOptions:
    """The target's optimizer and schedule: ``config`` is an optim config (``sgd``: SGD 0.1, momentum
    0.9, wd 5e-4, x``gamma`` at ``fractions`` of ``max_epochs``; ``sgd_cosine``: the same SGD, a
    linear ``warmup`` (a fraction of all steps, or a number of steps) then cosine decay to
    ``min_lr_ratio`` x lr, stepped per step; ``maxl``: x``gamma`` every ``step_size`` epochs). Fields
    left at ``None`` keep the config's value, except ``max_epochs``: ``None`` takes the Trainer's
    ``max_epochs`` when the optimizers are configured. A field the schedule does not have is an error."""
    config: str = "sgd"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    nesterov: bool | None = None
    max_epochs: int | None = None
    fractions: list | None = None
    gamma: float | None = None
    step_size: int | None = None
    warmup: float | None = None
    min_lr_ratio: float | None = None


# ------------------------------------------------------------------------------------ the config
def _group_options(group: str) -> list[str]:
    from sskt_lightning.validate import group_options
    return group_options(group)


def _choose(group: str, name: str) -> str:
    known = _group_options(group)
    if name not in known:
        close = difflib.get_close_matches(name, known, 3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"There is no {group} config {name!r}.{hint} Known: {', '.join(known)}.")
    return name


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def build_config(*, method: MethodOptions | str, model: ModelOptions | str = "resnet20",
                 sources: Sequence[SourceOptions | str] = (), optim: OptimOptions | str = "sgd",
                 channels_last: bool = False, data_config: Mapping | None = None) -> dict:
    """The config (a plain dict) that :class:`TransferModule` takes: ``model``, ``method``,
    ``source``, ``optim``, ``channels_last`` (and ``data`` when ``data_config`` is given), composed
    from the packaged configs as the command line composes them. See :meth:`TransferModule.from_options`."""
    from hydra.utils import get_class

    from sskt_lightning.compose import compose_config
    from sskt_lightning.validate import validate_config

    model = ModelOptions(model) if isinstance(model, str) else model
    optim = OptimOptions(optim) if isinstance(optim, str) else optim
    sources = [SourceOptions(s) if isinstance(s, str) else s for s in sources]
    for what, value, kind in (("model", model, ModelOptions), ("optim", optim, OptimOptions)):
        if not isinstance(value, kind):
            raise ConfigError(f"{what}= takes a {kind.__name__} or a config name, not {type(value).__name__}.")
    for s in sources:
        if not isinstance(s, SourceOptions):
            raise ConfigError(f"sources= takes SourceOptions or source config names, not {type(s).__name__}.")
    if isinstance(method, str):
        method_name, method_values = _choose("method", method), {}
    elif dataclasses.is_dataclass(method) and isinstance(method, MethodOptions):
        method_name, method_values = type(method).config, dataclasses.asdict(method)
    else:
        raise ConfigError(f"method= takes {', '.join(sorted(_method_classes(), key=lambda n: (n != 'SSKTOptions', n)))} or a "
                          f"method config name (e.g. 'paper/sskt'), not {type(method).__name__}.")

    model_group = model.name if model.name in _group_options("model") else "timm"
    overrides = [f"model={model_group}", f"method={method_name}", f"optim={_choose('optim', optim.config)}",
                 f"source=[{','.join(_choose('source', s.config) for s in sources)}]"]
    cfg = compose_config(overrides, output_dir=".")

    with open_dict(cfg):
        if model_group == "timm":
            cfg.model.name = model.name
        cfg.model.pretrained, cfg.model.kwargs = bool(model.pretrained), _plain(dict(model.kwargs))
        cfg.model.weights = None if model.weights is None else str(model.weights)
        cfg.model.freeze, cfg.model.ema = model.freeze, model.ema
        cfg.model.ema_warmup = bool(model.ema_warmup)
        cfg.model.ema_bn, cfg.model.ema_bn_images = model.ema_bn, model.ema_bn_images
        for key, value in method_values.items():
            cfg.method[key] = _plain(value)
        _set_optim(cfg, optim)
        keys = list(cfg.get("source") or {})
        if len(keys) != len(sources):
            raise ConfigError(f"sources={[s.config for s in sources]} name the source {keys} more than once: "
                              "each source config must have its own name.")
        for key, opts in zip(keys, sources):
            for f in dataclasses.fields(opts):
                value = getattr(opts, f.name)
                if f.name != "config" and value is not None:
                    cfg.source[key][f.name] = _plain(value)
        cfg.channels_last = bool(channels_last)

    needs_sources = bool(getattr(get_class(cfg.method._target_), "needs_sources", False))
    if needs_sources and not sources:
        raise ConfigError(f"method {method_name!r} needs sources: e.g. sources=[SourceOptions('imagenet_resnet50')] "
                          "(or SourceOptions('checkpoint', weights='<run>/checkpoints/last.ckpt')).")
    if sources and not needs_sources:
        raise ConfigError(f"method {method_name!r} uses no sources; leave sources= out.")
    for key, opts in zip(cfg.get("source") or {}, sources):
        missing = [k for k in cfg.source[key] if OmegaConf.is_missing(cfg.source[key], k)]
        if missing:
            raise ConfigError(f"SourceOptions({opts.config!r}) needs {', '.join(f'{k}=...' for k in missing)} "
                              "(the config has no default for it).")
    validate_config(cfg)

    out = {key: OmegaConf.to_container(cfg[key], resolve=True)
           for key in ("model", "method", "optim") if cfg.get(key) is not None}
    out["source"] = OmegaConf.to_container(cfg.source, resolve=True) if cfg.get("source") else {}
    out["channels_last"] = bool(channels_last)
    if data_config is not None:
        out["data"] = _plain(dict(data_config))
    return out


def _set_optim(cfg, optim: OptimOptions) -> None:
    sched = cfg.optim.get("scheduler")
    for f in dataclasses.fields(optim):
        value = getattr(optim, f.name)
        if f.name == "config" or (value is None and f.name != "max_epochs"):
            continue
        if f.name in _OPTIMIZER_FIELDS:
            cfg.optim.optimizer[f.name] = value
        elif sched is not None and f.name in sched:
            sched[f.name] = _plain(value)
        elif value is not None:
            raise ConfigError(f"OptimOptions({optim.config!r}) has no {f.name}: the {optim.config!r} schedule "
                              f"takes {', '.join(k for k in (sched or {}) if not k.startswith('_'))}.")


# ---------------------------------------------------------------------------------------- data
def data_module(name: str = "cifar10", **options: Any):
    """The :class:`~sskt_lightning.data.ImageDataModule` that ``data=<name> data.<key>=<value> ...``
    gives on the command line: the packaged data config's defaults, then ``options`` (any argument
    of ``ImageDataModule``). The config is kept as ``dm.data_config``; :meth:`TransferModule.from_options`
    records it in the module's config, so ``sskt-eval`` finds the data of its checkpoints."""
    from hydra.utils import instantiate

    from sskt_lightning.compose import compose_config
    from sskt_lightning.data import ImageDataModule

    params = [p for p in inspect.signature(ImageDataModule).parameters if p != "self"]
    unknown = [k for k in options if k not in params]
    if unknown:
        raise _unknown(f"data_module({name!r})", unknown, params)
    cfg = compose_config([f"data={_choose('data', name)}"], output_dir=".")
    with open_dict(cfg):
        for key, value in options.items():
            cfg.data[key] = _plain(value)
    data_config = OmegaConf.to_container(cfg.data, resolve=True)
    dm = instantiate(data_config)
    dm.data_config = data_config
    return dm


def data_info_from(data) -> tuple[dict, dict | None]:
    """``(data_info, data config or None)`` from a data module (set up here if it was not) or a
    ``data_info`` dict."""
    if isinstance(data, Mapping):
        required = ("num_classes", "in_chans", "image_size", "mean", "std")
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"data= as a dict is a data_info ({', '.join(required)}, ...); it lacks {missing}. "
                              "Pass the data module instead.")
        return dict(data), None
    from sskt_lightning.data.datamodule import data_info_of
    if not all(hasattr(data, k) for k in ("num_classes", "in_chans", "image_size", "mean", "std", "class_names")):
        raise ConfigError(f"data= takes a data module of this project (ImageDataModule, e.g. from data_module()) "
                          f"or a data_info dict, not {type(data).__name__}.")
    return data_info_of(data), getattr(data, "data_config", None)
